"""The store's default as a library feature: FloorRatios (the floor and the manual ratios above
it) in the store's config, and the learned map per feature (``project=True``) on the modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fiited_store import ConfigError, EmbeddingStore, FloorRatios, ManualRatios, StoreConfig, TableConfig
from fiited_store.adapters import FiitedEmbeddingBag, FiitedEmbeddingBagCollection, JaggedFeatures
from fiited_store.config import floor_budget_ratio


def _tables(dim=32, chunks=2, rows=(300, 200)):
    return [TableConfig(f"t{i}", dim=dim, chunks=chunks, num_embeddings=n) for i, n in enumerate(rows)]


def test_floor_ratios_give_each_table_its_floor_and_the_ratios_above_it():
    tables, cfg = FloorRatios(0.75).resolve(_tables(), StoreConfig(prune_period=7))
    assert [t.floor_dim for t in tables] == [2, 2]  # D / 16
    # 8 dimensions a row at 75%: the floor's 2, and 6 of the 30 above it (80% of them pruned)
    assert floor_budget_ratio(0.75, 32, 2) == pytest.approx(0.8)
    assert cfg.pruning == ManualRatios.linear(floor_budget_ratio(0.75, 32, 2), 2)
    assert cfg.budget_fraction == 0.25 and cfg.prune_period == 7
    # a floor given, and a table's own floor, win over D / 16
    tables, _ = FloorRatios(0.5, floor_dim=4).resolve(_tables(), StoreConfig())
    assert [t.floor_dim for t in tables] == [4, 4]
    own = [
        TableConfig("a", 32, chunks=2, num_embeddings=10, floor_dim=6),
        TableConfig("b", 32, chunks=2, num_embeddings=10),
    ]
    assert [t.floor_dim for t in FloorRatios(0.5).resolve(own, StoreConfig())[0]] == [6, 2]
    # a budget the user set is kept
    assert FloorRatios(0.75).resolve(_tables(), StoreConfig(budget_bytes=10_000))[1].budget_fraction is None


def test_floor_ratios_over_tables_of_several_widths_keep_the_budget():
    tables = [TableConfig("a", 32, chunks=2, num_embeddings=1000), TableConfig("b", 64, chunks=2, num_embeddings=500)]
    out, cfg = FloorRatios(0.75).resolve(tables, StoreConfig())
    floors = 1000 * 2 + 500 * 4
    dense = 1000 * 32 + 500 * 64
    above = dense - floors
    kept_above = above * (1.0 - cfg.pruning.average)
    assert [t.floor_dim for t in out] == [2, 4]
    assert floors + kept_above == pytest.approx(0.25 * dense)


@pytest.mark.parametrize(
    "tables, config, message",
    [
        (_tables(), StoreConfig(mode="cache", budget_fraction=0.5), "cache mode prunes nothing"),
        ([TableConfig("h", 32, chunks=2)], StoreConfig(), r"undeclared: \['h'\]"),
        (
            [TableConfig("a", 32, chunks=2, num_embeddings=9), TableConfig("b", 64, chunks=4, num_embeddings=9)],
            StoreConfig(),
            r"the same chunks, got \[2, 4\]",
        ),
        (_tables(dim=8), StoreConfig(), "do not split into chunks=2"),
    ],
)
def test_floor_ratios_refuse_what_they_cannot_hold_by_name(tables, config, message):
    with pytest.raises(ConfigError, match=message):
        FloorRatios(0.5).resolve(tables, config)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.5", True])
def test_a_bad_floor_ratio_is_refused_with_its_value(bad):
    with pytest.raises(ConfigError, match="FloorRatios: ratio must lie in"):
        FloorRatios(bad)
    with pytest.raises(ConfigError, match="floor_dim must be a positive int or None"):
        FloorRatios(0.5, floor_dim=0)


def test_a_store_built_directly_names_the_modules_that_hold_floors():
    with pytest.raises(ConfigError, match="FiitedEmbeddingBagCollection or FiitedEmbeddingBag"):
        EmbeddingStore(_tables(), StoreConfig(pruning=FloorRatios(0.75)))


def _batches(rng, rows=(300, 200), B=16, steps=6):
    for _ in range(steps):
        lengths = rng.integers(0, 3, size=2 * B)
        ids = np.concatenate([rng.integers(0, rows[f], int(lengths[f * B : (f + 1) * B].sum())) for f in range(2)])
        yield JaggedFeatures(["t0", "t1"], torch.from_numpy(ids), torch.from_numpy(lengths))


def test_a_collection_with_floor_ratios_is_the_collection_of_its_resolved_tables():
    """One option in the store's config builds what the harness used to build by hand."""
    base = StoreConfig(prune_period=3, gamma=0.9)
    ours = FiitedEmbeddingBagCollection(
        _tables(), store_config=StoreConfig(pruning=FloorRatios(0.75), prune_period=3, gamma=0.9), output="concat"
    )
    tables, cfg = FloorRatios(0.75).resolve(_tables(), base)
    by_hand = FiitedEmbeddingBagCollection(list(tables), store_config=cfg, output="concat")
    assert [t.name for t in ours.store.tables] == ["t0:floor", "t0", "t1:floor", "t1"]
    assert ours.store.config == by_hand.store.config
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    for fa, fb in zip(_batches(rng_a), _batches(rng_b)):
        a, b = ours(fa), by_hand(fb)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        g = torch.from_numpy(np.random.default_rng(len(a)).standard_normal(a.shape).astype(np.float32))
        a.backward(g)
        b.backward(g)
    for t in ours.store.tables:
        np.testing.assert_array_equal(
            ours.store.lookup(t.name, np.arange(t.num_embeddings)),
            by_hand.store.lookup(t.name, np.arange(t.num_embeddings)),
        )


def test_the_learned_map_is_a_parameter_applied_to_each_feature():
    torch.manual_seed(0)
    plain = FiitedEmbeddingBagCollection(
        _tables(), store_config=StoreConfig(pruning=FloorRatios(0.75)), output="concat"
    )
    torch.manual_seed(0)
    mapped = FiitedEmbeddingBagCollection(
        _tables(), store_config=StoreConfig(pruning=FloorRatios(0.75)), output="concat", project=True
    )
    P = mapped.projection
    assert P.shape == (2, 32, 32) and any(p is P for p in mapped.parameters())
    assert mapped.projection_bytes() == 2 * 32 * 32 * 4 and plain.projection_bytes() == 0
    feats = next(_batches(np.random.default_rng(1)))
    x = plain(feats).detach()
    y = mapped(feats)
    expect = torch.cat([x[:, :32] @ P[0].T, x[:, 32:] @ P[1].T], dim=1)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)
    # features given in another order take their own maps
    with torch.no_grad():
        z = mapped(JaggedFeatures(["t1", "t0"], *_swap(feats)))
    torch.testing.assert_close(z, torch.cat([expect[:, 32:], expect[:, :32]], dim=1).detach(), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert P.grad is not None and P.grad.abs().sum() > 0 and mapped.store.step_count == 1


def _swap(feats):
    B = feats.lengths().shape[0] // 2
    lengths = feats.lengths()
    cut = int(lengths[:B].sum())
    values = feats.values()
    return torch.cat([values[cut:], values[:cut]]), torch.cat([lengths[B:], lengths[:B]])


def test_features_of_several_widths_each_get_a_map_of_their_width():
    tables = [TableConfig("a", 16, chunks=2, num_embeddings=50), TableConfig("b", 8, chunks=2, num_embeddings=50)]
    ebc = FiitedEmbeddingBagCollection(
        tables, store_config=StoreConfig(budget_fraction=0.5), output="dict", project=True
    )
    assert ebc.projection is None and [tuple(p.shape) for p in ebc.projections] == [(16, 16), (8, 8)]
    out = ebc(JaggedFeatures(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0])))
    assert out["a"].shape == (2, 16) and out["b"].shape == (2, 8)


def test_a_bag_takes_the_default_too():
    W = torch.from_numpy(np.random.default_rng(2).standard_normal((100, 32)).astype(np.float32))
    bag = FiitedEmbeddingBag(
        100, 32, mode="sum", chunks=2, _weight=W, project=True, store_config=StoreConfig(pruning=FloorRatios(0.0))
    )
    assert [t.name for t in bag.store.tables] == ["table:floor", "table"] and bag.table.floor_dim == 2
    torch.testing.assert_close(bag.weight, W, rtol=0, atol=0)  # the floor's columns, then the rest
    ids, offsets = torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2])
    out = bag(ids, offsets)
    plain = torch.nn.functional.embedding_bag(ids, W, offsets, mode="sum")
    torch.testing.assert_close(out, plain @ bag.projection[0].T, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert bag.projection.grad is not None and bag.store.step_count == 1


def test_the_harness_builds_its_default_from_the_library_options():
    from fiited_store.experiments.models.dlrm import build_embeddings

    emb = build_embeddings("fiited-floor", ["t0", "t1"], [300, 200], 32, 0.75, 2, 0.05)
    tables, cfg = FloorRatios(0.75).resolve(_tables(), StoreConfig())
    assert [t.floor_dim for t in emb.collection.tables] == [t.floor_dim for t in tables] == [2, 2]
    assert emb.projection is emb.collection.projection is not None
    assert emb.store.config.pruning == cfg.pruning and emb.store.config.budget_fraction == cfg.budget_fraction


def test_a_compiled_model_with_the_default_trains_like_the_eager_one():
    def make():
        torch.manual_seed(5)
        return FiitedEmbeddingBagCollection(
            _tables(),
            store_config=StoreConfig(pruning=FloorRatios(0.75), prune_period=2),
            output="concat",
            project=True,
        )

    eager, compiled = make(), make()
    run = torch.compile(compiled)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    for fa, fb in zip(_batches(np.random.default_rng(4), steps=5), _batches(np.random.default_rng(4), steps=5)):
        a, b = eager(fa), run(fb)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        g = torch.from_numpy(np.random.default_rng(a.shape[0]).standard_normal(a.shape).astype(np.float32))
        (a * g).sum().backward()
        (b * g).sum().backward()
        opt_e.step()
        opt_c.step()
        opt_e.zero_grad()
        opt_c.zero_grad()
    torch.testing.assert_close(eager.projection, compiled.projection, rtol=1e-5, atol=1e-6)
    for t in eager.store.tables:
        np.testing.assert_allclose(
            eager.store.lookup(t.name, np.arange(t.num_embeddings)),
            compiled.store.lookup(t.name, np.arange(t.num_embeddings)),
            rtol=1e-5,
            atol=1e-6,
        )

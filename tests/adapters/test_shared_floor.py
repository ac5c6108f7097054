"""A floor shared through a hash (``TableConfig.floor_rows``): what ``FloorRatios`` gives past the
ratio where every row's own floor fits, so that the default spans 50% to 99.75%."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fiited_store import ConfigError, EmbeddingStore, FloorRatios, StoreConfig, TableConfig
from fiited_store.adapters import FiitedEmbeddingBag, FiitedEmbeddingBagCollection, JaggedFeatures
from fiited_store.adapters.floors import hash_ids, part_ids, split_floors
from fiited_store.verify import check_store
from tests.test_prune import resident


def _tables(rows=(3000, 2000), dim=32, chunks=2):
    return [TableConfig(f"t{i}", dim=dim, chunks=chunks, num_embeddings=n) for i, n in enumerate(rows)]


def test_past_the_ratio_where_every_row_keeps_a_floor_the_floor_takes_its_share_in_fewer_rows():
    dense = (3000 + 2000) * 32
    # 93.75%: 2 dimensions a row, the floor's own 2: every row still has its own
    tables, cfg = FloorRatios(0.9375).resolve(_tables(), StoreConfig())
    assert [t.floor_rows for t in tables] == [None, None] and cfg.budget_fraction == 0.0625
    # 99%: 0.32 dimensions a row; by default a tenth of them to the floor
    tables, _ = FloorRatios(0.99).resolve(_tables(), StoreConfig())
    assert [t.floor_rows for t in tables] == [48, 32]
    # half of them: 0.08 rows of 2 dimensions per id
    tables, cfg = FloorRatios(0.99, shared_floor=0.5).resolve(_tables(), StoreConfig())
    assert [t.floor_rows for t in tables] == [240, 160]
    store_tables, _ = split_floors(tables)
    assert [(t.name, t.num_embeddings, t.dim) for t in store_tables] == [
        ("t0:floor", 240, 2),
        ("t0", 3000, 30),
        ("t1:floor", 160, 2),
        ("t1", 2000, 30),
    ]
    store_dense = sum(t.num_embeddings * t.dim for t in store_tables)
    # the budget is still 1% of the tables given, though the store's own tables are smaller
    assert cfg.budget_fraction * store_dense == pytest.approx(0.01 * dense)
    above = (3000 + 2000) * 30 * (1.0 - cfg.pruning.average)
    assert (240 + 160) * 2 + above == pytest.approx(0.01 * dense)
    # a budget the user gave as a fraction stays a fraction of the tables given
    _, given = FloorRatios(0.99, shared_floor=0.5).resolve(_tables(), StoreConfig(budget_fraction=0.01))
    assert given.budget_fraction == pytest.approx(cfg.budget_fraction)
    # the share is the policy's to set
    tables, _ = FloorRatios(0.99, shared_floor=0.25).resolve(_tables(), StoreConfig())
    assert [t.floor_rows for t in tables] == [120, 80]


def _batch(rng, rows=(3000, 2000), B=64):
    lengths = rng.integers(1, 4, size=2 * B)
    # a skewed stream, as real ids are: the low ids come back, the others rarely
    ids = [np.minimum(rng.zipf(1.3, int(lengths[f * B : (f + 1) * B].sum())) - 1, rows[f] - 1) for f in range(2)]
    return JaggedFeatures(["t0", "t1"], torch.from_numpy(np.concatenate(ids)), torch.from_numpy(lengths))


def test_at_99_percent_every_row_keeps_its_shared_floor_and_the_pool_stays_in_the_budget():
    cfg = StoreConfig(pruning=FloorRatios(0.99, shared_floor=0.5), prune_period=2, sample_size=10_000)
    ebc = FiitedEmbeddingBagCollection(_tables(), store_config=cfg, output="concat")
    # the same store fed by hand: the floor's ids hashed, the chunks' ids as given
    tables, resolved = FloorRatios(0.99, shared_floor=0.5).resolve(
        _tables(), StoreConfig(prune_period=2, sample_size=10_000)
    )
    plain = EmbeddingStore(split_floors(tables)[0], resolved)
    rng = np.random.default_rng(0)
    seen = {"t0": [], "t1": []}
    for _ in range(6):
        kjt = _batch(rng)
        out = ebc(kjt)
        ids, offs, B = kjt.values(), kjt.offsets().numpy(), 64
        split = int(offs[B])
        u, i = ids[:split], ids[split:]
        seen["t0"].append(u)
        seen["t1"].append(i)
        ids2 = torch.cat([hash_ids(u, 240), u, hash_ids(i, 160), i]).numpy()
        lengths = np.diff(offs)
        lengths2 = np.concatenate([lengths[:B], lengths[:B], lengths[B:], lengths[B:]])
        offs2 = np.concatenate([[0], np.cumsum(lengths2)])
        b = plain.pooled_lookup(["t0:floor", "t0", "t1:floor", "t1"], ids2, offs2, train=True)
        np.testing.assert_array_equal(out.detach().numpy(), b.output)
        g = rng.standard_normal(out.shape).astype(np.float32)
        out.backward(torch.from_numpy(g))
        plain.backward(b, g)
        plain.step()
    s = ebc.store
    assert s.step_count == 6 and check_store(s) == []
    for name, rows in (("t0:floor", 240), ("t1:floor", 160), ("t0", 3000), ("t1", 2000)):
        np.testing.assert_array_equal(s.lookup(name, np.arange(rows)), plain.lookup(name, np.arange(rows)))
    # every id trained, of both tables, finds a resident floor row after the prunes
    for name, m in (("t0", 240), ("t1", 160)):
        held = resident(s, name + ":floor", hash_ids(torch.cat(seen[name]), m).numpy())
        assert held[:, 0].all()
    # ids that share a floor row read the same floor columns, and their own chunks above it
    ids = torch.arange(3000)
    first = hash_ids(ids, 240)
    a, b = (int(x) for x in torch.nonzero(first == first[0]).flatten()[:2])
    with torch.no_grad():
        none = torch.zeros(0, dtype=torch.int64)
        out = ebc(
            {"t0": (torch.tensor([a, b]), torch.tensor([0, 1, 2])), "t1": (none, torch.zeros(3, dtype=torch.int64))}
        )
    torch.testing.assert_close(out[0, :2], out[1, :2], rtol=0, atol=0)
    np.testing.assert_array_equal(out[:, 2:32].numpy(), s.lookup("t0", np.array([a, b])))
    # what the store holds is 1% of the dense weights: floors, then the chunks above them
    dense_bytes = (3000 + 2000) * 32 * 4
    assert sum(p.vector_bytes for p in s.pools) <= 0.01 * dense_bytes + 30 * 4
    assert s.pools[s.plans[0].group].slots == 240 + 160


def test_a_compiled_collection_with_a_shared_floor_trains_like_the_eager_one():
    def make():
        return FiitedEmbeddingBagCollection(
            [TableConfig("u", 10, chunks=2, floor_dim=2, floor_rows=7, num_embeddings=50), TableConfig("i", 8)],
            store_config=StoreConfig(budget_bytes=800, prune_period=2),
            output="keyed",
        )

    eager, compiled = make(), make()
    run = torch.compile(compiled)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = torch.from_numpy(np.concatenate([rng.integers(0, 50, 8), rng.integers(-99, 99, 4)])).long()
        kjt = JaggedFeatures(["u", "i"], ids, torch.tensor([2, 2, 2, 2, 1, 1, 1, 1]))
        a, b = eager(kjt), run(kjt)
        assert torch.equal(a.values(), b.values())
        g = torch.from_numpy(rng.standard_normal(a.values().shape).astype(np.float32))
        a.values().backward(g)
        b.values().backward(g)
    assert eager.store.tables[0].num_embeddings == 7
    for name, rows in (("u:floor", 7), ("u", 50)):
        np.testing.assert_array_equal(
            eager.store.lookup(name, np.arange(rows)), compiled.store.lookup(name, np.arange(rows))
        )


def test_a_bag_with_a_shared_floor_starts_each_floor_row_as_the_mean_of_the_rows_sharing_it():
    w = torch.from_numpy(np.random.default_rng(2).standard_normal((400, 32)).astype(np.float32))
    # a pool for every chunk, so that the whole of w fits; the floor is shared as at 99%
    cfg = StoreConfig(pruning=FloorRatios(0.99), budget_fraction=1.0)
    bag = FiitedEmbeddingBag(400, 32, chunks=2, store_config=cfg, _weight=w)
    m = bag.table.floor_rows
    assert m == int(0.1 * 0.01 * 400 * 32 / 2) and part_ids(bag.table) == [m, 0]
    shared = hash_ids(torch.arange(400), m)
    mean = torch.zeros(m, 2).index_add_(0, shared, w[:, :2]) / torch.bincount(shared, minlength=m).clamp(min=1)[:, None]
    dense = bag.weight
    torch.testing.assert_close(dense[:, :2], mean[shared], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense[:, 2:], w[:, 2:], rtol=0, atol=0)  # nothing pruned yet: every chunk is w's
    out = bag(torch.tensor([5, 9]), torch.tensor([0, 1]))
    torch.testing.assert_close(out, dense[[5, 9]], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(floor_dim=2, floor_rows=0, num_embeddings=9),
            "floor_rows must be None or an int in [1, num_embeddings=9]",
        ),
        (dict(floor_dim=2, floor_rows=10, num_embeddings=9), "got floor_rows=10, floor_dim=2"),
        (dict(floor_rows=3, num_embeddings=9), "got floor_rows=3, floor_dim=0"),
        (dict(floor_dim=2, floor_rows=2.5, num_embeddings=9), "got floor_rows=2.5"),
    ],
)
def test_a_bad_floor_rows_is_refused_with_its_value(kw, message):
    with pytest.raises(ConfigError) as e:
        TableConfig("t", dim=8, chunks=2, **kw)
    assert message in str(e.value)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.5, "0.5", True, float("nan")])
def test_a_bad_shared_floor_share_is_refused_with_its_value(bad):
    with pytest.raises(ConfigError, match=r"FloorRatios: shared_floor must lie in \(0, 1\], got"):
        FloorRatios(0.99, shared_floor=bad)

"""A floor of its own width (``TableConfig.floor_dim``): two tables of the store, one row of the feature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store import ConfigError, DynamicRatio, EmbeddingStore, ManualRatios, StoreConfig, TableConfig
from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures
from fiited_store.adapters.floors import repeat_keys, split_floors
from fiited_store.config import plan_pools
from fiited_store.errors import InputShapeError
from fiited_store.verify import check_store
from tests.test_prune import resident


def test_the_planner_pays_the_floors_first_each_from_its_own_pool():
    tables, _ = split_floors([TableConfig("t", dim=10, chunks=2, floor_dim=2, num_embeddings=100)])
    plans = plan_pools(tables, StoreConfig(budget_fraction=0.5))
    # 0.5 x 100 rows x 10 floats = 500: the floor's 100 x 2 first, the chunks above it the other 300
    assert [(p.chunk_width, p.slots) for p in plans] == [(2, 100), (4, 75)]


def test_floors_that_take_the_whole_budget_leave_the_chunks_above_them_one_slot():
    tables, _ = split_floors([TableConfig("t", dim=32, chunks=3, floor_dim=2, num_embeddings=50)])
    plans = plan_pools(tables, StoreConfig(budget_fraction=2 / 32, pruning=DynamicRatio(1.0)))
    assert [(p.chunk_width, p.slots) for p in plans] == [(2, 50), (10, 1)]


def test_split_floors_keeps_the_rows_initial_scale_and_the_column_order():
    t = TableConfig("user", dim=32, chunks=3, floor_dim=2, num_embeddings=10, optimizer="adagrad")
    tables, parts = split_floors([TableConfig("a", dim=8, chunks=2), t])
    assert [x.name for x in tables] == ["a", "user:floor", "user"] and parts == [[0], [1, 2]]
    floor, rest = tables[1], tables[2]
    assert (floor.dim, floor.chunks, floor.min_chunks, rest.dim, rest.chunks) == (2, 1, 1, 30, 3)
    assert floor.init_scale == rest.init_scale == pytest.approx(32**-0.5)
    assert floor.optimizer == rest.optimizer == "adagrad" and floor.floor_dim == rest.floor_dim == 0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dim=8, chunks=2, floor_dim=8, num_embeddings=4), "floor_dim must be an int in [0, dim=8), got 8"),
        (
            dict(dim=8, chunks=4, floor_dim=2, num_embeddings=4),
            "the 6 dimensions above floor_dim=2 do not split into chunks=4",
        ),
        (dict(dim=8, chunks=2, floor_dim=2), "floor_dim=2 needs num_embeddings"),
        (dict(dim=8, chunks=2, floor_dim=2, num_embeddings=4, min_chunks=1), "give floor_dim or min_chunks, not both"),
    ],
)
def test_a_bad_floor_is_refused_with_its_value(kw, message):
    with pytest.raises(ConfigError) as e:
        TableConfig("t", **kw)
    assert message in str(e.value)


def test_the_store_refuses_a_floor_it_would_not_serve():
    with pytest.raises(ConfigError, match="floor_dim=2 is held as two tables of the store.*split_floors"):
        EmbeddingStore([TableConfig("t", dim=10, chunks=2, floor_dim=2, num_embeddings=4)], StoreConfig())


def _plain_repeat(values, offsets, weights, copies):
    F = len(copies)
    B = (len(offsets) - 1) // F
    vs, ls, ws = [], [], []
    for f in range(F):
        for m in copies[f]:
            for b in range(B):
                lo, hi = offsets[f * B + b], offsets[f * B + b + 1]
                vs += [_plain_hash(v, m) if m else v for v in values[lo:hi]]
                ws += weights[lo:hi]
                ls.append(hi - lo)
    return vs, [0] + np.cumsum(ls).tolist(), ws


def _plain_hash(i, rows):
    mixed = (i % 2**31) * 2654435761
    return (mixed ^ (mixed >> 16)) % rows


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_repeat_keys_gives_each_keys_bags_again_in_place(data):
    F = data.draw(st.integers(1, 4))
    B = data.draw(st.integers(0, 3))
    lengths = data.draw(st.lists(st.integers(0, 3), min_size=F * B, max_size=F * B))
    offsets = [0] + np.cumsum(lengths).tolist() if lengths else [0]
    values = list(range(100, 100 + offsets[-1]))
    weights = [float(v) / 7 for v in values]
    # a copy 0 is the ids as given, a copy m > 0 the ids hashed into m rows (a shared floor)
    copies = data.draw(
        st.lists(st.lists(st.sampled_from([0, 0, 1, 5, 97]), min_size=1, max_size=3), min_size=F, max_size=F)
    )
    v, o, w = repeat_keys(
        torch.tensor(values, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(weights),
        copies,
    )
    ev, eo, ew = _plain_repeat(values, offsets, weights, copies)
    assert v.tolist() == ev and o.tolist() == eo and w.tolist() == pytest.approx(ew)


def test_repeat_keys_refuses_offsets_that_do_not_fit_the_keys():
    with pytest.raises(InputShapeError, match=r"B \+ 1] for F = 2 keys, got shape \(4,\)"):
        repeat_keys(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3]), None, [[0, 0], [0]])


def _batch(rng, B=6):
    user = torch.from_numpy(rng.integers(0, 8, B)).long()
    item = torch.from_numpy(rng.integers(0, 40, 2 * B)).long()
    return JaggedFeatures(
        ["user", "item"],
        torch.cat([user, item]),
        torch.cat([torch.ones(B, dtype=torch.int64), torch.full((B,), 2, dtype=torch.int64)]),
    )


def test_a_collection_with_floors_is_the_store_of_its_parts_fed_each_keys_ids_twice():
    tables = [
        TableConfig("user", dim=10, chunks=2, floor_dim=2, num_embeddings=8, optimizer="adagrad"),
        TableConfig("item", dim=8, chunks=2, num_embeddings=40),
    ]
    cfg = StoreConfig(pruning=DynamicRatio(0.5), prune_period=3, budget_fraction=0.5)
    ebc = FiitedEmbeddingBagCollection(tables, store_config=cfg, output="concat", mode="mean")
    parts, _ = split_floors(tables)
    plain = EmbeddingStore(parts, cfg)
    rng = np.random.default_rng(1)
    for _step in range(7):
        kjt = _batch(rng)
        out = ebc(kjt)
        assert out.shape == (6, 18)
        ids = kjt.values().numpy()
        offs = kjt.offsets().numpy()
        # the floor table's bags, then the chunks above it, then the item table
        ids2 = np.concatenate([ids[:6], ids[:6], ids[6:]])
        offs2 = np.concatenate([offs[:7], offs[1:7] + 6, offs[7:] + 6])
        b = plain.pooled_lookup(["user:floor", "user", "item"], ids2, offs2, mode="mean", train=True)
        np.testing.assert_array_equal(out.detach().numpy(), b.output)
        g = rng.standard_normal(out.shape).astype(np.float32)
        out.backward(torch.from_numpy(g))
        plain.backward(b, g)
        plain.step()
    assert ebc.store.step_count == plain.step_count == 7
    for name in ("user:floor", "user", "item"):
        np.testing.assert_array_equal(ebc.store.lookup(name, np.arange(8)), plain.lookup(name, np.arange(8)))
    assert check_store(ebc.store) == []


def test_every_row_keeps_its_floor_under_a_global_threshold_that_strips_the_rest():
    tables = [
        TableConfig("small", dim=10, chunks=2, floor_dim=2, num_embeddings=8),
        TableConfig("big", dim=10, chunks=2, floor_dim=2, num_embeddings=400),
    ]
    ebc = FiitedEmbeddingBagCollection(
        tables,
        store_config=StoreConfig(
            pruning=ManualRatios((0.8, 1.0)), budget_fraction=0.3, prune_period=0, sample_size=10_000
        ),
        output="dict",
    )
    rng = np.random.default_rng(0)
    for _ in range(6):
        small = torch.from_numpy(np.repeat(np.arange(8), np.arange(1, 9))).long()
        big = torch.from_numpy(rng.integers(0, 400, 36)).long()
        out = ebc({"small": (small, torch.arange(small.numel() + 1)), "big": (big, torch.arange(big.numel() + 1))})
        # the small table's gradients are 1000x smaller: a global threshold strips its chunks
        (1e-3 * out["small"].sum() + out["big"].sum()).backward()
    ebc.prune()
    s = ebc.store
    assert check_store(s) == []
    assert resident(s, "small:floor", np.arange(8))[:, 0].all()  # every row keeps its floor ...
    assert not resident(s, "small", np.arange(8)).any()  # ... and nothing above it
    held = resident(s, "big", np.arange(400))
    assert held[:, 0].any() and not held[:, 1].any()  # the big table's best rows keep chunk 0
    floor_pool = s.pools[s.plans[0].group]
    assert floor_pool.chunk_width == 2 and floor_pool.slots == 408  # every declared row's floor, paid first


@pytest.mark.parametrize("world", [2, 3])
def test_each_shard_holds_the_floors_of_the_rows_it_owns(world):
    """Row-wise, rows hash unevenly over the ranks: each shard's pool of floors is
    sized to its own declared rows, so every row keeps its floor as in one store."""
    from fiited_store.distributed.layout import shard_config
    from fiited_store.distributed.routing import RowWiseRouting

    tables, _ = split_floors(
        [
            TableConfig("u", dim=10, chunks=2, floor_dim=2, num_embeddings=101),
            TableConfig("i", dim=10, chunks=2, floor_dim=2, num_embeddings=37),
        ]
    )
    cfg = StoreConfig(budget_fraction=0.5)
    routing = RowWiseRouting()
    whole = {p.chunk_width: p.slots for p in plan_pools(tables, cfg)}
    floor_slots, rest_slots = [], []
    for rank in range(world):
        _, shard = shard_config(tables, cfg, world, routing, rank, pool_slack=0.0)
        _, slack = shard_config(tables, cfg, world, routing, rank)  # the default: 1/16 more, for the global cutoff
        for width, plain, more in zip((2 * 4, 4 * 4), shard.pool_budget_bytes, slack.pool_budget_bytes):
            assert more // width == plain // width + math.ceil(plain // width / 16)
        owned = sum(
            int(np.count_nonzero(routing.owners(np.full(n, t, np.int16), np.arange(n), world) == rank))
            for t, n in ((0, 101), (2, 37))
        )  # the floor tables' indices in the store
        floor_slots.append(shard.pool_budget_bytes[0] // (2 * 4))
        rest_slots.append(shard.pool_budget_bytes[1] // (4 * 4))
        assert floor_slots[-1] == owned
    assert sum(floor_slots) == whole[2] == 138 and len(set(floor_slots)) > 1  # uneven, and every row's floor
    assert sum(rest_slots) == pytest.approx(whole[4], abs=world)


def test_a_compiled_collection_with_floors_trains_like_the_eager_one():
    def make():
        return FiitedEmbeddingBagCollection(
            [TableConfig("u", 10, chunks=2, floor_dim=2, num_embeddings=50), TableConfig("i", 8, chunks=2)],
            store_config=StoreConfig(pruning=DynamicRatio(0.5), budget_bytes=600, prune_period=2),
            output="keyed",
        )

    eager, compiled = make(), make()
    run = torch.compile(compiled)  # the floor's id repetition runs behind a graph break
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = torch.from_numpy(np.concatenate([rng.integers(0, 50, 8), rng.integers(-99, 99, 4)])).long()
        kjt = JaggedFeatures(["u", "i"], ids, torch.tensor([2, 2, 2, 2, 1, 1, 1, 1]))
        a, b = eager(kjt), run(kjt)
        assert a.keys() == b.keys() == ["u", "i"] and torch.equal(a.values(), b.values())
        g = torch.from_numpy(rng.standard_normal(a.values().shape).astype(np.float32))
        a.values().backward(g)
        b.values().backward(g)
    for name in ("u:floor", "u", "i"):
        np.testing.assert_array_equal(
            eager.store.lookup(name, np.arange(50)), compiled.store.lookup(name, np.arange(50))
        )

"""The entry table: stored keys, in-batch deduplication, growth, tombstones, adversarial probes."""

from __future__ import annotations

import numpy as np
import pytest

from fiited_store import ConfigError, DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.verify import check_store
from tests.reference import key_hash


def home_buckets(table: int, ids: np.ndarray, capacity: int) -> np.ndarray:
    """Vectorised key_hash (numpy's uint64 arithmetic wraps like the kernel's)."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) ^ (np.uint64(table + 1) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(capacity - 1)).astype(np.int64)


def test_vectorised_hash_matches_the_reference():
    ids = np.array([0, 1, -1, 2**62, -(2**63), 123456789], np.int64)
    assert home_buckets(3, ids, 2**20).tolist() == [key_hash(3, int(i)) & (2**20 - 1) for i in ids]


def store_for(capacity: int, tables=("t",)):
    return EmbeddingStore(
        [TableConfig(n, dim=4, chunks=1) for n in tables],
        StoreConfig(budget_bytes=16 * 4096, prune_period=0, initial_capacity=capacity),
    )


def test_every_key_in_one_bucket():
    cap = 1024
    candidates = np.arange(3_000_000, dtype=np.int64)
    same = candidates[home_buckets(0, candidates, cap) == 17][:700]
    assert same.size == 700
    s = store_for(cap)
    values = np.arange(700 * 4, dtype=np.float32).reshape(700, 4)
    s.insert_or_assign("t", same, values)
    assert s.entries.capacity == cap  # 700 < 0.75 * 1024: no rehash, one probe chain of 700
    np.testing.assert_array_equal(s.lookup("t", same), values)
    np.testing.assert_array_equal(s.lookup("t", same[::-1]), values[::-1])
    assert not s.contains("t", candidates[home_buckets(0, candidates, cap) == 17][700:720]).any()
    assert check_store(s) == []
    s.erase("t", same[::2])  # holes in the middle of the chain: the rebuild closes them
    np.testing.assert_array_equal(s.lookup("t", same[1::2]), values[1::2])
    np.testing.assert_array_equal(s.lookup("t", same[::2]), np.zeros((350, 4), np.float32))
    s.find_or_insert("t", same[::2])  # re-inserted after the live keys, never on top of them
    assert s.entries.n_live == 700 and check_store(s) == []


def test_two_tables_with_the_same_ids_never_share_an_entry():
    s = store_for(64, tables=("a", "b"))
    ids = np.arange(20)
    s.insert_or_assign("a", ids, np.ones((20, 4), np.float32))
    s.insert_or_assign("b", ids, np.full((20, 4), 2.0, np.float32))
    assert s.entries.n_live == 40
    assert np.all(s.lookup("a", ids) == 1.0) and np.all(s.lookup("b", ids) == 2.0)


def test_duplicates_in_a_batch_share_one_entry():
    s = store_for(64)
    ids = np.array([5, 5, 5, -3, 5, -3, 2**63 - 1, -(2**63)], np.int64)
    out = s.find_or_insert("t", ids)
    assert s.entries.n_live == 4
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[3], out[5])


def test_growth_by_rehash_keeps_every_key_and_value(rng):
    s = store_for(8)
    ids = rng.choice(2**40, 3000, replace=False).astype(np.int64) - 2**39
    values = rng.standard_normal((3000, 4)).astype(np.float32)
    for lo in range(0, 3000, 500):
        s.insert_or_assign("t", ids[lo : lo + 500], values[lo : lo + 500])
        assert check_store(s) == []
    assert s.counters.rehashes >= 2 and s.entries.capacity >= 4096
    np.testing.assert_array_equal(s.lookup("t", ids), values)
    assert s.entries.n_live / s.entries.capacity <= s.config.max_load


def test_erasing_leaves_no_tombstone_and_never_grows_the_index(rng):
    from fiited_store.kernels.layout import TOMBSTONE

    s = store_for(256)
    for round_ in range(10):
        ids = np.arange(round_ * 150, round_ * 150 + 150)
        s.find_or_insert("t", ids)
        # sized by the 150 live keys alone (the first round fits the initial 256 slots; later
        # rounds start from an emptied, minimal index and land at 45% load): 1500 keys went through
        assert s.entries.capacity == (256 if round_ == 0 else 512)
        s.erase("t", ids[50:])
        s.erase("t", ids[:50])
        assert not np.any(s.backend.to_host(s.entries.arrays.table_ids) == TOMBSTONE)
        assert check_store(s) == []
    assert s.entries.n_live == 0 and s.entries.n_tombstones == 0
    assert s.entries.capacity == 8  # 1500 keys went through; nothing is held, so the index is minimal


def test_erasing_most_keys_shrinks_the_index_and_keeps_the_rest(rng):
    s = store_for(8)
    ids = rng.choice(2**40, 3000, replace=False).astype(np.int64)
    values = rng.standard_normal((3000, 4)).astype(np.float32)
    s.insert_or_assign("t", ids, values)
    grown, before = s.entries.capacity, s.memory_bytes()
    assert grown >= 4096
    assert grown == 8192
    s.erase("t", ids[2500:])  # 2500 left: a rehash would land at 8192 slots too, so it stays
    assert s.entries.capacity == grown
    s.erase("t", ids[100:2500])  # 100 left: rebuilt into 256 slots
    assert s.entries.capacity == 256 and s.memory_bytes() < before
    np.testing.assert_array_equal(s.lookup("t", ids[:100]), values[:100])
    assert not s.contains("t", ids[100:]).any()
    assert check_store(s) == []


def test_training_across_a_rehash_applies_to_the_right_keys(rng):
    s = EmbeddingStore(
        [TableConfig("t", dim=4, chunks=1, optimizer="sgd", learning_rate=1.0)],
        StoreConfig(budget_bytes=16 * 1000, prune_period=0, initial_capacity=8),
    )
    first = s.pooled_lookup("t", np.arange(4), np.arange(5), train=True)
    before = s.lookup("t", np.arange(4)).copy()
    s.find_or_insert("t", np.arange(100, 600))  # rehash between this forward and its backward
    assert s.counters.rehashes >= 1
    s.backward(first, np.ones((4, 4), np.float32))
    np.testing.assert_allclose(s.lookup("t", np.arange(4)), before - 1.0)


# --------------------------------------------------------------------------- direct index


def _stream_store(index, config):
    tables = [
        TableConfig("a", dim=8, chunks=2, num_embeddings=300, index=index, optimizer="adagrad"),
        TableConfig("b", dim=8, chunks=4, num_embeddings=77, index=index, optimizer="rowwise_adagrad"),
        TableConfig("c", dim=4, chunks=1, num_embeddings=500, index=index, optimizer="sgd"),
    ]
    s = EmbeddingStore(tables, config)
    rng = np.random.default_rng(5)
    for step in range(30):
        ids = np.concatenate([rng.zipf(1.2, 40) % 300, rng.integers(0, 77, 40), rng.zipf(1.5, 40) % 500])
        b = s.pooled_lookup(["a", "b", "c"], ids, np.arange(121), train=True)
        s.backward(b, rng.standard_normal(b.output.shape).astype(np.float32))
        s.step()
        if step == 17:
            s.erase("a", np.arange(0, 300, 7))
    return s


@pytest.mark.parametrize(
    "config",
    [
        StoreConfig(pruning=DynamicRatio(0.7), prune_period=4, sample_size=64, drop_floor=1e-3, gamma=0.8),
        StoreConfig(pruning=DynamicRatio(0.5), prune_period=5, on_evict="spill", utility="shared"),
        StoreConfig(mode="cache", budget_fraction=0.6, prune_period=6),
    ],
    ids=["discard", "spill", "cache"],
)
def test_direct_and_hashed_indexes_make_the_same_store(config):
    """Same stream, same decisions: samples, tie-breaks and initial values depend on keys only."""
    direct, hashed = _stream_store("direct", config), _stream_store("hashed", config)
    assert direct.entries.capacity == 0 and direct.entries.direct_rows == 877
    assert hashed.entries.direct_rows == 0
    for t in direct.tables:
        ids = np.arange(t.num_embeddings)
        np.testing.assert_array_equal(direct.lookup(t.name, ids), hashed.lookup(t.name, ids))
        np.testing.assert_array_equal(direct.utilities(t.name, ids), hashed.utilities(t.name, ids))
        np.testing.assert_array_equal(direct.contains(t.name, ids), hashed.contains(t.name, ids))
    assert check_store(direct) == [] and check_store(hashed) == []
    if config.mode == "cache":
        # every value is the same; which chunks are resident depends on slot order, as on the GPU
        return
    sd, sh = direct.stats(), hashed.stats()
    assert sd["tables"] == sh["tables"]
    assert {k: v for k, v in sd["counters"].items() if k != "rehashes"} == {
        k: v for k, v in sh["counters"].items() if k != "rehashes"
    }
    assert direct.counters.prunes > 0 and direct.counters.evicted_chunks + direct.counters.spilled_chunks > 0


@pytest.mark.parametrize("bad", [-1, 300, 2**62, -(2**63)])
def test_an_id_outside_a_direct_table_raises_and_changes_nothing(bad):
    from fiited_store import IdOutOfRangeError
    from tests.helpers import assert_unchanged, snapshot

    s = _stream_store("direct", StoreConfig(pruning=DynamicRatio(0.5), prune_period=4))
    before = snapshot(s)
    for call in (
        lambda: s.pooled_lookup(["a", "b"], np.array([1, bad, 2]), np.array([0, 2, 3]), train=True),
        lambda: s.lookup("a", np.array([bad])),
        lambda: s.insert("a", np.array([5, bad])),
        lambda: s.insert_or_assign("a", np.array([bad]), np.zeros((1, 8), np.float32)),
        lambda: s.erase("a", np.array([bad])),
    ):
        with pytest.raises(IdOutOfRangeError, match=f"id {bad} .* table 'a', which declares num_embeddings=300"):
            call()
    assert_unchanged(before, snapshot(s))


def test_direct_index_stores_no_key_and_no_probe():
    t = TableConfig("t", dim=64, chunks=4, num_embeddings=10_000)
    s = EmbeddingStore([t], StoreConfig(pruning=DynamicRatio(0.9375), prune_period=0))
    ea = s.entries.arrays
    assert ea.keys.size == 0 and ea.table_ids.size == 0
    assert ea.addr.shape == (10_000, 4) and ea.seen.nbytes == 4 * ((10_000 + 31) // 32)
    with pytest.raises(ConfigError, match="index='direct' needs num_embeddings"):
        TableConfig("u", dim=8, index="direct")


# --------------------------------------------------------------------------- memory budget


def test_a_memory_budget_covers_the_whole_store_and_the_pool_gets_the_rest():
    tables = [
        TableConfig("a", dim=32, chunks=2, num_embeddings=5000),
        TableConfig("b", dim=32, chunks=2, num_embeddings=800),
    ]
    s = EmbeddingStore(tables, StoreConfig(memory_budget_fraction=0.3, prune_period=0))
    st = s.stats()["total"]
    dense = 5800 * 32 * 4
    assert st["memory_budget_bytes"] == int(0.3 * dense)
    assert st["bytes"]["memory_total"] == s.memory_bytes() <= st["memory_budget_bytes"]
    assert 0.95 < st["memory_vs_budget"] <= 1.0  # nearly all of it, never more
    # what the direct index costs per row: 2 int32 addresses, 2 bfloat16 utilities, a seen bit
    assert st["bytes"]["entries"] == 5800 * (8 + 4) + 4 * ((5800 + 31) // 32) + 8 * 3
    # row-wise Adagrad on a dense table keeps one float per row
    assert st["dense_with_optimizer_bytes"] == dense + 5800 * 4
    assert st["memory_vs_dense_with_optimizer"] == st["bytes"]["memory_total"] / (dense + 5800 * 4)


def test_pool_and_memory_budgets_together_are_checked_at_construction():
    t = [TableConfig("a", dim=16, chunks=4, num_embeddings=10_000)]
    with pytest.raises(ConfigError, match="smaller than the entry index alone"):
        EmbeddingStore(t, StoreConfig(memory_budget_bytes=10_000))
    with pytest.raises(ConfigError, match=r"the store needs \d+ bytes .* but the memory budget is 300000 bytes"):
        EmbeddingStore(t, StoreConfig(budget_fraction=0.5, memory_budget_bytes=300_000))
    s = EmbeddingStore(t, StoreConfig(budget_fraction=0.25, memory_budget_fraction=0.9))
    assert s.stats()["total"]["memory_vs_budget"] <= 1.0


def test_pool_budgets_give_each_chunk_width_its_own_pool_and_are_checked():
    tables = [
        TableConfig("a", dim=8, chunks=2, num_embeddings=100),
        TableConfig("b", dim=16, chunks=2, num_embeddings=100),
    ]
    s = EmbeddingStore(tables, StoreConfig(pool_budget_bytes=(160, 3200), prune_period=0))
    assert [(p.chunk_width, p.slots) for p in s.plans] == [(4, 10), (8, 100)]
    assert s.stats()["total"]["budget_bytes"] == 160 + 3200
    with pytest.raises(ConfigError, match=r"pool_budget_bytes gives 1 budgets for 2 pools \(chunk widths \[4, 8\]\)"):
        EmbeddingStore(tables, StoreConfig(pool_budget_bytes=(160,)))
    with pytest.raises(ConfigError, match="not both"):
        StoreConfig(pool_budget_bytes=(160, 320), budget_fraction=0.5)
    with pytest.raises(ConfigError, match=r"positive ints, got \(160, -1\)"):
        StoreConfig(pool_budget_bytes=(160, -1))


def test_the_hashed_index_never_grows_past_the_memory_budget():
    from fiited_store import MemoryBudgetError
    from tests.helpers import assert_unchanged, snapshot

    t = [TableConfig("a", dim=16, chunks=2, num_embeddings=1000, index="hashed")]
    s = EmbeddingStore(
        t, StoreConfig(budget_fraction=0.05, memory_budget_bytes=20_000, prune_period=0, initial_capacity=64)
    )
    s.insert("a", np.arange(40))
    assert s.stats()["total"]["memory_vs_budget"] <= 1.0
    before = snapshot(s)
    with pytest.raises(MemoryBudgetError, match="over the memory budget of 20000 bytes; nothing was inserted"):
        s.insert("a", np.arange(40, 2000))
    assert_unchanged(before, snapshot(s))
    assert s.stats()["total"]["memory_vs_budget"] <= 1.0

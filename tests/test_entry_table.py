"""The entry table: stored keys, in-batch deduplication, growth, tombstones, adversarial probes."""

from __future__ import annotations

import numpy as np

from fiited_store import EmbeddingStore, StoreConfig, TableConfig
from fiited_store.verify import check_store

from .reference import key_hash



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
    return EmbeddingStore([TableConfig(n, dim=4, chunks=1) for n in tables],
                          StoreConfig(budget_bytes=16 * 4096, prune_period=0, initial_capacity=capacity))


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
    s.erase("t", same[::2])  # tombstones in the middle of the chain
    np.testing.assert_array_equal(s.lookup("t", same[1::2]), values[1::2])
    np.testing.assert_array_equal(s.lookup("t", same[::2]), np.zeros((350, 4), np.float32))
    s.find_or_insert("t", same[::2])  # re-inserted past the tombstones, not on top of live keys
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
        s.insert_or_assign("t", ids[lo:lo + 500], values[lo:lo + 500])
        assert check_store(s) == []
    assert s.counters.rehashes >= 2 and s.entries.capacity >= 4096
    np.testing.assert_array_equal(s.lookup("t", ids), values)
    assert s.entries.n_live / s.entries.capacity <= s.config.max_load


def test_rehash_purges_tombstones(rng):
    s = store_for(256)
    for round_ in range(10):
        ids = np.arange(round_ * 150, round_ * 150 + 150)
        s.find_or_insert("t", ids)
        s.erase("t", ids)
    assert s.entries.n_live == 0
    # 1500 keys went through; tombstones forced same-size rehashes instead of growth
    assert s.entries.capacity == 512
    assert s.entries.n_tombstones < 0.75 * 512
    assert check_store(s) == []


def test_training_across_a_rehash_applies_to_the_right_keys(rng):
    s = EmbeddingStore([TableConfig("t", dim=4, chunks=1, optimizer="sgd", learning_rate=1.0)],
                       StoreConfig(budget_bytes=16 * 1000, prune_period=0, initial_capacity=8))
    first = s.pooled_lookup("t", np.arange(4), np.arange(5), train=True)
    before = s.lookup("t", np.arange(4)).copy()
    s.find_or_insert("t", np.arange(100, 600))  # rehash between this forward and its backward
    assert s.counters.rehashes >= 1
    s.backward(first, np.ones((4, 4), np.float32))
    np.testing.assert_allclose(s.lookup("t", np.arange(4)), before - 1.0)

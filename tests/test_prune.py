"""The pruning policy and the budget (Algorithm 1, invariants 2, 3, 4 and 6)."""

from __future__ import annotations

import numpy as np
import pytest

from fiited_store import DynamicRatio, EmbeddingStore, ManualRatios, StoreConfig, TableConfig
from fiited_store.policy import thresholds
from fiited_store.verify import check_store
from tests.helpers import train_steps


def access(store, table, ids, grad_scale=1.0, rng=None):
    """One training step in which each id is one bag; gradient of ones (times grad_scale)."""
    ids = np.asarray(ids, np.int64)
    b = store.pooled_lookup(table, ids, np.arange(ids.size + 1), train=True)
    g = (
        np.full(b.output.shape, grad_scale, np.float32)
        if rng is None
        else rng.standard_normal(b.output.shape).astype(np.float32)
    )
    store.backward(b, g)
    store.step()


def resident(store, table, ids):
    e, _ = store.entries.find(np.full(len(ids), store.table_index(table), np.int16), np.asarray(ids, np.int64))
    out = np.zeros((len(ids), store.kmax), bool)
    out[e >= 0] = store.entries.arrays.addr[e[e >= 0]] >= 0
    return out


def test_new_keys_take_free_slots_then_start_absent():
    s = EmbeddingStore(
        [TableConfig("t", dim=8, chunks=2, num_embeddings=10)], StoreConfig(pruning=DynamicRatio(0.5), prune_period=0)
    )
    assert s.pools[0].slots == 10
    access(s, "t", np.arange(7))  # 14 chunks wanted, 10 slots
    res = resident(s, "t", np.arange(7))
    assert res[:5].all() and not res[5:].any()  # first come, first served, whole rows first
    np.testing.assert_array_equal(s.lookup("t", [6]), np.zeros((1, 8), np.float32))  # invariant 3
    assert check_store(s) == []


def test_highest_utilities_win_when_slots_run_short():
    # access utility: u = number of accesses (gamma close to 1 over few steps); keep-all ratio
    s = EmbeddingStore(
        [TableConfig("t", dim=4, chunks=1, num_embeddings=40)],
        StoreConfig(pruning=DynamicRatio(0.0), budget_bytes=10 * 16, utility="access", prune_period=0, gamma=0.999),
    )
    ids = np.arange(40)
    weights = (ids * 7919) % 40 + 1  # a shuffled access count per key, all distinct
    access(s, "t", np.repeat(ids, weights))
    s.prune()
    res = resident(s, "t", ids)[:, 0]
    top10 = ids[np.argsort(-weights)[:10]]
    assert set(ids[res]) == set(top10)
    assert s.pools[0].n_free == 0 and check_store(s) == []


def test_budget_holds_through_training_and_prunes(rng):
    tables = [
        TableConfig("a", dim=16, chunks=4, num_embeddings=300),
        TableConfig("b", dim=8, chunks=2, num_embeddings=300),
    ]
    s = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.8), prune_period=3, sample_size=50))
    slots = [p.slots for p in s.pools]
    vectors = [id(p.arrays.vectors) for p in s.pools]
    for _ in range(4):
        train_steps(s, tables, 6, rng, id_range=300)
        st = s.stats()
        for p, n in zip(st["pools"], slots):
            assert p["used"] <= n == p["slots"]
        assert check_store(s) == []
    assert [id(p.arrays.vectors) for p in s.pools] == vectors  # the pool was allocated once (invariant 2)


def test_manual_ratios_with_shared_utility_keep_a_prefix_of_chunks(rng):
    K = 4
    s = EmbeddingStore(
        [TableConfig("t", dim=16, chunks=K, num_embeddings=400)],
        StoreConfig(pruning=ManualRatios.linear(0.75, K), utility="shared", prune_period=0, sample_size=10_000),
    )
    for _ in range(10):
        access(s, "t", rng.zipf(1.3, 300) % 400, rng=rng)
    s.prune()
    res = resident(s, "t", np.arange(400))
    seen = s.contains("t", np.arange(400))
    # a row keeps chunks 0..j and loses the rest: the pruning order is fixed
    prefix = np.all(res[:, 1:] <= res[:, :-1], axis=1)
    assert prefix[seen].all()
    kept_per_chunk = res.sum(axis=0)
    assert kept_per_chunk[0] >= kept_per_chunk[1] >= kept_per_chunk[2] >= kept_per_chunk[3] == 0  # p_3 = 1.0


def test_dynamic_ratio_keeps_the_most_useful_chunks_across_chunk_indices(rng):
    s = EmbeddingStore(
        [TableConfig("t", dim=8, chunks=4, num_embeddings=50)],
        StoreConfig(pruning=DynamicRatio(0.5), prune_period=0, sample_size=10_000, gamma=0.999),
    )
    ids = np.arange(50)
    access(s, "t", ids, rng=rng)
    s.prune()
    util = s.utilities("t", ids)
    res = resident(s, "t", ids)
    # one threshold for all chunks: every kept chunk is at least as useful as every pruned one
    assert util[res].min() >= util[~res].max()
    assert abs(res.sum() - 100) <= 2


def test_non_resident_gradient_changes_only_utility():
    s = EmbeddingStore(
        [TableConfig("t", dim=8, chunks=2, num_embeddings=10)], StoreConfig(pruning=DynamicRatio(0.5), prune_period=0)
    )
    access(s, "t", np.arange(5))  # pool full
    access(s, "t", [9])  # key 9 starts absent
    pool_before = [a.copy() for a in s.pools[0].arrays]
    addr_before = s.entries.arrays.addr.copy()
    u_before = s.utilities("t", [9])
    access(s, "t", [9], grad_scale=3.0)
    for before, after in zip(pool_before, s.pools[0].arrays):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(addr_before, s.entries.arrays.addr)
    assert np.all(s.utilities("t", [9]) > u_before)  # invariant 4: only the utility moved
    np.testing.assert_array_equal(s.lookup("t", [9]), np.zeros((1, 8), np.float32))


def test_spilled_chunk_comes_back_with_its_trained_values_and_state(rng):
    tbl = TableConfig("t", dim=8, chunks=2, num_embeddings=20, optimizer="adagrad", learning_rate=0.1)
    s = EmbeddingStore(
        [tbl],
        StoreConfig(
            pruning=DynamicRatio(0.0),
            budget_bytes=8 * 4 * 4,
            on_evict="spill",
            utility="access",
            prune_period=0,
            gamma=0.5,
        ),
    )
    access(s, "t", [1, 2, 3, 4], rng=rng)  # 8 slots: all four rows resident
    access(s, "t", [1, 2, 3, 4], rng=rng)
    trained = s.lookup("t", [1, 2]).copy()
    states = (
        s.pools[0]
        .arrays.opt_state[s.entries.arrays.addr[s.entries.find(np.zeros(2, np.int16), np.array([1, 2]))[0]].ravel()]
        .copy()
    )
    for _ in range(4):
        access(s, "t", [5, 6, 7, 8, 3, 4], rng=rng)  # new keys start absent, then win the prune
    s.prune()
    assert not resident(s, "t", [1, 2]).any()
    assert s.stats()["total"]["spilled_chunks"] >= 4
    for _ in range(6):
        access(s, "t", [1, 2] * 3, grad_scale=0.0)  # zero gradient: values stay, utility grows
    s.prune()
    assert resident(s, "t", [1, 2]).all()
    np.testing.assert_array_equal(s.lookup("t", [1, 2]), trained)  # invariant 6
    e = s.entries.find(np.zeros(2, np.int16), np.array([1, 2]))[0]
    np.testing.assert_array_equal(s.pools[0].arrays.opt_state[s.entries.arrays.addr[e].ravel()], states)
    assert check_store(s) == []
    s.close()


def test_discarded_chunk_comes_back_reinitialised(rng):
    s = EmbeddingStore(
        [TableConfig("t", dim=4, chunks=1, num_embeddings=10)],
        StoreConfig(pruning=DynamicRatio(0.0), budget_bytes=2 * 16, utility="access", prune_period=0, gamma=0.5),
    )
    initial = s.find_or_insert("t", [1, 2])[:1].copy()
    access(s, "t", [1, 2], grad_scale=1.0)  # training moves row 1
    assert not np.array_equal(s.lookup("t", [1]), initial)
    for _ in range(3):
        access(s, "t", [3, 4, 3, 4])
    s.prune()
    np.testing.assert_array_equal(s.lookup("t", [1]), np.zeros((1, 4), np.float32))
    for _ in range(4):
        access(s, "t", [1, 1, 1, 2, 2, 2], grad_scale=0.0)
    s.prune()
    np.testing.assert_array_equal(s.lookup("t", [1]), initial)  # same key, same deterministic initial values


def test_endless_id_stream_keeps_a_bounded_entry_table(rng):
    # an endless stream is what the hashed index is for; num_embeddings only sizes the budget
    s = EmbeddingStore(
        [TableConfig("t", dim=8, chunks=2, num_embeddings=1000, index="hashed")],
        StoreConfig(pruning=DynamicRatio(0.9), prune_period=5, gamma=0.5, drop_floor=1e-3),
    )
    live = []
    for step in range(200):
        access(s, "t", np.arange(step * 50, step * 50 + 50), rng=rng)  # never the same id twice
        live.append(s.entries.n_live)
    assert max(live[100:]) <= max(live[:100]) <= 1000
    assert s.counters.dropped_entries > 8000
    assert check_store(s) == []


def test_utilities_follow_the_decay_recurrence(rng):
    gamma = 0.8
    s = EmbeddingStore(
        [TableConfig("t", dim=4, chunks=2, num_embeddings=10)],
        StoreConfig(pruning=DynamicRatio(0.0), budget_fraction=1.0, gamma=gamma, prune_period=0),
    )
    expect = np.zeros(2)
    for step in range(300):  # gamma**-300 is 1e29: the stored scale is folded back on the way
        if step % 3 == 0:
            b = s.pooled_lookup("t", np.array([5, 5]), np.array([0, 2]), train=True)
            g = rng.standard_normal((1, 4)).astype(np.float32)
            s.backward(b, g)
            a = 2.0
            expect += a * np.linalg.norm((2 * g[0].astype(np.float64)).reshape(2, 2), axis=1)
        s.step()
        expect *= gamma
    # utilities are bfloat16 (8 significant bits), rounded stochastically
    np.testing.assert_allclose(s.utilities("t", [5])[0], expect, rtol=1e-2)


def test_sixteen_bit_utilities_keep_growing_where_rounding_to_nearest_would_stall():
    """At gamma = 0.999 a hot row's increment is 0.1% of its utility, below half of a
    bfloat16 ulp (0.2%): rounded to nearest it would stall near 1/3 of its steady state.
    Stochastic rounding keeps the expected value; each row has its own rounding bits,
    so the mean over rows is close and no row is far off."""
    gamma, steps, n = 0.999, 3000, 64
    s = EmbeddingStore(
        [TableConfig("t", dim=4, chunks=1, num_embeddings=n)],
        StoreConfig(pruning=DynamicRatio(0.0), budget_fraction=1.0, gamma=gamma, prune_period=0),
    )
    g = np.full((n, 4), 0.5, np.float32)  # ||g|| = 1 for every row, every step
    for _ in range(steps):
        s.backward(s.pooled_lookup("t", np.arange(n), np.arange(n + 1), train=True), g)
        s.step()
    expect = gamma * (1 - gamma**steps) / (1 - gamma)  # sum of gamma**i, i = 1..steps
    got = s.utilities("t", np.arange(n))[:, 0].astype(np.float64)
    assert abs(got.mean() - expect) / expect < 0.02, (got.mean(), expect)
    assert np.all(np.abs(got - expect) / expect < 0.2), (got.min(), got.max(), expect)


# --- feature-aware pruning: floors and per-table normalisation ----------------------------------------------------


def _two_tables(config_kw, small_kw=None):
    """A tiny table whose gradients are 1000x smaller than a large table's: the global threshold strips it."""
    tables = [
        TableConfig("small", dim=8, chunks=4, num_embeddings=8, **(small_kw or {})),
        TableConfig("big", dim=8, chunks=4, num_embeddings=400),
    ]
    s = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.75), prune_period=0, sample_size=10_000, **config_kw))
    rng = np.random.default_rng(0)
    for _ in range(6):
        access(s, "small", np.repeat(np.arange(8), np.arange(1, 9)), grad_scale=1e-3)  # row i seen i + 1 times
        access(s, "big", rng.integers(0, 400, 200), grad_scale=1.0)
    s.prune()
    assert check_store(s) == []
    return s, resident(s, "small", np.arange(8)), resident(s, "big", np.arange(400))


def test_the_papers_rule_strips_a_small_table_under_a_global_threshold():
    _, small, big = _two_tables({})
    assert small.sum() == 0 and big.sum() > 0


def test_a_small_table_keeps_its_floor_under_a_global_threshold_that_would_strip_it():
    s, small, big = _two_tables({}, {"min_chunks": 2})
    assert small[:, :2].all() and not small[:, 2:].any()  # exactly the floor: its utilities lose the rest
    assert s.pools[0].slots - s.pools[0].n_free <= s.pools[0].slots  # inside the budget
    s, small, _ = _two_tables({"small_table_rows": 8})
    assert small.all()  # a table of at most small_table_rows rows keeps every chunk


def test_mean_normalisation_lets_every_table_compete_on_its_own_scale():
    _, small, big = _two_tables({"table_normalization": "mean"})
    assert 0 < small.sum() < small.size  # some, not all: its best chunks, judged against its own mean
    held_big = np.count_nonzero(big.any(axis=1))
    assert big.sum() > 0 and held_big > 0


def test_thresholds_per_table_reduce_to_the_papers_without_floors_or_normalisation():
    rng = np.random.default_rng(3)
    samples = rng.random((500, 4)).astype(np.float32)
    samples[:100, 2:] = np.nan  # table 0 has K = 2
    tables_of = np.where(np.arange(500) < 100, 0, 1)
    args = (np.array([2, 4]), np.array([100, 400]), np.array([1000, 1000]), np.array([0, 0]))
    thr = thresholds(samples, tables_of, DynamicRatio(0.9), *args)
    expect = np.quantile(samples[~np.isnan(samples)], 1 - 0.1 * (2 * 1000 + 4 * 1000) / (2 * 100 + 4 * 400))
    np.testing.assert_allclose(thr[0, :2], expect, rtol=1e-6)
    np.testing.assert_allclose(thr[1], expect, rtol=1e-6)
    floors = thresholds(samples, tables_of, DynamicRatio(0.8), *args[:3], np.array([2, 1]))
    assert np.isneginf(floors[0, :2]).all() and np.isneginf(floors[1, 0]) and np.isfinite(floors[1, 1:]).all()
    manual = thresholds(samples, tables_of, ManualRatios((0.9, 0.92, 0.95, 0.97)), *args, normalization="mean")
    means = [np.nanmean(samples[tables_of == t].astype(np.float64)) for t in (0, 1)]
    np.testing.assert_allclose(manual[0, :2] / manual[1, :2], means[0] / means[1], rtol=1e-5)


def _readmission_run(mode: str, reference: bool):
    """Rows 0-24 train and keep their slots; rows 25-49 lose theirs at the first prune,
    earn utility while absent, and win them back at the second (re-admission)."""
    from tests.reference import ReferenceStore

    tables = [TableConfig("a", 8, chunks=2, num_embeddings=50)]
    cfg = StoreConfig(pruning=DynamicRatio(0.5), prune_period=0, readmission=mode, seed=3)
    s = ReferenceStore(tables, cfg) if reference else EmbeddingStore(tables, cfg)
    ids = np.arange(50)
    for first, scale, steps in ((0, 1.0, 3), (25, 5.0, 4)):
        part = ids[first : first + 25]
        for _ in range(steps):
            b = s.pooled_lookup([0] if reference else "a", part, np.arange(26), train=True)
            s.backward(b, np.full((25, 8), scale, np.float32))
            s.step()
        s.prune()
    if reference:
        return np.stack([s.row_values(0, int(i)) for i in ids])
    return s.lookup("a", ids)


@pytest.mark.parametrize("mode", ["first", "zero", "fresh"])
def test_readmitted_chunks_start_as_the_option_says(mode):
    got = _readmission_run(mode, reference=False)
    np.testing.assert_array_equal(got, _readmission_run(mode, reference=True))
    first = _readmission_run("first", reference=False)
    readmitted = got[25:]
    if mode == "zero":
        assert not readmitted.any()
    elif mode == "fresh":
        assert readmitted.any() and not np.isin(readmitted, first[25:]).any()
    np.testing.assert_array_equal(got[:25], first[:25])  # rows that kept their slots are untouched


def _prune_inputs(seed=0, floor_table=True):
    """A trained store's entry arrays and thresholds that let some absent chunks qualify
    (and, with floor_table, one table's first chunk pass at -inf, as a floor does)."""
    tables = [
        TableConfig("a", dim=8, chunks=4, num_embeddings=300),
        TableConfig("b", dim=8, chunks=2, num_embeddings=300, index="hashed"),
    ]
    s = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.5), prune_period=0, seed=seed))
    train_steps(s, tables, 12, np.random.default_rng(seed), id_range=300)
    s.prune()
    train_steps(s, tables, 4, np.random.default_rng(seed + 1), id_range=300)
    values = (s.entries.arrays.util.astype(np.uint32) << np.uint32(16)).view(np.float32)
    thr = np.full((2, s.kmax), np.median(values[values > 0]), np.float32)  # some pass, some do not
    if floor_table:
        thr[0, 0] = -np.inf
    return s, thr


@pytest.mark.parametrize("floor_table", [False, True])
def test_one_pass_prune_lists_and_ranks_match_the_counting_and_listing_passes(floor_table):
    """prune_lists (classify, count and list in one pass) and allocation_ranks give what
    the two-pass prune_select gives: the same chunks, in the same order, ranked alike."""
    from fiited_store.kernels import cpu

    s, thr = _prune_inputs(floor_table=floor_table)
    ea, m = s.entries.arrays, s.meta
    counts = np.empty((cpu.SCAN_BLOCKS, 3), np.int64)
    keep, cand, drop, ev_e, ev_k, al_e, al_k = cpu.prune_lists(
        ea.row_base, ea.seen, ea.table_ids, ea.addr, ea.util, m["table_chunks"], m["table_group"], 0, thr, counts
    )
    assert cand > 0 and drop > 0 and keep > 0
    size = ea.addr.size
    ref = [np.empty(size, np.int64) for _ in range(4)] + [np.empty(size, np.uint64)]
    n_ev, n_al = cpu.prune_select(
        ea.row_base,
        ea.seen,
        ea.keys,
        ea.table_ids,
        ea.addr,
        ea.util,
        m["table_chunks"],
        m["table_group"],
        0,
        thr,
        False,
        np.uint64(0),
        True,
        counts,
        *ref,
    )
    assert (n_ev, n_al) == (drop, cand)
    np.testing.assert_array_equal(ev_e, ref[0][:n_ev])
    np.testing.assert_array_equal(ev_k, ref[1][:n_ev])
    np.testing.assert_array_equal(al_e, ref[2][:n_al])
    np.testing.assert_array_equal(al_k, ref[3][:n_al])
    ranks = np.empty(cand, np.uint64)
    cpu.allocation_ranks(ea.row_base, ea.seen, ea.keys, ea.table_ids, ea.util, thr, al_e, al_k, ranks)
    np.testing.assert_array_equal(ranks, ref[4][:n_al])
    s.close()

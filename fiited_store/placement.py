"""Applying a prune: which chunks lose their slot and which win one, and moving them.

Algorithm 1 over the pools (:func:`prune_pools`): sampled utilities give thresholds
(:mod:`fiited_store.policy`), the kernels classify every chunk, and the chunks that
change place are evicted (discarded, or spilled to the disk tier) and allocated
(re-initialised, or restored from the tier). The same moves serve cache mode
(:mod:`fiited_store.residency`) and the erasure of entries. Functions of the store
they act on; the store's verbs call them.
"""

from __future__ import annotations

import math
import shutil
from concurrent.futures import wait
from typing import Any, NamedTuple

import numpy as np

from . import tiering
from .config import table_floors
from .kernels import cpu as host_kernels
from .kernels.cpu import take_staged
from .policy import sample_rate_threshold, thresholds
from .pool import ChunkPool


def missing_chunks(store, entries, group: int, known=None):
    """(entries, chunk indexes) of the chunks of ``entries`` in pool ``group`` that are not
    resident. ``known``: such a list made earlier for the same entries, when no chunk of
    them left the pool since (then only the chunks that came in are taken out of it)."""
    b = store.backend
    if known is not None:
        k_e, k_k = known
        n_k = max(int(k_e.shape[0]), 1)
        miss_e, miss_k = np.empty(n_k, np.int64), np.empty(n_k, np.int64)
        n = int(host_kernels.still_missing(k_e, k_k, store.entries.arrays.addr, miss_e, miss_k))
        return miss_e[:n], miss_k[:n]
    size = max(int(entries.shape[0]) * store.kmax, 1)
    miss_e, miss_k = b.empty(size, np.int64), b.empty(size, np.int64)
    ea, m = store.entries.arrays, store.meta
    n = int(
        store.k.missing_chunks(
            entries,
            ea.row_base,
            ea.seen,
            ea.table_ids,
            ea.addr,
            m["table_chunks"],
            m["table_group"],
            group,
            miss_e,
            miss_k,
        )
    )
    return miss_e[:n], miss_k[:n]


def local_cutoff(ranks: np.ndarray, slots: int) -> np.uint64:
    """The rank of the ``slots``-th best of one pool's passing chunks: the chunks at or
    above it keep or take the slots when more pass than the pool holds."""
    n = ranks.shape[0]
    return np.partition(ranks, n - slots)[n - slots]


class PrunePlan(NamedTuple):
    """What a prune pass will do to one pool, decided before anything moves."""

    pool: ChunkPool
    ev_e: Any  # int64[n_ev]: chunks to evict (entry, chunk)
    ev_k: Any
    al_e: Any  # int64[n_al]: chunks to give a slot, best first when they outnumber the slots
    al_k: Any
    info: dict


def prune_pools(store, entries_per_table: np.ndarray) -> list[dict[str, Any]]:
    """Algorithm 1 over every pool: every pool's decisions, then the tier space of their
    evictions and the rows they restore, then the moves, so that a full device or a
    corrupt tier file refuses the pass before a chunk moves. Returns each pool's report."""
    plans = [plan_prune(store, pool, entries_per_table) for pool in store.pools]
    for p in plans:
        reserve_spills(store, p.pool.plan.group, int(p.ev_e.shape[0]))
    restores = [read_restores(store, p.pool, p.al_e, p.al_k) for p in plans]
    return [apply_prune(store, p, r) for p, r in zip(plans, restores)]


def apply_prune(store, plan: PrunePlan, restores: Restores) -> dict[str, Any]:
    """Move a pool's chunks as ``plan`` says, restoring from rows already read."""
    evict(store, plan.pool, plan.ev_e, plan.ev_k)
    if int(plan.al_e.shape[0]):
        allocate(store, plan.pool, plan.al_e, plan.al_k, readmit=True, restores=restores)
    return plan.info


def plan_prune(store, pool: ChunkPool, entries_per_table: np.ndarray) -> PrunePlan:
    """Algorithm 1's decisions for one pool, nothing moved. ``entries_per_table`` counts the
    whole store's entries (every shard's, for a shard of a sharded store), so every early
    return below is taken by all shards alike."""
    plan = pool.plan
    g = plan.group
    b, k, m = store.backend, store.k, store.meta
    ea = store.entries.arrays
    n_group = int(sum(entries_per_table[t] for t in plan.tables))
    info: dict[str, Any] = {"chunk_width": plan.chunk_width, "evicted": 0, "allocated": 0}
    if n_group == 0:
        none = b.empty(0, np.int64)
        return PrunePlan(pool, none, none, none, none, info)
    T = len(store.tables)
    if store.config.mode == "cache":
        thr = np.zeros((T, store.kmax), np.float32)
    else:
        m_size = store.config.sample_size
        cap = min(n_group, int(m_size + 6 * math.sqrt(m_size) + 64))
        samples = b.empty((cap, store.kmax), np.float32)
        sample_tables = b.empty(cap, np.int32)
        n_s = int(
            k.sample_utilities(
                ea.row_base,
                ea.seen,
                ea.keys,
                ea.table_ids,
                ea.util,
                m["table_chunks"],
                m["table_group"],
                g,
                sample_rate_threshold(m_size, n_group),
                store.config.seed,
                store.clock.prune_round,
                samples,
                sample_tables,
            )
        )
        in_pool = np.zeros(T, bool)
        in_pool[list(plan.tables)] = True
        chunks = np.where(in_pool, [t.chunks for t in store.tables], 0)
        entries = np.where(in_pool, entries_per_table, 0)
        sizes = [store.tables[t].num_embeddings for t in plan.tables]
        declared = (
            None
            if any(n is None for n in sizes)
            else np.where(in_pool, [t.num_embeddings or 0 for t in store.tables], 0)
        )
        samples_h, sample_tables_h = b.to_host(samples[:n_s]), b.to_host(sample_tables[:n_s])
        if store.collective is not None:
            # each shard sampled at the global rate: together they hold one store's sample
            samples_h, sample_tables_h = store.collective.gather_samples(samples_h, sample_tables_h)
            n_s = int(samples_h.shape[0])
        thr = thresholds(
            samples_h,
            sample_tables_h,
            store.config.pruning,
            chunks,
            entries,
            declared,
            np.array(table_floors(store.tables, store.config)),
            store.config.table_normalization,
        )
        info["sampled"] = n_s
    info["thresholds"] = {store.tables[t].name: thr[t, : store.tables[t].chunks].tolist() for t in plan.tables}
    thr_d = b.from_host(thr)
    block_counts = b.empty((k.SCAN_BLOCKS, 3), np.int64)
    # one pass lists the chunks below and above their thresholds; it is the prune unless
    # more chunks pass than there are slots, when ranks decide at a cutoff instead
    keep, cand, drop, ev_e, ev_k, al_e, al_k = k.prune_lists(
        ea.row_base,
        ea.seen,
        ea.table_ids,
        ea.addr,
        ea.util,
        m["table_chunks"],
        m["table_group"],
        g,
        thr_d,
        block_counts,
    )

    def ranks():
        comp = b.empty(keep + cand, np.uint64)
        n_c = int(
            k.prune_composites(
                ea.row_base,
                ea.seen,
                ea.keys,
                ea.table_ids,
                ea.addr,
                ea.util,
                m["table_chunks"],
                m["table_group"],
                g,
                thr_d,
                block_counts,
                comp,
            )
        )
        return b.to_host(comp[:n_c])

    if store.collective is not None:
        # a shard: the cutoff is the whole store's (see distributed.global_pools)
        use_cutoff, cutoff, info["shard_bound"] = store.collective.prune_cutoff(g, keep + cand, pool.slots, ranks)
    else:
        use_cutoff = keep + cand > pool.slots
        cutoff = local_cutoff(ranks(), pool.slots) if use_cutoff else None
    n_ev, n_al = drop, cand
    if use_cutoff:
        n_res = keep + drop
        ev_e, ev_k = b.empty(max(n_res, 1), np.int64), b.empty(max(n_res, 1), np.int64)
        al_e, al_k = b.empty(max(cand, 1), np.int64), b.empty(max(cand, 1), np.int64)
        al_r = b.empty(max(cand, 1), np.uint64)
        n_ev, n_al = (
            int(x)
            for x in k.prune_select(
                ea.row_base,
                ea.seen,
                ea.keys,
                ea.table_ids,
                ea.addr,
                ea.util,
                m["table_chunks"],
                m["table_group"],
                g,
                thr_d,
                True,
                cutoff,
                True,
                block_counts,
                ev_e,
                ev_k,
                al_e,
                al_k,
                al_r,
            )
        )
    elif n_al > pool.n_free + n_ev:
        # allocations may outnumber the free slots: they are placed best-first, by rank
        al_r = b.empty(max(cand, 1), np.uint64)
        k.allocation_ranks(ea.row_base, ea.seen, ea.keys, ea.table_ids, ea.util, thr_d, al_e, al_k, al_r)
    al_e, al_k = al_e[:n_al], al_k[:n_al]
    if n_al > pool.n_free + n_ev:
        # only when composite ties let more chunks qualify than there are slots (the
        # evictions below free n_ev): place the best first
        order = np.argsort(b.to_host(al_r[:n_al]), kind="stable")[::-1].copy()
        al_e = b.from_host(b.to_host(al_e)[order])
        al_k = b.from_host(b.to_host(al_k)[order])
    info.update(evicted=n_ev, allocated=n_al, oversubscribed=bool(use_cutoff))
    return PrunePlan(pool, ev_e[:n_ev], ev_k[:n_ev], al_e, al_k, info)


def reserve_spills(store, group: int, n: int) -> None:
    """Make room in pool ``group``'s tier for ``n`` spills before any is made; a tier made
    for this and refused goes again, so that the refusal leaves the store as it was."""
    if n <= 0 or not store.config.spills:
        return
    made = store.tiers[group] is None
    tier = tiering.tier_of(store, group)
    try:
        tier.reserve(n)
    except BaseException:
        if made:
            tier.close()
            store.tiers[group] = None
            shutil.rmtree(tier.location, ignore_errors=True)
        raise


def evict(store, pool: ChunkPool, ev_e, ev_k, *, spares_upcoming: bool = False) -> None:
    """Chunks out of the pool (to the tier when the store spills). ``spares_upcoming``:
    none of them belongs to the latest prefetched batch (whose list of missing
    chunks then stays true)."""
    n = int(ev_e.shape[0])
    if n == 0:
        return
    # a prefetched batch's missing chunks are only known while none of its chunks left
    store.residency.chunks_left_the_pool(spares_upcoming)
    b, a = store.backend, pool.arrays
    g = pool.plan.group
    if store.config.spills:
        tier = tiering.tier_of(store, g)
        if not tier.keeps_owners and b.name == "cpu":
            # a log's slots go out in order: a row's chunks, listed together, sit side by side
            order = np.lexsort((b.to_host(ev_k), b.to_host(ev_e)))
            ev_e, ev_k = b.from_host(b.to_host(ev_e)[order]), b.from_host(b.to_host(ev_k)[order])
        codes = b.empty(n, np.int32)
        store.k.chunk_codes(store.entries.arrays.addr, ev_e, ev_k, codes)
        vec = b.empty((n, pool.plan.chunk_width), np.float32)
        st = b.empty((n, pool.plan.state_width), np.float32)
        store.k.gather_slots(codes, a.vectors, a.opt_state, vec, st)
        tslots = tier.allocate(n)
        try:
            # on the tier's thread: a restore reads after it (the thread's queue, or a wait)
            tier.write_async(tslots, b.to_host(vec), b.to_host(st))
        except BaseException:
            tier.release(tslots)
            raise
        store.k.commit_evictions(
            ev_e, ev_k, b.from_host(tslots), store.entries.arrays.addr, a.owner, a.free_stack, a.n_free, store.kmax
        )
        if tier.keeps_owners:
            tier.owner[tslots] = b.to_host(ev_e)
        store.counters.spilled_chunks += n
    else:
        store.k.commit_evictions(
            ev_e, ev_k, b.empty(0, np.int64), store.entries.arrays.addr, a.owner, a.free_stack, a.n_free, store.kmax
        )
    store.counters.evicted_chunks += n


def readmission_init(store):
    """(seed, init kinds) for chunks a prune pass gives a slot without a copy to restore
    (``StoreConfig.readmission``): their first values, zeros, or values drawn anew."""
    from .kernels.cpu import mix64
    from .kernels.layout import INIT_CODES

    m, mode = store.meta, store.config.readmission
    if mode == "zero":
        if "readmit_zero_kind" not in m:
            m["readmit_zero_kind"] = store.backend.from_host(np.full(len(store.tables), INIT_CODES["zeros"], np.int8))
        return store.config.seed, m["readmit_zero_kind"]
    if mode == "fresh":
        salt = mix64(np.uint64(store.clock.prune_round) + np.uint64(0x9E3779B97F4A7C15))
        return int(mix64(np.uint64(store.config.seed) ^ salt) >> np.uint64(1)), m["table_init_kind"]
    return store.config.seed, m["table_init_kind"]


class Restores(NamedTuple):
    """The tier rows a list of chunks to allocate will take, read before anything moves."""

    restore_index: np.ndarray  # int64[n]: each chunk's row in vec/st, or -1 (starts anew)
    tslots: np.ndarray  # int64[n_sp]: the tier slots read
    vec: np.ndarray  # float32[n_sp, c]
    st: np.ndarray  # float32[n_sp, w]
    n_staged: int  # of them, taken from a background read


def read_restores(store, pool: ChunkPool, al_e, al_k) -> Restores:
    """Read (and check) the tier rows of the spilled chunks among these, changing nothing:
    a caller that evicts to make room reads first, so that a corrupt tier file is raised
    before any chunk moved."""
    n = int(al_e.shape[0])
    b = store.backend
    g = pool.plan.group
    c, w = pool.plan.chunk_width, pool.plan.state_width
    vec = np.empty((0, c), np.float32)
    st = np.empty((0, w), np.float32)
    if n == 0 or store.tiers[g] is None:
        # no tier, so no chunk of this pool is spilled: every one starts anew (an empty
        # restore_index says so, and a prune pass saves a pass over its allocations)
        n_sp = 0
        restore_index = np.empty(0, np.int64)
    else:
        codes_d = b.empty(n, np.int32)
        store.k.chunk_codes(store.entries.arrays.addr, al_e, al_k, codes_d)
        restore_index, all_tslots = np.empty(n, np.int64), np.empty(n, np.int64)
        n_sp = int(host_kernels.restore_plan(b.to_host(codes_d), restore_index, all_tslots))
    tslots = all_tslots[:n_sp] if n_sp else np.empty(0, np.int64)
    n_staged = 0
    if n_sp:
        vec, st, n_staged = read_tier(store, g, tslots)
    return Restores(restore_index, tslots, vec, st, n_staged)


def allocate(
    store,
    pool: ChunkPool,
    al_e,
    al_k,
    *,
    fetch_counter: str = "",
    readmit: bool = False,
    restores: Restores | None = None,
) -> int:
    """Give slots to chunks in list order; spilled ones come back from the tier (from
    ``restores`` when the caller read them first), the others start at their first values
    (or, with ``readmit``, as ``StoreConfig.readmission`` says)."""
    n = int(al_e.shape[0])
    if n == 0:
        return 0
    b, a, m, ea = store.backend, pool.arrays, store.meta, store.entries.arrays
    g = pool.plan.group
    restore_index, tslots, vec, st, n_staged = (
        restores if restores is not None else read_restores(store, pool, al_e, al_k)
    )
    n_sp = int(tslots.shape[0])
    if n_sp and fetch_counter:
        store.counters.prefetched_chunks += n_staged
        setattr(store.counters, fetch_counter, getattr(store.counters, fetch_counter) + n_sp - n_staged)
    seed, init_kind = readmission_init(store) if readmit else (store.config.seed, m["table_init_kind"])
    placed = int(
        store.k.commit_allocations(
            al_e,
            al_k,
            b.from_host(restore_index),
            b.from_host(vec),
            b.from_host(st),
            ea.row_base,
            ea.seen,
            ea.keys,
            ea.table_ids,
            ea.addr,
            a.owner,
            a.free_stack,
            a.n_free,
            a.vectors,
            a.opt_state,
            seed,
            init_kind,
            m["table_init_scale"],
            store.kmax,
        )
    )
    # the restored chunks come first in tslots' order, so the placed ones are a prefix
    n_restored = int((restore_index[:placed] >= 0).sum()) if n_sp else 0
    if n_restored:
        store.tiers[g].release(tslots[:n_restored])
    store.counters.restored_chunks += n_restored
    store.counters.initialised_chunks += placed - n_restored
    return placed


def read_tier(store, group: int, tslots: np.ndarray):
    """Rows of tier slots, taken from a staged background read where it is still valid."""
    tier = store.tiers[group]
    vec = np.empty((tslots.shape[0], tier.chunk_width), np.float32)
    st = np.empty((tslots.shape[0], tier.state_width), np.float32)
    hit = np.zeros(tslots.shape[0], bool)
    n_hit = 0
    for staged in store.residency.staged_reads(group):
        if n_hit == tslots.shape[0]:
            break
        if staged.slots.size == 0:
            continue
        # a read still in flight is waited for only when it holds rows needed now (it is this
        # batch's, running late on a busy machine): reading them again here would double the IO
        if not staged.future.done() and not np.isin(tslots[~hit], staged.slots).any():
            continue
        wait([staged.future])
        if staged.future.exception() is not None:
            continue
        s_vec, s_st = staged.future.result()
        # a slot released since the read began is not handed out again before the read
        # ends (the tier's quarantine), so a staged row of a slot still held is current
        n_hit += int(take_staged(staged.slots, s_vec, s_st, tslots, hit, vec, st))
    if n_hit < tslots.shape[0]:
        vec[~hit], st[~hit] = tier.read(tslots[~hit])
    return vec, st, n_hit


def drop_dead_entries(store) -> int:
    """Erase entries with no resident chunk whose every utility fell below ``drop_floor``."""
    store.check_writable()
    if store.config.mode == "cache":
        return 0
    store.fold_utility_scale()
    ea = store.entries.arrays
    out = store.backend.empty(max(int(ea.addr.shape[0]), 1), np.int64)
    n = int(
        store.k.find_dead_entries(
            ea.row_base, ea.seen, ea.table_ids, ea.addr, ea.util, np.float32(store.config.drop_floor), out
        )
    )
    if n:
        erase_entries(store, out[:n])
        store.counters.dropped_entries += n
    return n


def erase_entries(store, entries) -> int:
    ea = store.entries.arrays
    m = store.meta
    total = hashed_erased = 0
    for pool in store.pools:
        a = pool.arrays
        tier_out = store.backend.empty(max(int(entries.shape[0]) * store.kmax, 1), np.int64)
        n, n_h, n_t = (
            int(x)
            for x in store.k.erase_entries(
                entries,
                ea.row_base,
                ea.seen,
                ea.table_ids,
                ea.addr,
                ea.util,
                a.owner,
                a.free_stack,
                a.n_free,
                m["table_group"],
                pool.plan.group,
                store.kmax,
                tier_out,
            )
        )
        if n_t:
            store.tiers[pool.plan.group].release(store.backend.to_host(tier_out[:n_t]))
        store.entries.erased(n, n_h)
        total += n
        hashed_erased += n_h
    store.entries_moved()
    if hashed_erased:
        # no tombstones: the hashed index is rebuilt from its live keys (see EntryTable)
        store.rehash(store.entries.capacity_after_erase())
    return total

"""Cache mode: which chunks are resident in the pool, and bringing a batch's chunks in.

Nothing is pruned in cache mode: every chunk lives in the pool or in the disk tier,
and utilities decide which stay fast. :func:`make_resident` makes a batch's chunks
resident, evicting low-utility chunks the batch (and the next prefetched batch)
does not use; victims are found below a sampled utility threshold, never by a full
sort. :func:`prefetch_async` starts the next batch's disk reads on a background
thread, and :func:`read_through` serves a lookup that will not be trained without
moving anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import placement
from .errors import PoolCapacityError
from .kernels.layout import tier_slot_of
from .pool import ChunkPool


@dataclass
class Staged:
    """A background read of tier rows, for a coming batch."""

    slots: np.ndarray         # ascending tier slots being read in the background
    future: Any
    mark: int                 # the tier's release log position when the read began


def make_resident(store, uniq) -> None:
    """Cache mode: every chunk of these entries into the pool (evicting others to disk)."""
    b = store.backend
    if uniq.shape[0] == 0:
        return
    for pool in store.pools:
        g = pool.plan.group
        miss_e, miss_k = placement.missing_chunks(store, uniq, g)
        n = int(miss_e.shape[0])
        if n == 0:
            continue
        if n > pool.n_free:
            tids, _ = store.entries.keys_of(b.to_host(uniq))
            in_group = store._host_meta["table_group"][tids] == g
            batch_chunks = int(store._host_meta["table_chunks"][tids[in_group]].sum())
            if batch_chunks > pool.slots:
                raise PoolCapacityError(
                    f"a batch needs {batch_chunks} resident chunks of width {pool.chunk_width} but the pool has "
                    f"{pool.slots} slots; raise the budget or shrink the batch"
                )
            need = n - pool.n_free
            evictable = pool.n_used - (batch_chunks - n)
            batch = np.sort(b.to_host(uniq))
            evict_for(store, pool, batch, np.union1d(batch, store._upcoming), need,
                      min(evictable, need + pool.slots // 32))
        placement.allocate(store, pool, miss_e, miss_k, fetch_counter="sync_fetched_chunks")


def evict_for(store, pool: ChunkPool, batch_sorted: np.ndarray, spare_sorted: np.ndarray, need: int,
               target: int) -> None:
    """Evict at least ``need`` (aiming at ``target``) low-utility chunks not in the batch,
    sparing the next batch's (``spare_sorted``) as long as others can go."""
    b, k = store.backend, store.k
    g = pool.plan.group
    ea = store.entries.arrays
    rng = np.random.default_rng([store.config.seed, store.step_count, store.counters.spilled_chunks])
    positions = rng.integers(0, pool.slots, size=min(4096, pool.slots)).astype(np.int64)
    sampled = b.empty(positions.shape[0], np.float32)
    k.slot_utilities(pool.arrays.owner, ea.addr, ea.util, b.from_host(positions), sampled)
    sampled = b.to_host(sampled)
    sampled = sampled[~np.isnan(sampled)]
    # at least a quarter of the residents qualify, so that a call scans a few times
    # the slots it frees instead of the whole pool; the prune pass still ranks strictly
    q = min(1.0, max(1.5 * target / max(pool.n_used, 1), 0.25))
    threshold = float(np.quantile(sampled, q)) if sampled.size and q < 1.0 else np.inf
    done = 0
    for attempt in range(3):
        pinned = b.from_host(spare_sorted if attempt < 2 else batch_sorted)
        want = target - done
        out_e = b.empty(want, np.int64)
        out_k = b.empty(want, np.int64)
        n, store._clock[g] = (int(x) for x in k.pick_victims(pool.arrays.owner, ea.addr, ea.util, pinned,
                                                            np.float32(threshold), store._clock[g], out_e, out_k))
        placement.evict(store, pool, out_e[:n], out_k[:n])
        done += n
        if done >= need:
            return
        threshold = np.inf
        target = max(target, need)
    raise PoolCapacityError(f"could not free {need} slots of width {pool.chunk_width} (found {done})")


def prefetch(store, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
    """Cache mode: make every chunk of these keys resident now; returns chunks fetched or initialised.

    Unseen keys are inserted, as the forward pass would. A no-op in prune mode,
    where a chunk that is not resident is pruned by definition.
    """
    store._check_writable()
    if store.config.mode != "cache":
        return 0
    q_tables, ids_d = store._flat_keys(features, ids, offsets)
    entries = store._resolve(q_tables, ids_d, insert=True)
    before = store.counters.restored_chunks + store.counters.initialised_chunks
    make_resident(store, store._group(entries, q_tables).uniq)
    return store.counters.restored_chunks + store.counters.initialised_chunks - before


def prefetch_async(store, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
    """Cache mode: start reading, on a background thread, the spilled chunks these keys need.

    ``features``, ``ids`` and ``offsets`` are laid out as for :meth:`pooled_lookup`
    (offsets may be omitted for one table). The next forward pass installs the
    rows without waiting on the disk; a row whose slot was released in between is
    read again. Returns the number of chunks being read.
    """
    store._check_writable()
    if store.config.mode != "cache":
        return 0
    q_tables, ids_d = store._flat_keys(features, ids, offsets)
    entries, _ = store.entries.find(q_tables, ids_d)
    uniq = store._group(entries, q_tables).uniq
    b = store.backend
    store._upcoming = np.sort(b.to_host(uniq))
    total = 0
    for pool in store.pools:
        g = pool.plan.group
        miss_e, miss_k = placement.missing_chunks(store, uniq, g)
        n = int(miss_e.shape[0])
        codes = b.empty(max(n, 1), np.int32)
        store.k.chunk_codes(store.entries.arrays.addr, miss_e, miss_k, codes)
        c = b.to_host(codes)[:n]
        slots = np.unique(tier_slot_of(c[c <= -2]).astype(np.int64))
        if slots.size == 0 or store.tiers[g] is None:
            continue
        tier = store.tiers[g]
        reads = store._staged.setdefault(g, [])
        while len(reads) >= 2:
            old = reads.pop(0)
            old.future.cancel()
            tier.end_read(old.mark)
        future, mark = tier.read_async(slots)
        reads.append(Staged(slots, future, mark))
        total += int(slots.size)
    return total


def read_through(store, pool: ChunkPool, entries, q_tables):
    """Cache mode, no training: the tier rows of the batch's spilled chunks, read
    synchronously without moving anything into the pool."""
    b = store.backend
    g = pool.plan.group
    none = b.empty(0, np.int64), b.empty((0, pool.plan.chunk_width), np.float32)
    if store.tiers[g] is None:
        return none
    uniq = store._group(entries, q_tables).uniq
    miss_e, miss_k = placement.missing_chunks(store, uniq, g)
    n = int(miss_e.shape[0])
    if n == 0:
        return none
    codes = b.empty(n, np.int32)
    store.k.chunk_codes(store.entries.arrays.addr, miss_e, miss_k, codes)
    codes = b.to_host(codes)
    slots = np.unique(tier_slot_of(codes[codes <= -2]).astype(np.int64))
    if slots.size == 0:
        return none
    vec, _ = store.tiers[g].read(slots)
    store.counters.sync_fetched_chunks += int(slots.size)
    return b.from_host(slots), b.from_host(vec)

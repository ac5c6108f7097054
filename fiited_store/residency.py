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

from collections.abc import Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import placement, tiering
from .errors import PoolCapacityError
from .kernels import cpu as host_kernels
from .pool import ChunkPool


class FlatKeys(NamedTuple):
    """A request's keys: its features' tables, the table and id of each occurrence, and
    (when it came with offsets) the offsets and the bag of each occurrence."""

    feature_tables: np.ndarray  # int64[F], host
    q_tables: Any  # int16[nnz]
    ids: Any  # int64[nnz]
    offsets: np.ndarray | None  # int64[F * B + 1], host
    bag_of_occ: Any  # int64[nnz] or None


@dataclass
class Resolved:
    """A prefetched batch whose keys were all found: the training lookup of the same
    batch takes its entries and grouping instead of finding and grouping them again,
    and its chunks that were not resident (less those that came in since) unless one
    of its chunks was evicted in between (:func:`placement.evict` forgets them)."""

    keys: FlatKeys  # ids and offsets are the host copies the lookup compares
    entries: Any
    grouping: Any
    version: tuple  # (entry table, its version, store generation) when resolved
    missing: dict | None  # pool group -> (entries, chunks) not resident at the prefetch


@dataclass
class Staged:
    """A background read of tier rows, for a coming batch."""

    slots: np.ndarray  # tier slots being read in the background, in the batch's chunk order
    future: Any
    mark: int  # what the tier handed out for this read (end_read releases its quarantine)


class Residency:
    """What cache mode keeps between calls of one store, prefetching ``depth`` batches ahead.

    - ``staged``: per pool, the background reads of coming batches, newest last: one for
      each of the ``depth`` batches ahead and one for the batch about to be looked up (a
      prefetch is usually called before the forward);
    - ``upcoming``: the entries of the last ``depth`` prefetched batches, which evictions
      spare when they can;
    - ``resolved``: the last ``depth + 1`` prefetched batches, resolved, for their
      training lookups;
    - ``clock``: per pool, where the victim scan stopped;
    - ``needed`` and ``missed``: per table, the chunks each ``prefetch`` and training lookup
      needed resident, and those the pool did not hold at that call (installed from a
      background read or the disk, or new); the pool's hit rate is one minus their ratio.
    """

    def __init__(self, n_pools: int, n_tables: int = 0, depth: int = 1):
        self.depth = int(depth)
        self.staged: dict[int, list[Staged]] = {}
        self.upcoming_batches: list[np.ndarray] = []
        self.resolved: list[Resolved] = []
        self.clock = [0] * n_pools
        self.needed = np.zeros(n_tables, np.int64)
        self.missed = np.zeros(n_tables, np.int64)

    @property
    def upcoming(self) -> np.ndarray:
        """Entries of the batches prefetched and not looked up yet (repeats allowed)."""
        if not self.upcoming_batches:
            return np.empty(0, np.int64)
        if len(self.upcoming_batches) == 1:
            return self.upcoming_batches[0]
        return np.concatenate(self.upcoming_batches)

    def prefetched(self, uniq: np.ndarray) -> None:
        """A batch's entries were prefetched: spared from eviction for the next ``depth`` batches."""
        self.upcoming_batches.append(uniq)
        del self.upcoming_batches[: -self.depth]

    def hit_rates(self, table_names) -> dict[str, float | None]:
        """Per table, the share of chunks training lookups found resident (None before any)."""
        return {
            name: (1.0 - float(self.missed[i]) / float(self.needed[i])) if self.needed[i] else None
            for i, name in enumerate(table_names)
        }

    def hit_counts(self) -> dict[str, list[int]]:
        """The counters behind :meth:`hit_rates`, as a checkpoint keeps them."""
        return {"needed": self.needed.tolist(), "missed": self.missed.tolist()}

    def restore_hit_counts(self, counts: dict[str, list[int]]) -> None:
        """Counters a checkpoint kept (absent in stores saved before they existed: zeros)."""
        for name in ("needed", "missed"):
            saved = np.asarray(counts.get(name, []), np.int64)
            into = getattr(self, name)
            into[:] = 0
            into[: min(saved.size, into.size)] = saved[: into.size]

    def has_resolved(self) -> bool:
        return bool(self.resolved)

    def forget_resolved(self) -> None:
        self.resolved.clear()

    def staged_reads(self, group: int) -> list[Staged]:
        """Pool ``group``'s background reads, oldest first."""
        return self.staged.get(group, [])

    def chunks_left_the_pool(self, spares_upcoming: bool) -> None:
        """An eviction ran: the prefetched batches' lists of missing chunks no longer hold,
        but the latest one's when the eviction spared its entries."""
        for r in self.resolved:
            if not (spares_upcoming and any(r.grouping.uniq is u for u in self.upcoming_batches)):
                r.missing = None

    def drop_reads(self) -> None:
        """Forget every background read (the tiers they read were replaced)."""
        self.staged.clear()

    def cancel_reads(self, tiers) -> None:
        """Cancel every background read and end it on its tier (the store is closing)."""
        for g, reads in self.staged.items():
            for st in reads:
                st.future.cancel()
                tiers[g].end_read(st.mark)
        self.staged.clear()
        self.resolved.clear()


def _resolution_version(store) -> tuple:
    return id(store.entries), store.entries.version, store.generation


def take_resolved(store, feature_tables: np.ndarray, ids, offsets) -> Resolved | None:
    """The prefetched batch equal to this request (its ``keys`` hold private copies of
    the ids and offsets), or None. A match and every older prefetch are forgotten."""
    resolved = store.residency.resolved
    if not resolved:
        return None
    if store.backend.name != "cpu" or _resolution_version(store) != resolved[0].version:
        resolved.clear()
        return None
    for i, r in enumerate(resolved):
        k = r.keys
        if (
            np.array_equal(k.feature_tables, feature_tables)
            and host_kernels.equal_arrays(k.offsets, offsets)
            and host_kernels.equal_arrays(k.ids, ids)
        ):
            del resolved[: i + 1]
            return r
    return None


def _batch_too_big(need: int, pool: ChunkPool) -> PoolCapacityError:
    return PoolCapacityError(
        f"a batch needs {need} resident chunks of width {pool.chunk_width} but the pool has {pool.slots} slots; "
        "raise the budget or shrink the batch; nothing was changed"
    )


def check_batch_fits(store, q_tables, ids) -> None:
    """Cache mode, before a request inserts anything: refuse one whose distinct keys need
    more resident chunks in some pool than the pool has slots (the refusal would otherwise
    come after its new keys were inserted). Counting distinct keys costs a sort, so it runs
    only when the request's occurrences could be too many."""
    if int(q_tables.shape[0]) * store.kmax <= min(p.slots for p in store.pools):
        return  # every occurrence a new key with every chunk would still fit: the usual case
    b = store.backend
    m = store.host_meta
    q = b.to_host(q_tables)
    for pool in store.pools:
        g = pool.plan.group
        in_group = m["table_group"][q] == g
        bound = int(m["table_chunks"][q[in_group]].sum())
        if bound <= pool.slots:
            continue
        keys = np.unique(np.stack([q[in_group].astype(np.int64), b.to_host(ids)[in_group]]), axis=1)
        need = int(m["table_chunks"][keys[0]].sum())
        if need > pool.slots:
            raise _batch_too_big(need, pool)


def make_resident(store, uniq, missing: dict | None = None, room_for: np.ndarray | None = None) -> None:
    """Cache mode: every chunk of these entries into the pool (evicting others to disk).
    ``missing``: the prefetch's lists of their chunks that were not resident. ``room_for``:
    per pool, free slots to leave beyond them (for the chunks of keys about to be inserted)."""
    b = store.backend
    if uniq.shape[0] == 0 and room_for is None:
        return
    state = store.residency
    ea, m = store.entries.arrays, store.host_meta
    host_index = (b.to_host(ea.row_base), b.to_host(ea.seen), b.to_host(ea.table_ids))
    host_kernels.count_by_table(b.to_host(uniq), *host_index, len(store.tables), m["table_chunks"], True, state.needed)
    for pool in store.pools:
        g = pool.plan.group
        extra = 0 if room_for is None else int(room_for[g])
        if uniq.shape[0]:
            miss_e, miss_k = placement.missing_chunks(store, uniq, g, None if missing is None else missing.get(g))
        else:
            miss_e = miss_k = b.empty(0, np.int64)
        n = int(miss_e.shape[0])
        if n + extra == 0:
            continue
        if n:
            host_kernels.count_by_table(
                b.to_host(miss_e), *host_index, len(store.tables), m["table_chunks"], False, state.missed
            )
        restores = None
        if n + extra > pool.n_free:
            # the rows to restore are read (and checked) before any chunk leaves for them
            restores = placement.read_restores(store, pool, miss_e, miss_k)
            tids, _ = store.entries.keys_of(b.to_host(uniq))
            in_group = store.host_meta["table_group"][tids] == g
            batch_chunks = int(store.host_meta["table_chunks"][tids[in_group]].sum())
            if batch_chunks + extra > pool.slots:
                raise _batch_too_big(batch_chunks + extra, pool)
            need = n + extra - pool.n_free
            evictable = pool.n_used - (batch_chunks - n)
            batch = b.to_host(uniq)
            target = min(evictable, need + pool.slots // 32)
            # the tier space of every eviction round at once: a full device refuses here
            placement.reserve_spills(store, g, max(target, need) * (store.kmax if tiering.whole_rows(store, g) else 1))
            evict_for(store, pool, batch, need, target)
        if n:
            placement.allocate(store, pool, miss_e, miss_k, fetch_counter="sync_fetched_chunks", restores=restores)


def resolve_resident(store, q_tables, ids, new_out: list | None = None):
    """Cache mode, training: (the entries of these keys, unseen ones inserted, and their
    grouping when no key was new, else None), every chunk resident.

    Room is made first (evictions to the tier, the rows to restore read and checked),
    then the new keys are inserted and their chunks placed in the room left for them: a
    full device or a corrupt tier file refuses the request before a key is added."""
    b = store.backend
    entries, n_missing, n_hashed = store.entries.find_counted(q_tables, ids)
    if n_missing and store.entries.needs_rehash(n_hashed):
        capacity = store.entries.rehash_capacity(n_hashed)
        store.check_memory_budget(capacity)
        store.rehash(capacity)
        entries, n_missing, n_hashed = store.entries.find_counted(q_tables, ids)
    grouping = store.group_occurrences(entries, q_tables)  # the found entries (unknown keys left out)
    room = None
    if n_missing:
        m = store.host_meta
        e_h, q_h, id_h = b.to_host(entries), b.to_host(q_tables), b.to_host(ids)
        unseen = e_h < 0
        keys = np.unique(np.stack([q_h[unseen].astype(np.int64), id_h[unseen]]), axis=1)
        room = np.zeros(len(store.pools), np.int64)
        np.add.at(room, m["table_group"][keys[0]], m["table_chunks"][keys[0]])
    make_resident(store, grouping.uniq, room_for=room)
    if not n_missing:
        return entries, grouping
    new = store.entries.insert_missing(q_tables, ids, entries)
    if new_out is not None:
        new_out.append(new)
    make_resident(store, new)  # into the room left for them: nothing leaves the pool
    return entries, None


def evict_for(store, pool: ChunkPool, batch: np.ndarray, need: int, target: int) -> None:
    """Evict at least ``need`` (aiming at ``target``) low-utility chunks not of the batch's
    entries (any order), sparing the prefetched next batch's too as long as others can go."""
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
    # chunks at the quantile qualify too: utilities tie (untouched chunks all sit at 0),
    # and a strict bound at a tied quantile would let no chunk through and scan the pool
    threshold = (
        float(np.nextafter(np.float32(np.quantile(sampled, q)), np.float32(np.inf)))
        if sampled.size and q < 1.0
        else np.inf
    )
    done = 0
    state = store.residency
    spare = np.concatenate([batch, state.upcoming])
    for attempt in range(3):
        pinned = b.from_host(spare if attempt < 2 else batch)
        want = target - done
        out_e = b.empty(want, np.int64)
        out_k = b.empty(want, np.int64)
        n, state.clock[g] = (
            int(x)
            for x in k.pick_victims(
                pool.arrays.owner, ea.addr, ea.util, pinned, np.float32(threshold), state.clock[g], out_e, out_k
            )
        )
        ev_e, ev_k = out_e[:n], out_k[:n]
        if n and tiering.whole_rows(store, g):
            ev_e, ev_k = _whole_rows(store, g, ev_e)
            n = int(ev_e.shape[0])
        placement.evict(store, pool, ev_e, ev_k, spares_upcoming=attempt < 2)
        done += n
        if done >= need:
            return
        threshold = np.inf
        target = max(target, need)
    raise PoolCapacityError(f"could not free {need} slots of width {pool.chunk_width} (found {done})")


def _whole_rows(store, group: int, victims: np.ndarray):
    """Every resident chunk of the victims' rows: a row leaves the pool in one piece, so that
    it comes back in one read."""
    entries = np.unique(victims)
    ea, m = store.entries.arrays, store.host_meta
    size = entries.shape[0] * store.kmax
    out_e, out_k = np.empty(size, np.int64), np.empty(size, np.int64)
    n = int(
        host_kernels.resident_chunks(
            entries,
            ea.row_base,
            ea.seen,
            ea.table_ids,
            ea.addr,
            m["table_chunks"],
            m["table_group"],
            group,
            out_e,
            out_k,
        )
    )
    return out_e[:n], out_k[:n]


def prefetch(store, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
    """Cache mode: make every chunk of these keys resident now; returns chunks fetched or initialised.

    Unseen keys are inserted, as the forward pass would. A no-op in prune mode,
    where a chunk that is not resident is pruned by definition.
    """
    store.check_writable()
    if store.config.mode != "cache":
        return 0
    keys = store.flat_keys(features, ids, offsets)
    check_batch_fits(store, keys.q_tables, keys.ids)
    before = store.counters.restored_chunks + store.counters.initialised_chunks
    resolve_resident(store, keys.q_tables, keys.ids)
    return store.counters.restored_chunks + store.counters.initialised_chunks - before


def prefetch_async(store, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
    """Cache mode: start reading, on a background thread, the spilled chunks these keys need.

    ``features``, ``ids`` and ``offsets`` are laid out as for :meth:`pooled_lookup`
    (offsets may be omitted for one table). The next forward pass installs the
    rows without waiting on the disk; a row whose slot was released in between is
    read again. Returns the number of chunks being read.
    """
    store.check_writable()
    if store.config.mode != "cache":
        return 0
    keys = store.flat_keys(features, ids, offsets)
    entries, n_missing, _ = store.entries.find_counted(keys.q_tables, keys.ids)
    grouping = store.group_occurrences(entries, keys.q_tables)
    uniq = grouping.uniq
    b = store.backend
    missing: dict = {}
    state = store.residency
    if n_missing == 0 and keys.offsets is not None and b.name == "cpu":
        # the lookup of this batch, one step later, reuses all of it (the ids and offsets
        # are copied: the caller may refill its arrays in between)
        owned = keys._replace(ids=np.array(keys.ids), offsets=np.array(keys.offsets))
        if state.resolved and state.resolved[0].version != _resolution_version(store):
            state.resolved.clear()
        state.resolved.append(Resolved(owned, entries, grouping, _resolution_version(store), missing))
        del state.resolved[: -(state.depth + 1)]
    state.prefetched(b.to_host(uniq))
    total = 0
    for pool in store.pools:
        g = pool.plan.group
        miss_e, miss_k = missing[g] = placement.missing_chunks(store, uniq, g)
        if store.tiers[g] is None:
            continue
        # in the order the batch's allocation will list them (read_tier walks both together)
        slots = _spilled_slots(store, miss_e, miss_k)
        if slots.size == 0:
            continue
        tier = store.tiers[g]
        reads = state.staged.setdefault(g, [])
        while len(reads) >= state.depth + 1:
            old = reads.pop(0)
            old.future.cancel()
            tier.end_read(old.mark)
        future, mark = tier.read_async(slots)
        reads.append(Staged(slots, future, mark))
        total += int(slots.size)
    return total


def wait_for_tier_io(store) -> None:
    """Block until every background read of the prefetched batches, and every spill
    write, is done (a benchmark that times steps one after another waits here, so that
    no tier work runs on into the next store's step)."""
    futures = [staged.future for reads in store.residency.staged.values() for staged in reads]
    if futures:
        wait(futures)
    for tier in store.tiers:
        if tier is not None:
            tier.wait_for_writes()


def _spilled_slots(store, miss_e, miss_k) -> np.ndarray:
    """The tier slots of the spilled ones among these chunks, in list order (host)."""
    b = store.backend
    n = int(miss_e.shape[0])
    codes = b.empty(max(n, 1), np.int32)
    store.k.chunk_codes(store.entries.arrays.addr, miss_e, miss_k, codes)
    slots = np.empty(n, np.int64)
    n_sp = host_kernels.restore_plan(b.to_host(codes)[:n], np.empty(n, np.int64), slots)
    return slots[:n_sp]


def read_through(store, pool: ChunkPool, entries, q_tables):
    """Cache mode, no training: the tier rows of the batch's spilled chunks, read
    synchronously without moving anything into the pool."""
    b = store.backend
    g = pool.plan.group
    none = b.empty(0, np.int64), b.empty((0, pool.plan.chunk_width), np.float32)
    if store.tiers[g] is None:
        return none
    uniq = store.group_occurrences(entries, q_tables).uniq
    miss_e, miss_k = placement.missing_chunks(store, uniq, g)
    n = int(miss_e.shape[0])
    if n == 0:
        return none
    slots = np.sort(_spilled_slots(store, miss_e, miss_k))  # distinct chunks hold distinct slots
    if slots.size == 0:
        return none
    vec, _ = store.tiers[g].read(slots)
    store.counters.sync_fetched_chunks += int(slots.size)
    return b.from_host(slots), b.from_host(vec)

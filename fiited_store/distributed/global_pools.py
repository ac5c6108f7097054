"""The shards' pools, run as the one pool of a single store.

A single store makes two decisions over its whole pool that a shard cannot make
from its own rows: it gives new keys' chunks its free slots in first-occurrence
order until none remain, and when more chunks pass a prune's thresholds than it
has slots, it keeps the highest ranks. Left to each shard, both would follow
the shard's 1/W of the slots instead of the store's budget: a shard whose rows
happen to be hotter would cut where one store would not, and keys would win or
lose slots by where they hash. On ML-100K at 75% pruning the pool is full from
the first batch and every prune is over-subscribed, so this moved a 2-rank
run's AUC by up to 0.003 against one process.

:class:`GlobalPools` makes both decisions for the store as a whole:

- **the prune's cutoff**: the shards' counts of chunks that pass are summed; when
  they exceed the store's slots, the cutoff is the store-wide rank of the last
  chunk kept, found by a radix select over every shard's ranks (four all-reduces
  of a 65,536-bin histogram, not a gather of the ranks);
- **admission**: every rank keeps the same count of the store's free slots
  (recounted by one all-reduce after a prune). A full store, the usual state
  between prunes, costs nothing: every rank knows no slot is free. Nor does a
  store with more free slots than the batch could want (every key of every rank
  new; the key exchange's header bounds that): every shard admits all, and the
  count goes down by that bound, a lower bound recounted when it could decide
  something. Near the fill, one small all-reduce of the chunks the shards' new
  keys want says whether they all fit; only in the batch where they do not do
  the owners gather their new keys with each key's place in the global batch
  (feature, rank, position), and every rank computes the same prefix that one
  store would admit.

Each shard's own pool holds its share plus :data:`POOL_SLACK`, so that it can
take the slots the store-wide decisions give it when its rows run hotter than
1/W. Beyond the slack the shard's own pool binds (reported as ``shard_bound``),
and the sharded store then differs from one store in that pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..placement import local_cutoff

POOL_SLACK = 1 / 16  # each shard's pool above its 1/W share (of the slots beyond its floors)

# a key's place in the global batch rides in the int64 that carries its table id:
# table (16 bits), its first feature in the sender's batch (16 bits), its index among
# the sender's distinct keys (31 bits)
_TABLE_BITS, _FEATURE_BITS = 16, 16
MAX_FEATURES = 1 << _FEATURE_BITS


def pack_key_places(tables: np.ndarray, features: np.ndarray) -> np.ndarray:
    """int64[U]: each distinct key's table, its first feature (< MAX_FEATURES, checked by
    the caller) and its index (keys in first-occurrence order)."""
    index = np.arange(tables.shape[0], dtype=np.int64)
    return (
        (tables.astype(np.int64) & 0xFFFF)
        | (features.astype(np.int64) << _TABLE_BITS)
        | (index << (_TABLE_BITS + _FEATURE_BITS))
    )


def tables_of(packed: np.ndarray) -> np.ndarray:
    """int16[n]: the tables of received keys."""
    return (packed & 0xFFFF).astype(np.int16)


def places_of(packed: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """int64[n]: each received key's place in the global batch as one sortable int64:
    its feature, then the rank that sent it, then its index among that rank's keys."""
    feature = (packed >> _TABLE_BITS) & 0xFFFF
    index = packed >> (_TABLE_BITS + _FEATURE_BITS)
    return (feature << 47) | (sources.astype(np.int64) << 31) | index


def select_largest(exchange, ranks: np.ndarray, k: int) -> np.uint64:
    """The k-th largest of every rank's ``ranks`` (uint64) together, 1 <= k <= their count.

    A radix select from the top 16 bits down: per round one all-reduce of the
    histogram of the digit below the prefix found so far, among the values that
    share it. Exact, whatever the ties, in four collectives of 512 KiB."""
    values = np.asarray(ranks, np.uint64)
    prefix = 0
    need = int(k)
    for shift in (48, 32, 16, 0):
        digits = ((values >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)
        hist = exchange.sum(np.bincount(digits, minlength=1 << 16).astype(np.int64))
        above = np.cumsum(hist[::-1])  # above[j]: values whose digit >= 65535 - j
        j = int(np.searchsorted(above, need))
        d = (1 << 16) - 1 - j
        need -= int(above[j - 1]) if j else 0
        prefix = (prefix << 16) | d
        values = values[digits == d]
    return np.uint64(prefix)


class GlobalPools:
    """The prune hooks of a shard (``EmbeddingStore.collective``) and the store-wide
    ledger of free slots, identical on every rank.

    Args:
        exchange: the sharded store's collectives.
        global_slots: int64[pools], the slots of each pool of the whole store.
    """

    def __init__(self, exchange, global_slots: Sequence[int]):
        self.exchange = exchange
        self.global_slots = np.asarray(global_slots, np.int64)
        self.free: np.ndarray | None = None  # int64[pools]; None: count again before admitting
        self.exact = False  # free is the count, not a lower bound of it

    # ------------------------------------------------------------------ prune hooks
    def sum_counts(self, counts: np.ndarray) -> np.ndarray:
        return self.exchange.sum_counts(counts)

    def gather_samples(self, samples: np.ndarray, tables: np.ndarray):
        return self.exchange.gather_samples(samples, tables)

    def prune_cutoff(self, group: int, n_pass: int, slots: int, ranks: Callable[[], np.ndarray]):
        """(use a cutoff, the cutoff, whether this shard's own pool bound it) for pool
        ``group``, where ``n_pass`` chunks of this shard pass their thresholds and its
        pool holds ``slots``; ``ranks()`` gives those chunks' ranks (uint64)."""
        self.free = None  # the prune moves chunks: count again before the next admission
        total, over_here = (int(x) for x in self.exchange.sum(np.array([n_pass, int(n_pass > slots)], np.int64)))
        over_store = total > int(self.global_slots[group])
        if not over_store and not over_here:
            return False, None, False
        host = ranks() if (over_store or n_pass > slots) else None
        cutoff, bound = None, False
        if over_store:  # every rank takes this branch, or none
            cutoff = select_largest(self.exchange, host, int(self.global_slots[group]))
            if int(np.count_nonzero(host >= cutoff)) > slots:
                cutoff, bound = max(cutoff, local_cutoff(host, slots)), True
        elif n_pass > slots:
            cutoff, bound = local_cutoff(host, slots), True
        return cutoff is not None, cutoff, bound

    # ------------------------------------------------------------------ admission
    def admission(self, shard, tables: np.ndarray, ids: np.ndarray, places: Callable[[], np.ndarray], most_keys: int):
        """(the order to insert the received keys in, or None for as received; int64[pools]
        slots this shard may give new chunks): when the free slots run out within this
        batch, the keys in their global-batch order and this shard's part of the prefix
        of new chunks that one store's free slots would take. ``places()``: the keys'
        places in the global batch (:func:`places_of`, only needed then);
        ``most_keys``: the most keys any rank sent any rank in this lookup (agreed by
        every rank).

        A collective of every rank's training lookup, whose collectives every rank
        decides alike from what all of them know: none while the store is full, or
        while it has room for every chunk the batch could want; near the fill, a
        recount of the free slots and a sum of the chunks wanted; only in the batch
        that fills the pool, a gather of the new keys."""
        if shard.config.mode != "prune":  # cache mode makes every chunk resident: nothing to admit
            return None, None
        pools = shard.pools
        limits = np.zeros(len(pools), np.int64)
        own_free = np.array([p.n_free for p in pools], np.int64)
        W = self.exchange.world
        could_want = W * W * int(most_keys) * int(shard.kmax)  # every key of every rank new, every chunk
        for _attempt in range(2):
            if self.free is None:
                used = np.array([p.slots for p in pools], np.int64) - own_free
                self.free, self.exact = np.maximum(self.global_slots - self.exchange.sum(used), 0), True
            room = self.free >= could_want
            if (room | ((self.free == 0) & self.exact)).all():
                # each pool has room for anything this batch wants, or is full: the
                # order does not matter (a new chunk's first values come from its key,
                # not its slot). The count goes down by the most the batch could take,
                # a lower bound that is recounted before it could decide anything
                limits = np.where(room, own_free, 0)
                if room.any():
                    self.free, self.exact = self.free - np.where(room, could_want, 0), False
                return None, limits
            if self.exact:
                break
            self.free = None  # a lower bound too low to decide: count again
        # this shard's new keys, once each, in global order, with the pool and the
        # chunks each wants
        places = places()
        order = np.argsort(places, kind="stable")
        t, i = tables[order], ids[order]
        found, _ = shard.entries.find(t, i)
        miss = np.flatnonzero(np.asarray(found) < 0)
        if miss.size:
            _, first = np.unique(np.stack([t[miss].astype(np.int64), i[miss]]), axis=1, return_index=True)
            miss = miss[np.sort(first)]
        mt = t[miss].astype(np.int64)
        meta = shard.host_meta
        pool_of, wants = meta["table_group"][mt].astype(np.int64), meta["table_chunks"][mt].astype(np.int64)
        demand = np.bincount(pool_of, weights=wants, minlength=len(pools)).astype(np.int64)
        fits = np.minimum(demand, own_free)
        totals = self.exchange.sum(np.concatenate([demand, fits]))
        fit_all = totals[: len(pools)] <= self.free
        if (fit_all | (self.free == 0)).all():
            # in every pool either every new chunk of every shard gets a slot in one
            # store, or none does: no order needed (a shard past its slack takes what
            # it holds)
            limits = np.where(fit_all, fits, 0)
            self.free -= np.where(fit_all, totals[len(pools) :], 0)
            return order, limits
        # the last free slots go to the first new chunks in global order: every rank
        # computes that prefix from every shard's new keys
        mine = np.stack([places[order][miss], pool_of, wants], axis=1)
        every = self.exchange.all_gather_rows(mine)
        counts = self.exchange.all_gather_rows(np.array([[mine.shape[0], *own_free]], np.int64))
        owner = np.repeat(np.arange(counts.shape[0]), counts[:, 0])
        for g in np.flatnonzero(self.free):
            sel = np.flatnonzero(every[:, 1] == g)
            sel = sel[np.argsort(every[sel, 0], kind="stable")]
            want = every[sel, 2]
            before = np.cumsum(want) - want
            give = np.clip(int(self.free[g]) - before, 0, want)
            granted = np.bincount(owner[sel], weights=give, minlength=counts.shape[0]).astype(np.int64)
            taken = np.minimum(granted, counts[:, 1 + g])  # a shard past its slack takes what it holds
            limits[g] = taken[self.exchange.rank]
            self.free[g] -= int(taken.sum())
        return order, limits

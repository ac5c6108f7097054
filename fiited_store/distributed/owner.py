"""The owner's half of a sharded lookup: rows for the keys it received, updates from
the gradients it received. Functions of the shard (an ordinary EmbeddingStore) they
act on, like :mod:`fiited_store.placement`; the sharded front calls them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import placement, residency
from ..kernels import cpu as host_kernels


class OwnerRows(NamedTuple):
    entries: np.ndarray  # int64[n]: the entry of each received key in the shard, -1 if unknown
    new: np.ndarray  # int64[m]: entries this lookup inserted (erased again if a peer fails)


def owner_rows(
    store,
    q_tables: np.ndarray,
    ids: np.ndarray,
    train: bool,
    rows: np.ndarray,
    row_start: np.ndarray,
    order: np.ndarray | None = None,
    limits: np.ndarray | None = None,
) -> OwnerRows:
    """Find (and when training, insert) the keys, and gather their rows into
    ``rows[row_start[i] : + the key's dim]`` (float32; zeros where a chunk is absent).

    Training inserts unseen keys as a single store's training lookup does (their
    chunks take free slots, or start absent when the pool is full), in ``order``
    and giving at most ``limits[g]`` slots of pool g (see ``GlobalPools.admission``),
    and, in cache mode, makes every chunk of the keys resident."""
    new: list = []
    if order is None:
        entries = store.resolve(q_tables, ids, insert=train, new_out=new, limits=limits)
    else:
        entries = np.empty(ids.shape[0], np.int64)
        entries[order] = store.resolve(q_tables[order], ids[order], insert=train, new_out=new, limits=limits)
    new_entries = new[0] if new else np.empty(0, np.int64)
    if store.config.mode == "cache" and train and entries.shape[0]:
        try:
            residency.make_resident(store, store.group_occurrences(entries, q_tables).uniq)
        except BaseException:
            if new_entries.shape[0]:
                placement.erase_entries(store, new_entries)
            raise
    m = store.meta
    for pool in store.pools:
        if store.config.mode == "cache" and not train and entries.shape[0]:
            sp_slots, sp_vectors = residency.read_through(store, pool, entries, q_tables)
        else:
            sp_slots, sp_vectors = np.empty(0, np.int64), np.empty((0, pool.plan.chunk_width), np.float32)
        host_kernels.gather_entry_rows(
            entries,
            q_tables,
            store.entries.arrays.addr,
            pool.arrays.vectors,
            m["table_chunks"],
            m["table_group"],
            pool.plan.group,
            sp_slots,
            sp_vectors,
            row_start,
            rows,
        )
    return OwnerRows(entries, new_entries)


def forget(store, new_entries: np.ndarray) -> None:
    """Undo the insertions of a lookup that a peer's failure cancelled."""
    if new_entries.shape[0]:
        placement.erase_entries(store, new_entries)


def current_entries(store, entries: np.ndarray, generation: int, q_tables: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The received keys' entries now (a rehash or an erase since the lookup moves them)."""
    if generation == store.generation:
        return entries
    found, _ = store.entries.find(q_tables, ids)
    return found


class Gradients(NamedTuple):
    uniq: Any  # int64[U] distinct entries
    counts: Any  # int64[U] accesses of each, summed over every rank's batch
    grad_buf: Any  # float32[>= U, dmax] their summed gradients
    n_bad: int  # rows whose sums are not finite, or square past float32


def sum_gradients(
    store,
    entries: np.ndarray,
    q_tables: np.ndarray,
    order: np.ndarray,
    row_key: np.ndarray,
    row_start: np.ndarray,
    row_dim: np.ndarray,
    rows: np.ndarray,
    row_count: np.ndarray,
) -> Gradients:
    """Sum received gradient rows per entry; nothing in the shard changes.

    Row i belongs to received key ``row_key[i]``, holds ``row_dim[i]`` floats at
    ``row_start[i]`` and stands for ``row_count[i]`` accesses; rows are added in
    ``order`` (the single-store order when the requesters sent one row per
    occurrence)."""
    grouping = store.group_occurrences(entries, q_tables)
    U = int(grouping.uniq.shape[0])
    grad_buf = store.gradient_rows(U)
    which = grouping.which[row_key] if row_key.shape[0] else np.empty(0, np.int64)
    host_kernels.sum_rows_by_group(order, which, row_start, row_dim, rows, grad_buf)
    counts = (
        np.bincount(which[which >= 0], weights=row_count[which >= 0], minlength=U).astype(np.int64)[:U]
        if U
        else np.zeros(0, np.int64)
    )
    n_bad = int(host_kernels.count_nonfinite_rows(grad_buf, U))
    return Gradients(grouping.uniq, counts, grad_buf, n_bad)


def apply_gradients(store, grads: Gradients) -> None:
    """Utilities and the fused optimizer step, as EmbeddingStore.backward's second phase."""
    store.apply_summed_gradients(grads.uniq, grads.counts, grads.grad_buf)

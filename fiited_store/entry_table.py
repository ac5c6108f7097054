"""The entry table: the paper's VHPI hash table, with the key stored.

Open addressing with linear probing over flat arrays (see ``kernels/layout.py``).
Two ids never share an entry. The table grows by rehashing into fresh arrays and
never overwrites a live entry; erased entries become tombstones that the next
rehash drops.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .kernels.layout import EMPTY


class EntryArrays(NamedTuple):
    keys: np.ndarray       # int64[cap]
    table_ids: np.ndarray  # int16[cap]; EMPTY, TOMBSTONE or the table index
    addr: np.ndarray       # int32[cap, kmax]; slot, ABSENT, or -2 - tier slot
    util: np.ndarray       # float32[cap, U]; stored utilities (scaled, see store)


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class EntryTable:
    """Batched find / find_or_insert / erase over the entry arrays of one store."""

    def __init__(self, backend, kmax: int, util_width: int, capacity: int, max_load: float):
        self.backend = backend
        self.kmax = kmax
        self.util_width = util_width
        self.max_load = max_load
        self.arrays = self._allocate(_pow2_at_least(max(capacity, 8)))
        self.n_live = 0
        self.n_tombstones = 0

    def _allocate(self, cap: int) -> EntryArrays:
        b = self.backend
        return EntryArrays(
            keys=b.full(cap, 0, np.int64),
            table_ids=b.full(cap, EMPTY, np.int16),
            addr=b.full((cap, self.kmax), -1, np.int32),
            util=b.full((cap, self.util_width), 0.0, np.float32),
        )

    @classmethod
    def from_arrays(cls, backend, arrays: EntryArrays, max_load: float) -> "EntryTable":
        table = cls.__new__(cls)
        table.backend = backend
        table.kmax = arrays.addr.shape[1]
        table.util_width = arrays.util.shape[1]
        table.max_load = max_load
        table.arrays = arrays
        tids = backend.to_host(arrays.table_ids)
        table.n_live = int(np.count_nonzero(tids >= 0))
        table.n_tombstones = int(np.count_nonzero(tids == -2))
        return table

    @property
    def capacity(self) -> int:
        return int(self.arrays.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    @property
    def bytes_per_entry(self) -> int:
        return int(sum(a.nbytes for a in self.arrays) // self.capacity)

    # ------------------------------------------------------------------ verbs
    def find(self, q_tables, q_ids):
        """Entries of the keys, -1 where absent. Shapes: int16[n], int64[n] -> int64[n]."""
        out = self.backend.empty(q_ids.shape[0], np.int64)
        n_missing = self.backend.k.find_entries(self.arrays.keys, self.arrays.table_ids, q_tables, q_ids, out)
        return out, int(n_missing)

    def needs_rehash(self, n_missing: int) -> bool:
        return self.n_live + self.n_tombstones + n_missing > self.max_load * self.capacity

    def rehash_capacity(self, n_missing: int) -> int:
        # Land at 60% of max_load so that the next growth is a whole doubling away;
        # a rehash forced only by tombstones keeps the capacity.
        return max(_pow2_at_least(int((self.n_live + n_missing) / (0.6 * self.max_load)) + 1), 8)

    def rehash(self, new_capacity: int):
        """Move live entries into fresh arrays; returns old position -> new position."""
        old = self.arrays
        new = self._allocate(new_capacity)
        old_to_new = self.backend.empty(old.keys.shape[0], np.int64)
        self.backend.k.rehash_into(*old, *new, old_to_new)
        self.arrays = new
        self.n_tombstones = 0
        return old_to_new

    def insert_missing(self, q_tables, q_ids, entries):
        """Insert keys whose entry is -1 (the caller made room). Returns new entries, first occurrence first."""
        new_entries = self.backend.empty(q_ids.shape[0], np.int64)
        n_new = int(self.backend.k.insert_missing(*self.arrays, q_tables, q_ids, entries, new_entries))
        self.n_live += n_new
        return new_entries[:n_new]

"""The entry table: where each key's chunk addresses and utilities live.

Two index kinds share one entry space, so every kernel addresses an entry by one
integer whatever its kind (see ``kernels/layout.py``):

- **direct** (the paper's VHPI proper) for tables that declare ``num_embeddings``:
  row i of table t is entry ``row_base[t] + i``. No key, no table id and no probe
  are stored or chased; a ``seen`` bit per row says whether the key has an entry
  (a row that was never looked up in training, or was erased, has none), so both
  kinds follow the same semantics and a store gives the same results with either.
- **hashed** for tables without a declared size (arbitrary int64 ids): open
  addressing with linear probing and the key stored, entries
  ``row_base[-1] + slot``. It grows by rehashing into fresh arrays and never
  overwrites a live entry. Erasing keys rebuilds it (see :meth:`EntryTable.capacity_after_erase`),
  so no tombstone is ever left to lengthen probes or count toward growth, and it
  shrinks when most of what it held is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .config import hashed_capacity
from .errors import IdOutOfRangeError
from .kernels.layout import EMPTY, OUT_OF_RANGE


class EntryArrays(NamedTuple):
    row_base: np.ndarray  # int64[T + 1]; direct rows of table t are [row_base[t], row_base[t + 1])
    seen: np.ndarray  # uint32[ceil(direct rows / 32)]; bit e: direct row e holds a key
    keys: np.ndarray  # int64[cap]; hashed slots
    table_ids: np.ndarray  # int16[cap]; EMPTY, TOMBSTONE or the table index
    addr: np.ndarray  # int32[direct rows + cap, kmax]; slot, ABSENT, or -2 - tier slot
    util: np.ndarray  # uint16[direct rows + cap, U]; utilities as bfloat16 (scaled, see store)


def _popcount(words: np.ndarray) -> int:
    return int(np.unpackbits(np.ascontiguousarray(words).view(np.uint8)).sum()) if words.size else 0


def row_bases(direct_rows: Sequence[int]) -> np.ndarray:
    """int64[T + 1] prefix sums of the direct rows of each table (0 for hashed tables)."""
    return np.concatenate([[0], np.cumsum(np.asarray(direct_rows, np.int64))]).astype(np.int64)


class EntryTable:
    """Batched find / insert / erase over the entry arrays of one store.

    Args:
        direct_rows: per table, its declared rows when it uses the direct index, else 0.
        table_names: for error messages.
        capacity: hashed slots to start with (0 when no table is hashed).
    """

    def __init__(
        self,
        backend,
        direct_rows: Sequence[int],
        table_names: Sequence[str],
        kmax: int,
        util_width: int,
        capacity: int,
        max_load: float,
    ):
        self.backend = backend
        self.kmax = kmax
        self.util_width = util_width
        self.max_load = max_load
        self.table_names = list(table_names)
        base = row_bases(direct_rows)
        self.has_hashed = any(r == 0 for r in direct_rows)
        cap = hashed_capacity(capacity) if self.has_hashed else 0
        nd = int(base[-1])
        b = backend
        self.arrays = EntryArrays(
            row_base=b.from_host(base),
            seen=b.full(max((nd + 31) // 32, 1), 0, np.uint32),
            keys=b.full(cap, 0, np.int64),
            table_ids=b.full(cap, EMPTY, np.int16),
            addr=b.full((nd + cap, kmax), -1, np.int32),
            util=b.full((nd + cap, util_width), 0, np.uint16),
        )
        self._host_base = base
        self.n_live = 0
        self.n_hashed = 0
        self.n_tombstones = 0
        #: bumped whenever a live entry moves or goes (inserting moves none): a resolution
        #: of keys that were all found stays true until it changes
        self.version = 0

    @classmethod
    def from_arrays(cls, backend, arrays: EntryArrays, table_names: Sequence[str], max_load: float) -> EntryTable:
        table = cls.__new__(cls)
        table.backend = backend
        table.kmax = arrays.addr.shape[1]
        table.util_width = arrays.util.shape[1]
        table.max_load = max_load
        table.table_names = list(table_names)
        table.arrays = arrays
        table._host_base = np.array(backend.to_host(arrays.row_base), np.int64)
        table.has_hashed = bool(np.any(np.diff(table._host_base) == 0))
        tids = backend.to_host(arrays.table_ids)
        table.n_hashed = int(np.count_nonzero(tids >= 0))
        table.n_live = table.n_hashed + _popcount(backend.to_host(arrays.seen))
        table.n_tombstones = int(np.count_nonzero(tids == -2))
        table.version = 0
        return table

    # ------------------------------------------------------------------ sizes
    @property
    def direct_rows(self) -> int:
        """Entries of the direct index (declared rows of all direct tables)."""
        return int(self._host_base[-1])

    @property
    def capacity(self) -> int:
        """Slots of the hashed index."""
        return int(self.arrays.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    @property
    def hashed_slot_bytes(self) -> int:
        """Bytes one hashed slot costs (key, table id, addresses, utilities)."""
        return 8 + 2 + self.kmax * 4 + self.util_width * 2

    @property
    def table_rows(self) -> np.ndarray:
        """int64[T, 2] on the host: per table (first entry, rows) of its direct index; (., 0) when hashed."""
        base = self._host_base
        return np.stack([base[:-1], np.diff(base)], axis=1)

    def is_direct(self, table: int) -> bool:
        return bool(self._host_base[table + 1] > self._host_base[table])

    def rows_of(self, table: int) -> int:
        return int(self._host_base[table + 1] - self._host_base[table])

    # ------------------------------------------------------------------ verbs
    def _raise_out_of_range(self, q_tables, q_ids, out) -> None:
        bad = int(np.argmax(self.backend.to_host(out) == OUT_OF_RANGE))
        t = int(self.backend.to_host(q_tables[bad : bad + 1])[0])
        key = int(self.backend.to_host(q_ids[bad : bad + 1])[0])
        raise IdOutOfRangeError(self.table_names[t], key, self.rows_of(t), bad)

    def find(self, q_tables, q_ids):
        """Entries of the keys, -1 where absent. Shapes: int16[n], int64[n] -> (int64[n], missing)."""
        out, n_missing, _ = self.find_counted(q_tables, q_ids)
        return out, n_missing

    def find_counted(self, q_tables, q_ids):
        """As :meth:`find`, also counting the missing keys of hashed tables.

        An id outside its direct table's rows raises :class:`IdOutOfRangeError`
        (nothing has changed: finding writes nothing but ``out``)."""
        out = self.backend.empty(q_ids.shape[0], np.int64)
        a = self.arrays
        n_missing, n_hashed, n_bad = self.backend.k.find_entries(
            a.row_base, a.seen, a.keys, a.table_ids, q_tables, q_ids, out
        )
        if n_bad:
            self._raise_out_of_range(q_tables, q_ids, out)
        return out, int(n_missing), int(n_hashed)

    def needs_rehash(self, n_missing_hashed: int) -> bool:
        # tombstones exist only in stores saved before erasing rebuilt the index
        return n_missing_hashed > 0 and (
            self.n_hashed + self.n_tombstones + n_missing_hashed > self.max_load * self.capacity
        )

    def capacity_after_erase(self) -> int:
        """Slots to rebuild the hashed index into once keys were erased from it.

        The rebuild drops what a tombstone would have marked, so erasing never
        lengthens a probe chain and memory falls with the keys held. The index
        shrinks to the size a rehash would land at only when that is at most half
        of today's, so that erasing and re-inserting a few keys does not make it
        oscillate.
        """
        sized = self.rehash_capacity(0)
        return sized if sized <= self.capacity // 2 else self.capacity

    def rehash_capacity(self, n_missing_hashed: int) -> int:
        # Land at 60% of max_load so that the next growth is a whole doubling away;
        # a rehash forced only by tombstones keeps the capacity.
        if not self.has_hashed:
            return 0
        return hashed_capacity(int((self.n_hashed + n_missing_hashed) / (0.6 * self.max_load)) + 1)

    def rehash(self, new_capacity: int):
        """Move live hashed entries into fresh slots; returns old entry -> new entry."""
        old = self.arrays
        b = self.backend
        nd = self.direct_rows
        new = old._replace(
            keys=b.full(new_capacity, 0, np.int64),
            table_ids=b.full(new_capacity, EMPTY, np.int16),
            addr=b.full((nd + new_capacity, self.kmax), -1, np.int32),
            util=b.full((nd + new_capacity, self.util_width), 0, np.uint16),
        )
        old_to_new = b.empty(old.addr.shape[0], np.int64)
        self.backend.k.rehash_into(
            old.row_base,
            old.keys,
            old.table_ids,
            old.addr,
            old.util,
            new.keys,
            new.table_ids,
            new.addr,
            new.util,
            old_to_new,
        )
        self.arrays = new
        self.n_tombstones = 0
        self.version += 1
        return old_to_new

    def insert_missing(self, q_tables, q_ids, entries):
        """Insert keys whose entry is -1 (the caller made room). Returns new entries, first occurrence first."""
        new_entries = self.backend.empty(q_ids.shape[0], np.int64)
        a = self.arrays
        n_new, n_hashed = (
            int(x)
            for x in self.backend.k.insert_missing(
                a.row_base, a.seen, a.keys, a.table_ids, a.addr, a.util, q_tables, q_ids, entries, new_entries
            )
        )
        self.n_live += n_new
        self.n_hashed += n_hashed
        return new_entries[:n_new]

    def erased(self, n: int, n_hashed: int) -> None:
        """Account for entries erased by a kernel."""
        self.n_live -= n
        self.n_hashed -= n_hashed
        self.n_tombstones += n_hashed
        self.version += 1

    def keys_of(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table, id) of live entries, on the host: int64[n] each."""
        e = np.asarray(entries, np.int64)
        base = self._host_base
        nd = int(base[-1])
        tables = np.empty(e.shape[0], np.int64)
        ids = np.empty(e.shape[0], np.int64)
        direct = e < nd
        if direct.any():
            t = np.searchsorted(base, e[direct], side="right") - 1
            tables[direct] = t
            ids[direct] = e[direct] - base[t]
        if (~direct).any():
            h = e[~direct] - nd
            tables[~direct] = self.backend.to_host(self.arrays.table_ids)[h]
            ids[~direct] = self.backend.to_host(self.arrays.keys)[h]
        return tables, ids

    def entries_per_table(self, n_tables: int) -> np.ndarray:
        """int64[T]: live entries of each table, counted on the host from the bitmap and the table ids."""
        from .kernels import cpu as host_kernels

        out = np.zeros(n_tables, np.int64)
        if self.direct_rows:
            host_kernels.count_seen(self._host_base, np.asarray(self.backend.to_host(self.arrays.seen)), out)
        if self.capacity:
            tids = np.asarray(self.backend.to_host(self.arrays.table_ids))
            out += np.bincount(tids[tids >= 0], minlength=n_tables)[:n_tables]
        return out

    def table_of_entries(self) -> np.ndarray:
        """int64[direct rows + cap]: the table of every entry, EMPTY / TOMBSTONE where no key is held."""
        nd = self.direct_rows
        base = self._host_base
        seen = self.backend.to_host(self.arrays.seen)
        bits = np.unpackbits(np.ascontiguousarray(seen).view(np.uint8), bitorder="little")[:nd].astype(bool)
        out = np.full(nd + self.capacity, EMPTY, np.int64)
        out[:nd][bits] = np.searchsorted(base, np.nonzero(bits)[0], side="right") - 1
        out[nd:] = self.backend.to_host(self.arrays.table_ids)
        return out

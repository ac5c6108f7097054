"""The disk tier: chunk slots in Zarr (v3) arrays on local disk.

Two arrays, ``vectors: float32[capacity, c]`` and ``states: float32[capacity, w]``,
chunked by ``block_rows`` rows and stored without a compressor (the fastest choice
for float vectors). zarr creates, resizes and describes the arrays; the tier moves
the rows itself, a whole chunk file at a time. With the ``bytes`` codec a chunk
file *is* its rows, little-endian, so reading one is one ``read`` and writing one
is one ``write`` -- about thirty times faster than going through zarr's selection
machinery for scattered rows -- and the result is the file zarr would write: the
arrays stay plain Zarr v3 that any zarr reader opens. Because the allocator fills
the emptiest blocks first, a batch of evictions mostly writes whole chunks.

A chunk file is replaced by writing a temporary file and renaming it over the old
one (as zarr's LocalStore does), so it is never half-written in place: that is
what lets a checkpoint snapshot the tier by hard-linking its files.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import google_crc32c  # a dependency of zarr (its crc32c codec)
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import CorruptStoreError, StorageError, StorageFullError, StoreReadOnlyError
from .base import ChunkTier
from .rows import gather_rows, scatter_rows, sorted_unique

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(exc: OSError, what: str) -> StorageError:
    """The named error for an OSError met while doing ``what``."""
    if exc.errno in _FULL:
        return StorageFullError(exc.errno, f"{what}: the device is full ({exc.strerror}); nothing was changed")
    if exc.errno in _READ_ONLY:
        return StoreReadOnlyError(exc.errno, f"{what}: not writable ({exc.strerror}); nothing was changed")
    return StorageError(exc.errno, f"{what}: {exc.strerror or exc}")


#: the scratch file of a tier's staging map (never part of a checkpoint)
STAGING_FILE = "staging.f32"


class ZarrTier(ChunkTier):
    """Chunk slots in a Zarr group on local disk, read and written through a staging map.

    Rows move through ``staging.f32``, a ``numpy.memmap`` of the whole tier beside the
    Zarr arrays: scattered reads and writes of single rows are what a memory map does
    well and what per-chunk files do badly (each touch of a chunk file costs an open,
    a read and a close). A Zarr chunk is written, whole, when its rows changed and the
    tier is flushed -- a checkpoint flushes before it links the chunk files -- and a
    chunk is loaded, whole, the first time a row of it is needed after the tier was
    opened from a checkpoint. The staging file is scratch: only the Zarr arrays are
    kept, and a tier opened read-only reads them directly.

    >>> import tempfile, numpy as np
    >>> tier = ZarrTier(tempfile.mkdtemp(), chunk_width=4, state_width=1)
    >>> slots = tier.allocate(3)
    >>> tier.write(slots, np.ones((3, 4), np.float32), np.zeros((3, 1), np.float32))
    >>> tier.read(slots[:1])[0]
    array([[1., 1., 1., 1.]], dtype=float32)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        chunk_width: int,
        state_width: int,
        capacity: int = 0,
        block_rows: int = 4096,
        create: bool = True,
        read_only: bool = False,
    ):
        self.block_rows = int(block_rows)
        self.root = Path(root)
        self.read_only = read_only
        try:
            self._store = zarr.storage.LocalStore(str(self.root), read_only=read_only)
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
                cap = max(self._round_capacity_static(capacity, self.block_rows), self.block_rows)
                self._vectors = zarr.create_array(
                    store=self._store,
                    name="vectors",
                    shape=(cap, chunk_width),
                    chunks=(self.block_rows, chunk_width),
                    dtype="float32",
                    fill_value=0.0,
                    compressors=[Crc32cCodec()],
                    overwrite=True,
                    attributes={"chunk_width": chunk_width, "state_width": state_width},
                )
                self._states = zarr.create_array(
                    store=self._store,
                    name="states",
                    shape=(cap, max(state_width, 1)),
                    chunks=(self.block_rows, max(state_width, 1)),
                    dtype="float32",
                    fill_value=0.0,
                    compressors=[Crc32cCodec()],
                    overwrite=True,
                )
            else:
                mode = "r" if read_only else "r+"
                self._vectors = zarr.open_array(self._store, path="vectors", mode=mode)
                self._states = zarr.open_array(self._store, path="states", mode=mode)
                cap = int(self._vectors.shape[0])
        except OSError as exc:
            raise storage_error(exc, f"disk tier at {self.root}") from exc
        except (ValueError, KeyError, FileNotFoundError, TypeError) as exc:
            raise CorruptStoreError(f"disk tier at {self.root} cannot be opened: {exc}") from exc
        super().__init__(chunk_width, state_width, cap)
        # a tier written since format 3 ends each chunk file with its crc32c (Zarr's codec);
        # older tiers have bare rows
        self._crc = any(isinstance(c, Crc32cCodec) for c in self._vectors.metadata.codecs)
        self._prefix = str(self.root)
        self._stage = None
        if not read_only:
            n_blocks = cap // self.block_rows
            # a new tier's Zarr arrays and staging file are both all zeros: every chunk
            # is staged; a reopened tier stages each chunk on first touch
            self._staged = np.full(n_blocks, create, bool)
            self._dirty = np.zeros(n_blocks, bool)
            self._map_staging(cap)
        if not create:
            self._check_layout()

    # ---------------------------------------------------------------- layout
    @staticmethod
    def _round_capacity_static(n: int, r: int) -> int:
        return ((max(int(n), 0) + r - 1) // r) * r

    def _check_layout(self) -> None:
        v, s = self._vectors, self._states
        expect_v = (self.capacity, self.chunk_width)
        if tuple(v.shape) != expect_v or v.dtype != np.float32:
            raise CorruptStoreError(
                f"disk tier at {self.root}: vectors are {v.dtype}{tuple(v.shape)}, expected float32{expect_v}"
            )
        if s.shape[0] != self.capacity or s.dtype != np.float32:
            raise CorruptStoreError(
                f"disk tier at {self.root}: states are {s.dtype}{tuple(s.shape)}, "
                f"expected float32 with {self.capacity} rows"
            )
        if tuple(v.chunks) != (self.block_rows, self.chunk_width):
            raise CorruptStoreError(
                f"disk tier at {self.root}: vectors are chunked {v.chunks}, "
                f"expected {(self.block_rows, self.chunk_width)}"
            )

    @classmethod
    def open(cls, root: str | os.PathLike, owner: np.ndarray, read_only: bool = False) -> ZarrTier:
        """Open an existing tier whose back-pointers were saved in a checkpoint."""
        try:
            arr = zarr.open_array(zarr.storage.LocalStore(str(root), read_only=True), path="vectors", mode="r")
        except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
            raise CorruptStoreError(f"disk tier at {root} cannot be opened: {exc}") from exc
        attrs = dict(arr.attrs)
        if "chunk_width" not in attrs or "state_width" not in attrs:
            raise CorruptStoreError(f"disk tier at {root}: attributes chunk_width/state_width are missing")
        tier = cls(
            root,
            int(attrs["chunk_width"]),
            int(attrs["state_width"]),
            block_rows=int(arr.chunks[0]),
            create=False,
            read_only=read_only,
        )
        if owner.shape != (tier.capacity,):
            raise CorruptStoreError(
                f"disk tier at {root}: {tier.capacity} slots but the checkpoint lists {owner.shape[0]} owners"
            )
        tier.owner = np.array(owner, np.int32)
        tier.rebuild_free_space()
        return tier

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def _guard_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(errno.EROFS, f"disk tier at {self.root} is open read-only")

    # ---------------------------------------------------------------- staging map
    @property
    def _width(self) -> int:
        return self.chunk_width + self.state_width

    def _reserve_staging(self, capacity: int) -> str:
        """Size the staging file for ``capacity`` slots and reserve its blocks on disk.

        A sparse file written through a memory map gets its blocks at the first store
        to each page, and a full device answers that store with SIGBUS, which kills
        the process. Reserving every block here turns a full device into
        StorageFullError before anything is written."""
        path = os.path.join(self._prefix, STAGING_FILE)
        size = capacity * self._width * 4
        try:
            with open(path, "ab") as f:
                if size and hasattr(os, "posix_fallocate"):  # Linux; elsewhere the map stays sparse
                    os.posix_fallocate(f.fileno(), 0, size)
                f.truncate(size)
        except OSError as exc:
            raise storage_error(
                exc, f"reserving {size} bytes for the staging file of disk tier at {self.root}"
            ) from exc
        return path

    def _map_staging(self, capacity: int) -> None:
        path = self._reserve_staging(capacity)
        self._stage = np.memmap(path, dtype="<f4", mode="r+", shape=(capacity, self._width))

    def _ensure_staged(self, blocks: np.ndarray) -> None:
        """Load into the staging map the chunks not read since the tier was opened."""
        r, c = self.block_rows, self.chunk_width
        for b in blocks[~self._staged[blocks]].tolist():
            rows = slice(b * r, (b + 1) * r)
            self._stage[rows, :c] = self._load_block("vectors", b, c)
            if self.state_width:
                self._stage[rows, c:] = self._load_block("states", b, self.state_width)
            self._staged[b] = True

    def _grow_storage(self, new_capacity: int) -> None:
        self._guard_writable()
        self._reserve_staging(new_capacity)  # first: a full device then changes nothing
        try:
            self._vectors.resize((new_capacity, self.chunk_width))
            self._states.resize((new_capacity, self._states.shape[1]))
        except OSError as exc:
            raise storage_error(exc, f"growing disk tier at {self.root} to {new_capacity} slots") from exc
        grow = new_capacity // self.block_rows - self._staged.shape[0]
        self._staged = np.concatenate([self._staged, np.ones(grow, bool)])  # new chunks: zeros on both sides
        self._dirty = np.concatenate([self._dirty, np.zeros(grow, bool)])
        self._stage.flush()
        self._map_staging(new_capacity)

    # ---------------------------------------------------------------- whole Zarr chunks
    def _chunk_file(self, name: str, block: int) -> str:
        return f"{self._prefix}/{name}/c/{block}/0"

    def _load_block(self, name: str, block: int, width: int, owned=None) -> np.ndarray:
        """One chunk's rows, float32[block_rows, width]; a chunk never written is zeros.

        With the ``bytes`` codec a chunk file is its rows, little-endian, followed by
        their crc32c (Zarr's ``crc32c`` codec; tiers older than format 3 have none): the
        file zarr itself would read and write. ``owned``: slots of this chunk that the caller
        knows were written (a saved tier's owned rows); a missing file is then
        corruption, never zeros.
        """
        path = self._chunk_file(name, block)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if owned is not None and len(owned):
                raise CorruptStoreError(
                    f"disk tier at {self.root}: Zarr chunk {name}/c/{block}/0 is missing, but it holds the owned "
                    f"slots {np.asarray(owned)[:5].tolist()} (deleted, or a writer removed the checkpoint this "
                    f"store was opened from)"
                ) from None
            return np.zeros((self.block_rows, width), np.float32)
        except OSError as exc:
            raise storage_error(exc, f"reading Zarr chunk {name}/c/{block}/0 of disk tier at {self.root}") from exc
        expect = self.block_rows * width * 4 + (4 if self._crc else 0)
        if len(raw) != expect:
            raise CorruptStoreError(
                f"disk tier at {self.root}: Zarr chunk {name}/c/{block}/0 holds {len(raw)} bytes, expected "
                f"{expect} (truncated or corrupt)"
            )
        if self._crc:
            stored = int.from_bytes(raw[-4:], "little")
            computed = google_crc32c.value(raw[:-4])
            if stored != computed:
                raise CorruptStoreError(
                    f"disk tier at {self.root}: Zarr chunk {name}/c/{block}/0 fails its checksum (stored crc32c "
                    f"{stored:#010x}, computed {computed:#010x}): the file is corrupt"
                )
            raw = raw[:-4]
        return np.frombuffer(raw, dtype="<f4").reshape(self.block_rows, width).copy()

    def _store_block(self, name: str, block: int, rows: np.ndarray) -> None:
        """Replace one chunk file, atomically: a temporary file renamed over it (as zarr does)."""
        path = self._chunk_file(name, block)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            # a buffered write either writes everything or raises with the OS's errno
            # (ENOSPC, EFBIG, EROFS ...); ndarray.tofile reports a short write without it
            data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
            with open(tmp, "wb") as f:
                f.write(data)
                if self._crc:
                    f.write(google_crc32c.value(data).to_bytes(4, "little"))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _blocks(self, slots):
        """(block, start, stop) runs of sorted slots that fall into the same chunk."""
        blocks = slots // self.block_rows
        starts = np.concatenate([[0], np.nonzero(np.diff(blocks))[0] + 1])
        stops = np.concatenate([starts[1:], [slots.shape[0]]])
        return zip(blocks[starts].tolist(), starts.tolist(), stops.tolist())

    # ---------------------------------------------------------------- rows
    def _write_sorted(self, slots, vectors, states) -> None:
        self._staged_write(slots, vectors, states)()

    def _deferred_write(self, slots, vectors, states):
        return None if self._stage is None else self._staged_write(slots, vectors, states)

    def _staged_write(self, slots, vectors, states):
        """Everything of a write that can fail, done now; returns the store into the
        staging map that is left (run at once, or on the tier's thread)."""
        self._guard_writable()
        blocks = sorted_unique(slots // self.block_rows)
        try:
            self._ensure_staged(blocks)  # the one step that can fail: a chunk file read
        except CorruptStoreError:
            raise
        except OSError as exc:
            raise storage_error(exc, f"writing {slots.shape[0]} chunks to disk tier at {self.root}") from exc
        self._dirty[blocks] = True  # flush waits for the write before it looks
        # the staging file's blocks are reserved (_reserve_staging): a store into the
        # map cannot fail for space, and a growth, which remaps, waits for this job
        stage = np.asarray(self._stage)
        vectors = np.ascontiguousarray(vectors, np.float32)
        states = np.ascontiguousarray(states, np.float32)
        return lambda: scatter_rows(stage, slots, vectors, states)

    def _read_sorted(self, slots):
        if self._stage is None:  # read-only: straight from the Zarr chunks
            return self._read_chunks(slots)
        try:
            self._ensure_staged(sorted_unique(slots // self.block_rows))
            vec = np.empty((slots.shape[0], self.chunk_width), np.float32)
            st = np.empty((slots.shape[0], self.state_width), np.float32)
            gather_rows(np.asarray(self._stage), slots, vec, st)
        except CorruptStoreError:
            raise
        except OSError as exc:
            raise storage_error(exc, f"reading {slots.shape[0]} chunks from disk tier at {self.root}") from exc
        return vec, st

    def _read_any_order(self, slots):
        if self._stage is None:
            return None
        blocks = slots // self.block_rows
        unstaged = blocks[~self._staged[blocks]]
        if unstaged.size:
            return None  # loading whole chunks first: in file order, through the sort
        try:
            vec = np.empty((slots.shape[0], self.chunk_width), np.float32)
            st = np.empty((slots.shape[0], self.state_width), np.float32)
            gather_rows(np.asarray(self._stage), slots, vec, st)
        except OSError as exc:
            raise storage_error(exc, f"reading {slots.shape[0]} chunks from disk tier at {self.root}") from exc
        return vec, st

    def _read_chunks(self, slots):
        r = self.block_rows
        vec = np.empty((slots.shape[0], self.chunk_width), np.float32)
        st = np.empty((slots.shape[0], self.state_width), np.float32)
        for name, out, width in (("vectors", vec, self.chunk_width), ("states", st, self.state_width)):
            if width == 0:
                continue
            for block, lo, hi in self._blocks(slots):
                # a read-only tier is a saved one: every owned row of it was written
                owned = slots[lo:hi][self.owner[slots[lo:hi]] >= 0]
                out[lo:hi] = self._load_block(name, block, width, owned)[slots[lo:hi] - block * r]
        return vec, st

    def flush(self) -> None:
        """Write every changed chunk to its Zarr file, whole (a checkpoint needs them there)."""
        if self._stage is None:
            return
        self.wait_for_writes()
        with self._lock:
            r, c = self.block_rows, self.chunk_width
            try:
                for b in np.nonzero(self._dirty)[0].tolist():
                    rows = self._stage[b * r : (b + 1) * r]
                    self._store_block("vectors", b, rows[:, :c])
                    if self.state_width:
                        self._store_block("states", b, rows[:, c:])
                    self._dirty[b] = False
            except OSError as exc:
                raise storage_error(exc, f"writing back chunks of disk tier at {self.root}") from exc

    def shrink_to(self, capacity: int) -> None:
        """Cut the arrays to ``capacity`` slots (all slots past it must be free)."""
        self._guard_writable()
        capacity = max(self._round_capacity(capacity), self.block_rows)
        if np.any(self.owner[capacity:] >= 0) or not np.all(self._free[capacity:]):
            raise StorageError(f"disk tier at {self.root}: slots past {capacity} are still in use")
        self.flush()
        try:
            self._vectors.resize((capacity, self.chunk_width))
            self._states.resize((capacity, self._states.shape[1]))
        except OSError as exc:
            raise storage_error(exc, f"shrinking disk tier at {self.root}") from exc
        n = capacity // self.block_rows
        self._staged, self._dirty = self._staged[:n].copy(), self._dirty[:n].copy()
        self._map_staging(capacity)
        self.owner = self.owner[:capacity].copy()
        self.rebuild_free_space()

    def close(self) -> None:
        super().close()
        if self._stage is not None:
            self._stage = None
            try:
                os.unlink(os.path.join(self._prefix, STAGING_FILE))
            except FileNotFoundError:
                pass


class StagedZarrTier(ZarrTier):
    """A Zarr tier behind a write-back cache in host memory (page-locked for a GPU store).

    Chunks that leave a GPU pool land in ``cache_rows`` rows of host memory; the
    oldest are written to disk, in one batched write, only when the cache needs
    room (or at :meth:`flush`, which a checkpoint calls). A chunk that comes back
    while still cached costs no disk I/O at all: releasing its slot simply drops
    the cached row. Slot numbers, free space and back-pointers are the Zarr
    tier's, so to the store this is the same tier.
    """

    def __init__(
        self,
        root,
        chunk_width: int,
        state_width: int,
        capacity: int = 0,
        cache_rows: int = 1 << 16,
        pinned: bool = False,
        **kw,
    ):
        super().__init__(root, chunk_width, state_width, capacity, **kw)
        self.cache_rows = int(max(cache_rows, 1))
        alloc = _pinned if pinned else np.zeros
        self._c_vec = alloc((self.cache_rows, chunk_width))
        self._c_st = alloc((self.cache_rows, state_width))
        self._c_slot = np.full(self.cache_rows, -1, np.int64)
        self._c_age = np.zeros(self.cache_rows, np.int64)
        self._c_dirty = np.zeros(self.cache_rows, bool)
        self._row_of = np.full(self.capacity, -1, np.int32)
        self._clock = 0
        self.disk_writes = 0  # rows written to the Zarr arrays (for the tests and the stats)

    @classmethod
    def open(cls, root, owner, read_only: bool = False, cache_rows: int = 1 << 16, pinned: bool = False):
        base = ZarrTier.open(root, owner, read_only=read_only)
        tier = cls.__new__(cls)
        tier.__dict__.update(base.__dict__)
        tier.cache_rows = int(max(cache_rows, 1))
        alloc = _pinned if pinned else np.zeros
        tier._c_vec = alloc((tier.cache_rows, tier.chunk_width))
        tier._c_st = alloc((tier.cache_rows, tier.state_width))
        tier._c_slot = np.full(tier.cache_rows, -1, np.int64)
        tier._c_age = np.zeros(tier.cache_rows, np.int64)
        tier._c_dirty = np.zeros(tier.cache_rows, bool)
        tier._row_of = np.full(tier.capacity, -1, np.int32)
        tier._clock = 0
        tier.disk_writes = 0
        return tier

    @property
    def cached(self) -> int:
        return int((self._c_slot >= 0).sum())

    def _grow_storage(self, new_capacity: int) -> None:
        super()._grow_storage(new_capacity)
        self._row_of = np.concatenate([self._row_of, np.full(new_capacity - self._row_of.shape[0], -1, np.int32)])

    def _disk_write(self, slots, vectors, states) -> None:
        if slots.size:
            order = np.argsort(slots, kind="stable")
            super()._write_sorted(slots[order], vectors[order], states[order])
            self.disk_writes += int(slots.size)

    def _make_room(self, n: int) -> np.ndarray:
        """n cache rows: free ones first, then the oldest, whose dirty rows go to disk first."""
        free = np.nonzero(self._c_slot < 0)[0]
        if free.size >= n:
            return free[:n]
        need = n - free.size
        used = np.nonzero(self._c_slot >= 0)[0]
        oldest = used[np.argpartition(self._c_age[used], need - 1)[:need]] if need < used.size else used
        dirty = oldest[self._c_dirty[oldest]]
        self._disk_write(self._c_slot[dirty], self._c_vec[dirty], self._c_st[dirty])
        self._row_of[self._c_slot[oldest]] = -1
        self._c_slot[oldest] = -1
        self._c_dirty[oldest] = False
        return np.concatenate([free, oldest])

    def _write_sorted(self, slots, vectors, states) -> None:
        self._guard_writable()
        # a slot written again must not keep its old cached row: two dirty rows of one
        # slot would reach the disk in row order, and the older could win
        stale = self._row_of[slots]
        stale = stale[stale >= 0]
        self._c_slot[stale] = -1
        self._c_dirty[stale] = False
        self._row_of[slots] = -1
        if slots.size > self.cache_rows:
            self._disk_write(slots, vectors, states)
            return
        rows = self._make_room(slots.size)
        self._c_vec[rows] = vectors
        self._c_st[rows] = states
        self._c_slot[rows] = slots
        self._c_dirty[rows] = True
        self._clock += 1
        self._c_age[rows] = self._clock
        self._row_of[slots] = rows

    def _deferred_write(self, slots, vectors, states):
        return None  # a write may push cached rows to the disk: its errors are the caller's

    def _read_any_order(self, slots):
        return None  # the cache first, then the disk: the sorted path does both

    def _read_sorted(self, slots):
        rows = self._row_of[slots]
        hit = rows >= 0
        vec = np.empty((slots.size, self.chunk_width), np.float32)
        st = np.empty((slots.size, self.state_width), np.float32)
        vec[hit] = self._c_vec[rows[hit]]
        st[hit] = self._c_st[rows[hit]]
        if not hit.all():
            vec[~hit], st[~hit] = super()._read_sorted(slots[~hit])
        return vec, st

    def release(self, slots) -> None:
        with self._lock:
            slots = np.asarray(slots, np.int64)
            if slots.size:
                self._check_slots(slots)
                rows = self._row_of[slots]
                rows = rows[rows >= 0]
                self._c_slot[rows] = -1
                self._c_dirty[rows] = False
                self._row_of[slots] = -1
            super().release(slots)

    def flush(self) -> None:
        """Write every cached row that the disk has not seen (a checkpoint needs them there)."""
        self.wait_for_writes()
        with self._lock:
            dirty = np.nonzero(self._c_dirty)[0]
            self._disk_write(self._c_slot[dirty], self._c_vec[dirty], self._c_st[dirty])
            self._c_dirty[dirty] = False
        super().flush()

    def shrink_to(self, capacity: int) -> None:
        self.flush()
        super().shrink_to(capacity)
        self._row_of = self._row_of[: self.capacity].copy()
        self._c_slot[self._c_slot >= self.capacity] = -1


def _pinned(shape) -> np.ndarray:
    """Page-locked host memory, so that copies to and from the GPU run at full speed."""
    from numba import cuda

    a = cuda.pinned_array(shape, np.float32)
    a[...] = 0
    return a

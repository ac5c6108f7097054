"""The disk tier: chunk slots in Zarr (v3) arrays on local disk.

Two arrays, ``vectors: float32[capacity, c]`` and ``states: float32[capacity, w]``,
chunked by ``block_rows`` rows and stored without a compressor (the fastest choice
for float vectors). Every read and write is one orthogonal selection over sorted
slots, so Zarr touches each of its chunks once per batch; because the allocator
fills the emptiest blocks first, a batch of evictions mostly writes whole chunks.

zarr's LocalStore replaces a chunk file by writing a temporary file and renaming
it, so a chunk file is never half-written in place: that is what lets a
checkpoint snapshot the tier by hard-linking its files.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import zarr

from ..errors import CorruptStoreError, StorageError, StorageFullError, StoreReadOnlyError
from .base import ChunkTier

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(exc: OSError, what: str) -> StorageError:
    """The named error for an OSError met while doing ``what``."""
    if exc.errno in _FULL:
        return StorageFullError(exc.errno, f"{what}: the device is full ({exc.strerror}); nothing was changed")
    if exc.errno in _READ_ONLY:
        return StoreReadOnlyError(exc.errno, f"{what}: not writable ({exc.strerror}); nothing was changed")
    return StorageError(exc.errno, f"{what}: {exc.strerror or exc}")


class ZarrTier(ChunkTier):
    """Chunk slots in a Zarr group on local disk.

    >>> import tempfile, numpy as np
    >>> tier = ZarrTier(tempfile.mkdtemp(), chunk_width=4, state_width=1)
    >>> slots = tier.allocate(3)
    >>> tier.write(slots, np.ones((3, 4), np.float32), np.zeros((3, 1), np.float32))
    >>> tier.read(slots[:1])[0]
    array([[1., 1., 1., 1.]], dtype=float32)
    """

    def __init__(self, root: str | os.PathLike, chunk_width: int, state_width: int, capacity: int = 0,
                 block_rows: int = 4096, create: bool = True, read_only: bool = False):
        self.block_rows = int(block_rows)
        self.root = Path(root)
        self.read_only = read_only
        try:
            self._store = zarr.storage.LocalStore(str(self.root), read_only=read_only)
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
                cap = max(self._round_capacity_static(capacity, self.block_rows), self.block_rows)
                self._vectors = zarr.create_array(
                    store=self._store, name="vectors", shape=(cap, chunk_width), chunks=(self.block_rows, chunk_width),
                    dtype="float32", fill_value=0.0, compressors=None, overwrite=True,
                    attributes={"chunk_width": chunk_width, "state_width": state_width},
                )
                self._states = zarr.create_array(
                    store=self._store, name="states", shape=(cap, max(state_width, 1)),
                    chunks=(self.block_rows, max(state_width, 1)), dtype="float32", fill_value=0.0,
                    compressors=None, overwrite=True,
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
        if not create:
            self._check_layout()

    @staticmethod
    def _round_capacity_static(n: int, r: int) -> int:
        return ((max(int(n), 0) + r - 1) // r) * r

    def _check_layout(self) -> None:
        v, s = self._vectors, self._states
        expect_v = (self.capacity, self.chunk_width)
        if tuple(v.shape) != expect_v or v.dtype != np.float32:
            raise CorruptStoreError(f"disk tier at {self.root}: vectors are {v.dtype}{tuple(v.shape)}, expected float32{expect_v}")
        if s.shape[0] != self.capacity or s.dtype != np.float32:
            raise CorruptStoreError(f"disk tier at {self.root}: states are {s.dtype}{tuple(s.shape)}, expected float32 with {self.capacity} rows")
        if tuple(v.chunks) != (self.block_rows, self.chunk_width):
            raise CorruptStoreError(f"disk tier at {self.root}: vectors are chunked {v.chunks}, expected {(self.block_rows, self.chunk_width)}")

    @classmethod
    def open(cls, root: str | os.PathLike, owner: np.ndarray, read_only: bool = False) -> "ZarrTier":
        """Open an existing tier whose back-pointers were saved in a checkpoint."""
        try:
            arr = zarr.open_array(zarr.storage.LocalStore(str(root), read_only=True), path="vectors", mode="r")
        except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
            raise CorruptStoreError(f"disk tier at {root} cannot be opened: {exc}") from exc
        attrs = dict(arr.attrs)
        if "chunk_width" not in attrs or "state_width" not in attrs:
            raise CorruptStoreError(f"disk tier at {root}: attributes chunk_width/state_width are missing")
        tier = cls(root, int(attrs["chunk_width"]), int(attrs["state_width"]), block_rows=int(arr.chunks[0]),
                   create=False, read_only=read_only)
        if owner.shape != (tier.capacity,):
            raise CorruptStoreError(f"disk tier at {root}: {tier.capacity} slots but the checkpoint lists {owner.shape[0]} owners")
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

    def _grow_storage(self, new_capacity: int) -> None:
        self._guard_writable()
        try:
            self._vectors.resize((new_capacity, self.chunk_width))
            self._states.resize((new_capacity, self._states.shape[1]))
        except OSError as exc:
            raise storage_error(exc, f"growing disk tier at {self.root} to {new_capacity} slots") from exc

    def _write_sorted(self, slots, vectors, states) -> None:
        self._guard_writable()
        try:
            self._vectors.oindex[slots, :] = vectors
            if self.state_width:
                self._states.oindex[slots, :] = states
        except OSError as exc:
            raise storage_error(exc, f"writing {slots.shape[0]} chunks to disk tier at {self.root}") from exc

    def _read_sorted(self, slots):
        try:
            vec = np.ascontiguousarray(self._vectors.oindex[slots, :], dtype=np.float32)
            if self.state_width:
                st = np.ascontiguousarray(self._states.oindex[slots, :], dtype=np.float32)
            else:
                st = np.empty((slots.shape[0], 0), np.float32)
        except OSError as exc:
            raise storage_error(exc, f"reading {slots.shape[0]} chunks from disk tier at {self.root}") from exc
        except (ValueError, RuntimeError) as exc:
            raise CorruptStoreError(
                f"disk tier at {self.root}: a Zarr chunk holding slots {int(slots[0])}..{int(slots[-1])} is corrupt: {exc}"
            ) from exc
        return vec, st

    def shrink_to(self, capacity: int) -> None:
        """Cut the arrays to ``capacity`` slots (all slots past it must be free)."""
        self._guard_writable()
        capacity = max(self._round_capacity(capacity), self.block_rows)
        if np.any(self.owner[capacity:] >= 0) or not np.all(self._free[capacity:]):
            raise StorageError(f"disk tier at {self.root}: slots past {capacity} are still in use")
        try:
            self._vectors.resize((capacity, self.chunk_width))
            self._states.resize((capacity, self._states.shape[1]))
        except OSError as exc:
            raise storage_error(exc, f"shrinking disk tier at {self.root}") from exc
        self.owner = self.owner[:capacity].copy()
        self.rebuild_free_space()

    def array_files(self) -> list[Path]:
        return sorted(f for f in self.root.rglob("*") if f.is_file())

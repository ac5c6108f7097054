"""Saves that write what changed: an array of a checkpoint as a base plus deltas of blocks.

A save of a store into its own directory compares each array, block by block
(``BLOCK_BYTES``), with what the directory's last checkpoint holds, by a 64-bit hash
of every block (:class:`SaveHistory` keeps them, 8 bytes a block). An array the last
checkpoint holds as ``NAME`` (its base) plus ``NAME.deltas/0000 ... /k-1`` is saved as
hard links to all of those plus one more delta, ``NAME.deltas/k``: ``blocks``
(int64[n], the changed block numbers, ascending) and ``data`` (uint8[n, BLOCK_BYTES],
their bytes; the array's last block padded with zeros). Reading applies the deltas in
order over the base; an array that did not change links what it had. Once the deltas
since the base would pass ``REBASE_FRACTION`` of it or number more than ``MAX_DELTAS``,
or the array changes shape or dtype, the array is written whole again and becomes
its own base; so a checkpoint holds at most 1 + ``REBASE_FRACTION`` times its arrays,
and a save costs a pass over memory (the hashes) plus the blocks that changed.

Every base and delta is a Zarr array with crc32c, like any other; the checkpoint's
state counts each array's deltas (``increments``), so a missing delta is damage, not
an older value read silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit, prange

#: bytes a delta block covers: a page, so that a changed row costs one page and the
#: hashes kept in memory are 8 bytes per 4 KiB of arrays
BLOCK_BYTES = 4096
#: deltas since the base, against the base, beyond which an array is written whole
REBASE_FRACTION = 0.25
#: deltas at most before an array is written whole (each is read at open, in order)
MAX_DELTAS = 32
#: arrays smaller than this are always written whole (a delta would save too little)
WHOLE_BELOW_BYTES = 1 << 20
#: blocks per Zarr chunk of a delta's data (4 MiB files)
DELTA_CHUNK_BLOCKS = 1024

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@njit(cache=True, inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, parallel=True, nogil=True)
def block_hashes(words, tail, words_per_block, out):
    """out[b] = a 64-bit hash of block b: ``words`` (uint64[m], an array's bytes but its
    last m % 8) cut in blocks of ``words_per_block``, ``tail`` (its last bytes) in the last.
    xxHash64's rounds and avalanche, one lane: a changed block keeps its hash with
    probability about 2^-64."""
    nb = out.shape[0]
    m = words.shape[0]
    for b in prange(nb):
        lo = b * words_per_block
        hi = min(lo + words_per_block, m)
        h = _P5 ^ np.uint64(b)
        for i in range(lo, hi):
            k = words[i] * _P2
            k = _rotl(k, 31) * _P1
            h ^= k
            h = _rotl(h, 27) * _P1 + _P4
        if b == nb - 1:
            for j in range(tail.shape[0]):
                h ^= np.uint64(tail[j]) * _P5
                h = _rotl(h, 11) * _P1
        h ^= np.uint64(hi - lo)
        h ^= h >> np.uint64(33)
        h *= _P2
        h ^= h >> np.uint64(29)
        h *= _P3
        h ^= h >> np.uint64(32)
        out[b] = h


def _bytes_of(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def n_blocks(nbytes: int) -> int:
    return max(1, -(-nbytes // BLOCK_BYTES))


def hashes_of(data: np.ndarray) -> np.ndarray:
    """uint64[blocks]: the hash of each ``BLOCK_BYTES`` of ``data``'s bytes."""
    flat = _bytes_of(data)
    m = flat.size // 8
    out = np.empty(n_blocks(flat.size), np.uint64)
    block_hashes(flat[: m * 8].view(np.uint64), flat[m * 8 :], BLOCK_BYTES // 8, out)
    return out


def gather_blocks(data: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """uint8[len(blocks), BLOCK_BYTES]: those blocks of ``data``'s bytes (zeros past its end)."""
    flat = _bytes_of(data)
    full = flat.size // BLOCK_BYTES
    out = np.zeros((blocks.size, BLOCK_BYTES), np.uint8)
    inside = blocks < full
    out[inside] = flat[: full * BLOCK_BYTES].reshape(full, BLOCK_BYTES)[blocks[inside]]
    if not inside.all():  # the array's last, partial block
        out[~inside, : flat.size - full * BLOCK_BYTES] = flat[full * BLOCK_BYTES :]
    return out


def apply_blocks(data: np.ndarray, blocks: np.ndarray, block_data: np.ndarray) -> None:
    """Write a delta's blocks into ``data`` (contiguous), in place."""
    flat = data.reshape(-1).view(np.uint8)
    full = flat.size // BLOCK_BYTES
    inside = blocks < full
    flat[: full * BLOCK_BYTES].reshape(full, BLOCK_BYTES)[blocks[inside]] = block_data[inside]
    if not inside.all():
        flat[full * BLOCK_BYTES :] = block_data[~inside][-1, : flat.size - full * BLOCK_BYTES]


class SavedArray(NamedTuple):
    """What one array of the last checkpoint holds."""

    hashes: np.ndarray  # uint64[blocks]; the hash of each block of its content
    dtype: str
    shape: tuple[int, ...]
    base_bytes: int  # bytes of its base
    delta_bytes: int  # bytes of its deltas' data, all together
    deltas: int  # how many


class Increment(NamedTuple):
    """How the next save writes one array: whole, or the changed blocks after the deltas it links."""

    whole: bool
    changed: np.ndarray  # int64[n]; block numbers (empty when whole)
    previous: SavedArray | None


class SaveHistory:
    """The arrays of the last checkpoint of one store directory, as hashes: what a save
    there compares with to write only the blocks that changed.

    It describes a checkpoint only once that checkpoint is complete (``commit``) or was
    read whole (``opened``); until then, and after a save elsewhere fails, a save writes
    every array whole."""

    def __init__(self) -> None:
        self.checkpoint: Path | None = None
        self.arrays: dict[str, SavedArray] = {}

    def forget(self) -> None:
        self.checkpoint, self.arrays = None, {}

    def describes(self, checkpoint: Path | None) -> bool:
        return checkpoint is not None and self.checkpoint == Path(checkpoint).resolve() and checkpoint.is_dir()

    def plan(self, key: str, data: np.ndarray, hashes: np.ndarray, previous_checkpoint: Path | None) -> Increment:
        prev = self.arrays.get(key) if self.describes(previous_checkpoint) else None
        if (
            prev is None
            or data.nbytes < WHOLE_BELOW_BYTES
            or prev.shape != tuple(data.shape)
            or prev.dtype != str(data.dtype)
        ):
            return Increment(True, np.empty(0, np.int64), None)
        changed = np.flatnonzero(hashes != prev.hashes).astype(np.int64)
        if (
            prev.delta_bytes + changed.size * BLOCK_BYTES > REBASE_FRACTION * prev.base_bytes
            or prev.deltas + (changed.size > 0) > MAX_DELTAS
        ):
            return Increment(True, np.empty(0, np.int64), None)
        return Increment(False, changed, prev)

    @staticmethod
    def written(data: np.ndarray, hashes: np.ndarray, inc: Increment) -> SavedArray:
        """What the array holds once ``inc`` is written."""
        if inc.whole:
            return SavedArray(hashes, str(data.dtype), tuple(data.shape), int(data.nbytes), 0, 0)
        p = inc.previous
        if inc.changed.size == 0:
            return p  # nothing changed: the same base and deltas, linked
        return p._replace(
            hashes=hashes, delta_bytes=p.delta_bytes + inc.changed.size * BLOCK_BYTES, deltas=p.deltas + 1
        )

    def commit(self, checkpoint: Path, arrays: dict[str, SavedArray]) -> None:
        self.checkpoint, self.arrays = Path(checkpoint).resolve(), dict(arrays)

    def opened(self, checkpoint: Path, key: str, data: np.ndarray, described: dict | None) -> None:
        """An array read from ``checkpoint`` (its deltas applied): its hashes now, so that
        the first save after opening already writes only what changed."""
        checkpoint = Path(checkpoint).resolve()
        if self.checkpoint != checkpoint:
            self.checkpoint, self.arrays = checkpoint, {}
        d = described or {}
        self.arrays[key] = SavedArray(
            hashes_of(data),
            str(data.dtype),
            tuple(data.shape),
            int(d.get("base_bytes", data.nbytes)),
            int(d.get("delta_bytes", 0)),
            int(d.get("deltas", 0)),
        )

    @staticmethod
    def describe(saved: SavedArray) -> dict[str, int]:
        """The checkpoint state's record of an array (``increments``)."""
        return {"deltas": saved.deltas, "base_bytes": saved.base_bytes, "delta_bytes": saved.delta_bytes}

"""The disk tier as an append-only log of segments, each one shard of a Zarr v3 array.

A slot holds one chunk row: its ``c`` vector floats, then its ``w`` optimizer-state
floats. Slots are handed out in order, so chunks evicted together (a row's, sorted by
entry and chunk) sit side by side and come back in one read. Slot ``s`` is row ``s``
of the Zarr array ``chunks`` (float32[ids x S, c + w]) whose shards are segments of
``S`` slots: segment ``i`` is the shard file ``chunks/c/i/0``, written once, front to
back, with the sharding codec's layout: inner chunks of ``G`` slots, each followed by
its crc32c, and at the end the shard's index of (offset, size) per inner chunk, with
its own crc32c. Any zarr reader opens the array; the tier reads byte ranges itself.

- **Writes** append to the open segment through an aligned buffer, in whole 4 KiB
  blocks (O_DIRECT where the file system allows it, or through the page cache for the
  segments that ``page_cache_bytes`` admits, below). The open segment's file is
  reserved in full when it is started, so an append cannot fail for space: a full
  device is a :class:`~fiited_store.StorageFullError` at :meth:`allocate`, before
  anything changes.
- **Reads** take the runs of adjacent inner chunks that hold the asked slots, one
  request each, many in flight (:class:`~fiited_store.storage.io.IOPool`), check every
  inner chunk's crc32c, and take rows still in the write buffer from memory.
- **Sealing** (:meth:`seal`, which a checkpoint calls) pads the last inner chunk,
  writes the index, syncs and renames the file into place; a sealed segment never
  changes, so a checkpoint keeps it by a hard link: no second copy of the rows.
- **The page cache** holds no segment unless ``page_cache_bytes`` admits it: segments
  are admitted, as they are started or opened, while the files admitted so far and
  this one fit within that many bytes, and are written and read through the page
  cache (readahead off); the rest go around it (O_DIRECT). A tier that fits the bound
  is then served from memory after its first read, as a memory map would serve it,
  and one that does not takes no more than the bound of page cache, by construction.
- **Releasing** a slot only counts it dead: a released slot is never written again.
  Garbage is reclaimed segment by segment: the store moves a segment's live slots to
  the open segment (:mod:`fiited_store.compaction`) and the tier drops the file
  (:meth:`drop_segments`), once no background read of it is pending.

The tier keeps no owner per slot: which chunk a slot holds is in the store's entry
addresses, and the tier's memory is a few bits per slot and a few numbers per segment.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import CorruptStoreError, InputShapeError, StoreReadOnlyError
from . import liveness
from .base import Tier
from .io import ALIGN, IOPool, aligned_buffer, open_file, round_down, round_up, storage_error, write_all
from .rows import CRC_TABLE, check_inner_chunks, copy_rows, crc32c, place_rows

FORMAT = "fiited-segment-tier"
FORMAT_VERSION = 1
ARRAY = "chunks"
#: a segment's target size: large enough for few files, small enough that moving one is quick
SEGMENT_BYTES = 64 << 20
#: bytes of one inner chunk at most: a row of a few slots spans one or two of them, and a
#: read checks the crc32c of every inner chunk it touches (a tier keeps the size it was made with)
INNER_BYTES = 1024
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
#: bytes of rows the writer may have queued before write_async waits for it
_MAX_PENDING_WRITE_BYTES = 256 << 20
#: a thread's read buffer kept between reads at most
_MAX_KEPT_READ_BYTES = 64 << 20
#: open read descriptors kept at most (the rest are reopened when needed)
_MAX_FDS = 1024


def layout(
    chunk_width: int, state_width: int, segment_slots: int | None = None, inner_slots: int | None = None
) -> tuple[int, int]:
    """(slots per inner chunk G, slots per segment S) for rows of ``c + w`` floats."""
    record = (chunk_width + state_width) * 4
    g = max(1, INNER_BYTES // record) if inner_slots is None else int(inner_slots)
    if segment_slots is None:
        segment_slots = g * max(1, SEGMENT_BYTES // (g * record + 4))
    segment_slots = max(g, (int(segment_slots) + g - 1) // g * g)
    return g, segment_slots


class _Segment:
    __slots__ = ("id", "allocated", "written", "sealed", "fd", "padding", "cached")

    def __init__(self, seg_id: int, sealed: bool = False, written: int = 0):
        self.cached = False  # written and read through the page cache (admitted by page_cache_bytes)
        self.id = seg_id
        self.allocated = written
        self.written = written
        self.sealed = sealed
        self.fd: int | None = None  # the writer's descriptor while unsealed
        self.padding = 0  # zero rows that closed the last inner chunk (never handed out)


class _GatherPlan(NamedTuple):
    """A read's inner chunks on disk and where each asked slot's row lies in them."""

    disk: np.ndarray  # int64[m]: inner chunks to read, ascending, numbered across segments
    runs: tuple  # (segment, first, end) per run of adjacent ones
    fds: list  # a descriptor of the read's own per segment it reads
    run_fd: np.ndarray  # int64[runs]: each run's descriptor in fds
    cached: np.ndarray  # bool[runs]: whether each run's segment goes through the page cache
    at: np.ndarray  # int64[n]: each slot's inner chunk's index in disk
    on_disk: np.ndarray  # bool[n]: whether each slot is read from disk (else it was copied from the buffer)
    within: np.ndarray  # int64[n]: each slot's byte offset within its inner chunk


class SegmentTier(Tier):
    """Chunk slots in an append-only log of Zarr shards (see the module's docstring).

    Shapes: ``slots`` int64[n]; ``vectors`` float32[n, chunk_width]; ``states``
    float32[n, state_width].

    >>> import tempfile, numpy as np
    >>> tier = SegmentTier(tempfile.mkdtemp(), chunk_width=4, state_width=1, segment_slots=64)
    >>> slots = tier.allocate(3)
    >>> tier.write(slots, np.ones((3, 4), np.float32), np.zeros((3, 1), np.float32))
    >>> tier.read(slots[1:2])[0]
    array([[1., 1., 1., 1.]], dtype=float32)
    >>> tier.close()
    """

    #: a segment tier keeps no owner per slot (the store's addresses say which chunk a slot holds)
    keeps_owners = False

    def __init__(
        self,
        root: str | os.PathLike,
        chunk_width: int,
        state_width: int,
        segment_slots: int | None = None,
        *,
        read_only: bool = False,
        _create: bool = True,
        io_threads: int | None = None,
        page_cache_bytes: int = 0,
        _inner_slots: int | None = None,
    ):
        self.root = Path(root)
        self.page_cache_bytes = int(page_cache_bytes)
        self._cached_bytes = 0  # file bytes of the segments admitted to the page cache
        self.chunk_width = int(chunk_width)
        self.state_width = int(state_width)
        self.width = self.chunk_width + self.state_width
        self.record = self.width * 4
        self.group, self.segment_slots = layout(self.chunk_width, self.state_width, segment_slots, _inner_slots)
        self.inner_bytes = self.group * self.record + 4
        self.inner_per_segment = self.segment_slots // self.group
        self.index_bytes = self.inner_per_segment * 16 + 4
        self.data_bytes = round_up(self.inner_per_segment * self.inner_bytes)
        self.read_only = bool(read_only)
        self._lock = threading.RLock()
        self._segments: dict[int, _Segment] = {}
        self._free_ids: list[int] = []
        self._alloc_seg: _Segment | None = None  # handing out slots
        self._unsealed: list[_Segment] = []  # given slots, not sealed yet, oldest first (the writer's)
        self._reserved: list[_Segment] = []  # files reserved by reserve(), not handed out from yet
        self._wbuf = aligned_buffer(min(self.data_bytes, 8 << 20) + ALIGN)
        self._wbuf_start = 0  # file offset of _wbuf[0] (aligned)
        self._wbuf_len = 0  # bytes of _wbuf in use
        self._fds: dict[int, int] = {}
        self._read_bufs = threading.local()
        self._io = IOPool(io_threads) if io_threads else IOPool()
        self._executor: ThreadPoolExecutor | None = None
        self._writes: list[tuple[Future, int]] = []  # pending writes and the bytes each holds
        self._pending_reads: dict[int, int] = {}  # mark -> outstanding
        self._next_mark = 0
        self._ids = 0  # segment ids the Zarr array's shape covers
        # which slots are live, and how many per segment (storage/liveness.py)
        self._bits = np.zeros(0, np.uint8)
        self._live = np.zeros(0, np.int64)
        #: counters of what moved, for the benchmarks and stats
        self.bytes_read = 0
        self.bytes_written = 0
        self.read_requests = 0
        self.slots_read = 0
        self.slots_written = 0
        if _create:
            self._create()

    # ------------------------------------------------------------------ files
    @property
    def location(self) -> str:
        return str(self.root)

    def _array_dir(self) -> Path:
        return self.root / ARRAY

    def _segment_path(self, seg_id: int, partial: bool = False) -> Path:
        return self._array_dir() / "c" / str(seg_id) / ("0.partial" if partial else "0")

    def _attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "chunk_width": self.chunk_width,
            "state_width": self.state_width,
            "segment_slots": self.segment_slots,
            "inner_slots": self.group,
        }

    def _create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            store = zarr.storage.LocalStore(str(self.root))
            group = zarr.open_group(store, mode="w", attributes=self._attrs())
            group.create_array(
                ARRAY,
                shape=(self.segment_slots, self.width),
                chunks=(self.group, self.width),
                shards=(self.segment_slots, self.width),
                dtype="float32",
                fill_value=0.0,
                compressors=[Crc32cCodec()],
                overwrite=True,
            )
            self._set_ids(1)
            self._free_ids = [0]
        except OSError as exc:
            raise storage_error(exc, f"creating disk tier at {self.root}") from exc

    def _cover_ids(self, n_ids: int) -> None:
        """Make the Zarr array's shape cover segment ids [0, n_ids)."""
        if n_ids <= self._ids:
            return
        try:
            arr = zarr.open_array(zarr.storage.LocalStore(str(self.root)), path=ARRAY, mode="r+")
            arr.resize((n_ids * self.segment_slots, self.width))
        except OSError as exc:
            raise storage_error(exc, f"growing disk tier at {self.root}") from exc
        self._set_ids(n_ids)

    def _set_ids(self, n_ids: int) -> None:
        self._ids = int(n_ids)
        self._bits, self._live = liveness.grown(self._bits, self._live, self._ids * self.segment_slots, self._ids)

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        segments: list[list[int]],
        *,
        read_only: bool = False,
        io_threads: int | None = None,
        page_cache_bytes: int = 0,
    ) -> SegmentTier:
        """A tier whose sealed segments ``[[id, slots written, padding], ...]`` a checkpoint listed.
        The store marks the live slots afterwards (:meth:`mark_live`), from its addresses."""
        root = Path(root)
        try:
            attrs = dict(zarr.open_group(zarr.storage.LocalStore(str(root), read_only=True), mode="r").attrs)
            arr = zarr.open_array(zarr.storage.LocalStore(str(root), read_only=True), path=ARRAY, mode="r")
        except Exception as exc:  # noqa: BLE001 - whatever zarr raises on damaged metadata
            raise CorruptStoreError(f"disk tier at {root} cannot be opened: {exc}") from exc
        if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
            raise CorruptStoreError(f"disk tier at {root} is not a {FORMAT} v{FORMAT_VERSION}: {attrs}")
        try:
            tier = cls(
                root,
                int(attrs["chunk_width"]),
                int(attrs["state_width"]),
                int(attrs["segment_slots"]),
                read_only=read_only,
                _create=False,
                io_threads=io_threads,
                page_cache_bytes=page_cache_bytes,
                _inner_slots=int(attrs["inner_slots"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"disk tier at {root}: layout attributes {attrs} are not valid: {exc!r}") from exc
        shards = getattr(arr, "shards", None) or arr.chunks
        if (
            tier.group != int(arr.chunks[0])
            or tier.segment_slots != int(shards[0])
            or tuple(arr.shape[1:]) != (tier.width,)
        ):
            raise CorruptStoreError(f"disk tier at {root}: its layout {attrs} does not match its array {arr.shape}")
        tier._set_ids(int(arr.shape[0]) // tier.segment_slots)
        for entry in segments:
            seg_id, written = int(entry[0]), int(entry[1])
            path = tier._segment_path(seg_id)
            expect = tier._file_bytes(written)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise CorruptStoreError(f"disk tier at {root}: segment file {path} is missing") from None
            if size != expect:
                raise CorruptStoreError(
                    f"disk tier at {root}: segment file {path} has {size} bytes, expected {expect} (truncated or "
                    f"rewritten)"
                )
            seg = tier._segments[seg_id] = _Segment(seg_id, sealed=True, written=written)
            seg.padding = int(entry[2]) if len(entry) > 2 else 0
            tier._admit(seg)
        used = set(tier._segments)
        tier._free_ids = sorted(set(range(tier._ids)) - used, reverse=True)
        return tier

    def _file_bytes(self, written: int) -> int:
        """A sealed segment's file size: its written inner chunks (aligned), then the index."""
        n_inner = -(-written // self.group)
        return round_up(n_inner * self.inner_bytes) + self.index_bytes

    def _admit(self, seg: _Segment) -> None:
        """Admit ``seg`` to the page cache if its whole file still fits ``page_cache_bytes``."""
        size = self.data_bytes + round_up(self.index_bytes)
        if self._cached_bytes + size <= self.page_cache_bytes:
            seg.cached = True
            self._cached_bytes += size

    def _forget(self, seg: _Segment) -> None:
        if seg.cached:
            self._cached_bytes -= self.data_bytes + round_up(self.index_bytes)
            seg.cached = False

    @property
    def page_cached_bytes(self) -> int:
        """File bytes of the segments read and written through the page cache (at most
        ``page_cache_bytes``): what the tier may hold of the page cache."""
        return self._cached_bytes

    def _read_fd(self, seg_id: int) -> int:
        fd = self._fds.get(seg_id)
        if fd is not None:
            return fd
        seg = self._segments[seg_id]
        path = self._segment_path(seg_id, partial=not seg.sealed)
        try:
            fd, _ = open_file(str(path), write=False, direct=not seg.cached)
        except FileNotFoundError:
            raise CorruptStoreError(f"disk tier at {self.root}: segment file {path} is missing") from None
        except OSError as exc:
            raise storage_error(exc, f"opening {path}") from exc
        self._fds[seg_id] = fd
        return fd

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Slot numbers the tier may hand out now: every segment id its array covers."""
        return self._ids * self.segment_slots

    @property
    def n_used(self) -> int:
        return int(self._live.sum())

    @property
    def n_free(self) -> int:
        return self.capacity - self.n_used

    @property
    def live_bytes(self) -> int:
        """Bytes of the live rows (slots times row size)."""
        return self.n_used * self.record

    @property
    def nbytes(self) -> int:
        """Bytes the tier's files hold on disk (allocated blocks, so a reserved open segment counts in full)."""
        total = 0
        for s in self._segments.values():
            try:
                total += os.stat(self._segment_path(s.id, partial=not s.sealed)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def garbage_fraction(self) -> float:
        """Dead slots among those handed out in sealed segments (what compaction could reclaim)."""
        given = sum(s.written - s.padding for s in self._segments.values() if s.sealed)
        live = sum(int(self._live[s.id]) for s in self._segments.values() if s.sealed)
        return 1.0 - live / given if given else 0.0

    def segment_live(self, seg_id: int) -> int:
        """Live slots of segment ``seg_id`` (0 for one the tier does not have)."""
        seg = self._segments.get(int(seg_id))
        return 0 if seg is None else int(self._live[seg.id])

    def segments(self) -> list[dict[str, int]]:
        """Every segment: id, slots written, live slots, sealed."""
        return [
            {"id": s.id, "written": s.written, "live": int(self._live[s.id]), "sealed": s.sealed}
            for s in sorted(self._segments.values(), key=lambda x: x.id)
        ]

    # ------------------------------------------------------------------ liveness
    def _split(self, slots: np.ndarray):
        return slots // self.segment_slots, slots % self.segment_slots

    def _check_slots(self, slots: np.ndarray) -> None:
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            bad = slots[(slots < 0) | (slots >= self.capacity)][:5]
            raise InputShapeError(f"tier {self.location}: slots {bad.tolist()} are outside [0, {self.capacity})")
        allocated = np.zeros(self._ids, np.int64)
        for seg in self._segments.values():
            allocated[seg.id] = seg.allocated
        i = liveness.first_outside(slots, allocated, self.segment_slots)
        if i >= 0:
            sid = int(slots[i]) // self.segment_slots
            raise InputShapeError(f"tier {self.location}: slots of segment {sid} were never handed out")

    def is_free(self, slots: np.ndarray) -> np.ndarray:
        """bool[n]: whether each slot holds nothing live."""
        return liveness.free_mask(self._bits, np.ascontiguousarray(slots, np.int64))

    def _set_bits(self, slots: np.ndarray, on: bool) -> None:
        i = liveness.mark(self._bits, self._live, slots, self.segment_slots, on)
        if i >= 0:
            state = "live" if on else "free"
            raise InputShapeError(f"tier {self.location}: slots {[int(slots[i])]} are already {state}")

    def mark_live(self, slots: np.ndarray) -> None:
        """After opening from a checkpoint: these slots hold live chunks (the store's addresses say so)."""
        slots = np.unique(np.asarray(slots, np.int64))
        with self._lock:
            self._check_slots(slots)
            self._bits[:] = 0
            self._live[:] = 0
            self._set_bits(slots, True)

    def release(self, slots: np.ndarray) -> None:
        """These slots hold nothing any more (their rows stay where they are until the
        segment is compacted away). A slot already free, or one given twice, is an
        InputShapeError with nothing changed."""
        slots = np.ascontiguousarray(slots, np.int64)
        if slots.size == 0:
            return
        with self._lock:
            self._check_slots(slots)
            self._set_bits(slots, False)

    # ------------------------------------------------------------------ allocation
    # Slots are handed out by the segment open for allocation; rows are appended, in the
    # same order, by the writer to the oldest unsealed segment, which it seals once full.
    # Between the two sit the segments allocated in full whose rows are still on the way.

    def allocate(self, n: int) -> np.ndarray:
        """n new slots, ascending, for rows to be written in that order. A full device is
        a StorageFullError here, with nothing changed."""
        if self.read_only:
            raise StoreReadOnlyError(30, f"disk tier at {self.root} is open read-only")
        n = int(n)
        out: list[np.ndarray] = []
        with self._lock:
            started: list[_Segment] = []
            got = 0
            try:
                while got < n:
                    seg = self._alloc_seg
                    if seg is None or seg.allocated == self.segment_slots:
                        seg = self._start_segment()
                        started.append(seg)
                    m = min(n - got, self.segment_slots - seg.allocated)
                    out.append(
                        seg.id * self.segment_slots + np.arange(seg.allocated, seg.allocated + m, dtype=np.int64)
                    )
                    seg.allocated += m
                    got += m
            except BaseException:
                self._undo_allocation(out, started)
                raise
            slots = np.concatenate(out) if out else np.empty(0, np.int64)
            self._set_bits(slots, True)
            return slots

    def _undo_allocation(self, taken: list[np.ndarray], started: list[_Segment]) -> None:
        for slots in taken:
            self._segments[int(slots[0] // self.segment_slots)].allocated -= slots.size
        for seg in started:  # reserved by this call, never written: their files go
            self._unsealed.remove(seg)
            del self._segments[seg.id]
            self._discard(seg)
        self._alloc_seg = self._unsealed[-1] if self._unsealed else None

    def reserve(self, n: int) -> None:
        """Make the next ``n`` slots' space certain now: segments are started (their files
        reserved in full) until the open one and those set aside hold ``n`` free slots, so
        that the allocations which follow cannot fail for space. A full device is a
        StorageFullError here, with nothing changed."""
        if self.read_only:
            raise StoreReadOnlyError(30, f"disk tier at {self.root} is open read-only")
        with self._lock:
            seg = self._alloc_seg
            room = (self.segment_slots - seg.allocated if seg is not None else 0) + len(self._reserved) * (
                self.segment_slots
            )
            made: list[_Segment] = []
            try:
                while room < int(n):
                    made.append(self._new_segment())
                    room += self.segment_slots
            except BaseException:
                for seg in made:
                    self._discard(seg)
                raise
            self._reserved.extend(made)

    def _discard(self, seg: _Segment) -> None:
        """Give back a segment never written to: its file, its page-cache share and its id."""
        os.close(seg.fd)
        seg.fd = None
        self._segment_path(seg.id, partial=True).unlink(missing_ok=True)
        self._forget(seg)
        self._free_ids.append(seg.id)
        self._free_ids.sort(reverse=True)

    def _release_reserved(self) -> None:
        for seg in self._reserved:
            self._discard(seg)
        self._reserved = []

    def _start_segment(self) -> _Segment:
        """A new segment open for allocation (one set aside by :meth:`reserve` first), its
        file reserved in full (a full device raises here)."""
        seg = self._reserved.pop(0) if self._reserved else self._new_segment()
        self._segments[seg.id] = seg
        self._unsealed.append(seg)
        self._alloc_seg = seg
        return seg

    def _new_segment(self) -> _Segment:
        """A segment with its file reserved in full, not yet handed out from."""
        seg_id = self._free_ids.pop() if self._free_ids else self._ids
        try:
            self._cover_ids(max(self._ids, seg_id + 1))
            path = self._segment_path(seg_id, partial=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            seg = _Segment(seg_id)
            self._admit(seg)
            try:
                fd, _ = open_file(str(path), write=True, direct=not seg.cached)
            except BaseException:
                self._forget(seg)
                raise
            try:
                os.ftruncate(fd, 0)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self.data_bytes + round_up(self.index_bytes))
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                self._forget(seg)
                raise
        except OSError as exc:
            self._free_ids.append(seg_id)
            self._free_ids.sort(reverse=True)
            raise storage_error(exc, f"reserving segment {seg_id} of disk tier at {self.root}") from exc
        seg.fd = fd
        return seg

    # ------------------------------------------------------------------ writes
    def write(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """Write the rows of allocated slots, in allocation order."""
        job = self._write_job(slots, vectors, states)
        if job is not None:
            self.wait_for_writes()
            with self._lock:
                job()

    def write_async(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """The same on the tier's thread: every check runs now, the append (into space
        reserved when the segment started) then. Reads, writes, seals and drops after this
        call see the rows."""
        job = self._write_job(slots, vectors, states)
        if job is None:
            return
        self._writes = [(f, n) for f, n in self._writes if not f.done() or f.exception() is not None]
        if sum(n for _, n in self._writes) > _MAX_PENDING_WRITE_BYTES:
            self.wait_for_writes()  # the writer is behind: wait rather than queue more memory
        self._writes.append((self._thread().submit(self._locked, job), int(slots.size) * self.record))

    def _locked(self, job):
        with self._lock:
            return job()

    def _write_job(self, slots, vectors, states):
        if self.read_only:
            raise StoreReadOnlyError(30, f"disk tier at {self.root} is open read-only")
        slots = np.asarray(slots, np.int64)
        if vectors.shape != (slots.shape[0], self.chunk_width) or states.shape != (slots.shape[0], self.state_width):
            raise InputShapeError(
                f"tier {self.location}: write of {slots.shape[0]} slots got vectors {vectors.shape} and states "
                f"{states.shape}, expected ({slots.shape[0]}, {self.chunk_width}) and "
                f"({slots.shape[0]}, {self.state_width})"
            )
        if slots.size == 0:
            return None
        rows = np.empty((slots.shape[0], self.width), np.float32)
        rows[:, : self.chunk_width] = vectors
        rows[:, self.chunk_width :] = states
        with self._lock:
            self._check_slots(slots)
        return lambda: self._append(slots, rows)

    def _append(self, slots: np.ndarray, rows: np.ndarray) -> None:
        seg_ids, pos = self._split(slots)
        start = 0
        while start < slots.size:
            sid = int(seg_ids[start])
            # segment ids need not ascend: a dropped segment's id is handed out again
            other = np.flatnonzero(seg_ids[start:] != sid)
            end = start + int(other[0]) if other.size else slots.size
            seg = self._unsealed[0] if self._unsealed else None
            if seg is None or seg.id != sid or pos[start] != seg.written or np.any(np.diff(pos[start:end]) != 1):
                want = "none" if seg is None else f"segment {seg.id} slot {seg.written}"
                raise InputShapeError(
                    f"tier {self.location}: slots must be written in the order they were handed "
                    f"out (the next is {want}, got segment {sid} slot {int(pos[start])})"
                )
            self._put(seg, rows[start:end])
            if seg.written == self.segment_slots:
                self._seal_segment(seg)
            start = end

    def _put(self, seg: _Segment, rows: np.ndarray) -> None:
        """Append rows to the segment's buffer, each inner chunk that fills closed by its
        crc32c, and write whole megabytes of blocks out as they fill."""
        first = seg.written
        last_inner = (first + rows.shape[0] - 1) // self.group
        self._ensure_room((last_inner + 1) * self.inner_bytes - self._wbuf_start)
        data = rows.view(np.uint8).reshape(rows.shape[0], self.record)
        end = place_rows(CRC_TABLE, self._wbuf, self._wbuf_start, data, first, self.group, self.inner_bytes)
        seg.written += rows.shape[0]
        self._wbuf_len = max(self._wbuf_len, int(end))
        self.slots_written += rows.shape[0]
        self._flush_whole_blocks(seg)

    def _ensure_room(self, need: int) -> None:
        if need > self._wbuf.size:
            grown = aligned_buffer(round_up(need * 2))
            grown[: self._wbuf_len] = self._wbuf[: self._wbuf_len]
            self._wbuf = grown

    def _flush_whole_blocks(self, seg: _Segment, final: bool = False) -> None:
        """Write out the buffer's whole blocks of completed inner chunks (all of it when final)."""
        done = (seg.written // self.group) * self.inner_bytes - self._wbuf_start  # complete inner chunks
        upto = self._wbuf_len if final else round_down(done)
        if upto <= 0 or (not final and upto < (1 << 20)):  # write in megabytes, not blocks
            return
        nbytes = round_up(upto)
        if nbytes > upto:
            self._wbuf[upto:nbytes] = 0
        try:
            write_all(seg.fd, memoryview(self._wbuf)[:nbytes], self._wbuf_start)
        except OSError as exc:
            raise storage_error(exc, f"writing segment {seg.id} of disk tier at {self.root}") from exc
        self.bytes_written += nbytes
        if final:
            return
        # keep from the block holding the start of the first inner chunk not all written out,
        # so that every inner chunk the buffer begins is whole in it (reads take it from here)
        cut = round_down(((self._wbuf_start + upto) // self.inner_bytes) * self.inner_bytes) - self._wbuf_start
        keep = self._wbuf_len - cut
        self._wbuf[:keep] = self._wbuf[cut : self._wbuf_len]
        self._wbuf_start += cut
        self._wbuf_len = keep

    def _seal_segment(self, seg: _Segment) -> None:
        """Finish the oldest unsealed segment, every row it was given written: pad its last
        inner chunk, write everything and the index, sync, rename into place."""
        assert self._unsealed and self._unsealed[0] is seg
        g = self.group
        if seg.written % g:  # the last inner chunk is padded with zero rows, never handed out
            pad = g - seg.written % g
            self._put(seg, np.zeros((pad, self.width), np.float32))
            self.slots_written -= pad
            seg.padding = pad
        n_inner = seg.written // g
        self._flush_whole_blocks(seg, final=True)
        index = np.full((self.inner_per_segment, 2), _EMPTY, np.uint64)
        index[:n_inner, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(self.inner_bytes)
        index[:n_inner, 1] = np.uint64(self.inner_bytes)
        raw = np.frombuffer(index.astype("<u8").tobytes(), np.uint8)
        crc = crc32c(raw, np.array([0]), np.array([raw.size]))
        where = round_up(n_inner * self.inner_bytes)
        partial, final = self._segment_path(seg.id, partial=True), self._segment_path(seg.id)
        try:
            os.close(seg.fd)
            seg.fd = None
            with open(partial, "r+b") as f:  # buffered: the index need not be aligned
                f.truncate(where)
                f.seek(where)
                f.write(raw.tobytes())
                f.write(crc.astype("<u4").tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, final)
        except OSError as exc:
            raise storage_error(exc, f"sealing segment {seg.id} of disk tier at {self.root}") from exc
        old = self._fds.pop(seg.id, None)
        if old is not None:
            os.close(old)
        seg.sealed = True
        seg.allocated = seg.written
        self._unsealed.pop(0)
        if self._alloc_seg is seg:
            self._alloc_seg = None
        self._wbuf = aligned_buffer(min(self.data_bytes, 8 << 20) + ALIGN)
        self._wbuf_start = self._wbuf_len = 0

    def seal(self) -> None:
        """Seal every unsealed segment (a checkpoint needs every row in sealed, synced files)."""
        self.wait_for_writes()
        with self._lock:
            for seg in list(self._unsealed):
                if seg.written < seg.allocated:
                    raise InputShapeError(
                        f"tier {self.location}: {seg.allocated - seg.written} allocated slots of "
                        f"segment {seg.id} were never written"
                    )
                if seg.written == 0:  # nothing in it: the reservation is given back
                    self._undo_allocation([], [seg])
                else:
                    self._seal_segment(seg)
            self._alloc_seg = None
            self._release_reserved()  # a checkpoint's directory holds no empty reservations
            self._sync_dir()

    def _sync_dir(self) -> None:
        dirs = {self._array_dir() / "c"} | {self._segment_path(s.id).parent for s in self._segments.values()}
        for d in dirs:
            if d.exists():
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def flush(self) -> None:
        self.seal()

    def sealed_files(self) -> list[tuple[int, int, Path]]:
        """(id, slots written, path) of every sealed segment."""
        return [
            (s.id, s.written, self._segment_path(s.id))
            for s in sorted(self._segments.values(), key=lambda x: x.id)
            if s.sealed
        ]

    def metadata_files(self) -> list[Path]:
        """The Zarr metadata documents (group and array)."""
        return [self.root / "zarr.json", self._array_dir() / "zarr.json"]

    # ------------------------------------------------------------------ reads
    def read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``slots`` (any order, repeats allowed), checked against their crc32c."""
        self.wait_for_writes()
        return self._read(slots)

    def _read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slots = np.asarray(slots, np.int64)
        out = np.empty((slots.shape[0], self.width), np.float32)
        if slots.size:
            rows = out.view(np.uint8).reshape(slots.size, self.record)
            # the lock covers the plan and the rows still in the write buffer, not the disk:
            # a background read must not hold up the releases and allocations of a step
            with self._lock:
                self._check_slots(slots)
                plan = self._plan_gather(slots, rows)
            try:
                self._gather_from_disk(plan, rows)
            finally:
                for fd in plan.fds:
                    os.close(fd)
            with self._lock:
                self.slots_read += slots.size
        return np.ascontiguousarray(out[:, : self.chunk_width]), np.ascontiguousarray(out[:, self.chunk_width :])

    def _plan_gather(self, slots: np.ndarray, rows: np.ndarray) -> _GatherPlan:
        """Under the lock: copy the slots' rows still in the write buffer into ``rows``; the
        inner chunks to read for the others, with descriptors of their own (a segment
        sealed or dropped meanwhile closes the tier's, not these)."""
        g, rec, ib, per = self.group, self.record, self.inner_bytes, self.inner_per_segment
        seg_ids, pos = self._split(slots)
        inner = seg_ids * per + pos // g  # each slot's inner chunk, numbered across segments
        chunks = np.unique(inner)
        in_buf = np.zeros(chunks.size, bool)
        if self._unsealed:
            in_buf = (chunks // per == self._unsealed[0].id) & ((chunks % per) * ib >= self._wbuf_start)
        disk = chunks[~in_buf]
        at = np.searchsorted(disk, inner)
        on_disk = at < disk.size
        on_disk[on_disk] = disk[at[on_disk]] == inner[on_disk]
        within = (pos % g) * rec
        if not on_disk.all():
            src = ((inner % per) * ib - self._wbuf_start + within).astype(np.int64)
            copy_rows(self._wbuf, src, ~on_disk, rows)
        runs = self._runs(disk)
        segs, run_fd = np.unique(runs[0], return_inverse=True)
        cached = np.array([self._segments[sid].cached for sid in segs.tolist()], bool)[run_fd]
        fds: list[int] = []
        mine = self._fds_for(segs.tolist())  # a missing file is a CorruptStoreError here
        try:
            for fd in mine:
                fds.append(os.dup(fd))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise storage_error(exc, f"reading disk tier at {self.root}") from exc
        return _GatherPlan(disk, runs, fds, run_fd, cached, at, on_disk, within)

    def _gather_from_disk(self, plan: _GatherPlan, rows: np.ndarray) -> None:
        if not plan.disk.size:
            return
        c_off, buf = self._read_inner_chunks(
            plan.disk, plan.runs, [plan.fds[i] for i in plan.run_fd.tolist()], plan.cached
        )
        src = (c_off[np.minimum(plan.at, plan.disk.size - 1)] + plan.within).astype(np.int64)
        copy_rows(buf, src, plan.on_disk, rows)

    def _runs(self, disk: np.ndarray):
        """(segment, first, last + 1) of each run of adjacent inner chunks in ``disk``
        (ascending, numbered across segments); a run never crosses segments."""
        per = self.inner_per_segment
        brk = np.nonzero((np.diff(disk) != 1) | (np.diff(disk // per) != 0))[0] + 1
        starts = np.concatenate([[0], brk]).astype(np.int64)
        ends = np.concatenate([brk, [disk.size]]).astype(np.int64)
        return disk[starts] // per if disk.size else np.empty(0, np.int64), starts, ends

    def _read_inner_chunks(
        self, disk: np.ndarray, runs, fds: list[int], cached: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read the inner chunks ``disk`` (ascending, numbered across segments), one request
        per run of adjacent ones (``runs``, on descriptors ``fds``; ``cached`` runs through
        the page cache, exactly their bytes, the others in aligned blocks), and check each
        against its crc32c: (where each landed, the buffer)."""
        ib, per = self.inner_bytes, self.inner_per_segment
        r_seg, starts, ends = runs
        lo = (disk[starts] % per) * ib
        hi = (disk[ends - 1] % per + 1) * ib
        align = np.where(cached, 1, ALIGN).astype(np.int64)
        a_lo = lo - lo % align
        a_len = -(-hi // align) * align - a_lo
        # direct runs first, so that each lands at an aligned place in the buffer
        order = np.argsort(cached, kind="stable")
        dst = np.empty(a_len.size, np.int64)
        dst[order] = np.concatenate([[0], np.cumsum(a_len[order])[:-1]])
        buf = self._read_buffer(int(a_len.sum()))
        self._io.read_ranges(
            fds,
            a_lo.astype(np.int64),
            a_len.astype(np.int64),
            buf,
            dst,
            f"reading {disk.size} inner chunks from disk tier at {self.root}",
        )
        with self._lock:
            self.read_requests += len(fds)
            self.bytes_read += int(a_len.sum())
        run_of = np.repeat(np.arange(starts.size), ends - starts)
        c_off = (dst[run_of] + (disk % per) * ib - a_lo[run_of]).astype(np.int64)
        sums = np.zeros(2, np.uint32)
        bad = int(check_inner_chunks(CRC_TABLE, buf, c_off, self.group * self.record, sums))
        if bad >= 0:
            sid, j = divmod(int(disk[bad]), per)
            raise CorruptStoreError(
                f"disk tier at {self.root}: inner chunk {j} of segment file {self._segment_path(sid)} fails its "
                f"checksum (stored crc32c {int(sums[0]):#010x}, computed {int(sums[1]):#010x}): the file is corrupt"
            )
        return c_off, buf

    def _read_buffer(self, nbytes: int) -> np.ndarray:
        """An aligned buffer of the calling thread's for one read: kept between reads up to
        _MAX_KEPT_READ_BYTES (a new map per read would fault in every page again)."""
        buf = getattr(self._read_bufs, "buf", None)
        if buf is not None and buf.size >= nbytes:
            return buf[:nbytes]
        buf = aligned_buffer(round_up(nbytes + nbytes // 4))
        if buf.size <= _MAX_KEPT_READ_BYTES:
            self._read_bufs.buf = buf
        return buf[:nbytes]

    def _fds_for(self, seg_ids: list[int]) -> list[int]:
        """A read descriptor per segment id, keeping at most _MAX_FDS open (never one this call uses)."""
        want = set(seg_ids)
        if len(self._fds) + len(want) > _MAX_FDS:
            for sid in [x for x in self._fds if x not in want][: len(self._fds) + len(want) - _MAX_FDS]:
                os.close(self._fds.pop(sid))
        return [self._read_fd(sid) for sid in seg_ids]

    def read_async(self, slots: np.ndarray) -> tuple[Future, int]:
        """Read on the tier's thread; (future, mark). Until :meth:`end_read` of the mark, no
        segment the read touches is dropped."""
        with self._lock:
            mark = self._next_mark
            self._next_mark += 1
            self._pending_reads[mark] = 1
        return self._thread().submit(self._read, np.array(slots, np.int64)), mark

    def end_read(self, mark: int | None = None) -> None:
        with self._lock:
            if not self._pending_reads:
                return
            self._pending_reads.pop(min(self._pending_reads) if mark is None else mark, None)

    @property
    def quarantined_slots(self) -> int:
        return 0  # released slots are never handed out again: nothing to keep out of use

    def wait_for_writes(self) -> None:
        """Block until every write handed to the tier's thread has landed (raising the first
        failure's error once)."""
        writes, self._writes = self._writes, []
        failed = [e for e in (f.exception() for f, _ in writes) if e is not None]
        if failed:
            raise failed[0]

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fiited-tier")
        return self._executor

    def check_segment(self, seg_id: int) -> list[str]:
        """Every byte of a sealed segment's file: each written inner chunk against its crc32c,
        the padding after them (zeros), and the index (its crc32c, and the layout it must
        describe). Returns what is wrong."""
        seg = self._segments[seg_id]
        path = self._segment_path(seg_id)
        try:
            raw = np.fromfile(path, np.uint8)
        except OSError as exc:
            return [f"disk tier at {self.root}: segment file {path} cannot be read: {exc}"]
        problems = []
        n_inner = -(-seg.written // self.group)
        where = round_up(n_inner * self.inner_bytes)
        if raw.size != where + self.index_bytes:
            return [
                f"disk tier at {self.root}: segment file {path} has {raw.size} bytes, expected "
                f"{where + self.index_bytes}"
            ]
        starts = np.arange(n_inner, dtype=np.int64) * self.inner_bytes
        sums = np.zeros(2, np.uint32)
        bad = int(check_inner_chunks(CRC_TABLE, raw, starts, self.group * self.record, sums))
        if bad >= 0:
            problems.append(
                f"disk tier at {self.root}: inner chunk {bad} of segment file {path} fails its checksum "
                f"(stored crc32c {int(sums[0]):#010x}, computed {int(sums[1]):#010x})"
            )
        if np.any(raw[n_inner * self.inner_bytes : where]):
            problems.append(f"disk tier at {self.root}: segment file {path} has non-zero padding after its rows")
        index = raw[where : where + self.index_bytes - 4]
        stored = int(raw[where + self.index_bytes - 4 :].view("<u4")[0])
        if int(crc32c(raw, np.array([where]), np.array([self.index_bytes - 4]))[0]) != stored:
            problems.append(f"disk tier at {self.root}: the shard index of segment file {path} fails its checksum")
        else:
            entries = index.view("<u8").reshape(-1, 2)
            expect = np.full_like(entries, _EMPTY)
            expect[:n_inner, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(self.inner_bytes)
            expect[:n_inner, 1] = np.uint64(self.inner_bytes)
            if not np.array_equal(entries, expect):
                problems.append(
                    f"disk tier at {self.root}: the shard index of segment file {path} does not "
                    f"describe its {seg.written} rows"
                )
        return problems

    # ------------------------------------------------------------------ compaction
    def compaction_candidates(self, max_live: float) -> list[int]:
        """Sealed segments whose live share is at most ``max_live``, emptiest first."""
        segs = [s for s in self._segments.values() if s.sealed and s.written > s.padding]
        share = {s.id: int(self._live[s.id]) / (s.written - s.padding) for s in segs}
        return [s.id for s in sorted(segs, key=lambda s: (share[s.id], s.id)) if share[s.id] <= max_live]

    def drop_segments(self, seg_ids: list[int]) -> None:
        """Remove segments that hold no live slot any more (their id is reused later). Waits
        for background reads, which might be reading them."""
        self.wait_for_writes()
        if self._executor is not None:
            self._executor.submit(lambda: None).result()  # every queued read has run
        with self._lock:
            for sid in seg_ids:
                s = self._segments[sid]
                if self._live[sid]:
                    raise InputShapeError(
                        f"tier {self.location}: segment {sid} still holds {int(self._live[sid])} live slots"
                    )
                if not s.sealed:
                    raise InputShapeError(f"tier {self.location}: segment {sid} is not sealed")
                fd = self._fds.pop(sid, None)
                if fd is not None:
                    os.close(fd)
                self._segment_path(sid).unlink(missing_ok=True)
                self._forget(s)
                del self._segments[sid]
                self._free_ids.append(sid)
            self._free_ids.sort(reverse=True)

    def close(self) -> None:
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self.wait_for_writes()
        finally:
            self._io.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for seg in self._unsealed:
                if seg.fd is not None:
                    os.close(seg.fd)
                    seg.fd = None
            self._release_reserved()

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records of the tier: its layout and its sealed segments."""
        return {
            "kind": "segments",
            **self._attrs(),
            "segments": [
                [s.id, s.written, s.padding] for s in sorted(self._segments.values(), key=lambda x: x.id) if s.sealed
            ],
        }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())

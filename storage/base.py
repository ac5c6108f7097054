"""The one interface every tier below the pool implements (:class:`Tier`), and the
block tiers' shared implementation (:class:`ChunkTier`).

A tier keeps chunk vectors, with their optimizer state, in numbered slots. It owns
its free space: :meth:`ChunkTier.allocate` hands out slots and
:meth:`ChunkTier.release` takes them back. The store keeps ``owner`` (the
back-pointer from a tier slot to the entry whose chunk it holds) up to date; the
tier only grows it.

Reads and writes are batched: a call moves many chunks, so a tier on disk can
turn them into whole-chunk I/O. Slots are handed out block by block, emptiest
block first, so that a batch of spilled chunks lands in few blocks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import InputShapeError
from .rows import end_quarantine, release_slots, take_free_slots


class Tier(ABC):
    """What the store asks of any tier below the pool: numbered slots, each one chunk's
    vector and optimizer state, handed out and taken back by the tier, moved in batches.

    Shapes: ``slots`` int64[n]; ``vectors`` float32[n, chunk_width];
    ``states`` float32[n, state_width]. Every verb checks its slots first and raises
    :class:`~fiited_store.errors.InputShapeError` naming the tier and the slots.
    """

    chunk_width: int
    state_width: int
    #: whether the tier keeps the entry of each slot in ``owner`` (the store keeps it up to date)
    keeps_owners: bool

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the tier lives, for error messages."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Slot numbers the tier may hand out now."""

    @property
    @abstractmethod
    def n_used(self) -> int:
        """Slots holding a live chunk."""

    @property
    @abstractmethod
    def n_free(self) -> int:
        """``capacity - n_used``."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the tier takes (memory, or disk blocks)."""

    @abstractmethod
    def is_free(self, slots: np.ndarray) -> np.ndarray:
        """bool[n]: whether each slot holds nothing live."""

    @abstractmethod
    def allocate(self, n: int) -> np.ndarray:
        """int64[n]: new slots, ascending; a full device raises here with nothing changed."""

    @abstractmethod
    def reserve(self, n: int) -> None:
        """Make the space of the next ``n`` allocated slots certain now, so that those
        allocations cannot fail for space (a full device is a StorageFullError here, with
        nothing changed). A caller that will allocate in several rounds reserves first."""

    @abstractmethod
    def release(self, slots: np.ndarray) -> None:
        """These slots hold nothing any more (refused whole if any is already free)."""

    @abstractmethod
    def write(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """Write rows of allocated slots."""

    @abstractmethod
    def write_async(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """The same on the tier's thread; reads and writes after this call see the rows."""

    @abstractmethod
    def read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, states) of ``slots``, any order, repeats allowed."""

    @abstractmethod
    def read_async(self, slots: np.ndarray) -> tuple[Future, int]:
        """A background read: its future and a mark for :meth:`end_read`."""

    @abstractmethod
    def end_read(self, mark: int | None = None) -> None:
        """The background read ``mark`` (the oldest when None) is done with."""

    @abstractmethod
    def wait_for_writes(self) -> None:
        """Block until background writes landed; raise the first failure's error once."""

    @abstractmethod
    def flush(self) -> None:
        """Make what was written durable (a checkpoint calls it before linking files)."""

    @abstractmethod
    def close(self) -> None:
        """Finish background work and release files."""


class ChunkTier(Tier):
    """Batched slot storage in blocks, for chunks that left the pool: freed slots are
    reused, emptiest block first.

    Shapes: ``slots`` int64[n]; ``vectors`` float32[n, chunk_width];
    ``states`` float32[n, state_width].
    """

    #: rows per allocation block (a Zarr chunk for the disk tier)
    block_rows: int = 4096
    #: the tier keeps the entry of each slot in ``owner`` (the store keeps it up to date)
    keeps_owners = True

    def __init__(self, chunk_width: int, state_width: int, capacity: int = 0):
        self.chunk_width = int(chunk_width)
        self.state_width = int(state_width)
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        capacity = self._round_capacity(capacity)
        self.owner = np.full(capacity, -1, np.int32)
        self._free = np.ones(capacity, bool)
        self._block_free = np.full(capacity // self.block_rows, self.block_rows, np.int64)
        # A slot's data cannot change while it is owned. A slot released while a
        # background read is pending stays out of the free space (quarantined) until
        # every read that began before the release has ended: so a staged row of slot
        # s is still the row of whichever chunk holds s now, and a reader checks
        # nothing but the slot. Marks are absolute positions in the log of
        # quarantined releases: entry i of the list is position _log_base + i.
        self._quarantined = np.zeros(capacity, bool)
        self._release_log: list[np.ndarray] = []
        self._log_base = 0
        self._reader_marks: list[int] = []
        # writes handed to the tier's thread (write_async), in submission order; the
        # thread's queue is FIFO, so a read submitted later sees them
        self._writes: list[Future] = []

    # ----------------------------------------------------------- subclass hooks
    @abstractmethod
    def _grow_storage(self, new_capacity: int) -> None:
        """Make slots [old capacity, new_capacity) addressable."""

    @abstractmethod
    def _write_sorted(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """Write rows at ascending, distinct slots."""

    @abstractmethod
    def _read_sorted(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read rows at ascending, distinct slots."""

    def _read_any_order(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows at distinct slots in the given order, where the tier needs no sort to
        read them (random access in memory); None sends the read through the sort."""
        return None

    def _deferred_write(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray):
        """For rows at ascending, distinct slots: a job that writes them and cannot fail
        (every check and every fallible step done now, on the caller's thread), or None
        when this tier writes only synchronously."""
        return None

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the tier keeps its data, for messages."""

    # ------------------------------------------------------------------- sizes
    def _round_capacity(self, n: int) -> int:
        r = self.block_rows
        return ((max(int(n), 0) + r - 1) // r) * r

    @property
    def capacity(self) -> int:
        return int(self.owner.shape[0])

    @property
    def n_free(self) -> int:
        return int(self._block_free.sum())

    @property
    def n_used(self) -> int:
        return self.capacity - self.n_free

    @property
    def nbytes(self) -> int:
        """Bytes the tier's data occupies where it lives."""
        return self.capacity * (self.chunk_width + self.state_width) * 4

    # ------------------------------------------------------------- free space
    def is_free(self, slots: np.ndarray) -> np.ndarray:
        """bool[n]: whether each slot is in the free space (quarantined slots are not)."""
        with self._lock:
            return self._free[np.asarray(slots, np.int64)].copy()

    def allocate(self, n: int) -> np.ndarray:
        """Reserve n free slots (ascending), growing the tier if it must."""
        n = int(n)
        if n > self.n_free:
            self.wait_for_writes()  # growing remaps the storage that pending writes go to
        with self._lock:
            if n == 0:
                return np.empty(0, np.int64)
            if n > self.n_free:
                self._grow(max(2 * self.capacity, self.capacity + n))
            slots = np.empty(n, np.int64)
            got = int(take_free_slots(self._free, self._block_free, self.block_rows, slots))
            assert got == n, (got, n)  # the free counts said there were n
            return slots

    def reserve(self, n: int) -> None:
        """Grow now, as the next allocations of ``n`` slots would (a full device raises here)."""
        n = int(n)
        if n > self.n_free:
            self.wait_for_writes()  # growing remaps the storage that pending writes go to
        with self._lock:
            if n > self.n_free:
                self._grow(max(2 * self.capacity, self.capacity + n))

    def release(self, slots: np.ndarray) -> None:
        """Return slots to the free space, or to quarantine while a background read is
        pending (see :meth:`read_async`)."""
        with self._lock:
            slots = np.ascontiguousarray(slots, np.int64)
            if slots.size == 0:
                return
            quarantine = bool(self._reader_marks)
            bad = int(
                release_slots(
                    slots, self._free, self._quarantined, self.owner, self._block_free, self.block_rows, quarantine
                )
            )
            if bad >= 0:
                self._check_slots(slots)
                gone = self._free[slots] | self._quarantined[slots]
                raise InputShapeError(f"tier {self.location}: slots {slots[gone][:5].tolist()} are already free")
            if quarantine:
                self._release_log.append(slots.copy())

    def _grow(self, new_capacity: int) -> None:
        new_capacity = self._round_capacity(new_capacity)
        old = self.capacity
        self._grow_storage(new_capacity)
        self.owner = np.concatenate([self.owner, np.full(new_capacity - old, -1, np.int32)])
        self._free = np.concatenate([self._free, np.ones(new_capacity - old, bool)])
        self._quarantined = np.concatenate([self._quarantined, np.zeros(new_capacity - old, bool)])
        self._block_free = np.concatenate(
            [self._block_free, np.full((new_capacity - old) // self.block_rows, self.block_rows, np.int64)]
        )

    def rebuild_free_space(self) -> None:
        """Derive the free space from ``owner`` (after loading a checkpoint)."""
        with self._lock:
            self._quarantined = (
                np.zeros(self.capacity, bool) if self._quarantined.shape[0] != self.capacity else self._quarantined
            )
            self._free = (self.owner < 0) & ~self._quarantined
            self._block_free = np.bincount(
                np.nonzero(self._free)[0] // self.block_rows, minlength=self.capacity // self.block_rows
            ).astype(np.int64)

    def _check_slots(self, slots: np.ndarray) -> None:
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            bad = slots[(slots < 0) | (slots >= self.capacity)][:5]
            raise InputShapeError(f"tier {self.location}: slots {bad.tolist()} are outside [0, {self.capacity})")

    # --------------------------------------------------------------------- I/O
    def _sorted_write(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray):
        """The checked write request with its slots ascending (None: nothing to write)."""
        slots = np.asarray(slots, np.int64)
        if vectors.shape != (slots.shape[0], self.chunk_width) or states.shape != (slots.shape[0], self.state_width):
            raise InputShapeError(
                f"tier {self.location}: write of {slots.shape[0]} slots got vectors {vectors.shape} and states "
                f"{states.shape}, expected ({slots.shape[0]}, {self.chunk_width}) and "
                f"({slots.shape[0]}, {self.state_width})"
            )
        if slots.size == 0:
            return None
        self._check_slots(slots)
        if np.all(slots[1:] > slots[:-1]):  # what allocate() hands out: no reordering copy
            return slots, vectors, states
        order = np.argsort(slots, kind="stable")
        return slots[order], vectors[order], states[order]

    def write(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        request = self._sorted_write(slots, vectors, states)
        if request is not None:
            self._write_now(request)

    def _write_now(self, request) -> None:
        self.wait_for_writes()  # a row written now must not be overwritten by an older one
        with self._lock:
            self._write_sorted(*request)

    def write_async(self, slots: np.ndarray, vectors: np.ndarray, states: np.ndarray) -> None:
        """Write on the tier's thread where the tier can (synchronously where not).

        Every check runs now, so an error is raised here with nothing written. The
        caller hands over ``slots``, ``vectors`` and ``states`` and must not change them.
        Reads, writes, :meth:`flush` and growth after this call see the rows: reads
        on the tier's thread come after it in its queue, and the others wait for it.
        Spilling rows this way keeps a slow page write-back (the kernel throttling a
        writer of many dirty pages) off the training thread.
        """
        request = self._sorted_write(slots, vectors, states)
        if request is None:
            return
        with self._lock:
            job = self._deferred_write(*request)
        if job is None:
            self._write_now(request)
            return
        self._writes = [f for f in self._writes if not f.done() or f.exception() is not None]
        self._writes.append(self._thread().submit(job))

    def wait_for_writes(self) -> None:
        """Block until every write handed to the tier's thread has landed (raising the
        first one's error, if one failed)."""
        writes, self._writes = self._writes, []
        failed = [e for e in (f.exception() for f in writes) if e is not None]  # waits for each
        if failed:
            raise failed[0]

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # one worker: its queue orders the background reads and writes
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fiited-tier")
        return self._executor

    def read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.wait_for_writes()
        return self._read(slots)

    def _read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A read that does not wait for pending writes: on the tier's thread, which has
        run them already."""
        slots = np.asarray(slots, np.int64)
        if slots.size == 0:
            return np.empty((0, self.chunk_width), np.float32), np.empty((0, self.state_width), np.float32)
        self._check_slots(slots)
        with self._lock:
            rows = self._read_any_order(slots)
            if rows is not None:
                return rows
            # Sorted reads touch each block once, in file order.
            order = np.argsort(slots, kind="stable")
            vec, st = self._read_sorted(slots[order])
        out_v = np.empty_like(vec)
        out_s = np.empty_like(st)
        out_v[order] = vec
        out_s[order] = st
        return out_v, out_s

    def read_async(self, slots: np.ndarray) -> tuple[Future, int]:
        """Read on a background thread, in any slot order.

        Returns the future (it yields what :meth:`read` returns) and a mark to pass
        to :meth:`end_read` once the result is no longer used. Until then no slot
        released after this call is handed out again, so the row read for slot s is
        the row of whichever chunk holds s when the result is used (a chunk that left
        s in between cannot be back in it).
        """
        with self._lock:
            mark = self._log_base + len(self._release_log)
            self._reader_marks.append(mark)
        return self._thread().submit(self._read, np.array(slots, np.int64)), mark

    def end_read(self, mark: int | None = None) -> None:
        """The read of ``mark`` (the oldest pending one when None) is no longer used.

        Slots released before every pending read began leave quarantine for the free
        space, so a steady stream of overlapping reads keeps as many slots out of use
        as were released during the reads' overlap.
        """
        with self._lock:
            if not self._reader_marks:
                return
            self._reader_marks.remove(min(self._reader_marks) if mark is None else mark)
            keep_from = min(self._reader_marks) if self._reader_marks else self._log_base + len(self._release_log)
            done = self._release_log[: keep_from - self._log_base]
            del self._release_log[: keep_from - self._log_base]
            self._log_base = keep_from
            for slots in done:
                end_quarantine(slots, self._free, self._quarantined, self._block_free, self.block_rows)

    @property
    def quarantined_slots(self) -> int:
        """Released slots kept out of use until the background reads pending since end."""
        with self._lock:
            return int(sum(a.size for a in self._release_log))

    def flush(self) -> None:
        """Make written data durable where the tier supports it (subclasses call
        :meth:`wait_for_writes` first)."""
        self.wait_for_writes()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.wait_for_writes()  # landed (the shutdown waited); raises a failed one's error

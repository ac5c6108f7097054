"""Positional reads and writes in the units the store moves, many in flight, around the page cache.

The disk tier reads a row where it lies: one request per run of adjacent slots, issued
by a pool of threads so that the device sees the queue depth it needs, each thread
issuing its whole share from a kernel that calls ``pread`` without the GIL. Files are opened with ``O_DIRECT`` where the
file system allows it, so the page cache neither amplifies a scattered read (no
readahead of a block around one row) nor fills memory with rows the store holds
itself; a direct request's offset, length and buffer are multiples of
:data:`ALIGN`, so every buffer here comes from :func:`aligned_buffer`. Where ``O_DIRECT``
is refused (tmpfs), the file is read through the page cache with readahead off; a
tier may also ask for the page cache on purpose, for files whose total it bounds
(:class:`~fiited_store.storage.segment_tier.SegmentTier`'s ``page_cache_bytes``).

"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types

from ..errors import StorageError, StorageFullError, StoreReadOnlyError

#: offset, length and buffer alignment of an O_DIRECT request
ALIGN = 4096
#: threads issuing requests: enough to keep a device's queue full while they wait
IO_THREADS = 32

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(exc: OSError, what: str) -> StorageError:
    """The named error for an OSError met while doing ``what``."""
    if exc.errno in _FULL:
        return StorageFullError(exc.errno, f"{what}: the device is full ({exc.strerror}); nothing was changed")
    if exc.errno in _READ_ONLY:
        return StoreReadOnlyError(exc.errno, f"{what}: not writable ({exc.strerror}); nothing was changed")
    return StorageError(exc.errno, f"{what}: {exc.strerror or exc}")


def aligned_buffer(nbytes: int) -> np.ndarray:
    """uint8[nbytes] on anonymous pages: aligned for O_DIRECT, and returned to the system
    when freed (not kept by the allocator)."""
    return np.frombuffer(mmap.mmap(-1, max(int(nbytes), 1)), np.uint8)[: max(int(nbytes), 0)]


def round_down(x: int, a: int = ALIGN) -> int:
    return x - x % a


def round_up(x: int, a: int = ALIGN) -> int:
    return -(-x // a) * a


def open_file(path: str, write: bool, direct: bool = True) -> tuple[int, bool]:
    """(descriptor, whether it is O_DIRECT) for ``path``; created when ``write``. With
    ``direct`` False (or where the file system refuses O_DIRECT) the file goes through
    the page cache, with readahead off."""
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    direct = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # the file system refuses O_DIRECT (tmpfs): buffered below
                raise
    fd = os.open(path, flags, 0o644)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around a row
    return fd, False


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (a short write is continued, as the kernel allows)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        done += n


#: libc's pread, called from a kernel: a thread issues its whole share of requests without
#: the GIL (a Python loop per request would fight the training thread for it on every call)
_pread = types.ExternalFunction("pread", types.int64(types.int32, types.uintp, types.uintp, types.int64))


@njit(cache=True, nogil=True)
def pread_ranges(fds, offsets, lengths, base, out_offsets, lo, hi):
    """Read request i of [lo, hi) (``lengths[i]`` bytes of ``fds[i]`` at ``offsets[i]``) to the
    address ``base + out_offsets[i]``, continuing short reads; returns the first request
    that failed or met the end of its file, or -1."""
    for i in range(lo, hi):
        want, at, dst = lengths[i], offsets[i], out_offsets[i]
        while want > 0:
            r = _pread(np.int32(fds[i]), base + np.uint64(dst), np.uint64(want), at)
            if r <= 0:
                return i
            want -= r
            at += r
            dst += r
    return -1


class IOPool:
    """Threads that read byte ranges of files, many at once.

    ``read_ranges`` splits its requests into one contiguous share per thread, so the
    requests of one call are in flight together; the calling thread waits for all of
    them. Requests must be aligned when their file is O_DIRECT (the caller rounds)."""

    def __init__(self, threads: int = IO_THREADS):
        self.threads = int(threads)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fiited-io")
            return self._executor

    def read_ranges(
        self,
        fds: Sequence[int],
        offsets: np.ndarray,
        lengths: np.ndarray,
        out: np.ndarray,
        out_offsets: np.ndarray,
        what: str,
    ) -> None:
        """Read ``lengths[i]`` bytes of file ``fds[i]`` at ``offsets[i]`` into
        ``out[out_offsets[i]:]``; an OSError is raised as the store's named error."""
        n = len(offsets)
        if n == 0:
            return
        if out.dtype != np.uint8 or not out.flags.c_contiguous or out.flags.writeable is False:
            raise TypeError(f"read_ranges needs a writable contiguous uint8 buffer, got {out.dtype} {out.flags}")
        fd_arr = np.asarray(fds, np.int64)
        offs = np.ascontiguousarray(offsets, np.int64)
        lens = np.ascontiguousarray(lengths, np.int64)
        dsts = np.ascontiguousarray(out_offsets, np.int64)
        if (dsts < 0).any() or (dsts + lens > out.size).any():
            raise ValueError(f"read_ranges: a request lands outside the {out.size}-byte buffer")
        base = np.uint64(out.ctypes.data)

        def share(lo: int, hi: int) -> None:
            failed = int(pread_ranges(fd_arr, offs, lens, base, dsts, lo, hi))
            if failed >= 0:  # again in Python, for the errno (or the short file) in the error
                view = memoryview(out)
                want, at, dst = int(lens[failed]), int(offs[failed]), int(dsts[failed])
                while want > 0:
                    r = os.preadv(int(fd_arr[failed]), [view[dst : dst + want]], at)
                    if r <= 0:  # past the end: the file is shorter than the tier says
                        raise OSError(errno.EIO, f"read of {want} bytes at offset {at} returned {r}")
                    want, at, dst = want - r, at + r, dst + r
                share(failed + 1, hi)

        parts = min(self.threads, n)
        if parts == 1:
            self._run(share, 0, n, what)
            return
        bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
        futures = [self._pool().submit(share, bounds[j], bounds[j + 1]) for j in range(parts)]
        error = None
        for f in futures:  # every request ends before an error is raised: no read into a reused buffer
            try:
                f.result()
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise storage_error(error, what) from error

    @staticmethod
    def _run(fn, lo, hi, what):
        try:
            fn(lo, hi)
        except OSError as exc:
            raise storage_error(exc, what) from exc

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


# ----------------------------------------------------------------------------- the device
def random_read_rate(
    path: str, nbytes: int = 1 << 30, threads: int = IO_THREADS, block: int = ALIGN, seconds: float = 3.0
) -> dict[str, float]:
    """Random reads per second of ``block`` bytes at queue depth ``threads``, O_DIRECT where
    the file system allows it (fio's randread): written first, ``nbytes`` of it, then read.
    The file is removed afterwards."""
    buf = aligned_buffer(1 << 20)
    buf[:] = np.random.default_rng(0).integers(0, 256, buf.size, dtype=np.uint8)
    fd, direct = open_file(path, write=True)
    try:
        for off in range(0, nbytes, buf.size):
            write_all(fd, memoryview(buf), off)
        os.fsync(fd)
        blocks = nbytes // block
        rng = np.random.default_rng(1)
        pool = IOPool(threads)
        done, t0 = 0, time.perf_counter()
        out = aligned_buffer(4096 * block)
        while time.perf_counter() - t0 < seconds:
            n = 4096
            offsets = rng.integers(0, blocks, n).astype(np.int64) * block
            pool.read_ranges(
                [fd] * n,
                offsets,
                np.full(n, block, np.int64),
                out,
                np.arange(n, dtype=np.int64) * block,
                "measuring the device",
            )
            done += n
        elapsed = time.perf_counter() - t0
        pool.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return {"reads_per_s": done / elapsed, "block_bytes": block, "queue_depth": threads, "direct": direct}

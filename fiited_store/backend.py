"""Where arrays live and which kernels run on them.

A backend pairs an array namespace (allocation and host transfers) with a kernel
module whose functions have the same names and signatures on every device. The
store above is written once against this pair.
"""

from __future__ import annotations

import mmap
import os
from types import ModuleType
from typing import Any

import numpy as np

#: arrays at least this large are backed by transparent huge pages
HUGE_PAGE_BYTES = 4 << 20


def huge_empty(shape: Any, dtype: Any) -> np.ndarray:
    """An array on anonymous memory advised to use 2 MiB pages (zero-filled).

    The pool and the entry table are read at random: with 4 KiB pages almost every
    lookup also misses the TLB. Where the kernel does not offer transparent huge
    pages the advice is ignored and this is an ordinary zeroed array.
    """
    dtype = np.dtype(dtype)
    shape = tuple(np.atleast_1d(shape).tolist()) if not isinstance(shape, tuple) else shape
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class CpuBackend:
    """Host memory and numba ``njit`` kernels."""

    name = "cpu"

    def __init__(self) -> None:
        from .kernels import cpu

        self.k: ModuleType = cpu

    # arrays ---------------------------------------------------------------
    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        if int(np.prod(shape)) * np.dtype(dtype).itemsize >= HUGE_PAGE_BYTES:
            return huge_empty(shape, dtype)
        return np.empty(shape, dtype)

    def full(self, shape: Any, value: Any, dtype: Any) -> np.ndarray:
        if int(np.prod(shape)) * np.dtype(dtype).itemsize >= HUGE_PAGE_BYTES:
            a = huge_empty(shape, dtype)
            if value != 0:
                a.fill(value)
            return a
        return np.full(shape, value, dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return a

    def from_host(self, a: np.ndarray) -> np.ndarray:
        """An input for the kernels: the same memory when it is contiguous already."""
        return np.ascontiguousarray(a)

    def persist(self, a: np.ndarray) -> np.ndarray:
        """A copy to keep as store state (loaded from disk): huge pages when large."""
        if a.nbytes >= HUGE_PAGE_BYTES:
            out = huge_empty(a.shape, a.dtype)
            out[...] = a
            return out
        return np.array(a, order="C")

    def copy(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def synchronize(self) -> None:
        pass

    def memory_bytes(self) -> int:
        """Physical memory of this machine: what a store's arrays can hold once touched."""
        return host_memory_bytes()


def host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no up-front check
        return 1 << 62


def get_backend(device: str):
    if device == "cpu":
        return CpuBackend()
    if device == "cuda":
        from .kernels.cuda import CudaBackend

        return CudaBackend()
    raise ValueError(f"unknown device {device!r}")

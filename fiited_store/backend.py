"""Where arrays live and which kernels run on them.

A backend pairs an array namespace (allocation and host transfers) with a kernel
module whose functions have the same names and signatures on every device. The
store above is written once against this pair.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .hostmem import HUGE_PAGE_BYTES, host_memory_bytes, huge_empty


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


def get_backend(device: str):
    if device == "cpu":
        return CpuBackend()
    if device == "cuda":
        from .kernels.cuda import CudaBackend

        return CudaBackend()
    raise ValueError(f"unknown device {device!r}")

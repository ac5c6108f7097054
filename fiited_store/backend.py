"""Where arrays live and which kernels run on them.

A backend pairs an array namespace (allocation and host transfers) with a kernel
module whose functions have the same names and signatures on every device. The
store above is written once against this pair.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


class CpuBackend:
    """Host memory and numba ``njit`` kernels."""

    name = "cpu"

    def __init__(self) -> None:
        from .kernels import cpu

        self.k: ModuleType = cpu

    # arrays ---------------------------------------------------------------
    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def full(self, shape: Any, value: Any, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return a

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def copy(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def synchronize(self) -> None:
        pass


def get_backend(device: str):
    if device == "cpu":
        return CpuBackend()
    if device == "cuda":
        from .kernels.cuda import CudaBackend

        return CudaBackend()
    raise ValueError(f"unknown device {device!r}")

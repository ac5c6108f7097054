"""A tier in host memory: the staging tier between a GPU pool and the disk, and
the in-memory model the tier tests hold the disk tier against."""

from __future__ import annotations

import numpy as np

from .base import ChunkTier


class MemoryTier(ChunkTier):
    """Chunk slots in host RAM (page-locked when ``pinned`` and a GPU is present)."""

    def __init__(self, chunk_width: int, state_width: int, capacity: int = 0, pinned: bool = False):
        self.pinned = pinned
        self._vectors = np.zeros((0, chunk_width), np.float32)
        self._states = np.zeros((0, state_width), np.float32)
        super().__init__(chunk_width, state_width, capacity)
        self._grow_storage(self.capacity)

    @property
    def location(self) -> str:
        return "memory"

    def _alloc(self, shape) -> np.ndarray:
        if self.pinned:
            from numba import cuda

            a = cuda.pinned_array(shape, np.float32)
            a[...] = 0
            return a
        return np.zeros(shape, np.float32)

    def _grow_storage(self, new_capacity: int) -> None:
        old = self._vectors.shape[0]
        if new_capacity <= old:
            return
        v = self._alloc((new_capacity, self.chunk_width))
        s = self._alloc((new_capacity, self.state_width))
        v[:old] = self._vectors
        s[:old] = self._states
        self._vectors, self._states = v, s

    def _write_sorted(self, slots, vectors, states) -> None:
        self._vectors[slots] = vectors
        self._states[slots] = states

    def _read_sorted(self, slots):
        return self._vectors[slots], self._states[slots]

    def _read_any_order(self, slots):
        return self._vectors[slots], self._states[slots]

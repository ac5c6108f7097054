"""Reused output arrays of the forward pass."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _memory_chain(a: Any) -> tuple:
    """The objects that keep a's memory alive, a first.

    A view of a view collapses its ``base`` to an object deeper in this chain (the
    huge-page buffer behind a large array, a device array's allocation), so a slice
    that a caller keeps may reference none of the outer arrays: each link is checked.
    """
    chain = [a]
    x = a
    for _ in range(8):
        if isinstance(x, np.ndarray):
            nxt = x.base
        else:  # device arrays: numba's allocation (and the pointer a slice shares), the simulator's host array
            nxt = next((getattr(x, n) for n in ("gpu_data", "owner", "_ary") if getattr(x, n, None) is not None), None)
        if nxt is None or any(nxt is c for c in chain):
            break
        chain.append(nxt)
        x = nxt
    return tuple(chain)


class OutputBuffers:
    """Output arrays reused once nothing outside holds them or any view of them.

    A fresh multi-megabyte array costs page faults on every step; a ring of reused
    ones does not. A buffer is reused only when every object holding its memory
    (the array, its bases, its allocation) has the references it had when the
    buffer was made, so a caller that keeps an output, a slice of one, or a tensor
    sharing it through DLPack never sees it overwritten.
    """

    def __init__(self, backend, keep: int = 4):
        self.backend = backend
        self.keep = keep
        self.buffers: list[tuple[tuple, tuple[int, ...]]] = []  # (memory chain, its reference counts when free)

    def arrays(self) -> list:
        """The buffers in the ring (for inspection)."""
        return [entry[0][0] for entry in self.buffers]

    @staticmethod
    def _counts(chain: tuple) -> tuple[int, ...]:
        # indexing, not iterating: an iterator's item tuple would hold one more reference
        return tuple(sys.getrefcount(chain[i]) for i in range(len(chain)))

    def _free(self, entry) -> bool:
        return self._counts(entry[0]) == entry[1]

    def get(self, shape: tuple[int, int]):
        for entry in self.buffers:
            if entry[0][0].shape == shape and self._free(entry):
                return entry[0][0]
        if len(self.buffers) >= self.keep:
            for i, entry in enumerate(self.buffers):
                if self._free(entry):
                    del self.buffers[i]
                    break
        chain = _memory_chain(self.backend.empty(shape, np.float32))
        if len(self.buffers) < self.keep:
            # counted while only the chain refers to its objects, as _free will count them
            self.buffers.append((chain, self._counts(chain)))
        return chain[0]

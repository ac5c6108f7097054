"""The chunk pool and its chunk address manager.

One pool per distinct chunk width. Its arrays are allocated once, at the size the
budget allows, and never grow: that is what makes the budget hold (invariant 2).
The free-slot stack is the paper's chunk address manager; ``owner`` is the
back-pointer that lets a prune, a rehash or ``verify`` go from a slot to its chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import FLOAT_BYTES, PoolPlan


class PoolArrays(NamedTuple):
    vectors: np.ndarray  # float32[slots, c]
    opt_state: np.ndarray  # float32[slots, w]; w = 0 (sgd), 1 (row-wise adagrad), c (adagrad)
    owner: np.ndarray  # int32[slots]; the owning entry, or -1 when free
    free_stack: np.ndarray  # int32[slots]; the first n_free entries are free slots
    n_free: np.ndarray  # int64[1]; kept in an array so kernels can pop and push


class ChunkPool:
    def __init__(self, backend, plan: PoolPlan):
        self.backend = backend
        self.plan = plan
        b = backend
        slots = plan.slots
        # Pop order is stack order; starting from slot 0 keeps early chunks
        # packed at the front, which makes a fresh checkpoint small.
        self.arrays = PoolArrays(
            vectors=b.full((slots, plan.chunk_width), 0.0, np.float32),
            opt_state=b.full((slots, plan.state_width), 0.0, np.float32),
            owner=b.full(slots, -1, np.int32),
            free_stack=b.from_host(np.arange(slots - 1, -1, -1, dtype=np.int32)),
            n_free=b.from_host(np.array([slots], dtype=np.int64)),
        )

    @classmethod
    def from_arrays(cls, backend, plan: PoolPlan, arrays: PoolArrays) -> ChunkPool:
        pool = cls.__new__(cls)
        pool.backend = backend
        pool.plan = plan
        pool.arrays = arrays
        return pool

    @property
    def slots(self) -> int:
        return self.plan.slots

    @property
    def chunk_width(self) -> int:
        return self.plan.chunk_width

    @property
    def n_free(self) -> int:
        return int(self.backend.to_host(self.arrays.n_free)[0])

    @property
    def n_used(self) -> int:
        return self.slots - self.n_free

    @property
    def vector_bytes(self) -> int:
        return self.slots * self.plan.chunk_width * FLOAT_BYTES

    @property
    def state_bytes(self) -> int:
        return int(self.arrays.opt_state.nbytes)

    @property
    def manager_bytes(self) -> int:
        return int(self.arrays.owner.nbytes + self.arrays.free_stack.nbytes + self.arrays.n_free.nbytes)

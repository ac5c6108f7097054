"""Refusals that change nothing: what a verb records before work that may be refused
part-way, and puts back when the refusal came before anything moved.

A prune pass first folds the utilities' decay into them and counts itself, then moves
chunks pool by pool; a full device or a corrupt tier file is met only where chunks move
(a tier's ``allocate`` and ``read`` raise before they change anything). So when a
pass is refused before its first chunk moved, the clock, the counters and the utilities
it had already touched are put back and the store is as it was; once a chunk moved,
the pass is not undone (the error says so) and the store stays sound, as ``verify``
checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: the counters that move when a chunk changes place: unchanged, nothing moved
MOVES = ("evicted_chunks", "spilled_chunks", "restored_chunks", "initialised_chunks", "dropped_entries")


class StepUndo:
    """The state a training step (its prune pass included) may change before any chunk moves."""

    def __init__(self, store, with_utilities: bool):
        self.clock = store.clock.as_tuple()
        self.counters = dataclasses.replace(store.counters)
        self.util: Any = None
        if with_utilities:  # the fold rewrites every utility in place
            self.util = np.array(store.backend.to_host(store.entries.arrays.util))
        self.entries = store.entries

    def nothing_moved(self, store) -> bool:
        return store.entries is self.entries and all(
            getattr(store.counters, k) == getattr(self.counters, k) for k in MOVES
        )

    def restore(self, store) -> bool:
        """Put the step's bookkeeping back if no chunk moved; returns whether it did."""
        if not self.nothing_moved(store):
            return False
        store.clock.step_count, store.clock.scale_origin, store.clock.prune_round = self.clock
        for f in dataclasses.fields(self.counters):
            setattr(store.counters, f.name, getattr(self.counters, f.name))
        if self.util is not None:
            ea = store.entries.arrays
            store.entries.arrays = ea._replace(util=store.backend.persist(self.util))
        return True

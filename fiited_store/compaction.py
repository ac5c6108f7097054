"""Reclaiming a segment tier's dead slots.

A released tier slot is never written again (:mod:`fiited_store.storage.segment_tier`):
its row stays in its segment until the segment is dropped. When dead slots pass
``StoreConfig.tier_max_garbage`` of what the tier's sealed segments hold, the live
chunks of the emptiest segments are read, appended to the open segment in entry order
(so a row stays in one piece), their addresses moved, and the segments dropped.

After a step the emptiest segment is *drained* a slice at a time (:class:`Compactor`):
its live chunks are listed once, and each step moves the next few times as many as the
step spilled (cut at a row's end), so that reclaiming keeps pace with the garbage
the spills make without any one step moving a whole segment; a tier that falls
twice the bound behind moves whole segments until it is back under that. Before a checkpoint, as many
segments move as it takes to get under the bound, so that a checkpoint's files hold
at most that much garbage.

A crash in the middle changes nothing durable: the live tier is scratch, rebuilt from
the last checkpoint's own links when the store is opened again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import tiering
from .errors import StorageFullError
from .kernels import cpu as host_kernels


def segment_tiers(store) -> list[tuple[int, Any]]:
    """(pool group, tier) of every segment tier the store has."""
    return [(g, t) for g, t in enumerate(store.tiers) if t is not None and not t.keeps_owners]


def move_segments(store, group: int, seg_ids: list[int]) -> int:
    """Move every live chunk of these sealed segments to the open segment, then drop them;
    returns the chunks moved."""
    tier = store.tiers[group]
    flags = np.zeros(tier.capacity // tier.segment_slots, np.uint8)
    flags[seg_ids] = 1
    store.compactor.forget(group)
    moved = _move(store, group, *tiering.spilled_chunks(store, group, tier, flags))
    tier.drop_segments(seg_ids)
    return moved


def _move(store, group: int, entries: np.ndarray, chunks: np.ndarray, old: np.ndarray) -> int:
    tier = store.tiers[group]
    if old.size:
        vec, st = tier.read(old)
        new = tier.allocate(old.size)
        tier.write(new, vec, st)
        host_kernels.move_spilled(entries, chunks, new, store.entries.arrays.addr)  # segment tiers: CPU stores
        tier.release(old)
    store.counters.compacted_chunks += int(old.size)
    return int(old.size)


#: chunks a drain moves after a step at least, and per chunk the step spilled
DRAIN_MIN_CHUNKS = 8192
DRAIN_PER_SPILLED = 4


@dataclass
class _Drain:
    """A segment being emptied: its live chunks when it was listed, in entry order."""

    tier: Any
    seg_id: int
    entries: np.ndarray  # int64[n]
    chunks: np.ndarray  # int64[n]
    slots: np.ndarray  # int64[n]: each chunk's tier slot in the segment
    done: int  # chunks of the list handled
    version: tuple  # (entry table, its version, store generation) when listed


class Compactor:
    """Per pool, the segment being drained, and what the store had spilled at the last step."""

    def __init__(self, n_pools: int):
        self.drains: list[_Drain | None] = [None] * n_pools
        self.spilled_at_last_step: int | None = None  # None before the first step

    def forget(self, group: int | None = None) -> None:
        """Stop draining (``group``'s, or every) segment: its list no longer holds."""
        for g in range(len(self.drains)) if group is None else [group]:
            self.drains[g] = None


def _version(store) -> tuple:
    return id(store.entries), store.entries.version, store.generation


def drain_step(store, group: int, budget: int) -> int:
    """Move the next ``budget`` or so live chunks (whole rows) of the segment pool ``group``'s
    tier is draining, starting a drain of its emptiest segment when none is under way;
    drop the segment once it is empty. Returns the chunks moved."""
    tier = store.tiers[group]
    c = store.compactor
    d = c.drains[group]
    if d is not None and (d.tier is not tier or d.version != _version(store)):
        d = c.drains[group] = None  # the tier was replaced, or entries moved: list again
    if d is None:
        ids = tier.compaction_candidates(max_live=1.0)
        if not ids:
            return 0
        flags = np.zeros(tier.capacity // tier.segment_slots, np.uint8)
        flags[ids[0]] = 1
        e, k, s = tiering.spilled_chunks(store, group, tier, flags)
        d = c.drains[group] = _Drain(tier, ids[0], e, k, s, 0, _version(store))
    end = min(d.done + budget, d.entries.size)
    if end < d.entries.size:  # a row moves whole: cut where the next entry begins
        end = int(np.searchsorted(d.entries, d.entries[end - 1], side="right"))
    e, k, old = d.entries[d.done : end], d.chunks[d.done : end], d.slots[d.done : end]
    # chunks restored to the pool since the list was made left the segment already
    still = store.entries.arrays.addr[e, k] == (-2 - old).astype(np.int32)
    moved = _move(store, group, e[still], k[still], old[still])
    d.done = end
    if d.done == d.entries.size:
        c.drains[group] = None
        if tier.segment_live(d.seg_id) == 0:
            tier.drop_segments([d.seg_id])
        else:  # not expected (spills go to the open segment): move what is left whole
            moved += move_segments(store, group, [d.seg_id])
    return moved


def compact(store, group: int, target: float | None = None, max_segments: int | None = None) -> int:
    """Drop the emptiest segments of pool ``group``'s tier until its garbage is at most
    ``target`` (the store's ``tier_max_garbage`` by default), ``max_segments`` at most;
    returns the chunks moved."""
    tier = store.tiers[group]
    target = store.config.tier_max_garbage if target is None else target
    moved = done = 0
    while tier.garbage_fraction() > target and (max_segments is None or done < max_segments):
        # a segment is worth moving when at most half of it is live (or it is the emptiest)
        ids = tier.compaction_candidates(max_live=1.0)
        if not ids:
            break
        moved += move_segments(store, group, ids[:1])
        done += 1
    return moved


def after_step(store) -> None:
    """Each tier past its garbage bound drains a slice of a segment, a few times what the
    step spilled; one twice past it moves whole segments until it is back under that."""
    c = store.compactor
    last = c.spilled_at_last_step
    spilled = 0 if last is None else max(0, store.counters.spilled_chunks - last)
    c.spilled_at_last_step = store.counters.spilled_chunks
    bound = store.config.tier_max_garbage
    for g, tier in segment_tiers(store):
        garbage, high = tier.garbage_fraction(), min(2 * bound, (1 + bound) / 2)
        try:
            if garbage > high:  # fallen behind: whole segments until back under twice the bound
                compact(store, g, target=high)
            elif garbage > bound or c.drains[g] is not None:
                drain_step(store, g, max(DRAIN_MIN_CHUNKS, DRAIN_PER_SPILLED * spilled))
        except StorageFullError as exc:
            # reclaiming is housekeeping: a full device stops it (each move allocates before
            # it changes anything) without failing the step that was taken; the next spill,
            # which needs the space, raises
            warnings.warn(f"compaction of tier {g} deferred: {exc}", RuntimeWarning, stacklevel=2)
            c.forget(g)


def before_checkpoint(store) -> None:
    """Every segment tier under its garbage bound, so that a checkpoint links little garbage."""
    for g, _ in segment_tiers(store):
        compact(store, g)

"""Reclaiming a segment tier's dead slots.

A released tier slot is never written again (:mod:`fiited_store.storage.segment_tier`):
its row stays in its segment until the segment is dropped. When dead slots pass
``StoreConfig.tier_max_garbage`` of what the tier's sealed segments hold, the live
chunks of the emptiest segments are read, appended to the open segment in entry order
(so a row stays in one piece), their addresses moved, and the segments dropped. After a
step at most one segment moves, so that no step waits long; before a checkpoint, as many
as it takes to get under the bound, so that a checkpoint's files hold at most that much
garbage.

A crash in the middle changes nothing durable: the live tier is scratch, rebuilt from
the last checkpoint's own links when the store is opened again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import tiering
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
    entries, chunks, old = tiering.spilled_chunks(store, group, tier, flags)
    if old.size:
        vec, st = tier.read(old)
        new = tier.allocate(old.size)
        tier.write(new, vec, st)
        host_kernels.move_spilled(entries, chunks, new, store.entries.arrays.addr)  # segment tiers: CPU stores
        tier.release(old)
    tier.drop_segments(seg_ids)
    store.counters.compacted_chunks += int(old.size)
    return int(old.size)


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
    """At most one segment per tier moved, when a tier's garbage passed the bound."""
    for g, tier in segment_tiers(store):
        if tier.garbage_fraction() > store.config.tier_max_garbage:
            compact(store, g, max_segments=1)


def before_checkpoint(store) -> None:
    """Every segment tier under its garbage bound, so that a checkpoint links little garbage."""
    for g, _ in segment_tiers(store):
        compact(store, g)

"""The disk tier of each pool: made on a pool's first spill, reopened from a checkpoint,
each behind the host cache the store's configuration asks for (a GPU store keeps
spilled chunks in pinned host memory before they reach the disk)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import FLOAT_BYTES

#: target size of one Zarr chunk of a store's disk tier
TIER_CHUNK_BYTES = 32 << 10


class Tiers:
    """Each pool's disk tier, by pool group (None until the pool's first spill), and the
    temporary directory that holds them when the store has no directory of its own."""

    def __init__(self, n_pools: int):
        self._tiers: list[Any] = [None] * n_pools
        self._tmpdir: Path | None = None

    def __getitem__(self, group: int) -> Any:
        return self._tiers[group]

    def __setitem__(self, group: int, tier: Any) -> None:
        self._tiers[group] = tier

    def __iter__(self) -> Iterator[Any]:
        return iter(self._tiers)

    def __len__(self) -> int:
        return len(self._tiers)

    def root(self, path: Path | None) -> Path:
        """Where live tiers go: ``path/live``, or a temporary directory that :meth:`close` removes."""
        if path is not None:
            return path / "live"
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="fiited-tier-"))
        return self._tmpdir

    def close(self) -> None:
        for tier in self._tiers:
            if tier is not None:
                tier.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def host_cache_rows(store, group: int) -> int:
    """Rows of host cache in front of pool ``group``'s tier (0: none)."""
    plan = store.plans[group]
    row = (plan.chunk_width + plan.state_width) * FLOAT_BYTES
    if store.config.host_cache_bytes is None:
        return 4 * plan.slots if store.config.device == "cuda" else 0
    share = store.config.host_cache_bytes * plan.vector_bytes / sum(p.vector_bytes for p in store.plans)
    return int(share // row)


def page_cache_bytes(store, group: int) -> int:
    """Pool ``group``'s share of the page cache its segment tier may use (see
    ``StoreConfig.tier_page_cache_bytes``), split between pools as their rows are."""
    from .hostmem import host_memory_bytes

    total = store.config.tier_page_cache_bytes
    if total is None:
        total = host_memory_bytes() // 4
    return int(total * store.plans[group].vector_bytes / sum(p.vector_bytes for p in store.plans))


def new_tier(store, group: int, root: Path, capacity: int = 0):
    """A new, empty tier for pool ``group`` at ``root``, of the kind the store's
    configuration asks for (see :func:`tier_of`)."""
    from .storage.segment_tier import SegmentTier
    from .storage.zarr_tier import StagedZarrTier

    plan = store.plans[group]
    rows = host_cache_rows(store, group)
    if not rows:
        return SegmentTier(
            root,
            plan.chunk_width,
            plan.state_width,
            segment_slots=store.config.tier_segment_slots,
            page_cache_bytes=page_cache_bytes(store, group),
        )
    # ~32 KB chunks: restores are scattered, and a chunk is read whole for any of its rows
    block = int(max(64, TIER_CHUNK_BYTES // ((plan.chunk_width + plan.state_width) * FLOAT_BYTES)))
    return StagedZarrTier(
        root,
        plan.chunk_width,
        plan.state_width,
        capacity=max(capacity, plan.slots),
        cache_rows=rows,
        pinned=_pinned_host(store),
        block_rows=block,
    )


def tier_of(store, group: int):
    """Pool ``group``'s tier, made on first use: an append-only log of segments
    (:class:`~fiited_store.storage.segment_tier.SegmentTier`), or, behind a host cache (a
    GPU store's pinned memory, or ``host_cache_bytes``), the block-allocated Zarr tier."""
    if store.tiers[group] is None:
        store.tiers[group] = new_tier(store, group, tier_root(store) / f"tier_{group}")
    return store.tiers[group]


def _pinned_host(store) -> bool:
    if store.config.device != "cuda":
        return False
    from .kernels.cuda import SIMULATED

    return not SIMULATED


def open_saved_tier(store, group: int, root: Path, owner: np.ndarray, read_only: bool):
    """A saved tier, with the host cache this store's configuration asks for."""
    from .storage.zarr_tier import StagedZarrTier, ZarrTier

    rows = host_cache_rows(store, group)
    if rows and not read_only:
        return StagedZarrTier.open(root, owner, cache_rows=rows, pinned=_pinned_host(store))
    return ZarrTier.open(root, owner, read_only=read_only)


def tier_root(store) -> Path:
    """Where the store's live tiers go: its directory, or a temporary one that close() removes."""
    return store.tiers.root(store.path)


def open_segment_tier(store, group: int, root: Path, description: dict, read_only: bool):
    """A saved segment tier, its live slots read off the store's addresses (call after the
    entries are in place)."""
    from .storage.segment_tier import SegmentTier

    tier = SegmentTier.open(
        root, description["segments"], read_only=read_only, page_cache_bytes=page_cache_bytes(store, group)
    )
    _, _, slots = spilled_chunks(store, group, tier)
    tier.mark_live(slots)
    return tier


def spilled_chunks(store, group: int, tier=None, segments: np.ndarray | None = None):
    """(entries, chunks, tier slots) of pool ``group``'s spilled chunks, in entry order, read
    off the addresses; ``segments`` (uint8 per segment id) keeps those whose slot lies in a
    flagged segment of a segment tier."""
    from .kernels import cpu as host_kernels

    tier = store.tiers[group] if tier is None else tier
    b, m, ea = store.backend, store.host_meta, store.entries.arrays
    seg_slots = getattr(tier, "segment_slots", max(tier.capacity, 1)) if tier is not None else 1
    if segments is None:
        segments = np.ones(max(tier.capacity // seg_slots, 1) if tier is not None else 1, np.uint8)
    addr = b.to_host(ea.addr)
    args = (
        b.to_host(ea.row_base),
        b.to_host(ea.seen),
        b.to_host(ea.table_ids),
        addr,
        m["table_chunks"],
        m["table_group"],
        group,
        seg_slots,
        segments,
    )
    n = int(host_kernels.list_spilled(*args, *(np.empty(0, np.int64) for _ in range(3))))
    out = [np.empty(n, np.int64) for _ in range(3)]
    host_kernels.list_spilled(*args, *out)
    return out[0], out[1], out[2]


def whole_rows(store, group: int) -> bool:
    """Whether cache mode evicts pool ``group``'s rows whole: when they go to a segment tier,
    which keeps a row's chunks side by side only if they leave together."""
    if store.backend.name != "cpu":
        return False
    tier = store.tiers[group]
    return (not tier.keeps_owners) if tier is not None else host_cache_rows(store, group) == 0

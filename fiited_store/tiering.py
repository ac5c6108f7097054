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


def tier_of(store, group: int):
    """Pool ``group``'s tier, made on first use."""
    if store.tiers[group] is None:
        from .storage.zarr_tier import StagedZarrTier, ZarrTier

        plan = store.plans[group]
        root = tier_root(store) / f"tier_{group}"
        rows = host_cache_rows(store, group)
        # ~32 KB chunks: restores are scattered, and a chunk is read whole for any of its rows
        block = int(max(64, TIER_CHUNK_BYTES // ((plan.chunk_width + plan.state_width) * FLOAT_BYTES)))
        if rows:
            store.tiers[group] = StagedZarrTier(
                root,
                plan.chunk_width,
                plan.state_width,
                capacity=plan.slots,
                cache_rows=rows,
                pinned=_pinned_host(store),
                block_rows=block,
            )
        else:
            store.tiers[group] = ZarrTier(
                root, plan.chunk_width, plan.state_width, capacity=plan.slots, block_rows=block
            )
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

"""Tiers below the pool, and checkpoints (imported as ``fiited_store.storage``)."""

from .base import ChunkTier
from .memory import MemoryTier
from .zarr_tier import StagedZarrTier, ZarrTier

__all__ = ["ChunkTier", "MemoryTier", "StagedZarrTier", "ZarrTier"]

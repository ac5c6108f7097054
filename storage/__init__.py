"""Tiers below the pool, and checkpoints (imported as ``fiited_store.storage``)."""

from .base import ChunkTier, Tier
from .memory import MemoryTier
from .segment_tier import SegmentTier
from .zarr_tier import StagedZarrTier, ZarrTier

__all__ = ["ChunkTier", "MemoryTier", "SegmentTier", "StagedZarrTier", "Tier", "ZarrTier"]

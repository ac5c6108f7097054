"""fiited-store: embedding tables stored as FIITED chunks inside a fixed memory budget.

>>> from fiited_store import EmbeddingStore, TableConfig, StoreConfig, ManualRatios
"""

from .config import DynamicRatio, FloorRatios, ManualRatios, StoreConfig, TableConfig
from .errors import (
    ConfigError,
    CorruptStoreError,
    FiitedError,
    IdOutOfRangeError,
    InputDTypeError,
    InputShapeError,
    MemoryBudgetError,
    NonFiniteGradientError,
    PeerRankError,
    PoolCapacityError,
    StaleBatchError,
    StorageError,
    StorageFullError,
    StoreCopyError,
    StoreLockedError,
    StoreReadOnlyError,
    UnknownTableError,
    UnsupportedAutogradError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # the store imports numba and compiles nothing until asked; importing it lazily
    # keeps `import fiited_store` (and `fiited-store --help`) free of numba's start-up
    if name in ("EmbeddingStore", "PooledBatch"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'fiited_store' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "CorruptStoreError",
    "DynamicRatio",
    "FloorRatios",
    "EmbeddingStore",
    "FiitedError",
    "IdOutOfRangeError",
    "InputDTypeError",
    "InputShapeError",
    "ManualRatios",
    "MemoryBudgetError",
    "NonFiniteGradientError",
    "PeerRankError",
    "PoolCapacityError",
    "PooledBatch",
    "StaleBatchError",
    "StorageError",
    "StorageFullError",
    "StoreConfig",
    "StoreCopyError",
    "StoreLockedError",
    "StoreReadOnlyError",
    "TableConfig",
    "UnknownTableError",
    "UnsupportedAutogradError",
]

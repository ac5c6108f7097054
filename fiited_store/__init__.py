"""fiited-store: embedding tables stored as FIITED chunks inside a fixed memory budget.

>>> from fiited_store import EmbeddingStore, TableConfig, StoreConfig, ManualRatios
"""

from .config import DynamicRatio, ManualRatios, StoreConfig, TableConfig
from .errors import (
    ConfigError,
    CorruptStoreError,
    FiitedError,
    IdOutOfRangeError,
    InputDTypeError,
    InputShapeError,
    MemoryBudgetError,
    NonFiniteGradientError,
    PoolCapacityError,
    StaleBatchError,
    StorageError,
    StorageFullError,
    StoreLockedError,
    StoreReadOnlyError,
    UnknownTableError,
    UnsupportedAutogradError,
)
from .store import EmbeddingStore, PooledBatch

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorruptStoreError",
    "DynamicRatio",
    "EmbeddingStore",
    "FiitedError",
    "IdOutOfRangeError",
    "InputDTypeError",
    "InputShapeError",
    "ManualRatios",
    "MemoryBudgetError",
    "NonFiniteGradientError",
    "PoolCapacityError",
    "PooledBatch",
    "StaleBatchError",
    "StorageError",
    "StorageFullError",
    "StoreConfig",
    "StoreLockedError",
    "StoreReadOnlyError",
    "TableConfig",
    "UnknownTableError",
    "UnsupportedAutogradError",
]

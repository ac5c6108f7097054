"""Named exceptions.

Every error a user can provoke with bad input has its own class, carries the
offending value in its message, and is raised *before* any state changes, so
that a caught error leaves the store exactly as it was.
"""

from __future__ import annotations


class FiitedError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FiitedError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class UnknownTableError(FiitedError, KeyError):
    """A request names a table that the store does not hold."""

    def __init__(self, table: object, known: list[str]):
        self.table = table
        self.known = list(known)
        super().__init__(f"unknown table {table!r}; this store holds {self.known}")

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return self.args[0]


class InputDTypeError(FiitedError, TypeError):
    """An input array has the wrong dtype."""


class InputShapeError(FiitedError, ValueError):
    """An input array has the wrong shape, or offsets that are not a valid partition."""


class IdOutOfRangeError(FiitedError, IndexError):
    """An id lies outside ``[0, num_embeddings)`` of a table with a direct index (as torch raises)."""

    def __init__(self, table: str, id_: int, num_embeddings: int, position: int):
        self.table = table
        self.id = id_
        self.num_embeddings = num_embeddings
        self.position = position
        super().__init__(
            f"id {id_} (at position {position}) is out of range for table {table!r}, which declares "
            f"num_embeddings={num_embeddings}; nothing was changed"
        )


class NonFiniteGradientError(FiitedError, FloatingPointError):
    """A gradient holds NaN or inf; nothing was updated."""


class PeerRankError(FiitedError, RuntimeError):
    """Another rank of a sharded store refused its part of a collective verb (bad input,
    a full index); this rank raises too, so that no rank waits forever, and nothing changed."""


class StaleBatchError(FiitedError, RuntimeError):
    """A backward pass refers to a forward batch that can no longer be applied."""


class UnsupportedAutogradError(FiitedError, RuntimeError):
    """An autograd request the store cannot honour (double backward); nothing was updated."""


class StoreCopyError(FiitedError, TypeError):
    """A module or store that owns a store's memory and files cannot be copied implicitly."""


class PoolCapacityError(FiitedError, RuntimeError):
    """The operation needs more resident slots than the pool has."""


class MemoryBudgetError(PoolCapacityError):
    """The hashed index would have to grow past the store's memory budget; nothing was inserted."""


class StorageError(FiitedError, OSError):
    """A tier or checkpoint could not be read or written."""


class StorageFullError(StorageError):
    """The device holding a tier or checkpoint is full; nothing was lost."""


class StoreReadOnlyError(StorageError):
    """A write was attempted on a store opened read-only or on a read-only directory."""


class StoreLockedError(StorageError):
    """The store directory is already open for writing by another handle or process."""


class CorruptStoreError(StorageError):
    """A store on disk is truncated, corrupt, or not a fiited-store store."""

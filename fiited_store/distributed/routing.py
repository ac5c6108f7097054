"""Which shard owns a key.

Row-wise (the default): a key (table, id) falls in bucket ``hash(table, id) mod V``;
rank r of W owns the buckets ``[r * V / W, (r + 1) * V / W)``, so the owner of a
bucket is ``bucket * W // V``. V and the salt are recorded in a sharded store's
manifest from its first save: changing the world size moves whole bucket ranges,
and a checkpoint never depends on W.

Table-wise: every row of a table lives on one rank; tables go to ranks largest
first, each to the rank holding the fewest bytes so far (a function of the
tables' sizes and W alone, so every rank computes the same placement). A table
keeps its own index kind on its rank (the direct index when declared).

Both give ``owners(tables, ids, world)`` and describe a shard for the manifest.

Example::

    >>> import numpy as np
    >>> r = RowWiseRouting(n_buckets=8)
    >>> owners = r.owners(np.array([0, 0, 1], np.int16), np.array([5, 6, 5]), world=2)
    >>> owners.shape, bool(((owners >= 0) & (owners < 2)).all())
    ((3,), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ConfigError

#: virtual buckets of a new sharded store: any world size up to this many ranks
DEFAULT_BUCKETS = 4096
#: routing's hash salt; it must differ from the prune sampler's (see key_buckets)
DEFAULT_SALT = 0x6A09E667F3BCC908


@dataclass(frozen=True)
class RowWiseRouting:
    """Row-wise sharding: every chunk of a row lives on the row's owner.

    Args:
        n_buckets: V, the virtual buckets (at least the largest world size you will run).
        salt: the hash salt (64 bits).
    """

    n_buckets: int = DEFAULT_BUCKETS
    salt: int = DEFAULT_SALT
    kind: str = "row"

    def __post_init__(self) -> None:
        if not (isinstance(self.n_buckets, int) and 1 <= self.n_buckets <= 2**31):
            raise ConfigError(f"n_buckets must be an int in [1, 2**31], got {self.n_buckets!r}")
        if not (isinstance(self.salt, int) and 0 <= self.salt < 2**64):
            raise ConfigError(f"salt must be an int in [0, 2**64), got {self.salt!r}")

    def check_world(self, world: int) -> None:
        if world > self.n_buckets:
            raise ConfigError(
                f"a world of {world} ranks needs at least {world} virtual buckets, "
                f"this store has n_buckets={self.n_buckets}"
            )

    def buckets(self, tables: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """int64[n]: the bucket of each key (tables int16[n], ids int64[n])."""
        from ..kernels import cpu

        out = np.empty(ids.shape[0], np.int64)
        cpu.key_buckets(
            np.ascontiguousarray(tables, np.int16),
            np.ascontiguousarray(ids, np.int64),
            np.uint64(self.salt),
            self.n_buckets,
            out,
        )
        return out

    def owners(self, tables: np.ndarray, ids: np.ndarray, world: int) -> np.ndarray:
        """int64[n]: the rank that owns each key in a world of ``world`` ranks."""
        return self.buckets(tables, ids) * world // self.n_buckets

    def bucket_range(self, rank: int, world: int) -> tuple[int, int]:
        """[first, last) bucket owned by ``rank``."""
        V = self.n_buckets
        return -(-rank * V // world), -(-(rank + 1) * V // world)

    def owns_tables(self, rank: int, world: int) -> None:
        """Row-wise, every rank holds rows of every table."""
        return None

    def shard_json(self, rank: int, world: int) -> dict:
        return {"buckets": list(self.bucket_range(rank, world))}

    def to_json(self) -> dict:
        return {"kind": self.kind, "n_buckets": self.n_buckets, "salt": self.salt, "hash": "mix64(key_hash) ^ salt"}


@dataclass(frozen=True)
class TableWiseRouting:
    """Table-wise sharding: all rows of a table on one rank.

    Args:
        table_bytes: each table's weight for placement, in the tables' order
            (:func:`table_weights`: dense bytes, or dims when a size is undeclared).
    """

    table_bytes: tuple[int, ...]
    kind: str = "table"

    def __post_init__(self) -> None:
        if not self.table_bytes or any(not isinstance(b, int) or b < 0 for b in self.table_bytes):
            raise ConfigError(f"table_bytes must be a non-empty tuple of ints >= 0, got {self.table_bytes!r}")

    @classmethod
    def for_tables(cls, tables) -> TableWiseRouting:
        return cls(table_weights(tables))

    def check_world(self, world: int) -> None:
        if world > len(self.table_bytes):
            raise ConfigError(
                f"table-wise placement over {world} ranks needs at least {world} tables, "
                f"this store has {len(self.table_bytes)}"
            )

    def table_ranks(self, world: int) -> np.ndarray:
        """int64[T]: the rank of each table (placed once per world size, then looked up)."""
        return _place_tables(self.table_bytes, world)

    def owners(self, tables: np.ndarray, ids: np.ndarray, world: int) -> np.ndarray:
        return self.table_ranks(world)[np.asarray(tables, np.int64)]

    def owns_tables(self, rank: int, world: int) -> list[int]:
        return np.flatnonzero(self.table_ranks(world) == rank).tolist()

    def shard_json(self, rank: int, world: int) -> dict:
        return {"tables": self.owns_tables(rank, world)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "table_bytes": list(self.table_bytes)}


@lru_cache(maxsize=64)
def _place_tables(table_bytes: tuple[int, ...], world: int) -> np.ndarray:
    """Largest table first, each to the least-loaded rank (ties: the lower rank)."""
    load = np.zeros(world, np.int64)
    out = np.empty(len(table_bytes), np.int64)
    for t in sorted(range(len(table_bytes)), key=lambda t: (-table_bytes[t], t)):  # T tables, once per world
        r = int(np.argmin(load))
        out[t] = r
        load[r] += table_bytes[t]
    out.flags.writeable = False  # shared by every caller
    return out


def table_weights(tables) -> tuple[int, ...]:
    """Each table's share of a budget, as plan_pools weighs it: its dense bytes when every
    table declares its rows, else its dimension."""
    if all(t.dense_bytes is not None for t in tables):
        return tuple(int(t.dense_bytes) for t in tables)
    return tuple(int(t.dim) for t in tables)


def routing_from_json(doc: dict):
    """The routing a manifest records."""
    if doc.get("kind") == "row":
        return RowWiseRouting(n_buckets=int(doc["n_buckets"]), salt=int(doc["salt"]))
    if doc.get("kind") == "table":
        return TableWiseRouting(tuple(int(b) for b in doc["table_bytes"]))
    raise ConfigError(f"unknown routing {doc!r}")

"""A floor for every row: each table's first dimensions as a chunk that every row keeps.

FIITED's chunks of one row all have one width, so a floor (``TableConfig.min_chunks``)
costs a whole chunk per row, and chunks small enough to be a cheap floor cost an
address and a utility each (6 bytes for every 8 of a 2-float chunk). A collection
given ``TableConfig(floor_dim=f)`` holds the table as two tables of the store instead:

- ``"<name>:floor"``: the first f dimensions, one chunk that every row keeps
  (``min_chunks=1``: its pool is paid first, from the budget, for every declared row);
- ``"<name>"``: the other D - f dimensions in K chunks that utility decides, as in
  the paper.

The feature's ids go to both, so its pooled output is the two side by side: the
D columns of the table, still one buffer shared with the store. Both parts start
at the whole row's initial scale (1 / sqrt(D) unless ``init_scale`` says
otherwise), so a row starts as it would undivided.

A table with ``floor_rows`` fewer than its rows (what :class:`~fiited_store.config.FloorRatios`
gives past the ratio where a floor for every row fits) shares its floor: id i reads
floor row :func:`hash_ids` (i, floor_rows), the hashing trick on the floor alone, and
the chunks above it stay the row's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ..config import TableConfig
from ..errors import InputShapeError

FLOOR_SUFFIX = ":floor"

#: Knuth's multiplicative constant (2^32 / golden ratio)
_HASH_MULTIPLIER = 2654435761


def hash_ids(ids: torch.Tensor, rows: int, salt: int = 0) -> torch.Tensor:
    """int64[n]: each id's row among ``rows`` (a multiplicative hash, salted by ``salt``).

    Fixed for good: a store trained with a shared floor finds its rows through it."""
    mixed = (ids.to(torch.int64) % (1 << 31)) * _HASH_MULTIPLIER + salt
    return torch.remainder(mixed ^ (mixed >> 16), rows)


def shared_rows(t: TableConfig) -> int:
    """The rows ids are hashed into for the floor of ``t``; 0 when each row has its own."""
    if not t.floor_dim or t.floor_rows is None or t.floor_rows >= (t.num_embeddings or 0):
        return 0
    return t.floor_rows


def split_floors(tables: Sequence[TableConfig]) -> tuple[list[TableConfig], list[list[int]]]:
    """(the store's tables, and for each table given the store tables that hold its columns, in column order).

    A table without ``floor_dim`` is its own store table."""
    store_tables: list[TableConfig] = []
    parts: list[list[int]] = []
    for t in tables:
        f = t.floor_dim
        if not f:
            parts.append([len(store_tables)])
            store_tables.append(t)
            continue
        scale = t.init_scale if t.init_scale is not None else 1.0 / math.sqrt(t.dim)
        floor = dataclasses.replace(
            t,
            name=t.name + FLOOR_SUFFIX,
            dim=f,
            chunks=1,
            min_chunks=1,
            init_scale=scale,
            floor_dim=0,
            floor_rows=None,
            num_embeddings=shared_rows(t) or t.num_embeddings,
        )
        rest = dataclasses.replace(t, dim=t.dim - f, init_scale=scale, floor_dim=0, floor_rows=None)
        parts.append([len(store_tables), len(store_tables) + 1])
        store_tables += [floor, rest]
    return store_tables, parts


def repeat_keys(
    values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, copies: Sequence[Sequence[int]]
):
    """A jagged batch (key after key, B bags each) with key f's bags given once for each of
    ``copies[f]``, in a row: a copy 0 has the ids as given, a copy m > 0 has them hashed into
    m rows (:func:`hash_ids`, a shared floor).

    values int[nnz]; offsets int64[F * B + 1]; weights float[nnz] or None.
    Returns (values, offsets, weights) of the longer batch."""
    F = len(copies)
    if offsets.dim() != 1 or (offsets.numel() - 1) % F:
        raise InputShapeError(f"offsets must be int[F * B + 1] for F = {F} keys, got shape {tuple(offsets.shape)}")
    B = (offsets.numel() - 1) // F
    starts = offsets[::B] if B else offsets.new_zeros(F + 1)
    lengths = torch.diff(offsets)
    vs, ls, ws = [], [], []
    for f, rows in enumerate(copies):  # one slice per feature, not per key
        lo, hi = int(starts[f]), int(starts[f + 1])
        for m in rows:
            vs.append(hash_ids(values[lo:hi], m).to(values.dtype) if m else values[lo:hi])
            ls.append(lengths[f * B : (f + 1) * B])
            if weights is not None:
                ws.append(weights[lo:hi])
    lengths = torch.cat(ls)
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    return torch.cat(vs), offsets, (torch.cat(ws) if weights is not None else None)


def part_ids(t: TableConfig) -> list[int]:
    """For each store table holding ``t``'s columns (as :func:`split_floors` lists them), the
    rows its ids are hashed into (0: the ids as given); the copies :func:`repeat_keys` takes."""
    if not t.floor_dim:
        return [0]
    return [shared_rows(t), 0]

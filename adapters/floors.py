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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ..config import TableConfig
from ..errors import InputShapeError

FLOOR_SUFFIX = ":floor"


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
            t, name=t.name + FLOOR_SUFFIX, dim=f, chunks=1, min_chunks=1, init_scale=scale, floor_dim=0
        )
        rest = dataclasses.replace(t, dim=t.dim - f, init_scale=scale, floor_dim=0)
        parts.append([len(store_tables), len(store_tables) + 1])
        store_tables += [floor, rest]
    return store_tables, parts


def repeat_keys(values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, repeats: Sequence[int]):
    """A jagged batch (key after key, B bags each) with key f's bags given ``repeats[f]`` times in a row.

    values int[nnz]; offsets int64[F * B + 1]; weights float[nnz] or None.
    Returns (values, offsets, weights) of the longer batch."""
    F = len(repeats)
    if offsets.dim() != 1 or (offsets.numel() - 1) % F:
        raise InputShapeError(f"offsets must be int[F * B + 1] for F = {F} keys, got shape {tuple(offsets.shape)}")
    B = (offsets.numel() - 1) // F
    starts = offsets[::B] if B else offsets.new_zeros(F + 1)
    lengths = torch.diff(offsets)
    vs, ls, ws = [], [], []
    for f, r in enumerate(repeats):  # one slice per feature, not per key
        lo, hi = int(starts[f]), int(starts[f + 1])
        for _ in range(r):
            vs.append(values[lo:hi])
            ls.append(lengths[f * B : (f + 1) * B])
            if weights is not None:
                ws.append(weights[lo:hi])
    lengths = torch.cat(ls)
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    return torch.cat(vs), offsets, (torch.cat(ws) if weights is not None else None)

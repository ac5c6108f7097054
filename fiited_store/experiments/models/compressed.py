"""The peers that reach extreme pruning ratios at full dimension: the hashing trick and
quotient-remainder compositional embeddings (Shi et al., 2020).

Both keep every row at D dimensions and share rows between ids instead of shrinking
them; both return float32[B, F * D] (features side by side, each bag summed), train with
sparse gradients (torch's Adagrad, as the dense baseline) and count their own training
memory: weights and the optimizer's state, one float per weight.

- ``hashing``: feature f's ids hashed into ``max(1, round((1 - ratio) * n_f))`` rows.
- ``qr``: id i of feature f is ``q[i // m_f] * r[i % m_f]`` (element for element), with
  ``m_f`` the smallest collision count whose two tables fit ``(1 - ratio) * n_f`` rows.
  Two tables need at least ``2 * sqrt(n_f)`` rows, so a ratio past that cannot be met:
  the table then takes ``m_f = ceil(sqrt(n_f))`` and :func:`qr_collisions` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

# the hash that shares a floor's rows (ids below 2**31 keep their products within int64)
from ...adapters.floors import hash_ids
from .dense import DenseEmbeddings
from .optim import table_training_bytes


def hashed_rows(cardinality: int, ratio: float) -> int:
    """Rows a feature of ``cardinality`` ids keeps under the hashing trick at ``ratio``."""
    return max(1, min(int(cardinality), round((1.0 - ratio) * int(cardinality))))


def qr_collisions(cardinality: int, ratio: float) -> tuple[int, bool]:
    """(m, whether the ratio is met): the collisions per remainder row that make the
    quotient table (ceil(n / m) rows) and the remainder table (m rows) fit
    ``(1 - ratio) * n`` rows with the fewest collisions; m = 1 is the whole table."""
    n = int(cardinality)
    budget = (1.0 - ratio) * n
    if n <= budget:
        return 1, True
    smallest = max(1, math.ceil(math.sqrt(n)))
    if budget < 2.0 * math.sqrt(n):  # past the smallest pair of tables
        return smallest, False
    # between the roots of m^2 - budget * m + n = 0 the real-valued sizes fit; the first
    # m there whose rounded-up quotient table fits too, if any does (near 2 sqrt(n) none may)
    root = math.sqrt(max(budget * budget - 4.0 * n, 0.0))
    for m in range(max(2, int((budget - root) / 2.0)), int((budget + root) / 2.0) + 2):
        if math.ceil(n / m) + m <= budget:
            return m, True
    return smallest, False


def _bags(offsets: torch.Tensor) -> torch.Tensor:
    """int64[nnz]: the bag of each id of a jagged batch with offsets int64[B + 1]."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=offsets.device), lengths)


class HashedEmbeddings(DenseEmbeddings):
    """The hashing trick: each feature's ids share ``hashed_rows(n_f, ratio)`` full-width rows.

    >>> import torch
    >>> emb = HashedEmbeddings([1000, 10], dim=4, ratio=0.99)
    >>> [b.num_embeddings for b in emb.bags]
    [10, 1]
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, ratio: float, init_scale: float | None = None):
        rows = [hashed_rows(n, ratio) for n in cardinalities]
        super().__init__(rows, dim, init_scale)
        self.rows = rows

    def forward(self, batch) -> torch.Tensor:
        out = []
        for f, (bag, (ids, offs)) in enumerate(zip(self.bags, batch.per_feature())):
            out.append(bag(hash_ids(ids, self.rows[f], salt=f * 104729 + 1), offs[:-1]))
        return torch.cat(out, dim=1)


class QREmbeddings(nn.Module):
    """Quotient-remainder compositional embeddings: id i is ``q[i // m] * r[i % m]``.

    The quotient table starts as a dense table would (uniform in ±1/sqrt(D)), the
    remainder table at one with a little noise, so that ids which share a quotient row
    start apart but at a dense row's scale.

    >>> emb = QREmbeddings([10_000], dim=4, ratio=0.9)
    >>> emb.collisions, emb.quotient[0].num_embeddings, emb.remainder[0].num_embeddings
    ([11], 910, 11)
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, ratio: float, init_scale: float | None = None):
        super().__init__()
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        fits = [qr_collisions(n, ratio) for n in cardinalities]
        self.collisions = [m for m, _ in fits]
        #: whether each feature's two tables fit the ratio (past 2 sqrt(n) rows they cannot)
        self.meets_ratio = [ok for _, ok in fits]
        self.quotient = nn.ModuleList(
            nn.Embedding(-(-int(n) // m), dim, sparse=True) for n, m in zip(cardinalities, self.collisions)
        )
        self.remainder = nn.ModuleList(nn.Embedding(m, dim, sparse=True) for m in self.collisions)
        for q, r in zip(self.quotient, self.remainder):
            nn.init.uniform_(q.weight, -scale, scale)
            nn.init.uniform_(r.weight, 1.0 - scale, 1.0 + scale)

    def forward(self, batch) -> torch.Tensor:
        out = []
        for f, (ids, offs) in enumerate(batch.per_feature()):
            m = self.collisions[f]
            ids = ids.to(torch.int64)
            rows = self.quotient[f](ids // m) * self.remainder[f](ids % m)
            pooled = torch.zeros(offs.shape[0] - 1, rows.shape[1], dtype=rows.dtype)
            out.append(pooled.index_add_(0, _bags(offs.to(torch.int64)), rows))
        return torch.cat(out, dim=1)

    def sparse_parameters(self):
        return list(self.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.parameters())

    def training_bytes(self, optimizer: str = "adagrad") -> int:
        """Weights and the optimizer's state (:func:`~.optim.table_training_bytes`)."""
        return table_training_bytes(self.parameters(), optimizer)

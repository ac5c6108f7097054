"""The unpruned baseline: one torch table per feature, the layout the hashing trick reuses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .optim import table_training_bytes


class DenseEmbeddings(nn.Module):
    """One ``torch.nn.EmbeddingBag`` (sparse gradients) per feature: the unpruned baseline."""

    def __init__(self, cardinalities: Sequence[int], dim: int, init_scale: float | None = None):
        super().__init__()
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        self.bags = nn.ModuleList(nn.EmbeddingBag(int(n), dim, mode="sum", sparse=True) for n in cardinalities)
        for b in self.bags:
            nn.init.uniform_(b.weight, -scale, scale)

    def forward(self, batch) -> torch.Tensor:
        return torch.cat([bag(ids, offs[:-1]) for bag, (ids, offs) in zip(self.bags, batch.per_feature())], dim=1)

    def sparse_parameters(self):
        return list(self.parameters())

    def weight_bytes(self) -> int:
        return sum(b.weight.numel() * 4 for b in self.bags)

    def training_bytes(self, optimizer: str = "adagrad") -> int:
        """Weights and the optimizer's state (:func:`~.optim.table_training_bytes`)."""
        return table_training_bytes(self.parameters(), optimizer)

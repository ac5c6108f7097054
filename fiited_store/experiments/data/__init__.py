"""Datasets for the experiments: one tabular layout, several sources.

A :class:`TabularDataset` holds, per sparse feature, a jagged array of ids
(``values`` and ``offsets`` over the samples), dense features and labels. Batches
come out in the layout the store and TorchRec share: one flat id array, feature
after feature, with bag offsets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    dense: torch.Tensor  # float32[B, n_dense]
    keys: list[str]  # sparse feature names
    values: torch.Tensor  # int64[nnz], feature after feature
    lengths: torch.Tensor  # int64[F * B], bag sizes, feature-major
    labels: torch.Tensor  # float32[B]

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def features(self):
        from ...adapters import JaggedFeatures

        return JaggedFeatures(self.keys, self.values, self.lengths)

    def per_feature(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(ids, offsets[B + 1])] per feature, for per-table modules."""
        from ...adapters import JaggedFeatures

        return JaggedFeatures.per_feature_of(self.features())


def _gather_jagged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows``: (values, lengths), vectorised."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    if total == lengths.shape[0] and np.all(lengths == 1):
        return values[starts], lengths
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return values[np.arange(total) + shift], lengths


@dataclass
class TabularDataset:
    name: str
    feature_names: list[str]
    cardinalities: list[int]
    values: list[np.ndarray]  # per feature: int64[nnz_f]
    offsets: list[np.ndarray]  # per feature: int64[N + 1]
    dense: np.ndarray  # float32[N, n_dense]
    labels: np.ndarray  # float32[N]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    def subset(self, rows: np.ndarray, name: str) -> TabularDataset:
        values, offsets = [], []
        for v, o in zip(self.values, self.offsets):
            vals, lengths = _gather_jagged(v, o, rows)
            values.append(vals)
            offsets.append(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return TabularDataset(
            name,
            self.feature_names,
            self.cardinalities,
            values,
            offsets,
            self.dense[rows],
            self.labels[rows],
            dict(self.meta),
        )

    def split(self, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[TabularDataset]:
        """A seeded random split (80/10/10 by default)."""
        perm = np.random.default_rng(seed).permutation(len(self))
        bounds = np.round(np.cumsum([0.0, *fractions]) * len(self)).astype(int)
        names = ["train", "val", "test"][: len(fractions)]
        return [self.subset(np.sort(perm[a:b]), f"{self.name}/{n}") for a, b, n in zip(bounds[:-1], bounds[1:], names)]

    def access_counts(self) -> list[np.ndarray]:
        """Per feature, how often each id occurs (for Mixed-Dimension embeddings)."""
        return [np.bincount(v, minlength=c) for v, c in zip(self.values, self.cardinalities)]

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[Batch]:
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for lo in range(0, len(self), batch_size):
            rows = order[lo : lo + batch_size]
            if drop_last and rows.shape[0] < batch_size:
                return
            yield self.batch(rows)

    def batch(self, rows: np.ndarray) -> Batch:
        vals, lens = zip(*(_gather_jagged(v, o, rows) for v, o in zip(self.values, self.offsets)))
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense[rows])),
            keys=list(self.feature_names),
            values=torch.from_numpy(np.concatenate(vals).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lens).astype(np.int64)),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels[rows])),
        )

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size


def encode(tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """Raw tokens -> dense ids 0..n-1 (sorted order) and n."""
    uniq, inverse = np.unique(tokens, return_inverse=True)
    return inverse.astype(np.int64), int(uniq.shape[0])

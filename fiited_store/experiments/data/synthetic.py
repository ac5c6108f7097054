"""A synthetic click stream with a planted ground truth, generated on the fly.

Each of the sparse features draws ids from a bounded Zipf distribution (rank r
has weight r**-s), scattered over the id space by a fixed bijection so that hot
ids are not neighbours. The label of a sample is Bernoulli(sigmoid(logit)), with
logit = bias + sum over features of a hidden per-id weight (a hash of feature and
id, standard normal, times the feature's strength) + a hidden linear function of
the dense features. A model that learns the hot ids' weights does well; the
long tail carries little signal, which is exactly what pruning should exploit.
"""

from __future__ import annotations

import numpy as np
import torch

from ..workloads import KAGGLE_CARDINALITIES, ZipfIds, scaled_cardinalities, zipf_cdf  # noqa: F401
from . import Batch, TabularDataset


def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class SyntheticClickStream:
    """An endless, seeded stream of click batches (26 sparse + 13 dense features by default).

    >>> stream = SyntheticClickStream(scaled_cardinalities(cap=1000), seed=0)
    >>> b = stream.batch(8, step=0)
    >>> b.values.shape, b.labels.shape
    (torch.Size([208]), torch.Size([8]))
    """

    def __init__(
        self,
        cardinalities: list[int],
        zipf_s: float = 1.1,
        n_dense: int = 13,
        seed: int = 0,
        strength: float = 0.6,
        strengths: list[float] | None = None,
        feature_names: list[str] | None = None,
    ):
        self.cardinalities = list(cardinalities)
        self.feature_names = list(feature_names) if feature_names else [f"C{i + 1}" for i in range(len(cardinalities))]
        self.n_dense = n_dense
        self.seed = seed
        self.ids = [ZipfIds(n, zipf_s, salt=seed * 7919 + i * 104729) for i, n in enumerate(cardinalities)]
        rng = np.random.default_rng([seed, 99])
        # a few strong features, many weak ones, as in real click logs (or the caller's strengths)
        self.strength = (
            np.asarray(strengths, np.float64)
            if strengths is not None
            else strength * rng.permutation(np.geomspace(1.0, 0.05, len(cardinalities)))
        )
        self.dense_weights = rng.normal(0, 0.3, n_dense).astype(np.float32)
        self.bias = 0.0
        probe = self._logits(rng, 20_000)[0]
        self.bias = float(-np.quantile(probe, 0.72))  # about 28% positives

    def hidden_weight(self, feature: int, ids: np.ndarray) -> np.ndarray:
        h1 = _mix(
            ids.astype(np.uint64)
            ^ np.uint64((self.seed + 1) * 0x9E3779B97F4A7C15 % 2**64)
            ^ np.uint64((feature + 1) * 0xD6E8FEB86659FD93 % 2**64)
        )
        h2 = _mix(h1 ^ np.uint64(0x632BE59BD9B4E019))
        u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
        u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
        return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2) * self.strength[feature]

    def _logits(self, rng: np.random.Generator, n: int):
        ids = [z.sample(rng, n) for z in self.ids]
        dense = rng.standard_normal((n, self.n_dense)).astype(np.float32)
        logit = self.bias + dense @ self.dense_weights
        for f, v in enumerate(ids):
            logit = logit + self.hidden_weight(f, v)
        return logit, ids, dense

    def batch(self, batch_size: int, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        logit, ids, dense = self._logits(rng, batch_size)
        labels = (rng.random(batch_size) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return Batch(
            torch.from_numpy(dense),
            list(self.feature_names),
            torch.from_numpy(np.concatenate(ids)),
            torch.ones(len(ids) * batch_size, dtype=torch.int64),
            torch.from_numpy(labels),
        )

    def dataset(self, n: int, stream_seed: int) -> TabularDataset:
        """n samples materialised (a held-out set when stream_seed differs from the training steps)."""
        rng = np.random.default_rng([self.seed, 10**9 + stream_seed])
        logit, ids, dense = self._logits(rng, n)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        offsets = [np.arange(n + 1, dtype=np.int64)] * len(ids)
        return TabularDataset(
            "synthetic",
            list(self.feature_names),
            list(self.cardinalities),
            ids,
            offsets,
            dense,
            labels,
            {"bayes_logits": logit},
        )


#: the mixed stream: small features that carry most of the signal, long-tailed ones that carry little per id
MIXED_SMALL = [3, 7, 12, 40, 100, 300]
MIXED_LONG = [20_000] * 8


def mixed_stream(seed: int = 0) -> SyntheticClickStream:
    """Six small, highly predictive features (3 to 300 ids) beside eight long-tailed ones of 20,000 ids.

    Built to separate pruning methods: a shared threshold judges rows of every
    table on one scale, and the small tables' rows, each seen often but carrying a
    moderate gradient, can lose to the hot head of the long tails. A planted ground
    truth as in :class:`SyntheticClickStream`.

    >>> s = mixed_stream(0)
    >>> s.feature_names[:2], s.cardinalities[:2]
    (['S1', 'S2'], [3, 7])
    """
    names = [f"S{i + 1}" for i in range(len(MIXED_SMALL))] + [f"L{i + 1}" for i in range(len(MIXED_LONG))]
    strengths = [0.8] * len(MIXED_SMALL) + list(0.6 * np.geomspace(1.0, 0.2, len(MIXED_LONG)))
    return SyntheticClickStream(
        MIXED_SMALL + MIXED_LONG, zipf_s=1.1, seed=seed, strengths=strengths, feature_names=names
    )

"""The id distributions the benchmarks and the synthetic streams draw from, without torch:
Criteo Kaggle's cardinalities and bounded Zipf ids.

Apart from :mod:`.data` (which builds torch batches) so that a benchmark can measure a
store's memory in a process that never imported torch.
"""

from __future__ import annotations

import math

import numpy as np

#: Criteo Kaggle cardinalities (the paper's and DLRM's hash sizes)
KAGGLE_CARDINALITIES = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]


def zipf_cdf(n: int, s: float) -> np.ndarray:
    """CDF of the bounded Zipf distribution over ranks 1..n."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _coprime_multiplier(n: int) -> int:
    a = 2654435761 % max(n, 2) or 1
    while math.gcd(a, n) != 1:
        a += 1
    return a


class ZipfIds:
    """Bounded Zipf ids over [0, n), scattered by a bijection."""

    def __init__(self, n: int, s: float, salt: int):
        self.n = n
        self.cdf = zipf_cdf(n, s)
        self.a = _coprime_multiplier(n)
        self.b = salt % n

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        rank = np.searchsorted(self.cdf, rng.random(size), side="right").astype(np.int64)
        rank = np.minimum(rank, self.n - 1)
        return (rank * self.a + self.b) % self.n


def scaled_cardinalities(scale: float = 1.0, cap: int | None = None) -> list[int]:
    """Criteo Kaggle's cardinalities, scaled and capped (at least 2 rows each)."""
    out = [max(2, int(c * scale)) for c in KAGGLE_CARDINALITIES]
    return [min(c, cap) for c in out] if cap else out

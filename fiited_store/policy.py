"""The pruning policy: from sampled utilities to per-chunk thresholds (Algorithm 1).

The paper's VHPI table holds a row for every id of the declared table from the
start, unseen rows at zero utility. This store only holds the keys it has seen,
so the declared rows it has not seen yet are counted as virtual zero-utility
rows: the ratio p applies to the declared population, and with few keys seen the
threshold falls to zero and every chunk that earned any utility may keep its slot
(the budget still caps). Once every declared row has an entry this is exactly
the paper's rule.
"""

from __future__ import annotations

import numpy as np

from .config import DynamicRatio, ManualRatios


def sample_rate_threshold(sample_size: int, n_entries: int) -> np.uint64:
    """uint64 bound under which a key hash is accepted, for about sample_size picks."""
    if n_entries <= sample_size:
        return np.uint64(2**64 - 1)
    return np.uint64(int(sample_size / n_entries * 2.0**64))


def thresholds(
    samples: np.ndarray,
    pruning: ManualRatios | DynamicRatio,
    entry_chunks: np.ndarray,
    declared_chunks: np.ndarray | None,
) -> np.ndarray:
    """Per-chunk-index thresholds, float32[kmax].

    Args:
        samples: float32[n, kmax] sampled utilities, NaN past a table's K.
        pruning: manual per-chunk ratios or a dynamic global ratio.
        entry_chunks: int64[kmax], chunks of index k held by entries of this pool.
        declared_chunks: int64[kmax], chunks of index k in the declared tables, or
            None when a size is undeclared (then the population is the entries).
    """
    kmax = samples.shape[1]
    out = np.zeros(kmax, np.float32)
    population = entry_chunks.astype(np.float64)
    if declared_chunks is not None:
        population = np.maximum(population, declared_chunks.astype(np.float64))
    if isinstance(pruning, DynamicRatio):
        values = samples[~np.isnan(samples)]
        held = float(entry_chunks.sum())
        if values.size == 0 or held == 0:
            return out
        keep = (1.0 - pruning.ratio) * float(population.sum()) / held
        if keep <= 0.0:
            out[:] = np.inf
        elif keep < 1.0:
            out[:] = np.quantile(values, 1.0 - keep)
        return out
    for k in range(kmax):
        column = samples[:, k]
        values = column[~np.isnan(column)]
        if values.size == 0 or entry_chunks[k] == 0:
            continue
        keep = (1.0 - pruning.per_chunk[k]) * population[k] / float(entry_chunks[k])
        if keep <= 0.0:
            out[k] = np.inf  # p_k = 1: no chunk of index k may hold a slot
        elif keep < 1.0:
            out[k] = np.quantile(values, 1.0 - keep)
    return out

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

import math

import numpy as np

from .config import DynamicRatio, ManualRatios


def sample_rate_threshold(sample_size: int, n_entries: int) -> np.uint64:
    """uint64 bound under which a key hash is accepted, for about sample_size picks."""
    if n_entries <= sample_size:
        return np.uint64(2**64 - 1)
    return np.uint64(int(sample_size / n_entries * 2.0**64))


def thresholds(
    samples: np.ndarray,
    sample_tables: np.ndarray,
    pruning: ManualRatios | DynamicRatio,
    table_chunks: np.ndarray,
    entries: np.ndarray,
    declared: np.ndarray | None,
    floors: np.ndarray,
    normalization: str = "none",
) -> np.ndarray:
    """Thresholds per table and chunk index, float32[tables, kmax].

    Args:
        samples: float32[n, kmax] sampled utilities, NaN past a table's K.
        sample_tables: int[n], the table of each sample.
        pruning: manual per-chunk ratios or a dynamic global ratio.
        table_chunks: int[tables], K of each table; 0 for tables outside this pool.
        entries: int[tables], entries each table holds.
        declared: int[tables], each table's declared rows, or None when a size is
            undeclared (then the population is the entries).
        floors: int[tables], the chunks every row of a table keeps: their threshold
            is -inf, and they are taken from the budget before the others compete.
        normalization: "none" (the paper's rule: raw utilities, shared thresholds) or
            "mean" (each table's utilities divided by its sampled mean: a shared
            threshold on that scale is a per-table threshold on the raw one).
    """
    T, kmax = table_chunks.shape[0], samples.shape[1]
    out = np.zeros((T, kmax), np.float32)
    K = table_chunks.astype(np.int64)
    floors = np.minimum(floors.astype(np.int64), K)
    held = entries.astype(np.float64)
    population = held if declared is None else np.maximum(held, declared.astype(np.float64))
    ks = np.arange(kmax)
    in_table = ks[None, :] < K[:, None]  # [T, kmax]: chunk k exists in table t
    floor_chunk = ks[None, :] < floors[:, None]  # [T, kmax]: chunk k is a floor chunk of t
    competes = in_table & ~floor_chunk
    out[floor_chunk] = -np.inf

    # each sample scaled by its table's mean utility (1 without normalisation)
    scale = np.ones(T, np.float64)
    tables_of = sample_tables.astype(np.int64)
    if normalization == "mean" and samples.shape[0]:
        for t in np.unique(tables_of):
            v = samples[tables_of == t]
            v = v[~np.isnan(v)]
            m = math.fsum(v.tolist()) / v.size if v.size else 0.0  # exact: independent of the samples' order
            scale[t] = m if m > 0.0 else 1.0
    sample_competes = competes[tables_of] if samples.shape[0] else np.zeros((0, kmax), bool)
    scaled = samples / scale[tables_of, None].astype(np.float32) if normalization == "mean" else samples

    def cut(values: np.ndarray, budget: float, contenders: float) -> float:
        """The threshold that keeps ``budget`` of ``contenders`` chunks, on the sampled scale."""
        if values.size == 0 or contenders <= 0:
            return 0.0
        keep = budget / contenders
        if keep <= 0.0:
            return np.inf
        if keep >= 1.0:
            return 0.0
        return float(np.quantile(values, 1.0 - keep))

    if isinstance(pruning, DynamicRatio):
        budget = (1.0 - pruning.ratio) * float((population[:, None] * in_table).sum())
        budget -= float((held[:, None] * floor_chunk).sum())
        contenders = float((held[:, None] * competes).sum())
        q = cut(scaled[sample_competes & ~np.isnan(scaled)], budget, contenders)
        per_table = (q * scale).astype(np.float32) if normalization == "mean" else np.full(T, q, np.float32)
        out[competes] = np.broadcast_to(per_table[:, None], (T, kmax))[competes]
        return out
    for k in range(kmax):
        if not in_table[:, k].any():
            continue
        p = pruning.per_chunk[k] if k < len(pruning.per_chunk) else 1.0
        budget = (1.0 - p) * float((population * in_table[:, k]).sum()) - float((held * floor_chunk[:, k]).sum())
        contenders = float((held * competes[:, k]).sum())
        column = scaled[:, k][sample_competes[:, k]]
        q = cut(column[~np.isnan(column)], budget, contenders)
        for t in np.nonzero(competes[:, k])[0]:
            out[t, k] = np.float32(q * scale[t]) if normalization == "mean" else np.float32(q)
    return out

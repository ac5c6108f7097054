"""Criteo's TSV format: label, 13 integer columns, 26 hexadecimal categorical columns.

Integers become log(1 + max(x, 0)); an empty field is 0. A categorical value is
its hexadecimal number folded into the table's hash size (Kaggle's cardinalities
by default), so the dense baselines and the store see the same ids. An empty
categorical field is -1, which folds into the table's last row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..workloads import KAGGLE_CARDINALITIES
from . import TabularDataset
from .movielens import DatasetError

N_DENSE, N_SPARSE = 13, 26


def load_criteo_tsv(path: str | Path, limit: int | None = None, hash_sizes: list[int] | None = None) -> TabularDataset:
    """Read up to ``limit`` lines; ids are taken modulo ``hash_sizes`` (Kaggle's by default)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) + sorted(path.glob("*.tsv")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise DatasetError(f"{path}: no Criteo TSV file (train.txt, day_*.tsv ...) found")
    sizes = hash_sizes or KAGGLE_CARDINALITIES
    labels, dense, sparse = [], [], []
    n = 0
    for f in files:
        with open(f, encoding="ascii", errors="replace") as fh:
            for line_no, line in enumerate(fh, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 1 + N_DENSE + N_SPARSE:
                    raise DatasetError(
                        f"{f}: line {line_no} has {len(parts)} fields, expected {1 + N_DENSE + N_SPARSE}"
                    )
                labels.append(parts[0] == "1")
                dense.append([int(x) if x else 0 for x in parts[1 : 1 + N_DENSE]])
                sparse.append([int(x, 16) if x else -1 for x in parts[1 + N_DENSE :]])
                n += 1
                if limit is not None and n >= limit:
                    break
        if limit is not None and n >= limit:
            break
    d = np.log1p(np.maximum(np.array(dense, np.float64), 0)).astype(np.float32)
    s = np.array(sparse, np.int64)
    values = [np.mod(s[:, j], sizes[j]) for j in range(N_SPARSE)]
    offsets = [np.arange(n + 1, dtype=np.int64)] * N_SPARSE
    return TabularDataset(
        "criteo",
        [f"C{j + 1}" for j in range(N_SPARSE)],
        list(sizes),
        values,
        offsets,
        d,
        np.array(labels, np.float32),
        {"source": str(path)},
    )

"""How much do 16-bit utilities change pruning decisions? One run, two ledgers.

The store keeps its utilities in bfloat16 with stochastic rounding. This drives a
store with a Zipf stream of one-id bags and keeps, beside it, the same utilities
in float64 (u = gamma * u + a * ||g_k||, from the very gradients the store sees).
At the end it asks both ledgers which chunks a prune at ratio p would keep (the
top 1 - p by utility) and reports how many decisions differ, and how far from the
threshold the chunks that flip lie.

    python benchmarks/utility_precision.py [--rows 200000] [--steps 300] [--gamma 0.99]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.experiments.workloads import ZipfIds


def run(rows: int, steps: int, gamma: float, batch: int, dim: int, chunks: int, seed: int, progress: bool) -> dict:
    c = dim // chunks
    store = EmbeddingStore(
        [TableConfig("t", dim=dim, chunks=chunks, num_embeddings=rows)],
        StoreConfig(pruning=DynamicRatio(0.0), budget_fraction=1.0, gamma=gamma, prune_period=0, seed=seed),
    )
    zipf = ZipfIds(rows, 1.1, salt=7)
    rng = np.random.default_rng(seed)
    exact = np.zeros((rows, chunks))
    for _ in tqdm(range(steps), disable=not progress, desc="stream", unit="step"):
        ids = zipf.sample(rng, batch)
        b = store.pooled_lookup("t", ids, np.arange(batch + 1), train=True)
        g = (rng.standard_normal((batch, dim)) * rng.gamma(0.5, 1.0, (batch, 1))).astype(np.float32)
        store.backward(b, g)
        store.step()
        # the float64 ledger: per distinct id, a = occurrences, g = the summed gradient
        uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
        gsum = np.zeros((uniq.size, dim))
        np.add.at(gsum, inv, g.astype(np.float64))
        norms = np.linalg.norm(gsum.reshape(uniq.size, chunks, c), axis=2)
        # the store adds in the step and decays when the step ends
        exact[uniq] += counts[:, None] * norms
        exact *= gamma
    seen = np.nonzero(store.contains("t", np.arange(rows)))[0]
    half = store.utilities("t", seen).astype(np.float64)
    full = exact[seen]
    out = {
        "rows": rows,
        "rows_seen": int(seen.size),
        "steps": steps,
        "gamma": gamma,
        "chunks": chunks,
        "relative_error_median": float(np.median(np.abs(half - full) / np.maximum(full, 1e-30))),
        "relative_error_p99": float(np.quantile(np.abs(half - full) / np.maximum(full, 1e-30), 0.99)),
        "decisions": {},
    }
    for p in (0.5, 0.75, 0.9, 0.9375):
        # the prune's rule on the declared population: unseen rows count as zero-utility rows
        keep_n = int(round((1 - p) * rows * chunks))
        a, b_ = full.ravel(), half.ravel()
        if keep_n >= a.size:
            continue
        thr_f, thr_h = np.sort(a)[::-1][keep_n], np.sort(b_)[::-1][keep_n]
        kf, kh = a > thr_f, b_ > thr_h
        flips = kf != kh
        out["decisions"][str(p)] = {
            "chunks_kept": int(kf.sum()),
            "decisions_that_differ": float(flips.mean()),
            "kept_by_float_only": float((kf & ~kh).sum() / max(kf.sum(), 1)),
            "flipped_within_5pct_of_threshold": float(np.mean(np.abs(a[flips] - thr_f) <= 0.05 * thr_f))
            if flips.any()
            else 1.0,
        }
    store.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    out = run(a.rows, a.steps, a.gamma, a.batch, a.dim, a.chunks, a.seed, not a.no_progress)
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

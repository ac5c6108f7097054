"""The whole store's memory at extreme ratios on the bench shape (Criteo Kaggle's 33.8M
rows, D = 64, K = 4), with the default (``FloorRatios``, through the PyTorch collection,
which holds the floors) and with the paper's manual rule, after a few training batches
of Zipf(1.1) ids.

    python benchmarks/memory_extreme.py [--ratios 0.9375 0.99 0.9975] [--scale 1.0] [--json FILE]

Memory is the store's (pool, optimizer state, entries, address manager) against the
dense weights; the direct index holds an entry for every declared row, so it follows
from the layout and barely from the batches.
"""

from __future__ import annotations

import argparse
import gc
import json

import numpy as np
import torch
from tqdm import tqdm

from fiited_store import FloorRatios, ManualRatios, StoreConfig, TableConfig
from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures
from fiited_store.experiments.workloads import ZipfIds, scaled_cardinalities


def measure(policy: str, ratio: float, cards: list[int], dim: int, chunks: int, batches: int, batch: int) -> dict:
    tables = [
        TableConfig(f"C{i}", dim, chunks=chunks, num_embeddings=n, optimizer="rowwise_adagrad")
        for i, n in enumerate(cards)
    ]
    pruning = FloorRatios(ratio) if policy == "default" else ManualRatios.linear(ratio, chunks)
    cfg = StoreConfig(pruning=pruning, budget_fraction=1.0 - ratio, prune_period=2, sample_size=100_000)
    ebc = FiitedEmbeddingBagCollection(tables, store_config=cfg, project=policy == "default", output="concat")
    rng = np.random.default_rng(0)
    draws = [ZipfIds(n, 1.1, salt=i) for i, n in enumerate(cards)]
    for _ in range(batches):
        values = torch.from_numpy(np.concatenate([d.sample(rng, batch) for d in draws]))
        features = JaggedFeatures(
            [t.name for t in tables], values=values, lengths=torch.ones(values.numel(), dtype=torch.int64)
        )
        ebc(features).sum().backward()
    st = ebc.store.stats()["total"]
    dense = sum(cards) * dim * 4
    maps = ebc.projection_bytes()
    out = {
        "policy": policy,
        "ratio": ratio,
        "bytes": st["bytes"],
        "store_vs_dense": st["bytes"]["memory_total"] / dense,
        "with_maps_vs_dense": (st["bytes"]["memory_total"] + maps) / dense,
        "pool_vs_dense": st["bytes"]["pool_vectors"] / dense,
        "entries_vs_dense": st["bytes"]["entries"] / dense,
        "live_entries": st["entries"],
    }
    del ebc
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.9375, 0.99, 0.9975])
    p.add_argument("--scale", type=float, default=1.0, help="the cardinalities scaled (1.0: 33.8M rows)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    cards = scaled_cardinalities(args.scale)
    runs = [(policy, r) for r in args.ratios for policy in ("default", "paper")]
    results = []
    for policy, r in tqdm(runs, desc="memory", unit="store"):
        results.append(measure(policy, r, cards, args.dim, args.chunks, args.batches, args.batch_size))
    print(f"{sum(cards):,} rows, D = {args.dim}, K = {args.chunks}; the store's memory / dense weights")
    for x in results:
        print(
            f"  {x['policy']:<8} {x['ratio']:<7g} store {x['store_vs_dense']:.4f} (pool {x['pool_vs_dense']:.4f}, "
            f"entries {x['entries_vs_dense']:.4f}); with the learned maps {x['with_maps_vs_dense']:.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

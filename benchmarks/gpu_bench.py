"""The GPU benchmark (run by gpu_check.sh on a machine with a GPU).

The README's shape on one GPU, in one run: the store on device="cuda" (pool at 25%
of the dense size) against torch.nn.functional.embedding_bag on a dense GPU table
and a torch.nn.EmbeddingBag(sparse=True) + SGD step on the same GPU; lookups per
second and the bandwidth they imply against the card's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from numba import cuda

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.bench import BenchConfig, Workload

PEAK_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def timed(fn, warmup: int, repeats: int) -> float:
    for i in range(warmup):
        fn(i)
    cuda.synchronize()
    torch.cuda.synchronize()
    t = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        cuda.synchronize()
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1000)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = BenchConfig(scale=args.scale)
    w = Workload(cfg, 8)
    name = torch.cuda.get_device_name(0)
    out = {"device": name, "rows": w.total_rows, "lookups_per_batch": int(w.ids[0].size)}
    dev = torch.device("cuda")
    rows = [torch.from_numpy(r).to(dev) for r in w.rows]
    off = torch.from_numpy(w.offsets[:-1]).to(dev)
    W = torch.empty(w.total_rows, cfg.dim, device=dev).uniform_(-0.01, 0.01)
    out["torch_embedding_bag_ms"] = timed(lambda i: torch.nn.functional.embedding_bag(rows[i % 8], W, off, mode="sum"),
                                          5, args.repeats)
    bag = torch.nn.EmbeddingBag(w.total_rows, cfg.dim, mode="sum", sparse=True, _weight=W)
    opt = torch.optim.SGD(bag.parameters(), lr=0.01)
    grads = [torch.from_numpy(g).to(dev) for g in w.grads]

    def torch_step(i):
        opt.zero_grad(set_to_none=True)
        bag(rows[i % 8], off).backward(grads[i % 4].view(-1, cfg.dim))
        opt.step()

    out["torch_sparse_sgd_step_ms"] = timed(torch_step, 5, args.repeats)
    del bag, opt, W
    torch.cuda.empty_cache()

    tables = [TableConfig(n, dim=cfg.dim, chunks=cfg.chunks, num_embeddings=c, optimizer="rowwise_adagrad")
              for n, c in zip(w.names, w.cards)]
    store = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.75), budget_fraction=0.25, prune_period=0,
                                               device="cuda", initial_capacity=1 << 24))
    t0 = time.perf_counter()
    w.prefill(store, store.pools[0].slots // cfg.chunks)
    out["prefill_s"] = time.perf_counter() - t0
    ids_d = [torch.from_numpy(i).to(dev) for i in w.ids]
    off_d = torch.from_numpy(w.offsets).to(dev)
    out["store_lookup_ms"] = timed(lambda i: store.pooled_lookup(w.names, ids_d[i % 8], off_d), 5, args.repeats)

    def store_step(i):
        b = store.pooled_lookup(w.names, ids_d[i % 8], off_d, train=True)
        store.backward(b, grads[i % 4])
        store.step()

    out["store_train_step_ms"] = timed(store_step, 5, args.repeats)
    n = out["lookups_per_batch"]
    out["store_lookups_per_s"] = n / (out["store_lookup_ms"] / 1000)
    out["torch_lookups_per_s"] = n / (out["torch_embedding_bag_ms"] / 1000)
    # bytes a pooled lookup must move at least: the rows read and the output written
    moved = n * cfg.dim * 4 * 2
    out["store_effective_tb_s"] = moved / (out["store_lookup_ms"] / 1000) / 1e12
    peak = next((v for k, v in PEAK_TB_S.items() if k in name), None)
    if peak:
        out["store_fraction_of_peak_bandwidth"] = out["store_effective_tb_s"] / peak
    out["ratios"] = {
        "store_lookup / torch_embedding_bag": out["store_lookup_ms"] / out["torch_embedding_bag_ms"],
        "store_train_step / torch_sparse_sgd_step": out["store_train_step_ms"] / out["torch_sparse_sgd_step_ms"],
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

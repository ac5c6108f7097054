"""The GPU benchmark (run by gpu_check.sh on a machine with a GPU).

In one run, on one card, every store fed torch CUDA tensors (checked on the device,
nothing but the output and gradients crossing):

- lookup: the CPU bench's shape (26 features, one id per bag, D = 64, K = 4, pool
  at 25% of the dense size, Zipf(1.1) ids) and the same with a batch 16 times larger,
  against ``torch.nn.functional.embedding_bag`` on a dense table on the same card;
  lookups per second and the bandwidth they imply against the card's;
- training step against ``torch.nn.EmbeddingBag(sparse=True)`` + SGD on the same card;
- the prune pass of the trained bench store and of a 10M-row table;
- cache mode with the pool at 25% of the model (the rest in a pinned host cache,
  then in the Zarr tier alone) against the same step with everything on the GPU.

Each section that fails is recorded with its error and the others still run, so one
device session yields every figure it can.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from numba import cuda

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.experiments.bench.cpu import BenchConfig, Workload
from fiited_store.experiments.bench.tiers import TierBenchConfig, bench_cache_mode_step
from fiited_store.kernels.layout import util_from_float

#: peak memory bandwidth by the vendors' datasheets, TB/s
PEAK_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def sync() -> None:
    cuda.synchronize()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeats: int) -> dict:
    for i in range(warmup):
        fn(i)
    sync()
    t = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        sync()
        t.append(time.perf_counter() - t0)
    t = np.array(t) * 1000
    return {"median_ms": float(np.median(t)), "min_ms": float(t.min()), "max_ms": float(t.max())}


def lookup_and_step(batch_size: int, args, name: str) -> dict:
    cfg = BenchConfig(scale=args.scale, batch_size=batch_size)
    n_batches = 4
    w = Workload(cfg, n_batches)
    dev = args.torch_device
    out: dict = {"batch_size": batch_size, "rows": w.total_rows, "lookups_per_batch": int(w.ids[0].size)}
    rows = [torch.from_numpy(r).to(dev) for r in w.rows]
    bag_starts = torch.from_numpy(w.offsets[:-1]).to(dev)
    grads = [torch.from_numpy(g).to(dev) for g in w.grads[:2]]
    W = torch.empty(w.total_rows, cfg.dim, device=dev).uniform_(-0.01, 0.01)
    out["torch_embedding_bag"] = timed(
        lambda i: torch.nn.functional.embedding_bag(rows[i % n_batches], W, bag_starts, mode="sum"), 5, args.repeats
    )
    bag = torch.nn.EmbeddingBag(w.total_rows, cfg.dim, mode="sum", sparse=True, _weight=W)
    opt = torch.optim.SGD(bag.parameters(), lr=0.01)

    def torch_step(i):
        opt.zero_grad(set_to_none=True)
        bag(rows[i % n_batches], bag_starts).backward(grads[i % 2].view(-1, cfg.dim))
        opt.step()

    out["torch_sparse_sgd_step"] = timed(torch_step, 5, args.repeats)
    bag = opt = W = rows = None  # frees them (the closures above hold the cells)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    tables = [
        TableConfig(n, dim=cfg.dim, chunks=cfg.chunks, num_embeddings=c, optimizer="rowwise_adagrad")
        for n, c in zip(w.names, w.cards)
    ]
    store = EmbeddingStore(
        tables,
        StoreConfig(pruning=DynamicRatio(0.75), budget_fraction=cfg.budget_fraction, prune_period=0, device="cuda"),
    )
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    w.train(store, rng, cfg.train_warmup, prune_every=10)  # trained and pruned, as in the CPU bench
    sync()
    out["train_warmup_s"] = time.perf_counter() - t0
    ids_d = [torch.from_numpy(i).to(dev) for i in w.ids]
    off_d = torch.from_numpy(w.offsets).to(dev)
    out["store_lookup"] = timed(lambda i: store.pooled_lookup(w.names, ids_d[i % n_batches], off_d), 5, args.repeats)
    out["store_lookup_host_inputs"] = timed(
        lambda i: store.pooled_lookup(w.names, w.ids[i % n_batches], w.offsets), 3, max(5, args.repeats // 2)
    )

    def store_step(i):
        b = store.pooled_lookup(w.names, ids_d[i % n_batches], off_d, train=True)
        store.backward(b, grads[i % 2])
        store.step()

    out["store_train_step"] = timed(store_step, 5, args.repeats)
    t0 = time.perf_counter()
    report = store.prune()
    sync()
    out["store_prune_s"] = time.perf_counter() - t0
    out["store_prune_evicted"] = int(sum(p["evicted"] for p in report["pools"]))
    out["store_memory_vs_dense"] = store.stats()["total"]["memory_vs_dense"]
    store.close()
    store = grads = ids_d = None  # frees them (the closures above hold the cells)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    n = out["lookups_per_batch"]
    ms = out["store_lookup"]["median_ms"]
    out["store_lookups_per_s"] = n / (ms / 1000)
    out["torch_lookups_per_s"] = n / (out["torch_embedding_bag"]["median_ms"] / 1000)
    # the least a pooled lookup moves: each row read once and each pooled row written
    moved = n * cfg.dim * 4 + batch_size * len(w.cards) * cfg.dim * 4
    out["store_effective_tb_s"] = moved / (ms / 1000) / 1e12
    out["torch_effective_tb_s"] = moved / (out["torch_embedding_bag"]["median_ms"] / 1000) / 1e12
    peak = next((v for k, v in PEAK_TB_S.items() if k in name), None)
    if peak:
        out["store_fraction_of_peak_bandwidth"] = out["store_effective_tb_s"] / peak
        out["torch_fraction_of_peak_bandwidth"] = out["torch_effective_tb_s"] / peak
    out["ratios"] = {
        "store_lookup / torch_embedding_bag": ms / out["torch_embedding_bag"]["median_ms"],
        "store_train_step / torch_sparse_sgd_step": out["store_train_step"]["median_ms"]
        / out["torch_sparse_sgd_step"]["median_ms"],
        "store_lookup_host_inputs / store_lookup": out["store_lookup_host_inputs"]["median_ms"] / ms,
    }
    return out


def prune_10m(args) -> dict:
    n = args.prune_rows
    table = TableConfig("t", dim=64, chunks=4, num_embeddings=n)
    store = EmbeddingStore(
        [table], StoreConfig(pruning=DynamicRatio(0.75), budget_fraction=0.25, prune_period=0, device="cuda")
    )
    ids = np.arange(n, dtype=np.int64)
    for lo in range(0, n, 1 << 21):
        store.lookup("t", ids[lo : lo + (1 << 21)], train=True)
    rng = np.random.default_rng(0)
    ea = store.entries.arrays
    util = util_from_float(rng.pareto(1.1, (n, ea.util.shape[1])))
    ea.util.copy_to_device(np.ascontiguousarray(util, ea.util.dtype))
    sync()
    t0 = time.perf_counter()
    report = store.prune()
    sync()
    out = {"entries": n, "seconds": time.perf_counter() - t0, "evicted": int(report["pools"][0]["evicted"])}
    t0 = time.perf_counter()
    store.prune()
    sync()
    out["second_pass_seconds"] = time.perf_counter() - t0
    store.close()
    return out


def cache_mode(args) -> dict:
    cfg = TierBenchConfig(
        scale=args.cache_scale, steps=args.cache_steps, warmup=args.cache_warmup, batch_size=args.cache_batch
    )
    variants = (
        ("all_on_gpu", 1.0, 0, False),
        ("cache_25_pinned_host", None, "model", True),
        ("cache_25_zarr", None, 0, True),
    )
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="fiited-gpu-bench-") as root:

        class Bar:
            def update(self, n):
                print(f"  cache mode: a variant done ({time.strftime('%X')})", flush=True)

        bench_cache_mode_step(
            cfg,
            root,
            out,
            Bar(),
            device="cuda",
            variants=variants,
            to_device=lambda a: torch.from_numpy(a).to(args.torch_device),
            baseline="all_on_gpu",
        )
    return out["cache_mode_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="Criteo cardinalities times this (bench shape: 1.0)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096, help="the bench shape's batch")
    p.add_argument("--large-batch", type=int, default=65536)
    p.add_argument("--cache-scale", type=float, default=0.05)
    p.add_argument("--cache-steps", type=int, default=30)
    p.add_argument("--cache-warmup", type=int, default=25)
    p.add_argument("--cache-batch", type=int, default=4096)
    p.add_argument("--sections", default="lookup,large,prune,cache")
    p.add_argument("--prune-rows", type=int, default=10_000_000)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the script itself without a GPU: torch on the CPU, numba's simulator "
        "(NUMBA_ENABLE_CUDASIM=1), with tiny --scale/--large-batch/--prune-rows/--cache-scale",
    )
    args = p.parse_args()
    args.torch_device = torch.device("cpu" if args.dry_run else "cuda")
    name = "simulator (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    import numba

    out: dict = {
        "device": name,
        "python": platform.python_version(),
        "numba": numba.__version__,
        "torch": torch.__version__,
        "errors": {},
    }
    try:
        import numba_cuda

        out["numba_cuda"] = numba_cuda.__version__
    except ImportError:
        pass
    sections = {
        "lookup": lambda: lookup_and_step(args.batch_size, args, name),
        "large": lambda: lookup_and_step(args.large_batch, args, name),
        "prune": lambda: prune_10m(args),
        "cache": lambda: cache_mode(args),
    }
    for key in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"[{time.strftime('%X')}] {key} ...", flush=True)
        try:
            out[key] = sections[key]()
        except Exception as e:  # one failing section must not cost the others' figures
            out["errors"][key] = "".join(traceback.format_exception(e))[-4000:]
            print(out["errors"][key], flush=True)
        print(f"[{time.strftime('%X')}] {key} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.json:  # written after each section: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

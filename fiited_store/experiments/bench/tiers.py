"""``fiited-store bench --suite tiers``: the disk tier and cache mode.

The tier's spill (write) and restore (random read) rates against a ``numpy.memmap``
of the same rows, and a cache-mode training step (pool at 25% of the model, the rest
on disk, the next batch prefetched) against the same step with everything in memory,
on the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from ...config import StoreConfig, TableConfig
from ...store import EmbeddingStore
from ..workloads import ZipfIds, scaled_cardinalities


@dataclass(frozen=True)
class TierBenchConfig:
    chunks: int = 1 << 20  # rows moved in the throughput test
    batch: int = 1 << 16  # rows per spill / restore call
    chunk_width: int = 16
    state_width: int = 1
    scale: float = 0.05  # cache-mode step: Criteo cardinalities times this
    batch_size: int = 4096
    dim: int = 64
    K: int = 4
    budget_fraction: float = 0.25
    steps: int = 100  # timed (this machine's noise comes in bursts: many steps, one median)
    warmup: int = 25  # cache-mode steps before timing (a rebalance happens at step 20)
    prune_period: int = 20
    seed: int = 0
    directory: str | None = None  # where the disk tier goes (a temporary directory by default)


def bench_tier_throughput(cfg: TierBenchConfig, root, out: dict, bar) -> None:
    """Spill (write) and restore (random read) chunks/s: the Zarr tier against a numpy.memmap."""
    from pathlib import Path

    from ...storage.rows import gather_rows, scatter_rows
    from ...storage.zarr_tier import ZarrTier

    rng = np.random.default_rng(cfg.seed)
    n, w = cfg.chunks, cfg.chunk_width + cfg.state_width
    # load the tier's row kernels first (numba's cache: about 0.4 s, once per process,
    # which a training run pays long before its spills and which would be half this test)
    row = np.zeros((1, w), np.float32)
    scatter_rows(row, np.zeros(1, np.int64), row[:, : cfg.chunk_width].copy(), row[:, cfg.chunk_width :].copy())
    gather_rows(row, np.zeros(1, np.int64), row[:, : cfg.chunk_width].copy(), row[:, cfg.chunk_width :].copy())
    vec = rng.standard_normal((cfg.batch, cfg.chunk_width)).astype(np.float32)
    st = rng.standard_normal((cfg.batch, cfg.state_width)).astype(np.float32)
    tier = ZarrTier(Path(root) / "zarr_tier", cfg.chunk_width, cfg.state_width)
    mm = np.lib.format.open_memmap(Path(root) / "memmap.npy", mode="w+", dtype=np.float32, shape=(n, w))
    rows = np.concatenate([vec, st], axis=1)
    slots_all = []
    t0 = time.perf_counter()
    for _ in range(n // cfg.batch):
        s = tier.allocate(cfg.batch)
        tier.write(s, vec, st)
        slots_all.append(s)
    tier.flush()
    t_zarr_w = time.perf_counter() - t0
    # the memmap gets the same slots (the allocator hands out whole blocks, so they are runs)
    t0 = time.perf_counter()
    for s in slots_all:
        mm[s] = rows
    mm.flush()
    t_mm_w = time.perf_counter() - t0
    bar.update(1)
    all_slots = np.concatenate(slots_all)
    reads = [np.sort(rng.choice(all_slots, cfg.batch, replace=False)) for _ in range(8)]
    t0 = time.perf_counter()
    for r in reads:
        tier.read(r)
    t_zarr_r = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in reads:
        np.ascontiguousarray(mm[r])
    t_mm_r = time.perf_counter() - t0
    total_r = sum(r.size for r in reads)
    out["tier_throughput"] = {
        "chunks": n,
        "batch": cfg.batch,
        "chunk_bytes": w * 4,
        "zarr_spill_chunks_per_s": n / t_zarr_w,
        "memmap_spill_chunks_per_s": n / t_mm_w,
        "zarr_restore_chunks_per_s": total_r / t_zarr_r,
        "memmap_restore_chunks_per_s": total_r / t_mm_r,
    }
    out["tier_throughput"]["spill_zarr_vs_memmap"] = (n / t_zarr_w) / (n / t_mm_w)
    out["tier_throughput"]["restore_zarr_vs_memmap"] = (total_r / t_zarr_r) / (total_r / t_mm_r)
    bar.update(1)
    tier.close()
    del mm


#: (label, pool budget fraction, host cache bytes or None for the store's default, prefetch)
CACHE_VARIANTS = (("in_memory", 1.0, None, False), ("cache_25", None, None, True))


def bench_cache_mode_step(
    cfg: TierBenchConfig,
    root,
    out: dict,
    bar,
    *,
    device: str = "cpu",
    variants=CACHE_VARIANTS,
    to_device: Callable[[np.ndarray], Any] = lambda a: a,
    baseline: str = "in_memory",
) -> None:
    """A training step with the pool at 25% of the model (rest on disk, prefetch one batch
    ahead) against the same step with everything in memory, on the same batches.

    ``variants`` name each store: its pool budget (None: ``cfg.budget_fraction``), its
    host cache in bytes (None: the store's default; "model": the whole model, so
    nothing reaches the disk), and whether the next batch is prefetched. ``to_device``
    moves each batch where the store's user would keep it (a GPU, for device="cuda").

    The stores take their steps in turn (the order rotating every step), so that
    each ratio compares steps taken moments apart: this machine's noise comes in
    bursts longer than a step. A prefetching store's step lasts until its background
    read is done, so no store's reads run inside another's timing and a read slower
    than the step counts in full.
    """
    from pathlib import Path

    from ...residency import wait_for_tier_io

    cards = scaled_cardinalities(cfg.scale)
    names = [f"C{i + 1}" for i in range(len(cards))]
    tables = [
        TableConfig(nm, dim=cfg.dim, chunks=cfg.K, num_embeddings=n, optimizer="rowwise_adagrad", learning_rate=0.01)
        for nm, n in zip(names, cards)
    ]
    rng = np.random.default_rng(cfg.seed)
    zipfs = [ZipfIds(n, 1.1, salt=i * 104729 + 17) for i, n in enumerate(cards)]
    B = cfg.batch_size
    batches = [to_device(np.concatenate([z.sample(rng, B) for z in zipfs])) for _ in range(cfg.warmup + cfg.steps + 1)]
    offsets = to_device(np.arange(len(cards) * B + 1, dtype=np.int64))
    grads = [to_device(rng.standard_normal((B, len(cards) * cfg.dim)).astype(np.float32) * 0.01) for _ in range(4)]
    model_bytes = int(sum(cards)) * cfg.K * (cfg.dim // cfg.K + 1) * 4
    stores = {}
    for label, budget, host_cache, prefetch in variants:
        host_cache = model_bytes if host_cache == "model" else host_cache
        store = EmbeddingStore(
            tables,
            StoreConfig(
                mode="cache",
                budget_fraction=budget or cfg.budget_fraction,
                prune_period=cfg.prune_period,
                seed=cfg.seed,
                device=device,
                host_cache_bytes=host_cache,
            ),
            path=Path(root) / f"store_{label}",
        )
        # the whole model exists before timing: every row of every table, three quarters of it off the pool
        step = max(1, min(1 << 16, store.pools[0].slots // (2 * cfg.K)))  # what the pool can hold at once
        for name, n in zip(names, cards):
            for lo in range(0, n, step):
                store.prefetch(name, np.arange(lo, min(lo + step, n)))
        stores[label] = (store, host_cache, prefetch)
    times: dict[str, list[float]] = {label: [] for label in stores}
    order = list(stores)
    for i in range(cfg.warmup + cfg.steps):
        for label in order[i % len(order) :] + order[: i % len(order)]:
            store, _, prefetch = stores[label]
            t0 = time.perf_counter()
            if prefetch:
                # one batch ahead: the reads for step i + 1 overlap with step i
                store.prefetch_async(names, batches[i + 1], offsets)
            b = store.pooled_lookup(names, batches[i], offsets, train=True)
            store.backward(b, grads[i % len(grads)])
            store.step()
            store.backend.synchronize()
            wait_for_tier_io(store)
            times[label].append(time.perf_counter() - t0)
    results: dict[str, Any] = {}
    for label, (store, host_cache, _) in stores.items():
        st = store.stats()
        t = times[label][cfg.warmup :]
        results[label] = {
            "median_ms": float(np.median(t) * 1000),
            "mean_ms": float(np.mean(t) * 1000),
            "resident_chunks": st["total"]["resident_chunks"],
            "spilled_chunks": st["total"]["spilled_chunks"],
            "host_cache_bytes": host_cache,
            "counters": st["counters"],
        }
        store.close()
        bar.update(1)
    for label in stores:
        if label != baseline:
            results[f"{label}_vs_{baseline}"] = results[label]["median_ms"] / results[baseline]["median_ms"]
            # the ratio of each step to the baseline's step taken beside it
            paired = np.array(times[label][cfg.warmup :]) / np.array(times[baseline][cfg.warmup :])
            results[f"{label}_vs_{baseline}_paired_median"] = float(np.median(paired))
    if "cache_25" in results and baseline == "in_memory":
        # the names the CPU report and docs/results/bench_tiers.json have always used
        results["cache_vs_in_memory"] = results["cache_25_vs_in_memory"]
        results["cache_vs_in_memory_mean"] = results["cache_25"]["mean_ms"] / results["in_memory"]["mean_ms"]
    results["model_rows"] = int(sum(cards))
    out["cache_mode_step"] = results


def run_tier_bench(cfg: TierBenchConfig, progress: bool = True) -> dict:
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="fiited-bench-", dir=cfg.directory))
    bar = tqdm(total=4, disable=not progress, desc="tier bench", unit="stage")
    out: dict[str, Any] = {"config": asdict(cfg), "directory": str(root)}
    try:
        bench_tier_throughput(cfg, root, out, bar)
        bench_cache_mode_step(cfg, root, out, bar)
    finally:
        bar.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def format_tier_report(out: dict) -> str:
    t = out["tier_throughput"]
    c = out["cache_mode_step"]
    return "\n".join(
        [
            f"disk tier, {t['chunks']:,} chunks of {t['chunk_bytes']} bytes in batches of {t['batch']:,}:",
            f"  spill   Zarr {t['zarr_spill_chunks_per_s'] / 1e6:6.2f} M chunks/s   "
            f"memmap {t['memmap_spill_chunks_per_s'] / 1e6:6.2f} M chunks/s"
            f"   ratio {t['spill_zarr_vs_memmap']:.2f}",
            f"  restore Zarr {t['zarr_restore_chunks_per_s'] / 1e6:6.2f} M chunks/s   "
            f"memmap {t['memmap_restore_chunks_per_s'] / 1e6:6.2f} M chunks/s"
            f"   ratio {t['restore_zarr_vs_memmap']:.2f}",
            f"cache-mode training step ({c['model_rows']:,} rows, pool {out['config']['budget_fraction']:.0%} "
            "of the model, prefetch one batch ahead):",
            f"  all in memory {c['in_memory']['median_ms']:.2f} ms   cache mode {c['cache_25']['median_ms']:.2f} ms"
            f"   ratio {c['cache_vs_in_memory']:.2f} (median; mean {c['cache_vs_in_memory_mean']:.2f};"
            f" median of paired steps {c['cache_25_vs_in_memory_paired_median']:.2f})",
            f"  cache mode moved {c['cache_25']['counters']['spilled_chunks']:,} chunks to disk, restored "
            f"{c['cache_25']['counters']['restored_chunks']:,}, "
            f"of which {c['cache_25']['counters']['prefetched_chunks']:,} prefetched "
            f"and {c['cache_25']['counters']['sync_fetched_chunks']:,} fetched synchronously",
        ]
    )

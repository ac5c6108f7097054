"""``fiited-store bench --suite distributed``: the sharded store at 1, 2 and 4 ranks.

The bench shape of the embeddings suite (Criteo Kaggle's 26 tables, scaled; one id
per feature per sample; D = 64, K = 4) with a global batch split evenly over the
ranks. Per world size it reports the training step (forward, backward, step) of
the slowest rank, the bytes every rank hands to the exchange per step against the
floor (each distinct key's row and key, both ways; a world of one exchanges
nothing: its one shard is the whole store), and the forward exchange's
time against a TorchRec-style row-wise output exchange on the same data: a
reduce-scatter of partial pooled outputs, float32[global batch, 26 x D]. A world of
one also times a plain EmbeddingStore on the same batches.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: bytes of a key on the wire at the floor (an int64 id; the table rides in its high bits)
FLOOR_KEY_BYTES = 8


@dataclass(frozen=True)
class DistBenchConfig:
    worlds: tuple[int, ...] = (1, 2, 4)
    scale: float = 0.05
    batch_size: int = 4096  # the global batch, split over the ranks
    dim: int = 64
    chunks: int = 4
    budget_fraction: float = 0.25
    steps: int = 20
    warmup: int = 5
    zipf_s: float = 1.1
    seed: int = 0


class MeteredExchange:
    """An exchange that counts the bytes handed to it and the time spent in it."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world = inner.rank, inner.world
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.seconds = 0.0

    def _timed(self, nbytes: int, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        self.bytes += int(nbytes)
        return out

    def all_to_all(self, send, send_counts, recv_counts):
        return self._timed(send.nbytes, self.inner.all_to_all, send, send_counts, recv_counts)

    def counts(self, send_counts):
        return self._timed(8 * self.world, self.inner.counts, send_counts)

    def sum(self, values):
        return self._timed(np.asarray(values).nbytes, self.inner.sum, values)

    def max(self, values):
        return self._timed(np.asarray(values).nbytes, self.inner.max, values)

    def all_gather_rows(self, rows):  # the prune's samples; new keys while the pool fills
        return self._timed(rows.nbytes, self.inner.all_gather_rows, rows)

    def __getattr__(self, name):  # objects (stats), barriers: not metered
        return getattr(self.inner, name)


def _bench_rank(rank: int, world: int, cfg_json: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist

    from ...config import DynamicRatio, StoreConfig, TableConfig
    from ...distributed.exchange import TorchExchange
    from ...distributed.sharded_store import ShardedEmbeddingStore
    from ...store import EmbeddingStore
    from ..workloads import ZipfIds, scaled_cardinalities

    cfg = DistBenchConfig(**{**json.loads(cfg_json), "worlds": ()})
    cards = scaled_cardinalities(cfg.scale)
    names = [f"C{i + 1}" for i in range(len(cards))]
    tables = [TableConfig(n, cfg.dim, chunks=cfg.chunks, num_embeddings=c) for n, c in zip(names, cards)]
    store_cfg = StoreConfig(
        pruning=DynamicRatio(1.0 - cfg.budget_fraction),
        budget_fraction=cfg.budget_fraction,
        prune_period=0,
        seed=cfg.seed,
    )
    metered = MeteredExchange(TorchExchange())
    store = ShardedEmbeddingStore(tables, store_cfg, _exchange=metered)
    B = cfg.batch_size // world
    F = len(cards)
    zipfs = [ZipfIds(n, cfg.zipf_s, salt=i * 104729 + 17) for i, n in enumerate(cards)]
    offsets = np.arange(F * B + 1, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, rank])
    grad = (rng.standard_normal((B, F * cfg.dim)) * 0.01).astype(np.float32)
    batches = [np.concatenate([z.sample(rng, B) for z in zipfs]) for _ in range(cfg.warmup + cfg.steps)]
    step_ms, fwd_exchange_ms, sent, floor = [], [], [], []
    for i, ids in enumerate(batches):
        dist.barrier()
        metered.reset()
        t0 = time.perf_counter()
        batch = store.pooled_lookup(names, ids, offsets, train=True)
        fwd_s = metered.seconds
        store.backward(batch, grad)
        store.step()
        t1 = time.perf_counter()
        if i >= cfg.warmup:
            step_ms.append(1000 * (t1 - t0))
            fwd_exchange_ms.append(1000 * fwd_s)
            sent.append(metered.bytes)
            U = sum(np.unique(ids[f * B : (f + 1) * B]).size for f in range(F))  # distinct keys (one table per feature)
            floor.append(2 * U * (4 * cfg.dim + FLOOR_KEY_BYTES))
    # the peer's output exchange: every rank's partial pooled sums for every bag, reduce-scattered
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    partial = torch.randn(B * world, F * cfg.dim)
    mine = torch.empty(B, F * cfg.dim)
    rs_ms = []
    for i in range(cfg.warmup + cfg.steps):
        dist.barrier()
        t0 = time.perf_counter()
        reduce_scatter(mine, partial)
        if i >= cfg.warmup:
            rs_ms.append(1000 * (time.perf_counter() - t0))
    single_ms = None
    if world == 1:  # the same batches through one plain store: what sharding costs at one rank
        with EmbeddingStore(tables, store_cfg) as plain:
            times = []
            for i, ids in enumerate(batches):
                t0 = time.perf_counter()
                b = plain.pooled_lookup(names, ids, offsets, train=True)
                plain.backward(b, grad)
                plain.step()
                if i >= cfg.warmup:
                    times.append(1000 * (time.perf_counter() - t0))
            single_ms = float(np.median(times))
    mine_stats = {
        "step_ms": float(np.median(step_ms)),
        "forward_exchange_ms": float(np.median(fwd_exchange_ms)),
        "reduce_scatter_ms": float(np.median(rs_ms)),
        "bytes_sent": float(np.mean(sent)),
        "floor_bytes": float(np.mean(floor)),
    }
    every = metered.all_gather_object(mine_stats)
    store.close()
    if rank == 0:
        out = {
            "world_size": world,
            "batch_per_rank": B,
            "step_ms": max(s["step_ms"] for s in every),
            "forward_exchange_ms": max(s["forward_exchange_ms"] for s in every),
            "reduce_scatter_ms": max(s["reduce_scatter_ms"] for s in every),
            "bytes_sent_per_step": sum(s["bytes_sent"] for s in every),
            "floor_bytes_per_step": sum(s["floor_bytes"] for s in every),
            "single_store_step_ms": single_ms,
        }
        out["bytes_vs_floor"] = out["bytes_sent_per_step"] / out["floor_bytes_per_step"]
        out["exchange_vs_reduce_scatter"] = out["forward_exchange_ms"] / out["reduce_scatter_ms"]
        Path(out_file).write_text(json.dumps(out))


def run_distributed_bench(cfg: DistBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Every world size of ``cfg.worlds``, one spawned world after another."""
    from tqdm import tqdm

    from ...distributed.launch import spawn_world_or_raise

    results = []
    bar = tqdm(cfg.worlds, disable=not progress, desc="distributed bench", unit="world")
    with tempfile.TemporaryDirectory(prefix="fiited-dist-bench-") as tmp:
        for world in bar:
            bar.set_postfix(ranks=world)
            out_file = str(Path(tmp) / f"w{world}.json")
            spawn_world_or_raise(
                world, _bench_rank, (json.dumps(asdict(cfg)), out_file), deadline_s=1800, collective_timeout_s=600
            )
            results.append(json.loads(Path(out_file).read_text()))
    return {"config": asdict(cfg), "worlds": results}


def format_distributed_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"sharded store, Criteo cardinalities x {c['scale']}, global batch {c['batch_size']}, D={c['dim']}, "
        f"K={c['chunks']}, budget {c['budget_fraction']:g} of dense (medians of {c['steps']} steps)",
        f"{'ranks':>5} {'step ms':>9} {'fwd exchange ms':>16} {'reduce-scatter ms':>18} {'exch/RS':>8} "
        f"{'MB sent/step':>13} {'x floor':>8}",
    ]
    for w in report["worlds"]:
        lines.append(
            f"{w['world_size']:>5} {w['step_ms']:>9.1f} {w['forward_exchange_ms']:>16.2f} "
            f"{w['reduce_scatter_ms']:>18.2f} {w['exchange_vs_reduce_scatter']:>8.3f} "
            f"{w['bytes_sent_per_step'] / 1e6:>13.2f} {w['bytes_vs_floor']:>8.3f}"
        )
        if w.get("single_store_step_ms"):
            lines.append(
                f"      one plain EmbeddingStore on the same batches: {w['single_store_step_ms']:.1f} ms per "
                f"step (sharded front at one rank: {w['step_ms'] / w['single_store_step_ms']:.2f}x)"
            )
    return "\n".join(lines)

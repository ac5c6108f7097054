"""``fiited-store bench``: the store against its peers on the bench shape (docs/benchmarks.md), in one run.

Shape: batch 4096 x 26 features, one id per bag, D = 64, K = 4, Zipf(1.1) ids over
the Criteo Kaggle cardinalities (33.8M rows, an 8.6 GB dense table at scale 1),
pool budget 25% of the dense size. Peers: ``torch.nn.functional.embedding_bag`` on
a dense table, a raw njit gather of the same rows, ``torch.nn.EmbeddingBag(sparse=True)``
with SGD, and fbgemm-gpu-cpu's table-batched embedding with row-wise Adagrad.
Every figure is a median over ``repeats`` batches after ``warmup`` batches; the
ratios compare figures measured in the same run, since this machine is shared.
"""

from __future__ import annotations

import gc
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numba import njit, prange
from tqdm import tqdm

from ...config import DynamicRatio, ManualRatios, StoreConfig, TableConfig
from ...kernels.layout import util_from_float
from ...store import EmbeddingStore
from ..workloads import ZipfIds, scaled_cardinalities


@dataclass(frozen=True)
class BenchConfig:
    scale: float = 1.0
    batch_size: int = 4096
    dim: int = 64
    chunks: int = 4
    budget_fraction: float = 0.25
    zipf_s: float = 1.1
    repeats: int = 20
    warmup: int = 5
    train_warmup: int = 20  # training steps (with prunes) before the store's timings
    peers: tuple[str, ...] = ("torch", "gather", "torch-sparse", "fbgemm")
    prune_entries: int = 10_000_000
    seed: int = 0


@njit(parallel=True, cache=True, nogil=True)
def dense_gather(table, rows, out):
    """The memory floor: out[i] = table[rows[i]], nothing else."""
    for i in prange(rows.shape[0]):
        out[i, :] = table[rows[i], :]


def _timeit(fn: Callable[[int], Any], warmup: int, repeats: int) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1000.0
    return {
        "median_ms": float(np.median(t)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
    }


class Workload:
    """Pre-generated batches: ids per table (raw ids) and global rows of a dense table."""

    def __init__(self, cfg: BenchConfig, n_batches: int):
        self.cards = scaled_cardinalities(cfg.scale)
        self.names = [f"C{i + 1}" for i in range(len(self.cards))]
        self.row_offsets = np.concatenate([[0], np.cumsum(self.cards)]).astype(np.int64)
        self.total_rows = int(self.row_offsets[-1])
        rng = np.random.default_rng(cfg.seed)
        self.zipfs = [ZipfIds(n, cfg.zipf_s, salt=i * 104729 + 17) for i, n in enumerate(self.cards)]
        B = self.batch_size = cfg.batch_size
        self.ids = []  # int64[26 * B]: per batch, table after table
        for _ in range(n_batches):
            self.ids.append(self.sample(rng))
        table_of = np.repeat(np.arange(len(self.cards)), B)
        self.rows = [ids + self.row_offsets[table_of] for ids in self.ids]
        self.offsets = np.arange(len(self.cards) * B + 1, dtype=np.int64)
        self.grads = [rng.standard_normal((B, len(self.cards) * cfg.dim)).astype(np.float32) * 0.01 for _ in range(4)]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A fresh batch of ids, table after table."""
        return np.concatenate([z.sample(rng, self.batch_size) for z in self.zipfs])

    def train(self, store: EmbeddingStore, rng: np.random.Generator, steps: int, prune_every: int = 10) -> None:
        """Training steps on fresh batches, with a prune pass every ``prune_every`` steps."""
        for s in range(steps):
            b = store.pooled_lookup(self.names, self.sample(rng), self.offsets, train=True)
            store.backward(b, self.grads[s % len(self.grads)])
            store.step()
            if (s + 1) % prune_every == 0:
                store.prune()

    def prefill(self, store: EmbeddingStore, rows: int) -> None:
        """The state of a store deep into training: the globally most popular keys have entries."""
        for name, ids in zip(self.names, most_popular_ids(self.zipfs, rows)):
            for lo in range(0, ids.shape[0], 1 << 20):
                store.insert(name, ids[lo : lo + (1 << 20)])


def _dense_weights(rows: int, dim: int, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.empty(rows, dim).uniform_(-0.01, 0.01)


class DensePeer:
    """torch's dense table and its sparse SGD step, kept to be timed beside the store's
    lookups and steps (in alternating blocks of batches: see :func:`_timeit_blocks`)."""

    def __init__(self, W, w: Workload, dim: int):
        import torch

        self.W = W
        self.rows_t = [torch.from_numpy(r) for r in w.rows]
        self.off_t = torch.from_numpy(w.offsets[:-1])
        self.bag = torch.nn.EmbeddingBag(w.total_rows, dim, mode="sum", sparse=True, _weight=W)
        self.opt = torch.optim.SGD(self.bag.parameters(), lr=0.01)
        self.grads = [torch.from_numpy(g.reshape(-1, dim)) for g in w.grads]

    def lookup(self, i: int):
        import torch

        return torch.nn.functional.embedding_bag(self.rows_t[i % len(self.rows_t)], self.W, self.off_t, mode="sum")

    def step(self, i: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        o = self.bag(self.rows_t[i % len(self.rows_t)], self.off_t)
        o.backward(self.grads[i % len(self.grads)])
        self.opt.step()


#: batches per block of the alternating timings: one to warm, the rest timed
BLOCK_BATCHES = 6
BLOCK_ROUNDS = 8


def _timeit_blocks(
    fn: Callable[[int], Any],
    peer: Callable[[int], Any],
    warmup: int,
    rounds: int = BLOCK_ROUNDS,
    block: int = BLOCK_BATCHES,
) -> dict[str, float]:
    """fn and peer in alternating blocks of batches, the order of each pair of blocks
    alternating: the median, over the rounds, of fn's median time in its block over
    peer's in the block beside it.

    Two medians taken a minute apart see different machine states (this machine's
    noise comes in bursts longer than a batch); alternating batch by batch costs the
    peer its warm cache (torch's rows, evicted by the store's between two of its
    lookups, made it 1.2x to 2.5x slower, the store 1.1x). Blocks keep both sides in
    their warm state, one batch warming each block, and a few seconds apart."""
    for i in range(warmup):
        fn(i)
        peer(i)
    t_fn, t_peer, ratios = [], [], []
    i = warmup
    for r in range(rounds):
        medians = {}
        for which, times in ((fn, t_fn), (peer, t_peer)) if r % 2 == 0 else ((peer, t_peer), (fn, t_fn)):
            which(i)  # warms this side's lines after the other side's block
            block_t = []
            for j in range(1, block):
                t0 = time.perf_counter()
                which(i + j)
                block_t.append(time.perf_counter() - t0)
            times.extend(block_t)
            medians[which] = float(np.median(block_t))
        ratios.append(medians[fn] / medians[peer])
        i += block
    return {
        "median_ms": float(np.median(t_fn) * 1000.0),
        "peer_median_ms": float(np.median(t_peer) * 1000.0),
        "ratio_median": float(np.median(ratios)),
        "round_ratios": [float(x) for x in ratios],
    }


def bench_torch_and_gather(cfg: BenchConfig, w: Workload, out: dict, bar) -> DensePeer | None:
    """The dense peers; returns torch's table and step for the alternating store timings
    (None when neither torch peer is asked for)."""
    W = _dense_weights(w.total_rows, cfg.dim, cfg.seed)
    n = len(w.ids)
    if "gather" in cfg.peers:
        Wn = W.numpy()
        buf = np.empty((w.rows[0].shape[0], cfg.dim), np.float32)
        out["gather_lookup"] = _timeit(lambda i: dense_gather(Wn, w.rows[i % n], buf), cfg.warmup, cfg.repeats)
        bar.update(1)
        del Wn
    peer = DensePeer(W, w, cfg.dim) if {"torch", "torch-sparse"} & set(cfg.peers) else None
    if "torch" in cfg.peers:
        out["torch_embedding_bag"] = _timeit(peer.lookup, cfg.warmup, cfg.repeats)
        bar.update(1)
    if "torch-sparse" in cfg.peers:
        out["torch_sparse_sgd_step"] = _timeit(peer.step, cfg.warmup, cfg.repeats)
        bar.update(1)
    del W
    gc.collect()
    return peer


def bench_fbgemm(cfg: BenchConfig, w: Workload, out: dict, bar) -> None:
    import torch

    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            OptimType,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            EmbeddingLocation as _EL,  # noqa: F401  (older releases export it here)
        )
    except ImportError:
        try:
            from fbgemm_gpu.split_table_batched_embeddings_ops import (  # type: ignore
                ComputeDevice,
                EmbeddingLocation,
                OptimType,
                PoolingMode,
                SplitTableBatchedEmbeddingBagsCodegen,
            )
        except ImportError as exc:
            out["fbgemm_error"] = f"fbgemm-gpu-cpu is not importable ({exc}); pip install 'fiited-store[bench]'"
            bar.update(2)
            return
    specs = [(n, cfg.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in w.cards]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        specs, optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, eps=1e-8, pooling_mode=PoolingMode.SUM
    )
    B, T = cfg.batch_size, len(w.cards)
    ids_t = [torch.from_numpy(ids) for ids in w.ids]
    off_t = torch.arange(0, T * B + 1, dtype=torch.int64)
    n = len(w.ids)
    grads = [torch.from_numpy(g) for g in w.grads]
    with torch.no_grad():
        out["fbgemm_forward"] = _timeit(lambda i: tbe(ids_t[i % n], off_t), cfg.warmup, cfg.repeats)
    bar.update(1)

    def step(i):
        o = tbe(ids_t[i % n], off_t)
        o.backward(grads[i % len(grads)])

    out["fbgemm_rowwise_adagrad_step"] = _timeit(step, cfg.warmup, cfg.repeats)
    bar.update(1)
    tbe = None  # frees the tables (the closures above hold the cell, not the object)
    gc.collect()


def most_popular_ids(zipfs: list[ZipfIds], n_rows: int) -> list[np.ndarray]:
    """Per table, the ids of the globally n_rows most probable keys (ranks above one threshold)."""

    def counts(tau: float) -> list[int]:
        # rank r of table t is kept when its probability exceeds tau
        out = []
        for z in zipfs:
            p = np.diff(np.concatenate([[0.0], z.cdf]))
            out.append(int(np.searchsorted(-p, -tau)))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sum(counts(mid)) < n_rows else (mid, hi)
    ranks = counts(hi)
    return [(np.arange(r, dtype=np.int64) * z.a + z.b) % z.n for z, r in zip(zipfs, ranks)]


INDEXES = ("direct", "hashed")


def make_store(cfg: BenchConfig, w: Workload, budget_fraction: float, pruning, index: str = "direct") -> EmbeddingStore:
    tables = [
        TableConfig(
            name,
            dim=cfg.dim,
            chunks=cfg.chunks,
            num_embeddings=n,
            optimizer="rowwise_adagrad",
            learning_rate=0.01,
            index=index,
        )
        for name, n in zip(w.names, w.cards)
    ]
    return EmbeddingStore(
        tables,
        StoreConfig(
            pruning=pruning, budget_fraction=budget_fraction, prune_period=0, seed=cfg.seed, initial_capacity=1 << 16
        ),
    )


def bench_store(
    cfg: BenchConfig, w: Workload, out: dict, bar, index: str = "direct", peer: DensePeer | None = None
) -> None:
    """Lookup and training step of the store with the given index; keys ``store_*`` (direct)
    or ``store_hashed_*``. With torch's ``peer``, each is also timed in alternating
    blocks with torch's (``*_blocks``)."""
    store = make_store(cfg, w, cfg.budget_fraction, DynamicRatio(1.0 - cfg.budget_fraction), index)
    key = "store" if index == "direct" else f"store_{index}"
    n = len(w.ids)
    # the most popular keys of all tables hold the pool (a long run at this budget
    # converges to that), so timings see a full pool and an entry table of millions
    # of keys, not a warm, nearly empty one
    w.prefill(store, store.pools[0].slots // cfg.chunks)
    out[f"{key}_prefill"] = {
        "entries": store.entries.n_live,
        "pool_used": store.pools[0].n_used,
        "pool_slots": store.pools[0].slots,
    }
    w.train(store, np.random.default_rng(cfg.seed + 1), cfg.train_warmup)
    bar.update(1)
    out[f"{key}_lookup"] = _timeit(
        lambda i: store.pooled_lookup(w.names, w.ids[i % n], w.offsets), cfg.warmup, cfg.repeats
    )
    bar.update(1)

    def step(i):
        b = store.pooled_lookup(w.names, w.ids[i % n], w.offsets, train=True)
        store.backward(b, w.grads[i % len(w.grads)])
        store.step()

    out[f"{key}_train_step"] = _timeit(step, cfg.warmup, cfg.repeats)
    if peer is not None and "torch" in cfg.peers:
        out[f"{key}_lookup_blocks"] = _timeit_blocks(
            lambda i: store.pooled_lookup(w.names, w.ids[i % n], w.offsets), peer.lookup, cfg.warmup
        )
    if peer is not None and "torch-sparse" in cfg.peers:
        out[f"{key}_train_step_blocks"] = _timeit_blocks(step, peer.step, cfg.warmup)
    # the parts of a step, for the benchmarks' breakdown
    b = store.pooled_lookup(w.names, w.ids[0], w.offsets, train=True)
    t0 = time.perf_counter()
    store.backward(b, w.grads[0])
    out[f"{key}_backward_only_ms"] = (time.perf_counter() - t0) * 1000.0
    out[f"{key}_after_training"] = store.stats()["total"]
    bar.update(1)
    store.close()
    gc.collect()


def bench_memory(cfg: BenchConfig, w: Workload, out: dict, bar) -> None:
    """Store bytes at 93.75% pruning (K = 4, D = 64) with either index, after training on the stream.

    The direct index holds every declared row from the start: its figure is the
    paper's case (an entry for every row). The hashed index holds the keys it saw;
    with every declared row it would need capacity for all of them, which is
    computed from its bytes per slot.
    """
    ratio = 0.9375
    steps = cfg.train_warmup + cfg.repeats
    res: dict[str, Any] = {"paper_formula_vs_dense": (1 - ratio) + 3 * cfg.chunks / cfg.dim}
    for index in INDEXES:
        store = make_store(cfg, w, 1.0 - ratio, ManualRatios.linear(ratio, cfg.chunks), index)
        w.train(store, np.random.default_rng(cfg.seed + 2), steps)
        st = store.stats()["total"]
        dense = st["dense_bytes"]
        res["dense_bytes"] = dense
        res["dense_with_optimizer_bytes"] = st["dense_with_optimizer_bytes"]
        entry = {
            "steps": steps,
            "entries": st["entries"],
            "bytes": st["bytes"],
            "vs_dense": st["memory_vs_dense"],
            "vs_dense_with_optimizer": st["memory_vs_dense_with_optimizer"],
        }
        if index == "hashed":
            pool_side = st["bytes"]["pool_vectors"] + st["bytes"]["optimizer_state"] + st["bytes"]["address_manager"]
            # an entry for every declared row, at the load the table settles at after growth
            cap_full = 1 << math.ceil(math.log2(w.total_rows / (0.6 * store.config.max_load)))
            every = pool_side + cap_full * store.entries.hashed_slot_bytes
            entry["every_row"] = {"entry_capacity": cap_full, "bytes": every, "vs_dense": every / dense}
            entry["bytes_per_slot"] = store.entries.hashed_slot_bytes
        res[index] = entry
        store.close()
        gc.collect()
    out["memory_at_93.75"] = res
    bar.update(1)


def bench_prune(cfg: BenchConfig, out: dict, bar) -> None:
    """One prune pass over ``prune_entries`` entries with trained-looking utilities."""
    n = cfg.prune_entries
    K = cfg.chunks
    table = TableConfig("t", dim=cfg.dim, chunks=K, num_embeddings=n)  # the direct index
    store = EmbeddingStore(
        [table], StoreConfig(pruning=DynamicRatio(0.75), budget_fraction=0.25, prune_period=0, seed=cfg.seed)
    )
    ids = np.arange(n, dtype=np.int64)
    for lo in range(0, n, 1 << 20):
        store.lookup("t", ids[lo : lo + (1 << 20)], train=True)
    rng = np.random.default_rng(cfg.seed)
    ea = store.entries.arrays
    live = store.entries.table_of_entries() >= 0
    ea.util[live] = util_from_float(rng.pareto(1.1, (int(live.sum()), ea.util.shape[1])))
    t0 = time.perf_counter()
    report = store.prune()
    out["prune_pass"] = {
        "entries": n,
        "seconds": time.perf_counter() - t0,
        "evicted": report["pools"][0]["evicted"],
        "allocated": report["pools"][0]["allocated"],
    }
    t0 = time.perf_counter()
    report = store.prune()
    out["prune_pass"]["second_pass_seconds"] = time.perf_counter() - t0
    bar.update(1)
    store.close()
    gc.collect()


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    n_batches = cfg.warmup + cfg.repeats
    stages = (
        3 * len(INDEXES)
        + ("gather" in cfg.peers)
        + ("torch" in cfg.peers)
        + ("torch-sparse" in cfg.peers)
        + 2 * ("fbgemm" in cfg.peers)
        + 1
        + (cfg.prune_entries > 0)
        + 1
    )
    bar = tqdm(total=stages, disable=not progress, desc="bench", unit="stage")
    w = Workload(cfg, n_batches)
    bar.update(1)
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "rows": w.total_rows,
        "dense_gb": w.total_rows * cfg.dim * 4 / 1e9,
        "lookups_per_batch": int(w.ids[0].shape[0]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    if "fbgemm" in cfg.peers:  # first: its tables and torch's would not both fit beside a store
        bench_fbgemm(cfg, w, out, bar)
    peer = None
    if {"torch", "gather", "torch-sparse"} & set(cfg.peers):
        peer = bench_torch_and_gather(cfg, w, out, bar)
    for index in INDEXES:
        bench_store(cfg, w, out, bar, index, peer)
    del peer
    gc.collect()
    bench_memory(cfg, w, out, bar)
    if cfg.prune_entries > 0:
        bench_prune(cfg, out, bar)
    bar.close()
    out["ratios"] = ratios(out)
    return out


def ratios(out: dict[str, Any]) -> dict[str, float]:
    def med(k):
        return out[k]["median_ms"] if k in out else None

    r = {}
    pairs = [
        (f"{s}_{a}", b)
        for s in ("store", "store_hashed")
        for a, b in (
            ("lookup", "torch_embedding_bag"),
            ("lookup", "gather_lookup"),
            ("lookup", "fbgemm_forward"),
            ("train_step", "fbgemm_rowwise_adagrad_step"),
            ("train_step", "torch_sparse_sgd_step"),
        )
    ]
    for a, b in pairs:
        if med(a) is not None and med(b) is not None:
            r[f"{a} / {b}"] = med(a) / med(b)
    for s in ("store", "store_hashed"):
        for a, b in (("lookup", "torch_embedding_bag"), ("train_step", "torch_sparse_sgd_step")):
            if f"{s}_{a}_blocks" in out:
                r[f"{s}_{a} / {b}, blocks"] = out[f"{s}_{a}_blocks"]["ratio_median"]
    return r


def format_report(out: dict[str, Any]) -> str:
    lines = [
        f"{out['rows']:,} rows ({out['dense_gb']:.2f} GB dense at D={out['config']['dim']}), "
        f"{out['lookups_per_batch']:,} lookups per batch, median of {out['config']['repeats']} batches"
    ]
    names = [
        ("gather_lookup", "raw njit gather (memory floor)"),
        ("torch_embedding_bag", "torch embedding_bag, sum"),
        ("fbgemm_forward", "FBGEMM CPU TBE forward"),
        ("store_lookup", "fiited-store pooled lookup, direct index"),
        ("store_hashed_lookup", "fiited-store pooled lookup, hashed index"),
        ("torch_sparse_sgd_step", "torch EmbeddingBag(sparse) + SGD step"),
        ("fbgemm_rowwise_adagrad_step", "FBGEMM TBE fwd+bwd, row-wise Adagrad"),
        ("store_train_step", "fiited-store step, direct index (lookup, backward, Adagrad, utilities)"),
        ("store_hashed_train_step", "fiited-store step, hashed index"),
    ]
    for key, label in names:
        if key in out:
            lines.append(f"  {label:<58} {out[key]['median_ms']:8.2f} ms")
    if "fbgemm_error" in out:
        lines.append(f"  FBGEMM: {out['fbgemm_error']}")
    for k, v in out["ratios"].items():
        lines.append(f"  ratio {k:<60} {v:6.3f}")
    if "prune_pass" in out:
        p = out["prune_pass"]
        lines.append(
            f"  prune pass over {p['entries']:,} entries: {p['seconds']:.2f} s "
            f"(second pass {p['second_pass_seconds']:.2f} s)"
        )
    m = out.get("memory_at_93.75")
    if m:
        d, h = m["direct"], m["hashed"]
        lines.append(
            f"  store memory at 93.75% pruning / dense weights (paper's formula {m['paper_formula_vs_dense']:.4f}):"
        )
        lines.append(
            f"    direct index, every declared row: {d['vs_dense']:.4f} ({d['vs_dense_with_optimizer']:.4f} of dense "
            f"weights + row-wise Adagrad state)"
        )
        lines.append(
            f"    hashed index: {h['vs_dense']:.4f} after {h['steps']} steps ({h['entries']:,} entries); "
            f"{h['every_row']['vs_dense']:.4f} with every declared row"
        )
    return "\n".join(lines)

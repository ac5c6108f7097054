"""``fiited-store bench --suite larger-than-memory``: training a model bigger than this machine's RAM.

The scenario: the Criteo Kaggle cardinalities (33.8M rows at scale 1) at D = 256, K = 4,
row-wise Adagrad: 34.6 GB of dense weights. The store runs in cache mode with its pool
at 10% of the model and a path on disk; every row is made resident once, table by table
(as after opening a trained checkpoint), so the rest of the model sits in the disk
tier; then it trains on batches of 4096 x 26 Zipf(1.1) ids, each batch prefetched
``prefetch_depth`` batches ahead.

In one run it reports: the median step; rows and bytes the tier read and wrote per
step; the device's random-read rate, measured beside the tier (4 KiB reads at queue
depth 32, O_DIRECT) and its sequential write rate, and the IO floor they imply for the
rows moved; the disk in use against the live tier rows after a save; the save's time
and size; anonymous RSS against the store's in-memory arrays; and a peer a user might
try, the dense table as a ``numpy.memmap`` of a sparse file with
``torch.nn.functional.embedding_bag`` and a row-wise Adagrad update of the touched rows,
on the same batches. Everything it writes goes in a directory it removes.
"""

from __future__ import annotations

import os
import shutil
import statistics as stats
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ...config import StoreConfig, TableConfig
from ...errors import ConfigError
from ...storage import io
from ...store import EmbeddingStore
from ..workloads import ZipfIds, scaled_cardinalities


@dataclass(frozen=True)
class LargerThanMemoryConfig:
    scale: float = 1.0  # Criteo Kaggle cardinalities times this (1.0: 33.8M rows)
    dim: int = 256
    chunks: int = 4
    budget_fraction: float = 0.1  # the pool against the dense model
    batch_size: int = 4096
    zipf_s: float = 1.1
    steps: int = 30  # timed training steps
    warmup: int = 5  # steps before timing
    prefetch_depth: int = 2  # batches read ahead
    # the tier's page-cache bound (StoreConfig.tier_page_cache_bytes): none, so that every
    # read reaches the device and the step compares with the device's own IO floor
    page_cache_bytes: int = 0
    peer_steps: int = 3  # timed steps of the memmap peer (after one untimed)
    materialize_rows: int = 262_144  # rows made resident per call while materialising
    device_seconds: float = 3.0  # how long the random-read measurement runs
    probe_bytes: int = 1 << 30  # the file the device measurements read (randomly) and write (in sequence)
    directory: str | None = None  # where the store and the peer's file go (a temporary directory in it)
    seed: int = 0


def _anon_rss() -> int:
    """This process's anonymous resident memory, bytes (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _disk_bytes(path: Path) -> int:
    """Bytes allocated under ``path``, each hard-linked file once (du)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _sequential_write_rate(path: str, nbytes: int) -> float:
    """Bytes per second of large aligned writes (O_DIRECT where allowed), synced."""
    buf = io.aligned_buffer(min(8 << 20, nbytes))
    buf[:] = 1
    fd, _ = io.open_file(path, write=True)
    try:
        t0 = time.perf_counter()
        for off in range(0, nbytes, buf.size):
            io.write_all(fd, memoryview(buf), off)
        os.fsync(fd)
        return nbytes / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)


class Batches:
    """Zipf(1.1) ids per feature, one id per bag, feature-major; the same for store and peer.
    Drawn up front, so that the samplers' tables (a float per row) are gone before the
    store's memory is measured."""

    def __init__(self, cards: list[int], batch: int, s: float, seed: int, n: int):
        zipfs = [ZipfIds(c, s, salt=i * 104729 + 17) for i, c in enumerate(cards)]
        self._ids = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            self._ids.append(np.concatenate([z.sample(rng, batch) for z in zipfs]).astype(np.int64))
        del zipfs
        self.offsets = np.arange(len(cards) * batch + 1, dtype=np.int64)
        self.n_features = len(cards)

    @property
    def n(self) -> int:
        return len(self._ids)

    def ids(self, i: int) -> np.ndarray:
        return self._ids[i]

    def distinct_rows(self, i: int) -> int:
        """Distinct (feature, id) pairs of batch i: the rows it makes resident."""
        ids = self._ids[i].reshape(-1, (self.offsets.size - 1) // self.n_features)
        return int(sum(np.unique(row).size for row in ids))


def _bench_store(
    cfg: LargerThanMemoryConfig, root: Path, tables: list[TableConfig], batches: Batches, out: dict, bar
) -> None:
    names = [t.name for t in tables]
    store_dir = root / "store"
    store = EmbeddingStore(
        tables,
        StoreConfig(
            mode="cache",
            budget_fraction=cfg.budget_fraction,
            prefetch_depth=cfg.prefetch_depth,
            tier_page_cache_bytes=cfg.page_cache_bytes,
        ),
        path=store_dir,
    )
    try:
        # every row resident once, table by table: the rest of the model lands in the tier
        t0 = time.perf_counter()
        total = sum(t.num_embeddings for t in tables)
        per_call = max(1, min(cfg.materialize_rows, store.plans[0].slots // cfg.chunks // 4))  # a quarter of the pool
        with tqdm(
            total=total, disable=bar.disable, desc="materialise", unit="row", unit_scale=True, leave=False
        ) as rows_bar:
            for t in tables:
                for lo in range(0, t.num_embeddings, per_call):
                    ids = np.arange(lo, min(lo + per_call, t.num_embeddings), dtype=np.int64)
                    store.prefetch(t.name, ids)
                    rows_bar.update(ids.size)
        tier = store.tiers[0]
        tier.wait_for_writes()
        out["materialise_s"] = time.perf_counter() - t0
        out["tier_live_bytes_after_materialise"] = tier.live_bytes
        bar.update(1)

        n_steps = cfg.warmup + cfg.steps
        for i in range(min(cfg.prefetch_depth, n_steps)):
            store.prefetch_async(names, batches.ids(i), batches.offsets)
        times, moved, rss = [], [], []
        before = _tier_counters(store)
        asked = store.residency.hit_counts()  # the timed steps' hit rate: counters from here on
        with tqdm(total=n_steps, disable=bar.disable, desc="train", unit="step", leave=False) as steps_bar:
            for i in range(n_steps):
                t0 = time.perf_counter()
                if i + cfg.prefetch_depth < n_steps:
                    store.prefetch_async(names, batches.ids(i + cfg.prefetch_depth), batches.offsets)
                _train_step(store, names, batches, i)
                dt = time.perf_counter() - t0
                now = _tier_counters(store)
                if i == cfg.warmup - 1:
                    asked = store.residency.hit_counts()
                if i >= cfg.warmup:
                    times.append(dt)
                    moved.append({k: now[k] - before[k] for k in now})
                    rss.append(_anon_rss())
                before = now
                steps_bar.update(1)
                steps_bar.set_postfix(step_s=f"{dt:.3f}")
        out["step_s"] = {
            "median": stats.median(times),
            "mean": stats.fmean(times),
            "min": min(times),
            "max": max(times),
            "all": times,
        }
        # means: evictions come in bursts, so most steps write nothing and a median would say 0
        out["per_step"] = {k: stats.fmean([m[k] for m in moved]) for k in moved[0]}
        st = store.stats()["total"]
        arrays = (
            st["bytes"]["pool_vectors"]
            + st["bytes"]["optimizer_state"]
            + st["bytes"]["address_manager"]
            + st["bytes"]["entries"]
        )
        out["memory"] = {
            "in_memory_arrays": arrays,
            "anon_rss_median": int(stats.median(rss)),
            "anon_rss_vs_arrays": stats.median(rss) / arrays,
        }
        after = store.residency.hit_counts()
        needed = sum(after["needed"]) - sum(asked["needed"])
        missed = sum(after["missed"]) - sum(asked["missed"])
        out["hit_rate"] = 1.0 - missed / needed if needed else None  # over the timed steps
        bar.update(1)

        t0 = time.perf_counter()
        store.save()
        out["save_s"] = time.perf_counter() - t0
        ckpt = store_dir / store.checkpoint
        live = tier.live_bytes
        out["disk"] = {
            "tier_live_bytes": live,
            "store_dir_bytes": _disk_bytes(store_dir),
            "checkpoint_bytes": _disk_bytes(ckpt),
            "checkpoint_own_bytes": _disk_bytes(ckpt) - _disk_bytes(ckpt / "tier_0"),
            "vs_live_tier_rows": _disk_bytes(store_dir) / live if live else None,
            "tier_segments": len(tier.segments()),
            "tier_garbage": tier.garbage_fraction(),
        }
        # a second save: its cost is what changed since the first
        for i in range(n_steps, n_steps + 3):
            _train_step(store, names, batches, i)
        t0 = time.perf_counter()
        store.save()
        out["second_save_s"] = time.perf_counter() - t0
        bar.update(1)
    finally:
        store.close()
        shutil.rmtree(store_dir, ignore_errors=True)


def _train_step(store, names: list[str], batches: Batches, i: int) -> None:
    """One step of the loss 1/2 |pooled|^2: its gradient is the output itself, so the step
    holds no gradient array of its own, and the output is released before the next lookup
    (as a training loop's would be), so the store reuses its buffer."""
    b = store.pooled_lookup(names, batches.ids(i), batches.offsets, train=True)
    store.backward(b, b.output)
    del b
    store.step()


def _tier_counters(store) -> dict[str, int]:
    t = store.tiers[0]
    c = store.counters
    return {
        "bytes_read": t.bytes_read,
        "bytes_written": t.bytes_written,
        "read_requests": t.read_requests,
        "slots_read": t.slots_read,
        "slots_written": t.slots_written,
        "restored_chunks": c.restored_chunks,
        "spilled_chunks": c.spilled_chunks,
        "sync_fetched_chunks": c.sync_fetched_chunks,
        "prefetched_chunks": c.prefetched_chunks,
        "compacted_chunks": c.compacted_chunks,
    }


def _bench_memmap_peer(
    cfg: LargerThanMemoryConfig, root: Path, cards: list[int], batches: Batches, out: dict, bar
) -> None:
    """The dense table as a numpy.memmap of a sparse file, torch's embedding_bag, and a
    row-wise Adagrad update of the touched rows (a float of state per row, in a second map)."""
    import torch

    rows = int(sum(cards))
    base = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
    W_path, S_path = root / "peer_weights.f32", root / "peer_state.f32"
    for p, width in ((W_path, cfg.dim), (S_path, 1)):
        with open(p, "wb") as f:
            f.truncate(rows * width * 4)  # sparse: holes read as zeros
    W = np.memmap(W_path, np.float32, "r+", shape=(rows, cfg.dim))
    S = np.memmap(S_path, np.float32, "r+", shape=(rows,))
    Wt = torch.from_numpy(W)
    F, B, dim = len(cards), cfg.batch_size, cfg.dim
    offsets = torch.arange(F * B)
    times = []
    try:
        for i in range(1 + cfg.peer_steps):
            t0 = time.perf_counter()
            ids = batches.ids(i)
            global_ids = torch.from_numpy(ids + np.repeat(base, B))
            pooled = torch.nn.functional.embedding_bag(global_ids, Wt, offsets, mode="sum")  # [F*B, D]
            _ = pooled.view(F, B, dim).transpose(0, 1).reshape(B, F * dim)
            g_rows = pooled  # the loss 1/2 |pooled|^2, as the store's; one row per bag (one id each)
            uniq, inv = torch.unique(global_ids, return_inverse=True)
            g = torch.zeros(uniq.shape[0], dim).index_add_(0, inv, g_rows)
            u = uniq.numpy()
            state = S[u] + (g.numpy() ** 2).mean(axis=1)
            S[u] = state
            W[u] -= (0.01 * g.numpy() / (np.sqrt(state)[:, None] + 1e-8)).astype(np.float32)
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
        out["peer_step_s"] = {"median": stats.median(times), "all": times}
    finally:
        del W, S, Wt
        W_path.unlink(missing_ok=True)
        S_path.unlink(missing_ok=True)
    bar.update(1)


def _check_pool_holds_batches(cfg: LargerThanMemoryConfig, cards: list[int], batches: Batches) -> None:
    """The pool must hold the batches in flight (the one trained, those prefetched), or the
    first lookup fails after minutes of materialising."""
    slots = int(sum(cards) * cfg.chunks * cfg.budget_fraction)
    rows = [batches.distinct_rows(i) for i in range(batches.n)]
    window = cfg.prefetch_depth + 1
    need = max(sum(rows[i : i + window]) for i in range(max(1, len(rows) - window + 1))) * cfg.chunks
    if slots < need:
        raise ConfigError(
            f"larger-than-memory at scale {cfg.scale}: a pool of about {slots:,} chunk slots cannot hold "
            f"{window} batches of {cfg.batch_size} x {len(cards)} ids ({need:,} distinct chunks); "
            "raise the scale or the budget, or lower the batch size or the prefetch depth"
        )


def run_larger_than_memory_bench(cfg: LargerThanMemoryConfig, progress: bool = True) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fiited-ltm-", dir=cfg.directory))
    bar = tqdm(total=5, disable=not progress, desc="larger-than-memory", unit="stage")
    out: dict[str, Any] = {"config": asdict(cfg), "directory": str(root)}
    try:
        cards = [int(c) for c in scaled_cardinalities(cfg.scale)]
        tables = [
            TableConfig(
                f"C{i + 1}",
                dim=cfg.dim,
                chunks=cfg.chunks,
                num_embeddings=n,
                optimizer="rowwise_adagrad",
                learning_rate=0.01,
            )
            for i, n in enumerate(cards)
        ]
        out["rows"] = int(sum(cards))
        out["dense_bytes"] = int(sum(cards)) * cfg.dim * 4
        out["free_disk_bytes"] = shutil.disk_usage(root).free
        out["machine_memory_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        batches = Batches(
            cards,
            cfg.batch_size,
            cfg.zipf_s,
            cfg.seed,
            cfg.warmup + cfg.steps + 3 + max(cfg.prefetch_depth, 1 + cfg.peer_steps),
        )
        _check_pool_holds_batches(cfg, cards, batches)
        dev = io.random_read_rate(str(root / "device-probe.bin"), nbytes=cfg.probe_bytes, seconds=cfg.device_seconds)
        dev["sequential_write_bytes_per_s"] = _sequential_write_rate(str(root / "device-probe-w.bin"), cfg.probe_bytes)
        out["device"] = dev
        bar.update(1)
        _bench_store(cfg, root, tables, batches, out, bar)
        _bench_memmap_peer(cfg, root, cards, batches, out, bar)
        per = out["per_step"]
        record = (cfg.dim // cfg.chunks + 1) * 4  # a chunk's row: its floats and its row-wise Adagrad float
        rows_read = per["slots_read"] * record / (cfg.dim * 4 + cfg.chunks * 4)
        floor = per["read_requests"] / dev["reads_per_s"] + per["bytes_written"] / dev["sequential_write_bytes_per_s"]
        out["io_floor_s"] = {
            "requests_and_sequential_writes": floor,
            "one_read_per_row_moved": rows_read / dev["reads_per_s"]
            + per["bytes_written"] / dev["sequential_write_bytes_per_s"],
        }
        out["ratios"] = {
            "step_vs_io_floor": out["step_s"]["median"] / floor if floor else None,
            "step_vs_memmap_peer": out["step_s"]["median"] / out["peer_step_s"]["median"],
        }
    finally:
        bar.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def format_larger_than_memory_report(out: dict) -> str:
    c, d, per, m, disk = out["config"], out["device"], out["per_step"], out["memory"], out["disk"]
    mib = 2**20
    step, floor = out["step_s"], out["io_floor_s"]["requests_and_sequential_writes"]
    direct = "O_DIRECT" if d["direct"] else "buffered"
    moved = (
        f"{per['read_requests']:,.0f} read requests, {per['slots_read']:,.0f} chunks "
        f"({per['bytes_read'] / mib:.1f} MiB) read, {per['slots_written']:,.0f} chunks "
        f"({per['bytes_written'] / mib:.1f} MiB) written"
    )
    fetched = f"{per['sync_fetched_chunks']:,.0f} fetched synchronously, {per['compacted_chunks']:,.0f} compacted"
    if out.get("hit_rate") is not None:
        fetched += f"; pool hit rate {out['hit_rate']:.1%}"
    lines = [
        f"model: {out['rows']:,} rows x D={c['dim']}, K={c['chunks']}: {out['dense_bytes'] / 1e9:.1f} GB dense, "
        f"pool {c['budget_fraction']:.0%} of it; this machine {out['machine_memory_bytes'] / 2**30:.1f} GiB",
        f"device: {d['reads_per_s']:,.0f} random {d['block_bytes']} B reads/s at queue depth {d['queue_depth']} "
        f"({direct}), {d['sequential_write_bytes_per_s'] / mib:,.0f} MiB/s sequential writes",
        f"materialised in {out['materialise_s']:.0f} s; training step (batch {c['batch_size']} x 26, prefetch "
        f"{c['prefetch_depth']} ahead): median {step['median'] * 1e3:.0f} ms (mean {step['mean'] * 1e3:.0f}, "
        f"max {step['max'] * 1e3:.0f})",
        f"  per step: {moved}, {fetched}",
        f"  IO floor {floor * 1e3:.0f} ms: step / floor {out['ratios']['step_vs_io_floor']:.2f}",
        f"memmap peer: median {out['peer_step_s']['median']:.2f} s a step: store / peer "
        f"{out['ratios']['step_vs_memmap_peer']:.3f}",
        f"disk after a save: {disk['store_dir_bytes'] / 1e9:.2f} GB for {disk['tier_live_bytes'] / 1e9:.2f} GB "
        f"of live tier rows ({disk['vs_live_tier_rows']:.3f}x, the checkpoint included)",
        f"  {disk['tier_segments']} segments, garbage {disk['tier_garbage']:.1%}; save {out['save_s']:.1f} s, "
        f"the next (3 steps later) {out['second_save_s']:.1f} s",
        f"memory: anonymous RSS {m['anon_rss_median'] / 2**30:.2f} GiB against {m['in_memory_arrays'] / 2**30:.2f} "
        f"GiB of pool, optimizer state and entry arrays ({m['anon_rss_vs_arrays']:.3f}x)",
    ]
    return "\n".join(lines)

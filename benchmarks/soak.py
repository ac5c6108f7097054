"""Soak: a writer trains and saves in a loop while readers open, hold and read the store.

    python benchmarks/soak.py --minutes 10 --json docs/results/soak.json

The writer trains a prune-mode store with a disk tier (``on_evict="spill"``) on an
endless id stream (ids keep arriving; dead entries are dropped), saves every
``--save-every`` steps, and after each save records the rows of a fixed probe set
as that checkpoint holds them. Reader processes open the store read-only, read
the probes, keep the handle across several of the writer's saves, read again, and
close. Reported: reader errors (target 0), reads that differ from what the writer
saved in the checkpoint the reader opened (target 0), reads of a held handle that
changed while it was held (target 0), and the writer's resident memory at every
save: after the first save, once a tenth of the run has passed (the index and the
tier have grown to the working set by then), and at the end (target: within 10%),
with the store directory's bytes on disk at the same points.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

PROBES = 2000
D, K = 16, 4


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tables():
    from fiited_store import TableConfig

    return [
        TableConfig("user", D, chunks=K, num_embeddings=50_000, optimizer="adagrad"),
        TableConfig("stream", D, chunks=K, index="hashed", optimizer="adagrad"),
    ]


def _disk_bytes(root: Path) -> int:
    return sum(
        os.stat(os.path.join(d, f)).st_blocks * 512
        for d, _, fs in os.walk(root)
        for f in fs
        if os.path.exists(os.path.join(d, f))
    )


def _probe_ids():
    return {
        "user": np.arange(0, 50_000, 25, dtype=np.int64)[:PROBES],
        "stream": np.arange(PROBES, dtype=np.int64) * 7919,
    }


def _probe(store) -> dict[str, np.ndarray]:
    return {name: store.lookup(name, ids).copy() for name, ids in _probe_ids().items()}


def reader(path: str, expected: str, stop, results, seed: int) -> None:
    from fiited_store import EmbeddingStore

    rnd = random.Random(seed)
    opened = errors = mismatches = changed = checked = 0
    messages: list[str] = []
    while not stop.is_set():
        try:
            with EmbeddingStore.open(path, "r") as r:
                opened += 1
                name, first = r.checkpoint, _probe(r)
                time.sleep(rnd.uniform(0.0, 3.0))  # held across some of the writer's saves
                again = _probe(r)
        except Exception as exc:  # noqa: BLE001 - every failure is what the soak counts
            errors += 1
            messages.append(repr(exc)[:300])
            time.sleep(0.05)
            continue
        if any(not np.array_equal(first[k], again[k]) for k in first):
            changed += 1
        f = Path(expected) / f"{name}.npz"
        deadline = time.time() + 30
        while not f.exists() and time.time() < deadline and not stop.is_set():
            time.sleep(0.05)
        if f.exists():
            with np.load(f) as saved:
                checked += 1
                if any(not np.array_equal(saved[k], first[k]) for k in first):
                    mismatches += 1
    results.put(
        {
            "opened": opened,
            "errors": errors,
            "mismatches": mismatches,
            "changed_while_held": changed,
            "checked": checked,
            "messages": messages[:5],
        }
    )


def writer(path: Path, expected: Path, seconds: float, save_every: int, batch: int, progress: bool) -> dict:
    from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig

    cfg = StoreConfig(
        pruning=DynamicRatio(0.75),
        budget_bytes=8 << 20,
        prune_period=50,
        sample_size=4096,
        on_evict="spill",
        drop_floor=1e-3,
        gamma=0.95,
        memory_budget_bytes=96 << 20,
    )
    rng = np.random.default_rng(0)
    store = EmbeddingStore(_tables(), cfg, path=path)
    saves = steps = 0
    samples: list[tuple[float, int, int]] = []  # (seconds since start, writer RSS, bytes on disk) at each save
    start = time.time()
    end = start + seconds
    bar = tqdm(total=int(seconds), disable=not progress, unit="s", desc="soak")
    last = time.time()
    while time.time() < end:
        user = rng.zipf(1.2, batch) % 50_000
        # an endless stream: a hot head, and a tail of ids that keep arriving
        stream = np.where(
            rng.random(batch) < 0.5,
            (rng.zipf(1.3, batch) % PROBES) * 7919,
            steps * batch + rng.integers(0, batch, batch) + 10**9,
        )
        ids = np.concatenate([user, stream]).astype(np.int64)
        b = store.pooled_lookup(["user", "stream"], ids, np.arange(2 * batch + 1), train=True)
        store.backward(b, rng.standard_normal(b.output.shape).astype(np.float32) * 0.1)
        store.step()
        steps += 1
        if steps % save_every == 0:
            ckpt = store.save().name
            np.savez(expected / f"{ckpt}.tmp.npz", **_probe(store))
            os.replace(expected / f"{ckpt}.tmp.npz", expected / f"{ckpt}.npz")
            saves += 1
            samples.append((time.time() - start, _rss_bytes(), _disk_bytes(path)))
        now = time.time()
        bar.update(int(now - last))
        last += int(now - last)
    bar.close()
    warm = next(x for x in samples if x[0] >= seconds / 10) if samples[-1][0] >= seconds / 10 else samples[-1]
    out = {
        "steps": steps,
        "saves": saves,
        "writer_rss_first_save": samples[0][1],
        "writer_rss_after_a_tenth": warm[1],
        "writer_rss_end": samples[-1][1],
        "disk_bytes_first_save": samples[0][2],
        "disk_bytes_after_a_tenth": warm[2],
        "disk_bytes_end": samples[-1][2],
        "rss_samples": [(round(t, 1), r) for t, r, _ in samples[:: max(len(samples) // 40, 1)]],
        "entries_end": store.stats()["total"]["entries"],
        "dropped_entries": store.counters.dropped_entries,
        "spilled_chunks": store.counters.spilled_chunks,
    }
    store.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the writer trains and saves")
    ap.add_argument("--readers", type=int, default=2, help="reader processes")
    ap.add_argument("--save-every", type=int, default=20, help="writer steps between saves")
    ap.add_argument("--batch", type=int, default=1024, help="ids per feature per step")
    ap.add_argument("--directory", help="where the store is written (default: a temporary directory)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    base = Path(args.directory or tempfile.mkdtemp(prefix="fiited-soak-"))
    path, expected = base / "store", base / "expected"
    expected.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    procs = []
    # the readers start once the first checkpoint exists
    w = ctx.Process(target=_start_readers_later, args=(str(path), str(expected), stop, results, args.readers))
    w.start()
    procs.append(w)
    try:
        figures = writer(path, expected, args.minutes * 60, args.save_every, args.batch, not args.no_progress)
    finally:
        stop.set()
    per_reader = [results.get(timeout=120) for _ in range(args.readers)]
    for p in procs:
        p.join(timeout=60)
    readers = {
        k: sum(r[k] for r in per_reader) for k in ("opened", "errors", "mismatches", "changed_while_held", "checked")
    }
    rss0, rss_warm, rss1 = (
        figures["writer_rss_first_save"],
        figures["writer_rss_after_a_tenth"],
        figures["writer_rss_end"],
    )
    report = {
        "minutes": args.minutes,
        "readers": args.readers,
        **figures,
        **readers,
        "writer_rss_growth_from_first_save": rss1 / rss0 - 1.0,
        "writer_rss_growth_after_a_tenth": rss1 / rss_warm - 1.0,
        "reader_messages": [m for r in per_reader for m in r["messages"]][:5],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if readers["errors"] == readers["mismatches"] == readers["changed_while_held"] == 0 else 1


def _start_readers_later(path: str, expected: str, stop, results, n: int) -> None:
    while not (Path(path) / "fiited.json").exists() and not stop.is_set():
        time.sleep(0.1)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=reader, args=(path, expected, stop, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    sys.exit(main())

"""Should the hashed index keep each key and its table in one 16-byte slot?

The hashed index keeps keys (int64) and table ids (int16) in two arrays, so a found
key touches two cache lines. Interleaving them, one (key, table) pair per 16 bytes,
touches one. This fills a hashed index to the load it grows at (45%), then times
the store's own probe kernel (``find_entries``, prefetching included) on a batch of
present keys, once over the two arrays and once over views of one interleaved
array (the same kernel, the same probe sequence), alternating rounds so that the
machine's noise falls on both.

    python benchmarks/hashed_layout.py [--log2-slots 20 23 25] [--rounds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tqdm import tqdm

from fiited_store.backend import get_backend
from fiited_store.entry_table import EntryTable
from fiited_store.kernels.cpu import find_entries


def measure(log2_slots: int, rounds: int, reps: int, batch: int, tables: int, load: float, seed: int) -> dict:
    cap = 1 << log2_slots
    index = EntryTable(get_backend("cpu"), [0] * tables, [f"t{i}" for i in range(tables)], 4, 1, cap, 0.5)
    rng = np.random.default_rng(seed)
    n = int(cap * load)
    q_tables = rng.integers(0, tables, n).astype(np.int16)
    q_ids = rng.integers(0, 1 << 40, n).astype(np.int64)
    found, _ = index.find(q_tables, q_ids)
    index.insert_missing(q_tables, q_ids, found)
    a = index.arrays
    assert index.capacity == cap, "the index grew: lower --load"
    pick = rng.integers(0, n, batch)
    bt, bi = q_tables[pick].copy(), q_ids[pick].copy()
    pairs = np.empty((cap, 2), np.int64)  # one (key, table) pair per 16 bytes
    pairs[:, 0] = a.keys
    pairs[:, 1] = a.table_ids
    layouts = {"two_arrays": (a.keys, a.table_ids), "interleaved": (pairs[:, 0], pairs[:, 1])}
    outs = {name: np.empty(batch, np.int64) for name in layouts}
    medians: dict[str, list[float]] = {name: [] for name in layouts}
    for name, (keys, tids) in layouts.items():  # compile and warm
        find_entries(a.row_base, a.seen, keys, tids, bt, bi, outs[name])
    for _ in range(rounds):
        for name, (keys, tids) in layouts.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                find_entries(a.row_base, a.seen, keys, tids, bt, bi, outs[name])
                times.append(time.perf_counter() - t0)
            medians[name].append(float(np.median(times)) * 1e3)
    if not np.array_equal(outs["two_arrays"], outs["interleaved"]):
        raise AssertionError("the two layouts found different entries")
    two, inter = np.median(medians["two_arrays"]), np.median(medians["interleaved"])
    return {
        "slots": cap,
        "live": int(index.n_hashed),
        "batch": batch,
        "two_arrays_ms": float(two),
        "interleaved_ms": float(inter),
        "interleaved_vs_two_arrays": float(inter / two),
        "bytes_per_slot": {"two_arrays": 8 + 2, "interleaved": 16},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log2-slots", type=int, nargs="+", default=[20, 23, 25])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=106496, help="present keys per find (the bench shape's lookups)")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--load", type=float, default=0.45)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    results = []
    for log2 in tqdm(args.log2_slots, desc="index sizes", unit="size"):
        r = measure(log2, args.rounds, args.reps, args.batch, args.tables, args.load, args.seed)
        results.append(r)
        tqdm.write(
            f"{r['slots']:>11,} slots, {r['live']:>11,} keys: two arrays {r['two_arrays_ms']:.3f} ms, "
            f"interleaved {r['interleaved_ms']:.3f} ms, ratio {r['interleaved_vs_two_arrays']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""The CPU figures of docs/benchmarks.md: ``fiited-store bench`` run several times, medians taken.

Each ratio is measured inside one run (store and peer on the same machine state);
docs/benchmarks.md reports the median of the per-run ratios, and keeps every run's ratios.

    python benchmarks/bench_medians.py --runs 3 --out docs/results/bench_cpu_medians.json \\
        --last-run docs/results/bench_cpu.json

This machine is shared and noisy: single runs of one ratio have differed by 1.7x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics as st
import subprocess
import sys
import tempfile
from pathlib import Path

TIMINGS = [
    "gather_lookup",
    "torch_embedding_bag",
    "fbgemm_forward",
    "store_lookup",
    "store_hashed_lookup",
    "torch_sparse_sgd_step",
    "fbgemm_rowwise_adagrad_step",
    "store_train_step",
    "store_hashed_train_step",
]


def medians(runs: list[dict]) -> dict:
    mem = runs[-1]["memory_at_93.75"]
    return {
        "ms": {k: st.median(r[k]["median_ms"] for r in runs) for k in TIMINGS if k in runs[0]},
        "ratios": {k: st.median(r["ratios"][k] for r in runs) for k in runs[0]["ratios"]},
        "prune_s": st.median(r["prune_pass"]["seconds"] for r in runs),
        "prune2_s": st.median(r["prune_pass"]["second_pass_seconds"] for r in runs),
        "per_run": [r["ratios"] for r in runs],
        "prune_per_run_s": [r["prune_pass"]["seconds"] for r in runs],
        "memory": {
            "direct": mem["direct"]["vs_dense"],
            "direct_opt": mem["direct"]["vs_dense_with_optimizer"],
            "hashed": mem["hashed"]["vs_dense"],
            "hashed_every": mem["hashed"]["every_row"]["vs_dense"],
            "hashed_entries": mem["hashed"]["entries"],
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="docs/results/bench_cpu_medians.json")
    p.add_argument("--last-run", default=None, help="also keep the last run's whole report here")
    p.add_argument("--from-json", nargs="*", default=None, help="take the medians of these reports instead of running")
    args = p.parse_args()
    if args.from_json:
        paths = [Path(x) for x in args.from_json]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="fiited-bench-runs-"))
        paths = []
        for i in range(args.runs):
            path = tmp / f"run{i + 1}.json"
            print(f"bench run {i + 1} of {args.runs}", flush=True)
            subprocess.run(
                [sys.executable, "-m", "fiited_store.cli", "bench", "--no-progress", "--json", str(path)], check=True
            )
            paths.append(path)
    runs = [json.loads(x.read_text()) for x in paths]
    out = medians(runs)
    Path(args.out).write_text(json.dumps(out, indent=2))
    if args.last_run:
        shutil.copyfile(paths[-1], args.last_run)
    print(json.dumps({k: out[k] for k in ("ratios", "prune_s", "prune2_s", "memory")}, indent=1))


if __name__ == "__main__":
    main()

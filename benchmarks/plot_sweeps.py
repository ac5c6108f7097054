"""One plot and one table from several sweeps of the same dataset (``fiited-store sweep`` outputs).

    python benchmarks/plot_sweeps.py docs/results/sweep_ml100k docs/results/sweep_ml100k_fiited_floor \
        --ratios 0.5 0.75 0.8125 0.875 0.9375 --out docs/results/quality_ml100k.png

Each directory's ``sweep.csv`` is read; a method measured in two of them is taken
from the later one. Prints the merged markdown table (AUC and the store's memory).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fiited_store.experiments.sweep import markdown_table, plot_sweep

NUMERIC = ("ratio", "auc", "store_vs_dense_with_optimizer", "training_vs_dense")


def read(directory: Path) -> list[dict]:
    rows = []
    with open(directory / "sweep.csv", newline="") as f:
        for r in csv.DictReader(f):
            for k in NUMERIC:
                if r.get(k):
                    r[k] = float(r[k])
                else:
                    r.pop(k, None)
            rows.append(r)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", type=Path, help="sweep output directories")
    p.add_argument("--ratios", nargs="+", type=float, required=True)
    p.add_argument("--out", type=Path, required=True, help="the plot (.png)")
    args = p.parse_args()
    by_method: dict[str, list[dict]] = {}
    for d in args.sweeps:
        rows = read(d)
        for m in dict.fromkeys(r["method"] for r in rows):
            by_method[m] = [r for r in rows if r["method"] == m]
    results = [r for rows in by_method.values() for r in rows]
    methods = list(by_method)
    plot_sweep(results, methods, args.ratios, args.out)
    print(markdown_table(results, methods, args.ratios))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

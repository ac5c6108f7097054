"""``fiited-store sweep``: every method at every pruning ratio and seed, as CSV, markdown and a plot."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import plotting
from .config import TrainConfig
from .train import run


def sweep(
    base: TrainConfig,
    methods: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    out_dir: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every method at every ratio and seed (dense once per seed); writes CSV, markdown and a plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in seeds:
        if "dense" in methods:
            jobs.append(replace(base, method="dense", ratio=0.0, seed=seed))
        for m in methods:
            if m != "dense":
                jobs.extend(replace(base, method=m, ratio=r, seed=seed) for r in ratios)
    results = []
    bar = tqdm(total=len(jobs), disable=not progress, desc="sweep", unit="run", file=sys.stderr)
    csv_path = out_dir / "sweep.csv"
    for job in jobs:
        results.append(run(job, progress=False))
        bar.update(1)
        bar.set_postfix(method=job.method, ratio=job.ratio, auc=f"{results[-1]['auc']:.4f}")
        fields = list(dict.fromkeys(k for r in results for k in r))
        with open(csv_path, "w", newline="") as f:  # rewritten after every run: a long sweep keeps its results
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(results)
    bar.close()
    (out_dir / "sweep.md").write_text(markdown_table(results, methods, ratios))
    if plotting.available():
        plot_sweep(results, methods, ratios, out_dir / "sweep.png")
    return results


def _stats(results, method, ratio):
    v = [r["auc"] for r in results if r["method"] == method and (method == "dense" or r["ratio"] == ratio)]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else None


def _cell(s) -> str:
    """mean ± sd over seeds; a single run has no spread to show."""
    return f"{s[0]:.4f}" if s[2] == 1 else f"{s[0]:.4f} ± {s[1]:.4f}"


def markdown_table(results, methods, ratios) -> str:
    pruned = [m for m in methods if m != "dense"]
    lines = []
    dense = _stats(results, "dense", 0.0)
    if dense:
        lines.append(f"Dense (unpruned) test AUC: {_cell(dense)}\n")
    lines.append("| pruning ratio | " + " | ".join(pruned) + " |")
    lines.append("|---|" + "---|" * len(pruned))
    for r in ratios:
        cells = []
        for m in pruned:
            s = _stats(results, m, r)
            cells.append("" if s is None else _cell(s))
        lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
    counts = [(_stats(results, m, r) or (0, 0, 0))[2] for m in methods for r in (ratios if m != "dense" else [0.0])]
    n = max(counts, default=0)
    what = "one seed, so no spread" if n == 1 else f"mean ± standard deviation over {n} seeds"
    out = "\n".join(lines) + f"\n\nTest AUC, {what}.\n"
    stores = [m for m in pruned if any("store_vs_dense_with_optimizer" in r for r in results if r["method"] == m)]
    if stores:
        mem = ["| pruning ratio | " + " | ".join(stores) + " |", "|---|" + "---|" * len(stores)]
        for r in ratios:
            v = [
                [
                    x["store_vs_dense_with_optimizer"]
                    for x in results
                    if x["method"] == m and x["ratio"] == r and "store_vs_dense_with_optimizer" in x
                ]
                for m in stores
            ]
            mem.append(f"| {r:g} | " + " | ".join(f"{np.mean(x):.3f}" if x else "" for x in v) + " |")
        out += (
            "\nThe store's memory (pool, optimizer state, entry index) against the dense weights plus the same "
            "optimizer's state:\n\n" + "\n".join(mem) + "\n"
        )
    return out


def plot_sweep(results, methods, ratios, path: Path) -> None:
    from ..plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = _stats(results, "dense", 0.0)
    if dense:
        ax.axhline(dense[0], color="black", lw=1, ls="--", label="dense (unpruned)")
        ax.axhspan(dense[0] - 0.001, dense[0] + 0.001, color="grey", alpha=0.2, label="dense ± 0.001")
    for m in methods:
        if m == "dense":
            continue
        pts = [(r, *_stats(results, m, r)[:2]) for r in ratios if _stats(results, m, r)]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
    ax.set_xlabel("pruning ratio (fraction of the dense embedding size removed)")
    ax.set_ylabel("test AUC")
    ax.set_title("Model quality against pruning ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

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
from .train import embeddings_of, load_dataset, run

#: methods whose size follows one number, so that they can be given a training memory
MEMORY_MATCHED = ("small-dim", "md", "hashing", "qr")
#: store methods --equal-memory also matches (:func:`store_matched_ratio`)
STORE_MATCHED = ("adaembed",)


def sweep(
    base: TrainConfig,
    methods: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    out_dir: Path,
    progress: bool = True,
    equal_memory: str | None = None,
) -> list[dict[str, Any]]:
    """Every method at every ratio and seed (dense once per seed); writes CSV, markdown and a plot.

    With ``equal_memory`` (a method), the methods of :data:`MEMORY_MATCHED` and
    :data:`STORE_MATCHED` are given, at
    each ratio and seed, the training memory that method's run took there instead of the
    nominal ratio: they run at the ratio whose weights and optimizer state are that share of
    the dense baseline's (:func:`memory_matched_ratio`, the projections aside), and the row
    keeps the nominal ratio in ``ratio`` and the one run in ``memory_matched_ratio``; a store
    method runs at :func:`store_matched_ratio`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    matched = [m for m in methods if equal_memory and m in MEMORY_MATCHED + STORE_MATCHED and m != equal_memory]
    jobs: list[tuple[TrainConfig, float | None]] = []  # (run, nominal ratio when memory-matched)
    for seed in seeds:
        if "dense" in methods:
            jobs.append((replace(base, method="dense", ratio=0.0, seed=seed), None))
        for r in ratios:
            if equal_memory:  # the reference first: the others' memory follows from its run
                jobs.append((replace(base, method=equal_memory, ratio=r, seed=seed), None))
            for m in methods:
                if m not in ("dense", equal_memory):
                    jobs.append((replace(base, method=m, ratio=r, seed=seed), r if m in matched else None))
    results: list[dict[str, Any]] = []
    reference: dict[tuple[int, float], float] = {}  # (seed, ratio) -> the reference's training memory
    bar = tqdm(total=len(jobs), disable=not progress, desc="sweep", unit="run", file=sys.stderr)
    csv_path = out_dir / "sweep.csv"
    for job, nominal in jobs:
        if nominal is not None:
            given = reference[(job.seed, nominal)]
            matching = store_matched_ratio if job.method in STORE_MATCHED else memory_matched_ratio
            job = replace(job, ratio=matching(given, job))
        result = run(job, progress=False)
        if nominal is not None:
            result["memory_matched_ratio"], result["ratio"] = job.ratio, nominal
        elif job.method == equal_memory:
            reference[(job.seed, job.ratio)] = result["training_vs_dense"]
        results.append(result)
        bar.update(1)
        bar.set_postfix(method=job.method, ratio=f"{job.ratio:.4g}", auc=f"{result['auc']:.4f}")
        fields = list(dict.fromkeys(k for r in results for k in r))
        with open(csv_path, "w", newline="") as f:  # rewritten after every run: a long sweep keeps its results
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(results)
    bar.close()
    (out_dir / "sweep.md").write_text(markdown_table(results, methods, ratios, equal_memory))
    if plotting.available():
        plot_sweep(results, methods, ratios, out_dir / "sweep.png")
    return results


def memory_matched_ratio(training_vs_dense: float, cfg: TrainConfig) -> float:
    """The ratio at which ``cfg.method``'s torch tables and their state take m =
    ``training_vs_dense`` of dense weights with element-wise Adagrad's state (projections
    aside): 1 - m with element-wise Adagrad (a float of state per weight, as the
    baseline); row-wise, a float per row: 1 - 2m / (1 + 1/D) for rows of D (hashing, qr,
    md's widest), 1 - 2m + 1/D for small-dim's rows of D (1 - r)."""
    m = training_vs_dense
    if cfg.optimizer == "adagrad":
        kept = m
    elif cfg.method == "small-dim":
        kept = 2.0 * m - 1.0 / cfg.dim
    else:
        kept = 2.0 * m / (1.0 + 1.0 / cfg.dim)
    return min(max(1.0 - kept, 0.0), 1.0 - 1e-9)


def store_matched_ratio(training_vs_dense: float, cfg: TrainConfig) -> float:
    """The ratio at which the store method ``cfg.method`` takes m = ``training_vs_dense``
    of dense weights with element-wise Adagrad's state. The pool, its optimizer state and
    its slots' cells grow with the kept fraction and the entries of the declared rows do
    not, so two stores built untrained, at 50% and 90%, give the line."""
    _, _, _, names, cards, counts = load_dataset(cfg)
    yardstick = 2 * sum(cards) * cfg.dim * 4
    (x0, y0), (x1, y1) = [
        (1.0 - r, embeddings_of(replace(cfg, ratio=r), names, cards, counts).training_bytes() / yardstick)
        for r in (0.5, 0.9)
    ]
    kept = x0 + (training_vs_dense - y0) * (x1 - x0) / (y1 - y0)
    return min(max(1.0 - kept, 0.0), 1.0 - 1e-6)


def _stats(results, method, ratio):
    v = [r["auc"] for r in results if r["method"] == method and (method == "dense" or r["ratio"] == ratio)]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else None


def _memory(results, method, ratio) -> float | None:
    """Mean training memory against the dense baseline's, over the seeds of one cell."""
    v = [x["training_vs_dense"] for x in results if x["method"] == method and x["ratio"] == ratio]
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def _cell(s) -> str:
    """mean ± sd over seeds; a single run has no spread to show."""
    return f"{s[0]:.4f}" if s[2] == 1 else f"{s[0]:.4f} ± {s[1]:.4f}"


def markdown_table(results, methods, ratios, equal_memory: str | None = None) -> str:
    pruned = [m for m in methods if m != "dense"]
    lines = []
    if equal_memory:
        given = ", ".join(m for m in pruned if m in MEMORY_MATCHED + STORE_MATCHED and m != equal_memory)
        lines.append(
            f"At equal training memory: {given} are given, at each ratio and seed, the training memory "
            f"{equal_memory}'s run took there (the rows name the nominal ratio).\n"
        )
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
    every = [m for m in pruned if any("training_vs_dense" in x for x in results if x["method"] == m)]
    if every:
        mem = ["| pruning ratio | " + " | ".join(every) + " |", "|---|" + "---|" * len(every)]
        for r in ratios:
            v = [_memory(results, m, r) for m in every]
            mem.append(f"| {r:g} | " + " | ".join("" if x is None else f"{x:.4f}" for x in v) + " |")
        out += (
            "\nEach method's whole training memory (weights, optimizer state, index, maps) against the dense "
            "weights plus Adagrad's state (the dense baseline's training memory), mean over seeds:\n\n"
            + "\n".join(mem)
            + "\n"
        )
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

    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = _stats(results, "dense", 0.0)
    if dense:
        for a in (ax, ax_mem):
            a.axhline(dense[0], color="black", lw=1, ls="--", label="dense (unpruned)")
            a.axhspan(dense[0] - 0.001, dense[0] + 0.001, color="grey", alpha=0.2, label="dense ± 0.001")
    for m in methods:
        if m == "dense":
            continue
        pts = [(r, *_stats(results, m, r)[:2], _memory(results, m, r)) for r in ratios if _stats(results, m, r)]
        if pts:
            x, y, e, mem = zip(*pts)
            line = ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
            at = [(mm, yy, ee) for mm, yy, ee in zip(mem, y, e) if mm is not None]
            if at:
                mx, my, me = zip(*at)
                ax_mem.errorbar(mx, my, yerr=me, marker="o", capsize=3, label=m, color=line[0].get_color())
    ax.set_xlabel("pruning ratio (fraction of the dense embedding size removed)")
    ax.set_ylabel("test AUC")
    ax.set_title("Model quality against pruning ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_mem.set_xscale("log")
    ax_mem.set_xlabel("training memory / dense weights with Adagrad's state")
    ax_mem.set_ylabel("test AUC")
    ax_mem.set_title("Model quality against training memory")
    ax_mem.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

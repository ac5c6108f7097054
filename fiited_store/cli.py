"""The ``fiited-store`` command line.

    fiited-store train                       # the built-in default: a synthetic click stream
    fiited-store train --dataset movielens --path ../shared/data/ml-100k --method fiited-manual --ratio 0.8125
    fiited-store sweep --dataset movielens --path ../shared/data/ml-100k --out results/ml100k
    fiited-store bench --json bench.json
    fiited-store inspect STORE [--json] [--plot dims.png]
    fiited-store verify STORE
    fiited-store compact STORE
    fiited-store export STORE OUT --format dense|compact
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import FiitedError


def _train_args(p: argparse.ArgumentParser) -> None:
    from .models.dlrm import METHODS
    from .train import DATASETS, TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="synthetic (built in, no download), movielens or criteo")
    p.add_argument("--path", help="dataset directory (MovieLens: RecBole atomic files or u.data/u.user/u.item; Criteo: TSV)")
    p.add_argument("--chunks", type=int, default=d.chunks, help="K, chunks per row")
    p.add_argument("--dim", type=int, default=d.dim, help="D, embedding dimension")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over a dataset's training split")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps on the synthetic stream")
    p.add_argument("--lr-embedding", type=float, default=d.lr_embedding)
    p.add_argument("--lr-dense", type=float, default=d.lr_dense)
    p.add_argument("--prune-period", type=int, default=d.prune_period, help="T, steps between prune passes")
    p.add_argument("--gamma", type=float, default=d.gamma, help="utility decay")
    p.add_argument("--steepness", type=float, default=d.steepness, help="slope of the manual per-chunk ratios, 0..1")
    p.add_argument("--utility", choices=("gradient", "access", "shared"), default=d.utility)
    p.add_argument("--criteo-limit", type=int, default=d.criteo_limit, help="lines of Criteo to read")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(methods_choices=METHODS)


def _config_from(args, **override):
    from .train import TrainConfig

    return TrainConfig(dataset=args.dataset, path=args.path, chunks=args.chunks, dim=args.dim, batch_size=args.batch_size,
                       epochs=args.epochs, steps=args.steps, lr_embedding=args.lr_embedding, lr_dense=args.lr_dense,
                       prune_period=args.prune_period, gamma=args.gamma, steepness=args.steepness,
                       utility=args.utility, criteo_limit=args.criteo_limit, **override)


def cmd_train(args) -> int:
    from .train import format_result, run

    result = run(_config_from(args, method=args.method, ratio=args.ratio, seed=args.seed), progress=not args.no_progress)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


def cmd_sweep(args) -> int:
    from .train import markdown_table, sweep

    base = _config_from(args)
    results = sweep(base, args.methods, args.ratios, args.seeds, Path(args.out), progress=not args.no_progress)
    print(markdown_table(results, args.methods, args.ratios))
    print(f"wrote {args.out}/sweep.csv, sweep.md and sweep.png")
    return 0


def cmd_bench(args) -> int:
    from .bench import (BenchConfig, TierBenchConfig, format_report, format_tier_report, run_bench,
                        run_tier_bench)

    if args.suite == "tiers":
        report = run_tier_bench(TierBenchConfig(scale=args.scale if args.scale != 1.0 else TierBenchConfig.scale,
                                                batch_size=args.batch_size, dim=args.dim, K=args.chunks,
                                                budget_fraction=args.budget, seed=args.seed, directory=args.directory),
                                progress=not args.no_progress)
        print(format_tier_report(report))
    else:
        report = run_bench(BenchConfig(scale=args.scale, batch_size=args.batch_size, dim=args.dim, chunks=args.chunks,
                                       budget_fraction=args.budget, repeats=args.repeats, warmup=args.warmup,
                                       peers=tuple(args.peers), prune_entries=args.prune_entries, seed=args.seed),
                           progress=not args.no_progress)
        print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def cmd_inspect(args) -> int:
    from .store import EmbeddingStore
    from .tools import format_inspection, inspect_store, plot_inspection

    with EmbeddingStore.open(args.path, "r") as store:
        info = inspect_store(store)
        if args.plot:
            plot_inspection(store, info, Path(args.plot))
    print(json.dumps(info, indent=2, default=float) if args.json else format_inspection(info))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from .tools import verify_store

    problems = verify_store(Path(args.path), progress=not args.no_progress)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    print(f"OK {args.path}: every invariant holds")
    return 0


def cmd_compact(args) -> int:
    from .tools import compact_store

    r = compact_store(Path(args.path), progress=not args.no_progress)
    print(f"{args.path}: {r['bytes_before']:,} bytes -> {r['bytes_after']:,} bytes "
          f"({r['bytes_after'] / max(r['bytes_before'], 1):.1%}); entries {r['entries_before']:,} -> {r['entries_after']:,} "
          f"({r['dropped_entries']:,} dead entries dropped)")
    return 0


def cmd_export(args) -> int:
    from .tools import export_store

    s = export_store(Path(args.path), Path(args.out), args.format, progress=not args.no_progress)
    for name, t in s["tables"].items():
        print(f"{name}: {t['rows']:,} rows, {t['kept_chunks']:,} chunks, {t['bytes']:,} bytes")
    print(f"wrote {args.out} ({s['format']}, {s['bytes_on_disk']:,} bytes on disk)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models.dlrm import METHODS
    from .train import SWEEP_RATIOS

    parser = argparse.ArgumentParser(prog="fiited-store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DLRM and print quality, memory and speed")
    _train_args(p)
    p.add_argument("--method", choices=METHODS, default="fiited-manual")
    p.add_argument("--ratio", type=float, default=0.75, help="pruning ratio: fraction of the dense embedding size removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="every method x ratio x seed; CSV, markdown table and AUC-vs-ratio plot")
    _train_args(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ratios", nargs="+", type=float, default=list(SWEEP_RATIOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="results/sweep")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="lookup and training-step throughput against the peers, in one run")
    p.add_argument("--suite", choices=("embeddings", "tiers"), default="embeddings",
                   help="embeddings: lookup, step, prune, memory against the peers; tiers: disk tier and cache mode")
    p.add_argument("--directory", help="tiers suite: where the disk tier is written (a temporary directory by default)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the Criteo Kaggle cardinalities (1.0 = 33.8M rows; the tiers suite defaults to 0.05)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.25, help="pool budget as a fraction of the dense size")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prune-entries", type=int, default=10_000_000, help="entries for the prune-pass measurement")
    p.add_argument("--peers", nargs="*", default=["torch", "gather", "torch-sparse", "fbgemm"],
                   help="which peers to run (fbgemm needs fbgemm-gpu-cpu==1.8.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure and ratio to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="tables, residency, kept dimensions, utilities, bytes, fragmentation")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="draw the kept-dimension and utility histograms to this PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every invariant and array; exit 1 naming what is wrong")
    p.add_argument("path")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compact", help="drop dead entries, defragment pool and disk tier, shrink the files")
    p.add_argument("path")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("export", help="an inference export without utilities or optimizer state")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--format", choices=("dense", "compact"), default="dense")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FiitedError as exc:
        print(f"fiited-store {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"fiited-store {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

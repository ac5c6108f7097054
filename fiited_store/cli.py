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
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import ConfigError, FiitedError
from .experiments.config import (
    DATASETS,
    EMBEDDING_OPTIMIZERS,
    METHODS,
    NORMALIZATIONS,
    ON_EVICT,
    READMISSIONS,
    SWEEP_RATIOS,
    UTILITIES,
    TrainConfig,
)

# Nothing here imports torch, numba or zarr at module level: `fiited-store --help`
# and argument errors answer at once, and every command imports what it needs.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside every option; the description keeps its line breaks."""


def _number(kind: Callable, what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, "a positive int", lambda v: v > 0)
nonnegative_int = _number(int, "an int >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
pruning_ratio = _number(float, "a ratio in [0, 1)", lambda v: 0 <= v < 1)
fraction = _number(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)
unit_interval = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
open_unit = _number(float, "a number in (0, 1)", lambda v: 0 < v < 1)


def _writable_file(text: str) -> str:
    """A file path that can be written now, so that a long run does not fail at its end."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    elif not p.parent.is_dir() or not os.access(p.parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {str(p.parent)!r} is not a writable directory")
    return text


def _writable_dir(text: str) -> str:
    """A directory that exists and is writable, or that can be created (with its parents)."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {str(probe)!r} is not writable")
    return text


def _train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="synthetic (built in, no download), mixed (built in: small predictive features beside "
        "long-tailed ones), movielens or criteo",
    )
    p.add_argument(
        "--path",
        help="dataset directory (MovieLens: RecBole atomic files or u.data/u.user/u.item; "
        "Criteo: TSV); needed by movielens and criteo",
    )
    p.add_argument("--chunks", type=positive_int, default=d.chunks, help="K, chunks per row (dim %% chunks == 0)")
    p.add_argument("--dim", type=positive_int, default=d.dim, help="D, embedding dimension")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per training step")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over a dataset's training split")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="training steps on the synthetic stream")
    p.add_argument(
        "--lr-embedding",
        type=positive_float,
        default=d.lr_embedding,
        help="learning rate of the embeddings' optimizer (Adagrad)",
    )
    p.add_argument(
        "--lr-dense", type=positive_float, default=d.lr_dense, help="learning rate of the dense layers (Adam)"
    )
    p.add_argument(
        "--prune-period",
        type=nonnegative_int,
        default=d.prune_period,
        help="T, steps between prune passes (0: never prune)",
    )
    p.add_argument(
        "--optimizer",
        choices=EMBEDDING_OPTIMIZERS,
        default=d.optimizer,
        help="every method's embedding optimizer: Adagrad with one accumulator per weight, or "
        "row-wise (one per row, per chunk in the store, as FBGEMM's); memory is reported against "
        "dense weights with element-wise Adagrad's state either way",
    )
    p.add_argument("--gamma", type=open_unit, default=d.gamma, help="utility decay per step")
    p.add_argument(
        "--steepness",
        type=unit_interval,
        default=d.steepness,
        help="slope of the manual per-chunk ratios: 0 flat, 1 steepest",
    )
    p.add_argument(
        "--utility",
        choices=UTILITIES,
        default=d.utility,
        help="what a chunk's utility counts: gradient norms times accesses, accesses, or one per row",
    )
    p.add_argument("--criteo-limit", type=positive_int, default=d.criteo_limit, help="lines of Criteo to read")
    p.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default=d.table_normalization,
        help="FIITED: none (the paper's rule, one scale for every table) or mean (each table's "
        "utilities divided by its own mean)",
    )
    p.add_argument(
        "--small-table-rows",
        type=nonnegative_int,
        default=d.small_table_rows,
        help="FIITED: tables of at most this many rows keep every chunk (0: off)",
    )
    p.add_argument(
        "--readmission",
        choices=READMISSIONS,
        default=d.readmission,
        help="FIITED: a chunk that wins a slot back at a prune starts at its first values, at zero, "
        "or at values drawn anew",
    )
    p.add_argument(
        "--min-chunks",
        type=nonnegative_int,
        default=d.min_chunks,
        help="FIITED: every row of every table keeps its first M chunks (a floor: with a large K, "
        "every row keeps a few dimensions and the rest of the budget follows utility)",
    )
    p.add_argument(
        "--project",
        action="store_true",
        help="FIITED: map each feature's pooled row through a learned D x D matrix, as Mixed-Dimension "
        "embeddings map each table (always on for fiited-floor)",
    )
    p.add_argument(
        "--floor-dim",
        type=nonnegative_int,
        default=d.floor_dim,
        help="FIITED: every row keeps its first F dimensions (a chunk of its own width); the other "
        "D - F are split into K chunks that utility decides (0: the paper's layout)",
    )
    p.add_argument(
        "--shared-floor",
        type=fraction,
        default=d.shared_floor,
        help="FIITED: past the ratio where every row's floor fits the budget, the floor is shared "
        "through a hash and takes this share of the budget",
    )
    p.add_argument(
        "--on-evict",
        choices=ON_EVICT,
        default=d.on_evict,
        help="FIITED: a pruned chunk is discarded (the paper) or spilled to the disk tier, to come back "
        "with its trained values when it wins a slot again",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_from(args, **override) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        path=args.path,
        chunks=args.chunks,
        dim=args.dim,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps=args.steps,
        lr_embedding=args.lr_embedding,
        lr_dense=args.lr_dense,
        optimizer=args.optimizer,
        prune_period=args.prune_period,
        gamma=args.gamma,
        steepness=args.steepness,
        utility=args.utility,
        criteo_limit=args.criteo_limit,
        table_normalization=args.normalization,
        small_table_rows=args.small_table_rows,
        readmission=args.readmission,
        on_evict=args.on_evict,
        min_chunks=args.min_chunks,
        floor_dim=args.floor_dim,
        shared_floor=args.shared_floor,
        project=args.project,
        **override,
    )


def _start_compiling():
    """The store's kernels compiled before the first step, in forked processes while this one
    reads the data and builds the model (a fresh install only: numba caches them), so that no
    step time measures the compiler. Under torchrun every rank would compile the same
    kernels at once: the ranks compile lazily there. Returns what to call before the first step."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    from .kernels.warmup import KernelCompilation

    # this process first imports torch, makes the data and builds the model: a few seconds
    return KernelCompilation(out=sys.stderr, head_start=5.0).finish


def cmd_train(args) -> int:
    # dense does not prune: its ratio is 0 whatever --ratio says
    ratio = 0.0 if args.method == "dense" else args.ratio
    cfg = _config_from(args, method=args.method, ratio=ratio, seed=args.seed)  # checked before any work
    compiled = _start_compiling()
    from .experiments.train import format_result, run  # torch: after the fork of the compilers

    result = run(cfg, progress=not args.no_progress, before_training=compiled)
    if result.get("world_size", 1) > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:  # under torchrun: rank 0 reports for all
            return 0
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


def cmd_sweep(args) -> int:
    from dataclasses import replace

    from .plotting import INSTALL_HINT, available

    base = _config_from(args, method=args.methods[0])
    if args.equal_memory and args.equal_memory not in args.methods:
        raise ConfigError(f"--equal-memory {args.equal_memory!r} is not among --methods {args.methods}")
    for m in args.methods:  # every run's values checked before the first run
        for r in args.ratios:
            replace(base, method=m, ratio=r)
    plots = available()
    compiled = _start_compiling()
    from .experiments.sweep import markdown_table, sweep  # torch: after the fork of the compilers

    if compiled is not None:
        compiled()

    if not plots:
        print(f"fiited-store sweep: sweep.png will not be drawn ({INSTALL_HINT})", file=sys.stderr)
    results = sweep(
        base,
        args.methods,
        args.ratios,
        args.seeds,
        Path(args.out),
        progress=not args.no_progress,
        equal_memory=args.equal_memory,
    )
    print(markdown_table(results, args.methods, args.ratios, args.equal_memory))
    print(f"wrote {args.out}/sweep.csv, sweep.md" + (" and sweep.png" if plots else ""))
    return 0


def cmd_bench(args) -> int:
    if args.suite != "larger-than-memory":  # the other suites' shape
        args.dim = 64 if args.dim is None else args.dim
        args.budget = 0.25 if args.budget is None else args.budget
        args.repeats = 20 if args.repeats is None else args.repeats

    if args.suite == "larger-than-memory":
        from .experiments.bench.larger_than_memory import (
            LargerThanMemoryConfig,
            format_larger_than_memory_report,
            run_larger_than_memory_bench,
        )

        d = LargerThanMemoryConfig()
        report = run_larger_than_memory_bench(
            LargerThanMemoryConfig(
                scale=args.scale,
                dim=args.dim if args.dim is not None else d.dim,
                chunks=args.chunks,
                budget_fraction=args.budget if args.budget is not None else d.budget_fraction,
                batch_size=args.batch_size,
                steps=args.repeats if args.repeats is not None else d.steps,
                warmup=args.warmup,
                prefetch_depth=args.prefetch_depth,
                peer_steps=args.peer_steps,
                directory=args.directory,
                seed=args.seed,
            ),
            progress=not args.no_progress,
        )
        print(format_larger_than_memory_report(report))
    elif args.suite == "distributed":
        from .experiments.bench.distributed import DistBenchConfig, format_distributed_report, run_distributed_bench

        report = run_distributed_bench(
            DistBenchConfig(
                worlds=tuple(args.worlds),
                scale=args.scale if args.scale != 1.0 else DistBenchConfig.scale,
                batch_size=args.batch_size,
                dim=args.dim,
                chunks=args.chunks,
                budget_fraction=args.budget,
                steps=args.repeats,
                warmup=args.warmup,
                seed=args.seed,
            ),
            progress=not args.no_progress,
        )
        print(format_distributed_report(report))
    elif args.suite == "tiers":
        from .experiments.bench.tiers import TierBenchConfig, format_tier_report, run_tier_bench

        report = run_tier_bench(
            TierBenchConfig(
                scale=args.scale if args.scale != 1.0 else TierBenchConfig.scale,
                batch_size=args.batch_size,
                dim=args.dim,
                K=args.chunks,
                budget_fraction=args.budget,
                seed=args.seed,
                directory=args.directory,
            ),
            progress=not args.no_progress,
        )
        print(format_tier_report(report))
    else:
        from .experiments.bench.cpu import BenchConfig, format_report, run_bench

        report = run_bench(
            BenchConfig(
                scale=args.scale,
                batch_size=args.batch_size,
                dim=args.dim,
                chunks=args.chunks,
                budget_fraction=args.budget,
                repeats=args.repeats,
                warmup=args.warmup,
                peers=tuple(args.peers),
                prune_entries=args.prune_entries,
                seed=args.seed,
            ),
            progress=not args.no_progress,
        )
        print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def _sharded(path: str) -> bool:
    from .distributed.checkpoint import is_sharded

    return is_sharded(path)


def cmd_inspect(args) -> int:
    from .store import EmbeddingStore
    from .tools import format_inspection, inspect_store, plot_inspection

    if _sharded(args.path):
        from .distributed.tools import format_sharded_inspection, inspect_sharded

        if args.plot:
            raise ValueError("--plot draws one store: inspect a shard directory (PATH/w0002-shard-00000) to plot it")
        info = inspect_sharded(Path(args.path))
        print(json.dumps(info, indent=2, default=float) if args.json else format_sharded_inspection(info))
        return 0
    if args.plot:
        from .plotting import INSTALL_HINT, available

        if not available():  # before the store is read
            raise ValueError(f"--plot: {INSTALL_HINT}")
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

    if _sharded(args.path):
        from .distributed.tools import verify_sharded

        problems = verify_sharded(Path(args.path), progress=not args.no_progress)
    else:
        problems = verify_store(Path(args.path), progress=not args.no_progress)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    print(f"OK {args.path}: every invariant holds")
    return 0


def cmd_compact(args) -> int:
    from .tools import compact_store

    if _sharded(args.path):
        from .distributed.tools import compact_sharded

        r = compact_sharded(Path(args.path), progress=not args.no_progress)
    else:
        r = compact_store(Path(args.path), progress=not args.no_progress)
    print(
        f"{args.path}: {r['bytes_before']:,} bytes -> {r['bytes_after']:,} bytes "
        f"({r['bytes_after'] / max(r['bytes_before'], 1):.1%}); "
        f"entries {r['entries_before']:,} -> {r['entries_after']:,} "
        f"({r['dropped_entries']:,} dead entries dropped)"
    )
    return 0


def cmd_reshard(args) -> int:
    from .distributed.tools import reshard_offline

    if not _sharded(args.path):
        raise ValueError(f"{args.path} is not a sharded store (no fiited-sharded.json)")
    r = reshard_offline(Path(args.path), args.world_size, progress=not args.no_progress)
    if not r["moved"]:
        print(f"{args.path} already has {args.world_size} shards: nothing to do")
    else:
        print(f"{args.path}: {args.world_size} shards, entries per shard {r['entries_per_shard']}")
    return 0


def cmd_export(args) -> int:
    from .tools import export_store

    if _sharded(args.path):
        raise ValueError("export reads one store: export each shard directory (PATH/w0002-shard-00000 ...)")

    s = export_store(Path(args.path), Path(args.out), args.format, progress=not args.no_progress)
    for name, t in s["tables"].items():
        print(f"{name}: {t['rows']:,} rows, {t['kept_chunks']:,} chunks, {t['bytes']:,} bytes")
    print(f"wrote {args.out} ({s['format']}, {s['bytes_on_disk']:,} bytes on disk)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fiited-store", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    p = command("train", "train a DLRM and print quality, memory and speed")
    _train_args(p)
    p.add_argument(
        "--method",
        choices=METHODS,
        default=TrainConfig().method,
        help="embedding method (fiited-manual and fiited-dynamic are the paper's rule)",
    )
    p.add_argument(
        "--ratio",
        type=pruning_ratio,
        default=0.75,
        help="pruning ratio: fraction of the dense embedding size removed (ignored by dense)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and sampling")
    p.add_argument("--json", type=_writable_file, help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_train)

    p = command("sweep", "every method x ratio x seed; CSV, markdown table and AUC-vs-ratio plot")
    _train_args(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to compare")
    p.add_argument("--ratios", nargs="+", type=pruning_ratio, default=list(SWEEP_RATIOS), help="pruning ratios")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed at every point")
    p.add_argument(
        "--equal-memory",
        choices=METHODS,
        metavar="METHOD",
        help="give small-dim, md, hashing, qr and adaembed the training memory this method's run took at each "
        "ratio and seed, instead of the nominal ratio",
    )
    p.add_argument(
        "--out", type=_writable_dir, default="results/sweep", help="directory for sweep.csv, sweep.md and sweep.png"
    )
    p.set_defaults(func=cmd_sweep)

    p = command("bench", "lookup and training-step throughput against the peers, in one run")
    p.add_argument(
        "--suite",
        choices=("embeddings", "tiers", "distributed", "larger-than-memory"),
        default="embeddings",
        help="embeddings: lookup, step, prune, memory against the peers; tiers: disk tier and cache mode; "
        "distributed: the sharded store at several world sizes (gloo processes on this machine); "
        "larger-than-memory: a cache-mode model bigger than RAM trained from disk (about 50 GB free at scale 1)",
    )
    p.add_argument(
        "--worlds", nargs="+", type=positive_int, default=[1, 2, 4], help="distributed suite: the world sizes to run"
    )
    p.add_argument(
        "--directory",
        type=_writable_dir,
        help="tiers and larger-than-memory suites: where the disk tier is written (default: a temporary directory)",
    )
    p.add_argument(
        "--scale",
        type=positive_float,
        default=1.0,
        help="multiply the Criteo Kaggle cardinalities (1.0 = 33.8M rows; the tiers and distributed "
        "suites default to 0.05; larger-than-memory at 1.0 is a 34.6 GB model, 0.05 a quick run)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4096, help="samples per batch")
    p.add_argument("--dim", type=positive_int, help="D, embedding dimension (64; larger-than-memory: 256)")
    p.add_argument("--chunks", type=positive_int, default=4, help="K, chunks per row")
    p.add_argument(
        "--budget", type=fraction, help="pool budget as a fraction of the dense size (0.25; larger-than-memory: 0.1)"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        help="timed repetitions of each measurement (20; larger-than-memory: 30 training steps)",
    )
    p.add_argument(
        "--prefetch-depth", type=positive_int, default=2, help="larger-than-memory suite: batches prefetched ahead"
    )
    p.add_argument(
        "--peer-steps",
        type=positive_int,
        default=3,
        help="larger-than-memory suite: timed steps of the numpy.memmap peer",
    )
    p.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed repetitions before them")
    p.add_argument(
        "--prune-entries", type=positive_int, default=10_000_000, help="entries for the prune-pass measurement"
    )
    p.add_argument(
        "--peers",
        nargs="*",
        choices=("torch", "gather", "torch-sparse", "fbgemm"),
        default=["torch", "gather", "torch-sparse", "fbgemm"],
        help="which peers to run (fbgemm needs fbgemm-gpu-cpu==1.8.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the ids and gradients")
    p.add_argument("--json", type=_writable_file, help="write every figure and ratio to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = command("inspect", "tables, residency, kept dimensions, utilities, bytes, fragmentation")
    p.add_argument("path", help="store directory (a sharded store: every shard, one merged report)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot",
        type=_writable_file,
        help="draw the kept-dimension and utility histograms, one colour per table, to this PNG",
    )
    p.set_defaults(func=cmd_inspect)

    p = command("verify", "check every invariant and array; exit 1 naming what is wrong")
    p.add_argument("path", help="store directory (a sharded store: every shard, and each key's owner)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = command("compact", "drop dead entries, defragment pool and disk tier, shrink the files")
    p.add_argument("path", help="store directory, opened for writing (a sharded store: every shard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compact)

    p = command("reshard", "rewrite a sharded store for another number of ranks (offline, one process)")
    p.add_argument("path", help="sharded store directory (holds fiited-sharded.json)")
    p.add_argument("world_size", type=positive_int, help="the number of shards to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reshard)

    p = command("export", "an inference export without utilities or optimizer state")
    p.add_argument("path", help="store directory")
    p.add_argument("out", help="new directory to write (never overwritten)")
    p.add_argument(
        "--format",
        choices=("dense", "compact"),
        default="dense",
        help="dense rows, or only the kept chunks and a chunk mask",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (`inspect --json | head`): nothing more to say, and
        # stdout must not raise again when Python flushes it at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except FiitedError as exc:
        print(f"fiited-store {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"fiited-store {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # one line naming the file, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fiited-store {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

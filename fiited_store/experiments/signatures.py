"""The workloads whose kernel signatures ``fiited-store train`` compiles ahead of time
(:mod:`fiited_store.kernels.warmup`), and the command that records them.

    python -m fiited_store.experiments.signatures --record     # rewrite kernels/signatures.json
    python -m fiited_store.experiments.signatures --run train  # what a run compiles that the list lacks

Recording runs each workload in a fresh process with an empty numba cache, so that the
compile seconds kept for balancing the workers are real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..kernels.warmup import SIGNATURE_FILE, compiled_signatures, recorded


def training_workload() -> None:
    """What ``fiited-store train`` runs, small: every method's store verbs, prunes, spilling,
    evaluation and stats."""
    from .config import TrainConfig
    from .train import run

    small = dict(steps=12, prune_period=4, batch_size=64, eval_samples=512, synthetic_cap=400)
    variants = (
        ("fiited-floor", {}),
        ("fiited-manual", {"chunks": 4}),
        ("fiited-dynamic", {}),
        ("adaembed", {}),
        ("fiited-floor", {"on_evict": "spill"}),
        ("fiited-floor", {"dataset": "mixed"}),
    )
    for method, extra in variants:
        run(TrainConfig(method=method, **{**small, **extra}), progress=False)


WORKLOADS = {"train": training_workload}

_RECORDER = """
import json, time
from numba.core import event
from fiited_store.experiments import signatures
from fiited_store.kernels.warmup import compiled_signatures
seconds, started = {}, {}
class Timer(event.Listener):
    def on_start(self, ev):
        started[id(ev.data["dispatcher"]), str(ev.data["args"])] = time.perf_counter()
    def on_end(self, ev):
        t0 = started.pop((id(ev.data["dispatcher"]), str(ev.data["args"])), time.perf_counter())
        name = ev.data["dispatcher"].py_func.__name__
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
event.register("numba:compile", Timer())
signatures.WORKLOADS[%r]()
print(json.dumps({"signatures": compiled_signatures(), "seconds": seconds}))
"""


def record_all() -> dict[str, dict]:
    """Every workload's signatures and compile seconds, each in a fresh process and cache."""
    kernels: dict[str, dict] = {}
    for name in WORKLOADS:
        with tempfile.TemporaryDirectory() as cache:
            res = subprocess.run(
                [sys.executable, "-c", _RECORDER % name],
                env={**os.environ, "NUMBA_CACHE_DIR": cache},
                capture_output=True,
                text=True,
                check=True,
            )
        doc = json.loads(res.stdout.strip().splitlines()[-1])
        for k, sigs in doc["signatures"].items():
            e = kernels.setdefault(k, {"signatures": [], "seconds": 0.0})
            e["signatures"] = [json.loads(s) for s in sorted({json.dumps(s) for s in e["signatures"] + sigs})]
            e["seconds"] = max(e["seconds"], round(doc["seconds"].get(k, 0.0), 3))
    return dict(sorted(kernels.items()))


def unlisted(workload: str) -> dict[str, list]:
    """Run a workload here; the signatures it compiled (or loaded) that the list lacks."""
    WORKLOADS[workload]()
    listed = {n: e["signatures"] for n, e in recorded().items()}
    extra = {n: [s for s in sigs if s not in listed.get(n, [])] for n, sigs in compiled_signatures().items()}
    return {n: s for n, s in extra.items() if s}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fiited_store.experiments.signatures", description=__doc__.split("\n")[0]
    )
    p.add_argument("--record", action="store_true", help=f"record every workload and rewrite {SIGNATURE_FILE.name}")
    p.add_argument(
        "--run",
        choices=sorted(WORKLOADS),
        help="run a workload; print (JSON) what it compiled that the list lacks, exit 1 if anything",
    )
    args = p.parse_args(argv)
    if args.run:
        extra = unlisted(args.run)
        print(json.dumps(extra))
        return 1 if extra else 0
    if args.record:
        kernels = record_all()
        SIGNATURE_FILE.write_text(
            json.dumps(
                {
                    "about": "kernel signatures compiled ahead of a run (fiited_store/kernels/warmup.py)",
                    "kernels": kernels,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {SIGNATURE_FILE} ({sum(len(e['signatures']) for e in kernels.values())} signatures)")
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Run scenarios in a world of gloo processes (``fiited_store.distributed.launch``).

One spawn per world size runs every scenario, in order, in every rank (spawning
costs seconds per process); each scenario's outcome (passed, or the traceback of
the first rank that failed) comes back through a file per rank, so that each
scenario is its own test.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from fiited_store.distributed.launch import spawn_world

#: a collective that waits longer than this fails (gloo's timeout): generous, because a rank
#: compiling kernels on a fresh numba cache keeps its peers waiting in the next exchange
COLLECTIVE_TIMEOUT = 300


def _run_scenarios(rank: int, world: int, workdir: str, scenarios: list[str], module: str) -> None:
    import importlib

    import torch.distributed as dist

    mod = importlib.import_module(module)
    results = {}
    for name in scenarios:
        scratch = Path(workdir) / name
        scratch.mkdir(exist_ok=True)
        try:
            getattr(mod, name)(rank, world, scratch)
            results[name] = None
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the scenario's test
            results[name] = traceback.format_exc()
        (Path(workdir) / f"results-{rank}.json").write_text(json.dumps(results))
        # every rank finishes a scenario before the next begins, whatever happened
        dist.barrier()


def run_world(
    world: int, scenarios: list[str], module: str, workdir: Path, collective_timeout: float = COLLECTIVE_TIMEOUT
) -> dict[str, str | None]:
    """Run ``module.<scenario>(rank, world, scratch_dir)`` for each scenario on ``world`` ranks.

    Returns scenario -> None (passed on every rank) or the failing ranks' tracebacks."""
    crash = spawn_world(
        world, _run_scenarios, (str(workdir), scenarios, module), collective_timeout_s=collective_timeout, debug=True
    )
    out: dict[str, str | None] = {}
    files = [workdir / f"results-{r}.json" for r in range(world)]
    per_rank = [json.loads(f.read_text()) if f.exists() else {} for f in files]
    for name in scenarios:
        failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res.get(name)]
        if any(name not in res for res in per_rank):
            failures.append(f"not finished on every rank; the world stopped with: {crash}")
        out[name] = "\n".join(failures) if failures else None
    return out

"""Run scenarios in a world of gloo processes (``torch.multiprocessing.spawn``).

One spawn per world size runs every scenario, in order, in every rank (spawning
costs seconds per process); each scenario's outcome (passed, or the traceback of
the first rank that failed) comes back through a file per rank, so that each
scenario is its own test. A ``file://`` rendezvous needs no port; a deadline turns
a hang into a failure instead of a stalled CI.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

#: seconds a whole world may run before its processes are killed
WORLD_DEADLINE = 600
#: a collective that waits longer than this fails (gloo's timeout)
COLLECTIVE_TIMEOUT = 60


def _worker(rank: int, world: int, workdir: str, scenarios: list[str], module: str, timeout: float) -> None:
    import importlib

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
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
    dist.destroy_process_group()


def run_world(world: int, scenarios: list[str], module: str, workdir: Path,
              collective_timeout: float = COLLECTIVE_TIMEOUT) -> dict[str, str | None]:
    """Run ``module.<scenario>(rank, world, scratch_dir)`` for each scenario on ``world`` ranks.

    Returns scenario -> None (passed on every rank) or the failing ranks' tracebacks."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    env = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    crash = None
    try:
        ctx = mp.start_processes(_worker, args=(world, str(workdir), scenarios, module, collective_timeout), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + WORLD_DEADLINE
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    crash = f"a world of {world} ranks ran past {WORLD_DEADLINE} s (a hang?)"
                    break
        except ProcessException as exc:  # a rank left the collectives out of step, or died
            crash = str(exc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out: dict[str, str | None] = {}
    files = [workdir / f"results-{r}.json" for r in range(world)]
    per_rank = [json.loads(f.read_text()) if f.exists() else {} for f in files]
    for name in scenarios:
        failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res.get(name)]
        if any(name not in res for res in per_rank):
            failures.append(f"not finished on every rank; the world stopped with: {crash}")
        out[name] = "\n".join(failures) if failures else None
    return out

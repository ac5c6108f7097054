"""Start a world of gloo processes on this machine, without torchrun (tests, benchmarks).

``torch.multiprocessing`` spawns the ranks; a ``file://`` rendezvous needs no port;
a deadline turns a hang into an error instead of a stalled run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def _entry(rank: int, world: int, init_file: str, collective_timeout: float, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=collective_timeout),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_world(
    world: int,
    fn: Callable,
    args: tuple = (),
    *,
    deadline_s: float = 600,
    collective_timeout_s: float = 60,
    threads_per_rank: int = 1,
    debug: bool = False,
) -> str | None:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks (``fn`` must be importable by name).

    ``debug`` sets TORCH_DISTRIBUTED_DEBUG=DETAIL: ranks that call different
    collectives fail at once, naming both, instead of waiting for the timeout.

    Returns None when every rank finished, or what stopped the world (a rank's
    exception, a rank that died, or the deadline)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    env = {
        "NUMBA_NUM_THREADS": str(threads_per_rank),
        "OMP_NUM_THREADS": str(threads_per_rank),
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL" if debug else "OFF",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_dir = tempfile.mkdtemp(prefix="fiited-rendezvous-")
    try:
        ctx = mp.start_processes(
            _entry,
            args=(world, os.path.join(init_dir, "init"), collective_timeout_s, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    return f"a world of {world} ranks ran past {deadline_s} s (a hang?)"
        except ProcessException as exc:  # a rank raised, or died
            return str(exc)
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name in os.listdir(init_dir):
            os.remove(os.path.join(init_dir, name))
        os.rmdir(init_dir)


def spawn_world_or_raise(world: int, fn: Callable, args: tuple = (), **kw: Any) -> None:
    crash = spawn_world(world, fn, args, **kw)
    if crash is not None:
        raise RuntimeError(f"a world of {world} ranks failed: {crash}")

"""Compiling the CPU kernels before a run, in parallel, into numba's cache, and saying so.

Numba compiles a kernel at its first call. Left alone, the first training run of a fresh
install spends most of its first steps in the compiler, and a step time measured over
them reports the compiler, not the store. :func:`prepare` compiles, before the first
step, every kernel signature the store's training verbs use that numba's cache does not
hold yet, in one process per core, and returns how long that took (None when the cache
already held everything: later runs pay nothing).

Which signatures: ``signatures.json`` beside this module, recorded by running the
workloads of :mod:`fiited_store.experiments.signatures` (``python -m
fiited_store.experiments.signatures --record``); ``tests/kernels/test_warmup.py`` runs a
training run in a fresh process and fails when it compiles a signature the list lacks,
so the list cannot fall behind the kernels.
A signature the list lacks is still compiled at its first call, as always: the list
only decides what is compiled ahead of time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SIGNATURE_FILE = Path(__file__).with_name("signatures.json")


# ----------------------------------------------------------------------------- types <-> JSON
def encode_type(t: Any) -> Any:
    """A numba type as JSON (the kinds a kernel's arguments take: arrays, scalars, tuples, None)."""
    from numba.core import types

    if isinstance(t, types.Array):
        return ["array", str(t.dtype), t.ndim, t.layout, bool(t.mutable is False)]
    if isinstance(t, types.UniTuple):
        return ["unituple", encode_type(t.dtype), t.count]
    if isinstance(t, types.Tuple):
        return ["tuple", [encode_type(x) for x in t.types]]
    if isinstance(t, types.NoneType):
        return ["none"]
    if isinstance(t, (types.Integer, types.Float, types.Boolean)):
        return ["scalar", str(t)]
    raise TypeError(f"no JSON form for numba type {t!r} ({type(t).__name__})")


def decode_type(x: Any) -> Any:
    from numba.core import types

    kind = x[0]
    if kind == "array":
        return types.Array(_scalar(x[1]), x[2], x[3], readonly=x[4])
    if kind == "unituple":
        return types.UniTuple(decode_type(x[1]), x[2])
    if kind == "tuple":
        return types.Tuple([decode_type(y) for y in x[1]])
    if kind == "none":
        return types.none
    if kind == "scalar":
        return _scalar(x[1])
    raise ValueError(f"unknown type kind {kind!r} in {SIGNATURE_FILE.name}")


def _scalar(name: str) -> Any:
    from numba.core import types

    return types.boolean if name == "bool" else getattr(types, name)


# ----------------------------------------------------------------------------- the list
def dispatchers() -> dict[str, Any]:
    """Every jitted function of the CPU kernels, by name."""
    from numba.core.registry import CPUDispatcher

    from . import cpu

    return {name: obj for name, obj in vars(cpu).items() if isinstance(obj, CPUDispatcher)}


def compiled_signatures() -> dict[str, list[list]]:
    """What this process's kernels hold now (compiled or loaded from the cache), as JSON."""
    out = {}
    for name, d in dispatchers().items():
        if not _caches(d):
            continue
        sigs = [[encode_type(t) for t in sig] for sig in d.signatures]
        if sigs:
            out[name] = sorted(sigs, key=json.dumps)
    return out


def recorded() -> dict[str, dict]:
    """{kernel: {"signatures": [...], "seconds": compile time when recorded}} from the list."""
    if not SIGNATURE_FILE.exists():
        return {}
    return json.loads(SIGNATURE_FILE.read_text())["kernels"]


def _caches(d: Any) -> bool:
    """Whether a dispatcher keeps what it compiles in numba's cache (``cache=True``)."""
    from numba.core.caching import NullCache

    return not isinstance(d._cache, NullCache)


def _is_cached(d: Any, sig: tuple) -> bool:
    """Whether numba's cache holds this signature (read without compiling anything)."""
    try:
        return d._cache.load_overload(sig, d.targetctx) is not None
    except Exception:  # noqa: BLE001 - an unreadable cache entry is one to compile
        return False


def missing() -> list[tuple[str, list, float]]:
    """(kernel, signature, expected seconds) of every listed signature the cache lacks."""
    found = dispatchers()
    todo = []
    for name, entry in recorded().items():
        d = found.get(name)
        if d is None:
            continue  # a kernel that is gone: the test of the list says so
        for sig in entry["signatures"]:
            types_ = tuple(decode_type(t) for t in sig)
            if types_ not in d.overloads and not _is_cached(d, types_):
                todo.append((name, sig, float(entry.get("seconds", 1.0)) / max(len(entry["signatures"]), 1)))
    return todo


# ----------------------------------------------------------------------------- compiling
def compile_items(items: list[tuple[str, list]]) -> None:
    """Compile these signatures in this process (each lands in numba's cache)."""
    found = dispatchers()
    for name, sig in items:
        found[name].compile(tuple(decode_type(t) for t in sig))


def _shares(todo: list[tuple[str, list, float]], n: int, head_start: float = 0.0) -> list[list[tuple[str, list]]]:
    """``n`` lists of about equal expected seconds, longest first (LPT); the first starts
    ``head_start`` seconds behind (its process has other work to do first). Every signature
    of one kernel goes to one process: two processes adding entries to one kernel's cache
    index at once could each keep only their own."""
    by_kernel: dict[str, list] = {}
    for name, sig, cost in todo:
        by_kernel.setdefault(name, [0.0, []])
        by_kernel[name][0] += cost
        by_kernel[name][1].append(sig)
    shares: list[list[tuple[str, list]]] = [[] for _ in range(n)]
    load = [head_start] + [0.0] * (n - 1)
    for name, (cost, sigs) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0]):
        i = load.index(min(load))
        shares[i] += [(name, sig) for sig in sigs]
        load[i] += cost
    return shares


class KernelCompilation:
    """The kernels a run needs, compiled by forked worker processes while this one goes on;
    :meth:`finish` compiles this process's own share and waits for the workers.

    Start it before the process starts threads (torch, numba's parallel kernels): forking
    a process with threads is unsafe."""

    def __init__(self, out: TextIO | None = sys.stderr, workers: int | None = None, head_start: float = 0.0):
        self.out = out
        self.todo = missing()
        self.children: list[int] = []
        self.own: list[tuple[str, list]] = []
        self.seconds: float | None = None
        if not self.todo:
            return
        self.t0 = time.perf_counter()
        n = max(1, min(workers or os.cpu_count() or 1, len({name for name, _, _ in self.todo})))
        shares = _shares(self.todo, n, head_start)
        if out is not None:
            print(
                f"compiling the store's kernels ({len(self.todo)} signatures in {n} processes; first run only: "
                f"numba caches them) ...",
                file=out,
                flush=True,
            )
        self.own = shares[0]
        for share in shares[1:]:
            pid = os.fork() if hasattr(os, "fork") else -1
            if pid == 0:  # the worker: its share into the cache, then leave at once
                code = 0
                try:
                    compile_items(share)
                except BaseException:  # noqa: BLE001 - what failed here compiles at its first call
                    code = 1
                os._exit(code)
            if pid > 0:
                self.children.append(pid)
            else:
                self.own += share  # no fork on this system: this process compiles it all

    def finish(self) -> float | None:
        """Compile this process's share, wait for the workers; the seconds since the start, or
        None when the cache held everything."""
        if not self.todo or self.seconds is not None:
            return self.seconds
        compile_items(self.own)
        for pid in self.children:
            os.waitpid(pid, 0)
        self.seconds = time.perf_counter() - self.t0
        if self.out is not None:
            print(f"compiled in {self.seconds:.1f} s", file=self.out, flush=True)
        return self.seconds


def prepare(out: TextIO | None = sys.stderr, workers: int | None = None) -> float | None:
    """Compile every listed kernel signature numba's cache lacks, one process per core by
    default (call it before the process starts threads); the seconds it took, or None when
    there was nothing to do."""
    return KernelCompilation(out, workers).finish()

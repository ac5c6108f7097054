"""Compiling the kernels ahead of a run (kernels/warmup.py): the signature list keeps up with
the kernels, its types round-trip, and forked workers fill numba's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from numba.core import types

from fiited_store.kernels import warmup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "t",
    [
        types.Array(types.int64, 1, "C"),
        types.Array(types.float32, 2, "A", readonly=True),
        types.Array(types.uint16, 2, "C"),
        types.int64,
        types.float64,
        types.boolean,
        types.uint64,
        types.none,
        types.UniTuple(types.int64, 2),
        types.Tuple([types.int32, types.float32]),
    ],
)
def test_a_kernel_argument_type_round_trips_through_json(t):
    assert warmup.decode_type(json.loads(json.dumps(warmup.encode_type(t)))) == t


def test_a_type_without_a_json_form_is_refused_by_name():
    with pytest.raises(TypeError, match="no JSON form for numba type"):
        warmup.encode_type(types.unicode_type)


def test_every_listed_kernel_exists_and_every_signature_decodes():
    listed = warmup.recorded()
    assert listed, "kernels/signatures.json is empty: python -m fiited_store.experiments.signatures --record"
    found = warmup.dispatchers()
    assert set(listed) <= set(found), sorted(set(listed) - set(found))
    for name, entry in listed.items():
        for sig in entry["signatures"]:
            assert len(tuple(warmup.decode_type(t) for t in sig)) == found[name].py_func.__code__.co_argcount, name


def test_shares_balance_the_expected_seconds_and_keep_a_kernel_in_one_process():
    todo = [("a", [1], 5.0), ("a", [2], 1.0), ("b", [1], 4.0), ("c", [1], 3.0), ("d", [1], 2.0)]
    shares = warmup._shares(todo, 2)
    by_kernel = [{name for name, _ in s} for s in shares]
    assert {"a"} <= by_kernel[0] and "a" not in by_kernel[1]  # both of a's signatures in one process
    loads = [sum(c for n, _, c in todo if n in k) for k in by_kernel]
    assert loads == [8.0, 7.0]  # a (6) + d (2) against b (4) + c (3)
    # the first process starts behind by the work it does before compiling
    shares = warmup._shares(todo, 2, head_start=20.0)
    assert shares[0] == [] and len(shares[1]) == len(todo)


def test_a_training_run_compiles_nothing_the_list_lacks():
    """The list cannot fall behind: a changed kernel signature fails here, with the command
    that records the list again."""
    res = subprocess.run(
        [sys.executable, "-m", "fiited_store.experiments.signatures", "--run", "train"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    extra = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else None
    assert res.returncode == 0 and extra == {}, (
        f"signatures a run compiles that kernels/signatures.json lacks: {extra or res.stderr[-2000:]}; "
        f"record them with: python -m fiited_store.experiments.signatures --record"
    )


def test_forked_workers_fill_an_empty_cache_and_a_second_start_has_nothing_to_do(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        from fiited_store.kernels import warmup
        few = {k: v for k, v in warmup.recorded().items() if k in ("zero_rows", "first_decrease", "count_seen")}
        warmup.recorded = lambda: few
        assert len(warmup.missing()) == 3, warmup.missing()
        seconds = warmup.KernelCompilation(out=sys.stdout, workers=2).finish()
        print(json.dumps({"seconds": seconds, "missing": len(warmup.missing()),
                          "again": warmup.KernelCompilation(out=None).finish()}))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("compiling the store's kernels (3 signatures in 2 processes")
    assert lines[1].startswith("compiled in ")
    done = json.loads(lines[-1])
    assert done["seconds"] > 0 and done["missing"] == 0 and done["again"] is None
    assert len(list((tmp_path / "cache").rglob("*.nbi"))) >= 3


def test_the_training_run_finishes_compiling_before_its_first_step():
    from fiited_store.experiments.config import TrainConfig
    from fiited_store.experiments.train import run

    calls = []
    r = run(
        TrainConfig(steps=3, batch_size=32, eval_samples=64, synthetic_cap=100),
        progress=False,
        before_training=lambda: calls.append("compiled"),
    )
    assert calls == ["compiled"] and r["steps"] == 3

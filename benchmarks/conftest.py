"""pytest-benchmark suites: ``python -m pytest benchmarks/`` (not part of the test run).

FIITED_BENCH_SCALE multiplies the Criteo Kaggle cardinalities (default 0.02, a
173 MB dense table, so that a run takes a minute); ``fiited-store bench`` runs the
full-scale comparison of docs/benchmarks.md in one process and reports ratios.
"""

import os

import pytest

from fiited_store.config import DynamicRatio
from fiited_store.experiments.bench.cpu import BenchConfig, Workload, make_store

SCALE = float(os.environ.get("FIITED_BENCH_SCALE", "0.02"))


@pytest.fixture(scope="session")
def cfg():
    return BenchConfig(scale=SCALE)


@pytest.fixture(scope="session")
def workload(cfg):
    return Workload(cfg, 8)


@pytest.fixture(scope="session")
def store(cfg, workload):
    """A store deep into training: the most popular keys fill the pool."""
    s = make_store(cfg, workload, cfg.budget_fraction, DynamicRatio(1 - cfg.budget_fraction))
    workload.prefill(s, s.pools[0].slots // cfg.chunks)
    yield s
    s.close()


@pytest.fixture(scope="session")
def dense_weight(workload, cfg):
    import torch

    torch.manual_seed(0)
    return torch.empty(workload.total_rows, cfg.dim).uniform_(-0.01, 0.01)


def cycle(items):
    state = {"i": 0}

    def next_item():
        state["i"] += 1
        return items[state["i"] % len(items)]

    return next_item

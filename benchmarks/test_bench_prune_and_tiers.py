"""A prune pass, and the disk tier's spill and restore throughput against numpy.memmap."""

import numpy as np

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.kernels.layout import util_from_float
from fiited_store.storage import ZarrTier


def test_prune_pass_one_million_entries(benchmark):
    n = 1_000_000
    s = EmbeddingStore(
        [TableConfig("t", dim=64, chunks=4, num_embeddings=n)],
        StoreConfig(pruning=DynamicRatio(0.75), budget_fraction=0.25, prune_period=0, initial_capacity=1 << 22),
    )
    s.insert("t", np.arange(n))
    rng = np.random.default_rng(0)
    live = s.entries.table_of_entries() >= 0

    def setup():
        s.entries.arrays.util[live] = util_from_float(rng.pareto(1.1, (int(live.sum()), 4)))

    benchmark.pedantic(s.prune, setup=setup, rounds=3)


def _rows(n, w):
    return np.random.default_rng(0).standard_normal((n, w)).astype(np.float32)


def test_zarr_tier_spill(benchmark, tmp_path):
    tier = ZarrTier(tmp_path / "t", 16, 1)
    vec, st = _rows(1 << 16, 16), _rows(1 << 16, 1)
    benchmark(lambda: tier.write(tier.allocate(1 << 16), vec, st))


def test_memmap_spill(benchmark, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float32, shape=(1 << 22, 17))
    rows = _rows(1 << 16, 17)
    state = {"at": 0}

    def write():
        lo = state["at"] % ((1 << 22) - (1 << 16))
        mm[lo : lo + (1 << 16)] = rows
        state["at"] += 1 << 16

    benchmark(write)


def test_zarr_tier_restore(benchmark, tmp_path):
    tier = ZarrTier(tmp_path / "t", 16, 1)
    slots = tier.allocate(1 << 20)
    tier.write(slots, _rows(1 << 20, 16), _rows(1 << 20, 1))
    rng = np.random.default_rng(1)
    benchmark(lambda: tier.read(np.sort(rng.choice(slots, 1 << 16, replace=False))))


def test_memmap_restore(benchmark, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float32, shape=(1 << 20, 17))
    mm[:] = _rows(1 << 20, 17)
    rng = np.random.default_rng(1)
    benchmark(lambda: np.ascontiguousarray(mm[np.sort(rng.choice(1 << 20, 1 << 16, replace=False))]))

"""The command line: inspect, verify (with planted corruptions), compact, export, train."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.cli import main
from fiited_store.tools import read_export
from fiited_store.verify import check_store

from .helpers import train_steps

TABLES = [TableConfig("user", dim=16, chunks=4, num_embeddings=400), TableConfig("item", dim=8, chunks=2, num_embeddings=400)]


@pytest.fixture
def saved_store(tmp_path):
    """A prune-mode store with spilled chunks, erased keys and dead entries, saved and closed."""
    path = tmp_path / "store"
    s = EmbeddingStore(TABLES, StoreConfig(pruning=DynamicRatio(0.8), prune_period=4, sample_size=100, on_evict="spill",
                                           gamma=0.7, drop_floor=1e-3), path=path)
    rng = np.random.default_rng(0)
    train_steps(s, TABLES, 20, rng, id_range=400)
    s.erase("user", np.arange(0, 400, 7))
    s.save()
    lookups = {t.name: s.lookup(t.name, np.arange(400)).copy() for t in TABLES}
    s.close()
    return path, lookups


def ckpt_dir(path: Path) -> Path:
    return path / json.loads((path / "fiited.json").read_text())["checkpoint"]


def test_inspect_reports_tables_histograms_utilities_bytes_and_fragmentation(saved_store, capsys, tmp_path):
    path, _ = saved_store
    assert main(["inspect", str(path), "--json", "--plot", str(tmp_path / "dims.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    for name in ("user", "item"):
        t = info["tables"][name]
        assert sum(t["kept_dim_histogram"].values()) == t["entries"] > 0
        assert set(t["utility_quantiles"]) == {"0.0", "0.1", "0.25", "0.5", "0.75", "0.9", "0.99", "1.0"}
        assert len(t["resident_per_chunk"]) == t["chunks"]
    pool = info["pools"][0]
    assert {"fragmentation", "free_runs", "longest_free_run"} <= set(pool)
    assert pool["tier"]["used"] > 0
    assert info["total"]["bytes"]["on_disk"] > 0
    png = (tmp_path / "dims.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(path)]) == 0
    assert "kept-dimension histogram" in capsys.readouterr().out


def test_verify_passes_a_healthy_store(saved_store, capsys):
    path, _ = saved_store
    assert main(["verify", str(path), "--no-progress"]) == 0
    assert "every invariant holds" in capsys.readouterr().out


def _array(path: Path, name: str):
    return zarr.open_array(zarr.storage.LocalStore(str(ckpt_dir(path))), path=name, mode="r+")


def plant_bad_owner(path):
    owner = _array(path, "pool_0/owner")
    o = owner[...]
    s = int(np.nonzero(o >= 0)[0][0])
    o[s] = o[s] + 1  # now names a chunk that is not there
    owner[...] = o


def plant_slot_owned_twice(path):
    addr = _array(path, "entries/addr")
    a = addr[...]
    e, k = np.nonzero(a >= 0)
    other = int(np.argmax(e != e[0]))  # a chunk of another entry now claims the same slot
    a[e[other], k[other]] = a[e[0], k[0]]
    addr[...] = a


def plant_truncated_chunk(path):
    chunk = next(p for p in (ckpt_dir(path) / "tier_0" / "data" / "vectors").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:77])


def plant_wrong_dtype(path):
    root = zarr.open_group(zarr.storage.LocalStore(str(ckpt_dir(path))), mode="r+")
    util = root["entries/util"][...]
    root["entries"].create_array("util", data=util.astype(np.float64), overwrite=True)


@pytest.mark.parametrize("plant, expect", [
    (plant_bad_owner, "names entry"),
    (plant_slot_owned_twice, "whose owner is"),
    (plant_truncated_chunk, "corrupt"),
    (plant_wrong_dtype, "entries/util has dtype float64, expected uint16"),
])
def test_verify_catches_planted_corruption(saved_store, capsys, plant, expect):
    path, _ = saved_store
    plant(path)
    assert main(["verify", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and expect in out


def test_compact_changes_no_lookup_and_shrinks_the_files(saved_store, capsys):
    path, lookups = saved_store
    with EmbeddingStore.open(path, "r") as s:
        tier_capacity_before = s.tiers[0].capacity
    assert main(["compact", str(path), "--no-progress"]) == 0
    assert "bytes ->" in capsys.readouterr().out
    with EmbeddingStore.open(path, "r") as s:
        for name, expect in lookups.items():
            np.testing.assert_array_equal(s.lookup(name, np.arange(400)), expect)
        assert check_store(s) == []
        owner = s.backend.to_host(s.pools[0].arrays.owner)
        used = int((owner >= 0).sum())
        assert np.all(owner[:used] >= 0) and np.all(owner[used:] < 0)  # the pool is packed
        t = s.tiers[0]
        assert np.all(t.owner[: t.n_used] >= 0) and t.capacity <= tier_capacity_before
    assert main(["verify", str(path), "--no-progress"]) == 0


def test_compact_reports_smaller_files(tmp_path, capsys):
    path = tmp_path / "s"
    tables = [dataclasses.replace(t, index="hashed") for t in TABLES]  # the hashed index is what compact shrinks
    s = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.5), prune_period=0, on_evict="spill",
                                           initial_capacity=1 << 14), path=path)
    # far fewer keys than the initial 16k slots (an erase would shrink the index itself)
    train_steps(s, TABLES, 10, np.random.default_rng(1), id_range=400)
    s.save()
    s.close()
    from fiited_store.tools import compact_store

    r = compact_store(path, progress=False)
    assert r["bytes_after"] < r["bytes_before"]
    with EmbeddingStore.open(path, "r") as again:
        assert again.entries.capacity < 1 << 14


@pytest.mark.parametrize("fmt", ["dense", "compact"])
def test_export_round_trips_and_compact_overhead_is_k_over_d(saved_store, tmp_path, fmt, capsys):
    path, lookups = saved_store
    out = tmp_path / f"export-{fmt}"
    assert main(["export", str(path), str(out), "--format", fmt, "--no-progress"]) == 0
    exported = read_export(out)
    for t in TABLES:
        ids, weights = exported[t.name]
        np.testing.assert_array_equal(weights, lookups[t.name][ids])
        kept = np.any(lookups[t.name] != 0, axis=1)
        np.testing.assert_array_equal(np.sort(ids), np.nonzero(kept)[0])
    if fmt == "compact":
        g = zarr.open_group(zarr.storage.LocalStore(str(out)), mode="r")["user"]
        index, values = g["chunk_index"], g["values"]
        assert index.dtype == np.int32 and index.shape[1] == 4
        # one int32 address per chunk: K / D of the dense row's bytes
        assert index.nbytes / (index.shape[0] * 16 * 4) == pytest.approx(4 / 16)
        assert values.shape[0] == int((index[...] >= 0).sum())
    assert main(["export", str(path), str(out), "--no-progress"]) == 2  # never overwrites


def test_commands_on_a_missing_store_fail_clearly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 1
    assert "not a fiited-store store" in capsys.readouterr().out


def test_train_on_the_builtin_default_prints_quality_memory_and_speed(capsys, tmp_path):
    args = ["train", "--steps", "40", "--batch-size", "256", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "MiB" in out and "ms per training step" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert 0.5 < r["auc"] <= 1.0 and r["bytes_vs_dense"] == pytest.approx(0.25, abs=0.01)

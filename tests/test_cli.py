"""The command line: inspect, verify (with planted corruptions), compact, export, train."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fiited_store import DynamicRatio, EmbeddingStore, ManualRatios, StoreConfig, TableConfig
from fiited_store.cli import main
from fiited_store.tools import read_export
from fiited_store.verify import check_store
from tests.helpers import reseal, train_steps

TABLES = [
    TableConfig("user", dim=16, chunks=4, num_embeddings=400),
    TableConfig("item", dim=8, chunks=2, num_embeddings=400),
]


@pytest.fixture
def saved_store(tmp_path):
    """A prune-mode store with spilled chunks, erased keys and dead entries, saved and closed."""
    path = tmp_path / "store"
    s = EmbeddingStore(
        TABLES,
        StoreConfig(
            pruning=DynamicRatio(0.8), prune_period=4, sample_size=100, on_evict="spill", gamma=0.7, drop_floor=1e-3
        ),
        path=path,
    )
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
    chunk = next(
        p for p in (ckpt_dir(path) / "tier_0" / "data" / "chunks").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(chunk.read_bytes()[:77])


def plant_wrong_dtype(path):
    root = zarr.open_group(zarr.storage.LocalStore(str(ckpt_dir(path))), mode="r+")
    util = root["entries/util"][...]
    root["entries"].create_array("util", data=util.astype(np.float64), overwrite=True)
    reseal(path)  # as a writer with a bug would have saved it (an edit afterwards fails its digest)


@pytest.mark.parametrize(
    "plant, expect",
    [
        (plant_bad_owner, "names entry"),
        (plant_slot_owned_twice, "whose owner is"),
        (plant_truncated_chunk, "has 77 bytes, the checkpoint lists"),
        (plant_wrong_dtype, "entries/util has dtype float64, expected uint16"),
    ],
)
def test_verify_catches_planted_corruption(saved_store, capsys, plant, expect):
    path, _ = saved_store
    plant(path)
    assert main(["verify", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and expect in out


def test_compact_changes_no_lookup_and_shrinks_the_files(saved_store, capsys):
    path, lookups = saved_store
    with EmbeddingStore.open(path, "r") as s:
        segments_before = len(s.tiers[0].segments())
        assert s.tiers[0].garbage_fraction() > 0  # erased keys left dead slots
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
        assert t.garbage_fraction() == 0.0 and len(t.segments()) <= segments_before  # no dead slot is kept
    assert main(["verify", str(path), "--no-progress"]) == 0


def test_compact_reports_smaller_files(tmp_path, capsys):
    path = tmp_path / "s"
    tables = [dataclasses.replace(t, index="hashed") for t in TABLES]  # the hashed index is what compact shrinks
    s = EmbeddingStore(
        tables,
        StoreConfig(pruning=DynamicRatio(0.5), prune_period=0, on_evict="spill", initial_capacity=1 << 14),
        path=path,
    )
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
        mask, values = g["chunk_mask"], g["values"]
        assert mask.dtype == np.bool_ and mask.shape[1] == 4
        # one byte per chunk before compression: K / 4D of the dense row's bytes
        assert mask.nbytes / (mask.shape[0] * 16 * 4) == pytest.approx(4 / (4 * 16))
        assert values.shape[0] == int(mask[...].sum())
    assert main(["export", str(path), str(out), "--no-progress"]) == 2  # never overwrites


def test_the_compact_export_is_smaller_than_the_dense_one(saved_store, tmp_path):
    from fiited_store.tools import export_store

    path, _ = saved_store
    small = {fmt: export_store(path, tmp_path / fmt, fmt, progress=False) for fmt in ("dense", "compact")}
    for name in ("user", "item"):  # held bytes: the compact form stores nothing for an absent chunk
        assert small["compact"]["tables"][name]["bytes"] < small["dense"]["tables"][name]["bytes"]
    # on disk Zarr compresses the dense form's zero chunks too; past a few thousand rows the
    # compact form still wins (below that, its one extra array's metadata decides)
    big = tmp_path / "big"
    tables = [TableConfig("user", 16, chunks=4, num_embeddings=5000)]
    s = EmbeddingStore(tables, StoreConfig(pruning=DynamicRatio(0.8), prune_period=4, sample_size=500), path=big)
    train_steps(s, tables, 8, np.random.default_rng(0), batch=2048, id_range=5000)
    s.save()
    s.close()
    disk = {
        fmt: export_store(big, tmp_path / f"big-{fmt}", fmt, progress=False)["bytes_on_disk"]
        for fmt in ("dense", "compact")
    }
    assert disk["compact"] < disk["dense"], disk


def test_a_version_1_compact_export_still_reads(tmp_path):
    root = zarr.open_group(zarr.storage.LocalStore(str(tmp_path / "v1")), mode="w")
    root.attrs.update({"format": "fiited-store-export", "kind": "compact", "format_version": 1})
    g = root.create_group("t")
    g.attrs.update({"dim": 4, "chunks": 2})
    g.create_array("ids", data=np.array([3, 9]))
    g.create_array("chunk_index", data=np.array([[1, -1], [0, 2]], np.int32))
    g.create_array("values", data=np.arange(6, dtype=np.float32).reshape(3, 2))
    ids, w = read_export(tmp_path / "v1")["t"]
    np.testing.assert_array_equal(ids, [3, 9])
    np.testing.assert_array_equal(w, [[2, 3, 0, 0], [0, 1, 4, 5]])


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


# --- the command line explains itself and checks its arguments before any work ------------------------------------


def _subparsers():
    import argparse

    from fiited_store.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_option_has_help_and_shows_its_default():
    import argparse

    parser, commands = _subparsers()
    assert set(commands) == {"train", "sweep", "bench", "inspect", "verify", "compact", "reshard", "export"}
    for name, p in commands.items():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                assert "(default:" in text, (name, a.dest)
    assert "(default: 512)" in commands["train"].format_help()


def test_version_and_a_help_that_imports_neither_torch_nor_numba(capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == "fiited-store 0.1.0"
    code = (
        "import sys\nfrom fiited_store.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'numba', 'zarr', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--steps", "0"], "--steps: must be a positive int, got '0'"),
        (["train", "--batch-size", "0"], "--batch-size: must be a positive int, got '0'"),
        (["train", "--batch-size", "-5"], "--batch-size: must be a positive int, got '-5'"),
        (
            ["train", "--dataset", "movielens", "--path", ".", "--epochs", "0"],
            "--epochs: must be a positive int, got '0'",
        ),
        (["train", "--ratio", "1"], "--ratio: must be a ratio in [0, 1), got '1'"),
        (["train", "--gamma", "nan"], "--gamma: must be a number in (0, 1), got 'nan'"),
        (["train", "--json", "/nonexistent-dir/r.json"], "--json: cannot create '/nonexistent-dir/r.json'"),
        (["bench", "--repeats", "0"], "--repeats: must be a positive int, got '0'"),
        (["train", "--min-chunks", "-1"], "--min-chunks: must be an int >= 0, got '-1'"),
        (["train", "--on-evict", "keep"], "invalid choice: 'keep'"),
        (["bench", "--peers", "faiss"], "invalid choice: 'faiss'"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_inconsistent_training_values_are_refused_before_any_work(capsys, monkeypatch):
    import fiited_store.experiments.train as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", "--method", "fiited-manual", "--dim", "10", "--chunks", "4", "--no-progress"]) == 2
    assert "dim 10 is not divisible by chunks 4" in capsys.readouterr().err
    assert main(["train", "--dim", "10", "--chunks", "4", "--no-progress"]) == 2  # the default, fiited-floor
    assert "the 9 dimensions above floor_dim = 1 do not split into 4 equal chunks" in capsys.readouterr().err
    assert main(["train", "--dataset", "movielens"]) == 2
    assert "needs --path" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--method",
                "fiited-manual",
                "--chunks",
                "4",
                "--min-chunks",
                "2",
                "--ratio",
                "0.75",
                "--no-progress",
            ]
        )
        == 2
    )
    assert (
        "min_chunks 2 of 4 chunks per row is 0.5 of the dense size, more than the budget at ratio 0.75"
        in capsys.readouterr().err
    )
    assert main(["train", "--method", "fiited-manual", "--chunks", "4", "--min-chunks", "5", "--no-progress"]) == 2
    assert "min_chunks must be an int in [0, chunks = 4], got 5" in capsys.readouterr().err
    assert main(["train", "--method", "fiited-floor", "--chunks", "4", "--no-progress"]) == 2
    assert (
        "the 30 dimensions above floor_dim = 2 do not split into 4 equal chunks (--chunks 1, 2, 3, 5, 6, 10, 15, "
        "30 would)" in capsys.readouterr().err
    )
    # the default shares a floor that does not fit; fiited-dynamic gives every row its own
    dynamic = ["train", "--method", "fiited-dynamic", "--floor-dim", "4", "--chunks", "4", "--ratio", "0.9375"]
    assert main([*dynamic, "--no-progress"]) == 2
    assert "floor_dim 4 of 32 is more than the budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--shared-floor", "0", "--no-progress"])
    assert "--shared-floor: must be a fraction in (0, 1], got '0'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--method",
                "fiited-manual",
                "--chunks",
                "4",
                "--min-chunks",
                "1",
                "--floor-dim",
                "4",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "give floor_dim or min_chunks, not both (got 4 and 1)" in capsys.readouterr().err
    assert main(["train", "--chunks", "5", "--min-chunks", "1", "--no-progress"]) == 2
    assert "give floor_dim or min_chunks, not both (got 2 and 1)" in capsys.readouterr().err  # fiited-floor's own
    with pytest.raises(SystemExit):
        main(["sweep", "--out", __file__])  # a file where sweep wants a directory
    assert "exists and is not a directory" in capsys.readouterr().err


def test_dense_says_it_does_not_prune_and_one_seed_shows_no_spread(capsys, tmp_path):
    from fiited_store.experiments.sweep import markdown_table

    assert main(["train", "--method", "dense", "--steps", "5", "--batch-size", "64", "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "no pruning" in first and "ratio" not in first
    results = [{"method": "dense", "ratio": 0.0, "auc": 0.78}, {"method": "fiited-manual", "ratio": 0.5, "auc": 0.77}]
    table = markdown_table(results, ["dense", "fiited-manual"], [0.5])
    assert "±" not in table and "one seed" in table and "| 0.5 | 0.7700 |" in table
    two = results + [
        {"method": "dense", "ratio": 0.0, "auc": 0.80},
        {"method": "fiited-manual", "ratio": 0.5, "auc": 0.79},
    ]
    assert "0.7800 ± 0.0100" in markdown_table(two, ["dense", "fiited-manual"], [0.5])
    assert "over 2 seeds" in markdown_table(two, ["dense", "fiited-manual"], [0.5])
    assert "The store's memory" not in table  # nothing measured it
    mem = [dict(r, store_vs_dense_with_optimizer=v) for r, v in zip(two[1::2], (0.4, 0.5))]
    assert "| 0.5 | 0.450 |" in markdown_table(mem, ["dense", "fiited-manual"], [0.5])


def test_inspect_into_a_closed_pipe_exits_quietly(saved_store):
    import subprocess
    import sys

    path, _ = saved_store
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiited_store.cli", "inspect", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line is written, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_inspect_plot_labels_every_table(saved_store, tmp_path):
    from fiited_store.tools import inspect_store, plot_inspection

    path, _ = saved_store
    with EmbeddingStore.open(path, "r") as s:
        legends = plot_inspection(s, inspect_store(s), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    for panel in ("kept_dim", "utility"):
        assert [label.split(" ")[0] for label in legends[panel]] == ["user", "item"], legends


def test_plots_without_matplotlib_name_the_extra(saved_store, tmp_path, capsys, monkeypatch):
    """matplotlib is the plot extra: asked for a plot without it, the command says how to get it."""
    import importlib.util

    from fiited_store import plotting

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # an import now fails too
    path, _ = saved_store
    assert main(["inspect", str(path), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'fiited-store[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(plotting.PlottingUnavailableError, match=r"fiited-store\[plot\]"):
        plotting.pyplot()
    assert (
        main(
            [
                "sweep",
                "--methods",
                "dense",
                "--steps",
                "3",
                "--batch-size",
                "32",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "sw"),
                "--no-progress",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "sweep.png will not be drawn" in captured.err and "fiited-store[plot]" in captured.err
    assert (tmp_path / "sw" / "sweep.csv").exists() and not (tmp_path / "sw" / "sweep.png").exists()


@pytest.mark.parametrize("array", ["pool_0/vectors", "pool_0/opt_state"])
def test_a_planted_nan_is_reported_by_verify_and_refused_by_export(saved_store, tmp_path, capsys, array):
    path, _ = saved_store
    arr = _array(path, array)
    a = arr[...]
    assert a.size > 0  # both pools keep row-wise Adagrad state
    a[3, 0] = np.nan
    arr[...] = a  # rewritten through zarr: a valid checksum, the same size
    assert main(["verify", str(path), "--no-progress"]) == 1
    assert "NaN or inf at slots [3]" in capsys.readouterr().out
    assert main(["export", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fails verification, nothing exported" in err and "NaN" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_os_error_is_one_line_naming_the_file(saved_store, capsys):
    path, _ = saved_store
    assert main(["export", str(path), "/proc/fiited-out", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "/proc/" in err, err


def test_export_onto_a_full_device_is_a_storage_full_error_and_leaves_nothing(saved_store, tmp_path):
    from fiited_store import StorageFullError
    from fiited_store.tools import export_store
    from tests.storage.test_tiers import file_size_limit

    path, _ = saved_store
    with file_size_limit(2048), pytest.raises(StorageFullError, match="writing export .* the device is full"):
        export_store(path, tmp_path / "out", "dense", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    export_store(path, tmp_path / "out", "dense", progress=False)  # room again: it works


def test_compact_on_a_full_device_exits_with_a_storage_error_and_loses_nothing(tmp_path):
    """The case that used to die of SIGBUS (exit 135): a real process, a real EFBIG from the kernel."""
    import resource
    import subprocess
    import sys

    path = tmp_path / "store"
    s = EmbeddingStore(TABLES, StoreConfig(mode="cache", budget_fraction=0.3, prune_period=4), path=path)
    train_steps(s, TABLES, 12, np.random.default_rng(0), id_range=400)
    s.save()
    expect = {t.name: s.lookup(t.name, np.arange(400)).copy() for t in TABLES}
    s.close()

    def limit():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    run = subprocess.run(
        [sys.executable, "-m", "fiited_store.cli", "compact", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "StorageFullError" in run.stderr and "Traceback" not in run.stderr
    assert not list(path.rglob("*.partial")) and not list(path.rglob("*.compact"))
    with EmbeddingStore.open(path, "r") as again:
        for t in TABLES:
            np.testing.assert_array_equal(again.lookup(t.name, np.arange(400)), expect[t.name])


def test_train_can_keep_pruned_chunks_in_the_disk_tier(capsys, tmp_path):
    args = [
        "train",
        "--steps",
        "60",
        "--batch-size",
        "256",
        "--prune-period",
        "10",
        "--ratio",
        "0.75",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args + ["--on-evict", "spill"]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["on_evict"] == "spill" and r["spilled_chunks"] > 0
    assert f"disk tier: {r['spilled_chunks']:,} pruned chunks" in out
    assert r["bytes_vs_dense"] == pytest.approx(0.25, abs=0.01)  # the pool's budget is the same
    assert main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["on_evict"] == "discard" and r["spilled_chunks"] == 0
    assert "disk tier" not in capsys.readouterr().out


def test_train_with_a_floor_keeps_a_chunk_of_every_row(tmp_path):
    """--min-chunks gives every table a floor: each row that has an entry keeps its
    first chunk, and the rest of the budget follows utility."""
    args = [
        "train",
        "--method",
        "fiited-manual",
        "--steps",
        "60",
        "--batch-size",
        "256",
        "--prune-period",
        "10",
        "--ratio",
        "0.75",
        "--chunks",
        "16",
        "--min-chunks",
        "1",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["min_chunks"] == 1 and r["bytes_vs_dense"] == pytest.approx(0.25, abs=0.01)
    from fiited_store.experiments.models.dlrm import build_embeddings

    emb = build_embeddings("fiited-manual", ["a", "b"], [50, 7], 32, 0.75, 16, 0.05, min_chunks=1)
    assert [t.min_chunks for t in emb.store.tables] == [1, 1]  # the floor reaches every table of the store
    emb.store.close()


def test_train_with_a_floor_of_its_own_width(tmp_path):
    """fiited-floor: every row keeps D / 16 dimensions, paid first; the chunks above
    them share the rest of the budget, so the pool is the same size as without."""
    args = [
        "train",
        "--method",
        "fiited-floor",
        "--steps",
        "60",
        "--batch-size",
        "256",
        "--prune-period",
        "10",
        "--ratio",
        "0.75",
        "--chunks",
        "3",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["method"] == "fiited-floor" and r["bytes_vs_dense"] == pytest.approx(0.25, abs=0.01)
    from fiited_store.experiments.models.dlrm import build_embeddings

    emb = build_embeddings("fiited-floor", ["a", "b"], [50, 7], 32, 0.75, 3, 0.05)
    s = emb.store
    assert [(t.name, t.dim, t.chunks, t.min_chunks) for t in s.tables] == [
        ("a:floor", 2, 1, 1),
        ("a", 30, 3, 0),
        ("b:floor", 2, 1, 1),
        ("b", 30, 3, 0),
    ]
    # 0.25 x 57 rows x 32 floats = 456: the floors' 57 x 2 first, the chunks above them the rest
    assert sorted((p.chunk_width, p.slots) for p in s.plans) == [(2, 57), (10, 34)]
    assert s.config.pruning.per_chunk == ManualRatios.linear(1 - 6 / 30, 3).per_chunk  # 6 of the 30 dims above
    # each feature's pooled row goes through its own learned D x D map, counted with the weights
    assert emb.projection.shape == (2, 32, 32) and emb.projection.requires_grad
    assert emb.weight_bytes() == sum(p.vector_bytes for p in s.pools) + 2 * 32 * 32 * 4
    from fiited_store.adapters import JaggedFeatures

    class _Batch:
        def features(self):
            return JaggedFeatures(["a", "b"], torch.tensor([3, 4, 1, 5]), torch.tensor([1, 1, 1, 1]))

    out = emb(_Batch())
    # the map is the collection's own (project=True; its arithmetic: tests/adapters/test_default_policy.py)
    assert emb.collection.projection is emb.projection
    torch.testing.assert_close(out, emb.collection(_Batch().features()))
    out.sum().backward()
    assert emb.projection.grad is not None and emb.projection.grad.abs().sum() > 0
    s.close()
    from fiited_store.experiments.data.synthetic import scaled_cardinalities

    assert r["projection_bytes"] == len(scaled_cardinalities(cap=r["synthetic_cap"])) * 32 * 32 * 4


def test_the_projection_is_fiited_floors_and_on_request_any_fiited_methods():
    from fiited_store.experiments.config import TrainConfig

    assert TrainConfig(method="fiited-floor", chunks=3).effective_project
    assert TrainConfig(method="fiited-manual", project=True).effective_project
    assert not TrainConfig(method="fiited-manual").effective_project
    assert not TrainConfig(method="md", project=True).effective_project  # md maps its tables already
    assert TrainConfig(method="fiited-floor", chunks=3).effective_floor_dim == 2
    assert TrainConfig(method="fiited-floor", chunks=2, floor_dim=4).effective_floor_dim == 4


@pytest.mark.parametrize("verb", ["inspect", "verify", "compact", "export"])
def test_every_verb_names_an_edited_metadata_file_instead_of_a_json_traceback(saved_store, tmp_path, capsys, verb):
    path, _ = saved_store
    f = ckpt_dir(path) / "entries" / "zarr.json"
    raw = bytearray(f.read_bytes())
    raw[0] = ord("x")  # not JSON any more, and the same size
    f.write_bytes(bytes(raw))
    args = {
        "inspect": ["inspect", str(path)],
        "verify": ["verify", str(path), "--no-progress"],
        "compact": ["compact", str(path), "--no-progress"],
        "export": ["export", str(path), str(tmp_path / "out.npz"), "--no-progress"],
    }[verb]
    code = main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == (1 if verb == "verify" else 2), text
    assert f"metadata file {f} was changed since it was saved" in text and "Traceback" not in text
    assert f.read_bytes() == bytes(raw)  # nothing was rewritten


def test_an_equal_memory_sweep_gives_the_peers_the_reference_runs_training_memory(tmp_path, capsys):
    from fiited_store.experiments.config import TrainConfig
    from fiited_store.experiments.sweep import sweep

    base = TrainConfig(steps=3, batch_size=32, synthetic_cap=2000, eval_samples=500, method="fiited-manual")
    results = sweep(
        base, ["fiited-manual", "hashing", "qr"], [0.75], [0], tmp_path / "sw", progress=False,
        equal_memory="fiited-manual",
    )  # fmt: skip
    ref, hashing, qr = results
    assert ref["method"] == "fiited-manual" and "memory_matched_ratio" not in ref
    for peer in (hashing, qr):
        assert peer["ratio"] == 0.75  # the nominal cell it is compared in
        assert peer["memory_matched_ratio"] == pytest.approx(1.0 - ref["training_vs_dense"])
    # the hashing trick's training memory is its rows' share: the reference's, up to rounding rows
    assert hashing["training_vs_dense"] == pytest.approx(ref["training_vs_dense"], rel=0.02)
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "At equal training memory: hashing, qr" in table and "Each method's whole training memory" in table
    assert main(["sweep", "--methods", "hashing", "--equal-memory", "fiited-manual", "--out", str(tmp_path)]) == 2
    assert "--equal-memory 'fiited-manual' is not among --methods" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fiited-floor", "hashing"])
def test_train_with_rowwise_adagrad_holds_one_accumulator_a_row(tmp_path, method):
    """--optimizer rowwise_adagrad trains every method with one accumulator per row (per
    chunk in the store): less memory than element-wise Adagrad, on the same yardstick."""
    held = {}
    for optimizer in ("adagrad", "rowwise_adagrad"):
        out = tmp_path / f"{optimizer}.json"
        args = ["train", "--method", method, "--steps", "30", "--batch-size", "128", "--prune-period", "10"]
        assert main([*args, "--optimizer", optimizer, "--no-progress", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["optimizer"] == optimizer and r["dense_training_bytes"] == 2 * r["dense_embedding_bytes"]
        assert 0.5 < r["auc"] < 1.0
        held[optimizer] = r
    a, rw = held["adagrad"], held["rowwise_adagrad"]
    if method == "hashing":  # a float per row of 32 instead of one per weight
        assert rw["training_bytes"] == pytest.approx(a["training_bytes"] * (1 + 1 / 32) / 2)
    else:  # the pool's state: a float per chunk (of 2 or 15 dimensions) instead of one per dimension
        pool = a["embedding_bytes"] - a["projection_bytes"]
        assert a["store_memory_bytes"] - rw["store_memory_bytes"] > 0.5 * pool

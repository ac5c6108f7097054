"""Checkpoints: exact round trips, one writer, crash safety, and clear errors on bad disks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fiited_store import (
    CorruptStoreError,
    DynamicRatio,
    EmbeddingStore,
    StorageFullError,
    StoreConfig,
    StoreLockedError,
    StoreReadOnlyError,
    TableConfig,
)
from fiited_store.storage import checkpoint
from fiited_store.verify import check_store
from tests.helpers import assert_unchanged, reseal, snapshot, train_steps

TABLES = [
    TableConfig("a", dim=8, chunks=2, num_embeddings=300, optimizer="adagrad"),
    TableConfig("b", dim=16, chunks=4, num_embeddings=300),
]

CONFIGS = {
    "prune-discard": StoreConfig(pruning=DynamicRatio(0.75), prune_period=4, sample_size=64),
    "prune-spill": StoreConfig(pruning=DynamicRatio(0.75), prune_period=4, sample_size=64, on_evict="spill"),
    "cache": StoreConfig(mode="cache", budget_fraction=0.3, prune_period=4),
}


def all_lookups(store):
    return {t.name: store.lookup(t.name, np.arange(t.num_embeddings)).copy() for t in TABLES}


def assert_lookups_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact_and_training_continues_identically(tmp_path, name):
    rng = np.random.default_rng(5)
    s = EmbeddingStore(TABLES, CONFIGS[name], path=tmp_path / "s")
    train_steps(s, TABLES, 13, rng, id_range=300)
    expect = all_lookups(s)
    s.save()
    with EmbeddingStore.open(tmp_path / "s", "r") as r:
        assert_lookups_equal(expect, all_lookups(r))
        assert r.stats()["total"] == s.stats()["total"] | {"bytes": r.stats()["total"]["bytes"]}
        assert check_store(r) == []
    # the writer trains on; a second copy opened from the checkpoint does the same steps
    copy_dir = tmp_path / "copy"
    s.save(copy_dir)
    train_steps(s, TABLES, 9, np.random.default_rng(6), id_range=300)
    with EmbeddingStore.open(copy_dir, "r+") as c:
        train_steps(c, TABLES, 9, np.random.default_rng(6), id_range=300)
        assert_lookups_equal(all_lookups(s), all_lookups(c))
    s.close()


def test_checkpoint_is_isolated_from_later_spills(tmp_path):
    rng = np.random.default_rng(1)
    s = EmbeddingStore(TABLES, CONFIGS["cache"], path=tmp_path / "s")
    train_steps(s, TABLES, 10, rng, id_range=300)
    expect = all_lookups(s)
    s.save()
    train_steps(s, TABLES, 15, rng, id_range=300)  # rewrites tier chunk files the checkpoint links to
    assert s.counters.spilled_chunks > 0
    with EmbeddingStore.open(tmp_path / "s", "r") as r:
        assert_lookups_equal(expect, all_lookups(r))
    s.close()


def saved_after_training(path, config, steps, rng) -> Path:
    """A store at path, trained for steps on ids below 300, saved and closed; returns its checkpoint."""
    s = EmbeddingStore(TABLES, config, path=path)
    train_steps(s, TABLES, steps, rng, id_range=300)
    ckpt = s.save()
    s.close()
    return ckpt


def test_a_reader_keeps_reading_its_checkpoint_while_a_writer_saves(tmp_path):
    rng = np.random.default_rng(1)
    saved_after_training(tmp_path / "s", CONFIGS["cache"], 10, rng)
    reader = EmbeddingStore.open(tmp_path / "s", "r")
    pinned = reader.checkpoint
    assert reader.stats()["total"]["spilled_chunks"] > 0
    with EmbeddingStore.open(tmp_path / "s", "r") as first:
        expect = all_lookups(first)
    with EmbeddingStore.open(tmp_path / "s", "r+") as w:  # another writer trains and saves twice
        for _ in range(2):
            train_steps(w, TABLES, 3, rng, id_range=300)
            w.save()
        assert (tmp_path / "s" / pinned).is_dir()  # kept: a reader holds it
        latest = w.checkpoint
    assert_lookups_equal(expect, all_lookups(reader))  # the values it opened, tier chunks included
    reader.close()
    with EmbeddingStore.open(tmp_path / "s", "r+") as w:
        w.save()  # nobody pins the old checkpoint any more: removed
    names = sorted(p.name for p in (tmp_path / "s").glob("ckpt-*"))
    assert pinned not in names and latest not in names and len(names) == 1


def test_a_reader_of_a_vanished_checkpoint_raises_instead_of_reading_zeros(tmp_path):
    from fiited_store import CorruptStoreError

    rng = np.random.default_rng(1)
    saved_after_training(tmp_path / "s", CONFIGS["cache"], 10, rng)
    reader = EmbeddingStore.open(tmp_path / "s", "r")
    reader._pin.release()  # as if it had never pinned it (a store saved by an older version)
    with EmbeddingStore.open(tmp_path / "s", "r+") as w:
        for _ in range(2):
            train_steps(w, TABLES, 3, rng, id_range=300)
            w.save()
    with pytest.raises(CorruptStoreError, match=r"segment file \S+/chunks/c/\d+/0 is missing"):
        all_lookups(reader)
    reader.close()


def test_a_deleted_tier_chunk_file_is_named_not_read_as_zeros(tmp_path):
    from fiited_store import CorruptStoreError

    saved_after_training(tmp_path / "s", CONFIGS["cache"], 10, np.random.default_rng(1))
    chunk = sorted((tmp_path / "s").glob("ckpt-*/tier_*/data/chunks/c/*/0"))[0]
    chunk.unlink()
    with pytest.raises(
        CorruptStoreError, match=rf"chunks/c/{chunk.parent.name}/0 is missing \(the checkpoint lists it\)"
    ):
        EmbeddingStore.open(tmp_path / "s", "r")


@pytest.mark.parametrize(
    "victim",
    [
        "pool_*/vectors/c/0/0",
        "entries/addr/c/0/0",
        "entries/util/c/0/0",
        "pool_*/opt_state/c/0/0",
        "tier_*/data/chunks/c/*/0",
    ],
)
def test_a_deleted_or_truncated_array_chunk_file_is_named_on_open(tmp_path, victim):
    from fiited_store import CorruptStoreError
    from fiited_store.tools import verify_store

    saved_after_training(tmp_path / "s", CONFIGS["cache"], 10, np.random.default_rng(1))
    f = sorted((tmp_path / "s").glob(f"ckpt-*/{victim}"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStoreError, match=r"has \d+ bytes, the checkpoint lists \d+"):
        EmbeddingStore.open(tmp_path / "s", "r")
    f.unlink()
    with pytest.raises(CorruptStoreError, match=r"is missing \(the checkpoint lists it\)"):
        EmbeddingStore.open(tmp_path / "s", "r")
    assert any("is missing" in p for p in verify_store(tmp_path / "s"))


def test_one_writer_at_a_time(tmp_path):
    s = EmbeddingStore(TABLES, CONFIGS["prune-spill"], path=tmp_path / "s")
    s.save()
    with pytest.raises(StoreLockedError, match="already open for writing"):
        EmbeddingStore.open(tmp_path / "s", "r+")
    with EmbeddingStore.open(tmp_path / "s", "r"):
        pass  # readers need no lock
    s.close()
    with EmbeddingStore.open(tmp_path / "s", "r+") as again:
        with pytest.raises(StoreLockedError):
            EmbeddingStore.open(tmp_path / "s", "r+")
        assert again.stats()["total"]["entries"] == 0


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path):
    s = EmbeddingStore(TABLES, CONFIGS["prune-spill"], path=tmp_path / "s")
    s.save()
    (tmp_path / "s" / ".lock").unlink()
    with pytest.raises(StoreLockedError, match="already open for writing"):
        EmbeddingStore.open(tmp_path / "s", "r+")
    s.close()
    with EmbeddingStore.open(tmp_path / "s", "r+"):
        pass  # the first writer gone, the next gets in


def test_a_save_refuses_to_replace_another_store_and_changes_nothing(tmp_path, rng):
    from fiited_store import StorageError

    saved_after_training(tmp_path / "other", CONFIGS["prune-discard"], 3, rng)
    other_files = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / "other").rglob("*"))
    with EmbeddingStore.open(tmp_path / "other", "r") as r:
        before = snapshot(r)
    s = EmbeddingStore(TABLES, CONFIGS["prune-spill"])
    train_steps(s, TABLES, 2, rng, id_range=300)
    with pytest.raises(StorageError, match="holds another store; nothing was changed") as info:
        s.save(tmp_path / "other")
    assert info.value.errno == errno.EEXIST
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / "other").rglob("*")) == other_files
    with EmbeddingStore.open(tmp_path / "other", "r") as r:
        assert_unchanged(before, snapshot(r))
    s.save(tmp_path / "mine")
    s.save(tmp_path / "mine")  # its own earlier save it may replace
    s.close()


def test_a_refused_open_or_compact_of_a_directory_without_a_store_leaves_nothing_behind(tmp_path):
    from fiited_store.tools import compact_store

    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptStoreError):
        EmbeddingStore.open(tmp_path / "empty", "r+")
    with pytest.raises(CorruptStoreError):
        compact_store(tmp_path / "empty", progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_read_only_handle_refuses_writes(tmp_path):
    rng = np.random.default_rng(2)
    saved_after_training(tmp_path / "s", CONFIGS["prune-discard"], 3, rng)
    with EmbeddingStore.open(tmp_path / "s", "r") as r:
        before = snapshot(r)
        for fn in (
            lambda: r.pooled_lookup("a", np.arange(3), np.arange(4), train=True),
            r.step,
            r.prune,
            lambda: r.insert_or_assign("a", np.arange(1), np.ones((1, 8), np.float32)),
            lambda: r.save(),
        ):
            with pytest.raises(StoreReadOnlyError):
                fn()
        assert_unchanged(before, snapshot(r))


def test_creating_a_store_over_an_existing_one_is_refused(tmp_path):
    s = EmbeddingStore(TABLES, CONFIGS["prune-discard"], path=tmp_path / "s")
    s.save()
    s.close()
    with pytest.raises(Exception, match="already holds a store"):
        EmbeddingStore(TABLES, CONFIGS["prune-discard"], path=tmp_path / "s")


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from fiited_store import EmbeddingStore, StoreConfig, TableConfig, DynamicRatio
    from fiited_store.storage import checkpoint, increments
    path, point, out = sys.argv[1], sys.argv[2], sys.argv[3]
    increments.WHOLE_BELOW_BYTES = 0  # so that the second save is an incremental one, as a big store's is
    tables = [TableConfig("a", dim=8, chunks=2, num_embeddings=300),
              TableConfig("b", dim=16, chunks=4, num_embeddings=300)]
    config = StoreConfig(mode="cache", budget_fraction=0.3, prune_period=4, tier_segment_slots=64)
    s = EmbeddingStore(tables, config, path=path)
    rng = np.random.default_rng(0)
    def steps(n):
        for _ in range(n):
            ids = rng.integers(0, 300, 64)
            b = s.pooled_lookup(["a", "b"], ids, np.arange(65), train=True)
            s.backward(b, rng.standard_normal(b.output.shape).astype(np.float32))
            s.step()
    def dump(name):
        np.savez(os.path.join(out, name), a=s.lookup("a", np.arange(300)), b=s.lookup("b", np.arange(300)))
    steps(8); s.save(); dump("first.npz")
    steps(8); dump("second.npz")
    def hook(p):
        if p == point:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._save_hook = hook
    if point.startswith("compaction"):  # killed once a segment is dropped, after a step or before a save
        from fiited_store.storage.segment_tier import SegmentTier
        real = SegmentTier.drop_segments
        def drop_then_die(self, seg_ids):
            real(self, seg_ids)
            os.kill(os.getpid(), signal.SIGKILL)
        SegmentTier.drop_segments = drop_then_die
        import dataclasses
        s.config = dataclasses.replace(config, tier_max_garbage=0.01)
        if point == "compaction-after-step":
            steps(4)
    s.save()
    print("save finished without reaching", point)
""")

SAVE_POINTS = [
    "group-created",
    "entries-written",
    "pool-0-written",
    "tier-0-linked",
    "attrs-written",
    "fsynced",
    "renamed",
    "manifest-replaced",
    "compaction-after-step",
    "compaction-before-checkpoint",
]


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkill_during_save_leaves_a_whole_checkpoint(tmp_path, point):
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "s"), point, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    expect = np.load(tmp_path / ("second.npz" if point == "manifest-replaced" else "first.npz"))
    with EmbeddingStore.open(tmp_path / "s", "r+") as s:  # the dead writer's lock died with it
        assert check_store(s) == []
        np.testing.assert_array_equal(s.lookup("a", np.arange(300)), expect["a"])
        np.testing.assert_array_equal(s.lookup("b", np.arange(300)), expect["b"])
        s.save()  # and the store is writable again; leftovers are cleaned up
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.startswith("ckpt"))
    assert len(names) == 1 and not names[0].endswith(".partial")


def test_full_disk_during_save_loses_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    s = EmbeddingStore(TABLES, CONFIGS["prune-spill"], path=tmp_path / "s")
    train_steps(s, TABLES, 8, rng, id_range=300)
    s.save()
    saved = all_lookups(s)
    train_steps(s, TABLES, 4, rng, id_range=300)
    before = snapshot(s)
    real = checkpoint._write_array
    calls = {"n": 0}

    def failing(group, name, data, fill):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(group, name, data, fill)

    monkeypatch.setattr(checkpoint, "_write_array", failing)
    with pytest.raises(StorageFullError, match="device is full"):
        s.save()
    monkeypatch.undo()
    assert_unchanged(before, snapshot(s))
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "s").iterdir())
    with EmbeddingStore.open(tmp_path / "s", "r") as r:
        assert_lookups_equal(saved, all_lookups(r))
    s.save()  # once space is back, saving works
    s.close()


def test_corrupt_manifest_and_metadata_are_reported(tmp_path):
    s = EmbeddingStore(TABLES, CONFIGS["prune-discard"], path=tmp_path / "s")
    s.save()
    s.close()
    manifest = tmp_path / "s" / "fiited.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(CorruptStoreError, match="fiited.json is not valid JSON"):
        EmbeddingStore.open(tmp_path / "s")
    manifest.write_text(json.dumps({"format": "fiited-store", "format_version": 99, "checkpoint": "x"}))
    with pytest.raises(CorruptStoreError, match="format_version 99"):
        EmbeddingStore.open(tmp_path / "s")
    manifest.write_text(good)
    ckpt = tmp_path / "s" / json.loads(good)["checkpoint"]
    meta = ckpt / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["config"]["tables"][0]["dim"] = 7
    meta.write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match="zarr.json was changed since it was saved"):
        EmbeddingStore.open(tmp_path / "s")  # an edit: the digests name it
    reseal(tmp_path / "s")  # as a writer with a bug would have saved it: the checks behind the digests
    with pytest.raises(CorruptStoreError, match="configuration is not valid"):
        EmbeddingStore.open(tmp_path / "s")
    doc["attributes"]["config"]["tables"][0]["dim"] = 16  # valid, but the arrays disagree
    meta.write_text(json.dumps(doc))
    reseal(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match="shape"):
        EmbeddingStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match="not a fiited-store store"):
        EmbeddingStore.open(tmp_path)


def test_truncated_array_chunk_is_reported_on_open(tmp_path):
    ckpt = saved_after_training(tmp_path / "s", CONFIGS["prune-discard"], 3, np.random.default_rng(4))
    chunk = next(p for p in (ckpt / "pool_0" / "vectors").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CorruptStoreError, match=r"pool_0/vectors/c/0/0 has 10 bytes, the checkpoint lists \d+"):
        EmbeddingStore.open(tmp_path / "s")


def _flip_one_bit(f: Path, at: int = 100) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0x01  # a float's lowest mantissa bit: finite, and the same size
    f.write_bytes(bytes(data))


def test_a_flipped_bit_in_an_array_fails_its_checksum_on_open(tmp_path):
    ckpt = saved_after_training(tmp_path / "s", CONFIGS["prune-discard"], 3, np.random.default_rng(4))
    _flip_one_bit(ckpt / "pool_0" / "vectors" / "c" / "0" / "0")
    with pytest.raises(CorruptStoreError, match=r"pool_0/vectors cannot be decoded .*checksum"):
        EmbeddingStore.open(tmp_path / "s")


def test_a_flipped_bit_in_a_tier_chunk_is_found_by_verify_and_refused_by_export(tmp_path):
    from fiited_store.tools import export_store, verify_store

    saved_after_training(tmp_path / "s", CONFIGS["cache"], 10, np.random.default_rng(1))
    chunk = sorted((tmp_path / "s").glob("ckpt-*/tier_*/data/chunks/c/*/0"))[0]
    _flip_one_bit(chunk)
    problems = verify_store(tmp_path / "s")
    assert any("fails its checksum" in p and "chunks/c/" in p for p in problems), problems
    with pytest.raises(CorruptStoreError, match="fails its checksum"):
        export_store(tmp_path / "s", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


READ_ONLY_SCRIPT = textwrap.dedent("""
    import sys
    from fiited_store import EmbeddingStore, StoreReadOnlyError
    path = sys.argv[1]
    with EmbeddingStore.open(path, "r") as r:
        r.lookup("a", [1, 2])
    try:
        EmbeddingStore.open(path, "r+")
    except StoreReadOnlyError as e:
        print("REFUSED", e)
""")


def _run_on_read_only_directory(store_dir: Path) -> subprocess.CompletedProcess | None:
    """Run READ_ONLY_SCRIPT where store_dir cannot be written: an unprivileged user on a
    chmod-ed directory, or, as root (who ignores permission bits), a read-only bind
    mount in a private mount namespace. None when neither is possible here."""
    cmd = [sys.executable, "-c", READ_ONLY_SCRIPT, str(store_dir)]
    if os.geteuid() != 0:
        for root, _dirs, _files in os.walk(store_dir):
            os.chmod(root, 0o555)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        finally:
            for root, _dirs, _files in os.walk(store_dir):
                os.chmod(root, 0o755)
    if shutil.which("unshare") is None:
        return None
    d = str(store_dir)
    shell = f'mount --bind "{d}" "{d}" && mount -o remount,ro,bind "{d}" && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", *cmd], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "REFUSED" not in proc.stdout and ("unshare" in proc.stderr or "mount" in proc.stderr):
        return None
    return proc


def test_read_only_directory_gives_a_clear_error(tmp_path, monkeypatch):
    s = EmbeddingStore(TABLES, CONFIGS["prune-discard"], path=tmp_path / "s")
    train_steps(s, TABLES, 2, np.random.default_rng(0), id_range=300)
    s.save()
    s.close()
    (tmp_path / "s" / ".lock").unlink()
    proc = _run_on_read_only_directory(tmp_path / "s")
    if proc is not None:
        assert "REFUSED" in proc.stdout and "not writable" in proc.stdout, proc.stdout + proc.stderr
        return
    # no way to make a directory read-only here: inject the error the kernel would give
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(StoreReadOnlyError, match="not writable"):
        EmbeddingStore.open(tmp_path / "s", "r+")


FIXTURE = Path(__file__).parents[1] / "fixtures" / "store_v1"


def test_committed_format_fixture_still_decodes():
    """A store written by format version 1 must open and read the same forever."""
    expected = json.loads((FIXTURE.parent / "store_v1_expected.json").read_text())
    with EmbeddingStore.open(FIXTURE, "r") as s:
        assert check_store(s) == []
        for name, rows in expected["lookups"].items():
            np.testing.assert_array_equal(s.lookup(name, np.array(expected["ids"][name])), np.array(rows, np.float32))
        assert s.step_count == expected["step_count"]
        assert s.stats()["total"]["spilled_chunks"] == expected["spilled_chunks"]


FIXTURE_V2 = Path(__file__).parents[1] / "fixtures" / "store_v2"


def test_committed_format_v2_fixture_still_decodes():
    """Format version 2 (direct and hashed indexes side by side) must open and read the same forever."""
    expected = json.loads((FIXTURE_V2.parent / "store_v2_expected.json").read_text())
    with EmbeddingStore.open(FIXTURE_V2, "r") as s:
        assert check_store(s) == []
        assert [t.direct for t in s.tables] == [True, False]
        assert s.entries.direct_rows == 64 and s.entries.capacity > 0
        for name, rows in expected["lookups"].items():
            ids = np.array(expected["ids"][name], np.int64)
            np.testing.assert_array_equal(s.lookup(name, ids), np.array(rows, np.float32))
        assert s.step_count == expected["step_count"]
        assert s.stats()["total"]["entries"] == expected["entries"]
        assert s.stats()["total"]["spilled_chunks"] == expected["spilled_chunks"]


FIXTURE_V3 = Path(__file__).parents[1] / "fixtures" / "store_v3"


def check_fixture_reads_as_recorded(fixture: Path, version: int) -> None:
    """A committed store of format ``version`` opens, passes the invariants, reads the rows,
    counts and spilled chunks recorded beside it, and verifies."""
    from fiited_store.tools import verify_store

    expected = json.loads((fixture.parent / f"{fixture.name}_expected.json").read_text())
    assert json.loads((fixture / "fiited.json").read_text())["format_version"] == version
    with EmbeddingStore.open(fixture, "r") as s:
        assert check_store(s) == []
        assert [t.direct for t in s.tables] == [True, False]
        for name, rows in expected["lookups"].items():
            ids = np.array(expected["ids"][name], np.int64)
            np.testing.assert_array_equal(s.lookup(name, ids), np.array(rows, np.float32))
        assert s.step_count == expected["step_count"]
        assert s.stats()["total"]["entries"] == expected["entries"]
        assert s.stats()["total"]["spilled_chunks"] == expected["spilled_chunks"] > 0
    assert verify_store(fixture) == []


def test_committed_format_v3_fixture_still_decodes_and_verifies():
    """Format version 3 (checksums, every chunk written, the file list) must open, read and verify the same forever."""
    check_fixture_reads_as_recorded(FIXTURE_V3, 3)


def test_a_version_1_store_saved_again_is_the_current_version_and_reads_the_same(tmp_path):
    expected = json.loads((FIXTURE.parent / "store_v1_expected.json").read_text())
    path = tmp_path / "s"
    shutil.copytree(FIXTURE, path)
    with EmbeddingStore.open(path, "r+") as s:
        assert all(t.index == "hashed" for t in s.tables)  # version 1 had only the hashed index
        s.save()
    assert json.loads((path / "fiited.json").read_text())["format_version"] == checkpoint.FORMAT_VERSION == 5
    with EmbeddingStore.open(path, "r") as s:
        assert check_store(s) == []
        for name, rows in expected["lookups"].items():
            np.testing.assert_array_equal(s.lookup(name, np.array(expected["ids"][name])), np.array(rows, np.float32))


WRITER = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from fiited_store import EmbeddingStore
from tests.helpers import train_steps
from tests.storage.test_checkpoint import TABLES, all_lookups
path, expected, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
rng = np.random.default_rng(7)
with EmbeddingStore.open(path, "r+") as w:
    end = time.time() + seconds
    while time.time() < end:
        train_steps(w, TABLES, 2, rng, id_range=300)
        ckpt = w.save().name
        np.savez(f"{{expected}}/{{ckpt}}.tmp.npz", **all_lookups(w))
        import os; os.replace(f"{{expected}}/{{ckpt}}.tmp.npz", f"{{expected}}/{{ckpt}}.npz")
print("saves", len(__import__("os").listdir(expected)))
"""


@pytest.mark.slow
def test_readers_open_and_read_consistently_while_another_process_saves(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    saved_after_training(tmp_path / "s", CONFIGS["cache"], 6, np.random.default_rng(1))
    expected = tmp_path / "expected"
    expected.mkdir()
    root = str(Path(__file__).resolve().parents[2])
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(root=root), str(tmp_path / "s"), str(expected), "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    opened, held, errors, observed = 0, [], [], []
    try:
        while writer.poll() is None:
            try:
                r = EmbeddingStore.open(tmp_path / "s", "r")
            except Exception as exc:  # noqa: BLE001 - every failure to open is what this test counts
                errors.append(repr(exc))
                continue
            opened += 1
            held.append((r, r.checkpoint, all_lookups(r)))
            observed.append(held[-1][1:])
            if len(held) > 3:  # keep a few readers open across several saves
                r0, name, first = held.pop(0)
                assert_lookups_equal(first, all_lookups(r0))  # still its checkpoint's values
                r0.close()
            time.sleep(0.01)
    finally:
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert errors == [] and opened > 10, (errors[:3], opened, out)
    for r, _name, seen in held:
        assert_lookups_equal(seen, all_lookups(r))
        r.close()
    checked = 0
    for name, seen in observed:  # what each reader read against what the writer saved in that checkpoint
        f = expected / f"{name}.npz"
        if f.exists():  # the first checkpoint was saved before the writer started recording
            with np.load(f) as saved:
                assert_lookups_equal(dict(saved), seen)
            checked += 1
    assert checked > 5, (checked, opened)
    assert int(out.split()[-1]) > 3, out


FIXTURE_V4 = Path(__file__).parents[1] / "fixtures" / "store_v4"


def test_committed_format_v4_fixture_still_decodes_and_verifies():
    """Format version 4 (the disk tier as sealed segments, arrays as a base plus deltas)
    must open, read and verify the same forever."""
    ckpt = FIXTURE_V4 / json.loads((FIXTURE_V4 / "fiited.json").read_text())["checkpoint"]
    state = json.loads((ckpt / "zarr.json").read_text())["attributes"]["state"]
    assert state["increments"] and any(len(t["segments"]) > 1 for t in state["tiers"] if t)  # what it must cover
    check_fixture_reads_as_recorded(FIXTURE_V4, 4)


FIXTURE_V5 = Path(__file__).parents[1] / "fixtures" / "store_v5"


def test_committed_format_v5_fixture_still_decodes_and_verifies():
    """Format version 5 (digests of every metadata file and of the manifest) must open, read
    and verify the same forever, its digests checked."""
    from fiited_store.storage import digests

    ckpt = FIXTURE_V5 / json.loads((FIXTURE_V5 / "fiited.json").read_text())["checkpoint"]
    listed = json.loads((ckpt / digests.DIGESTS).read_text())["files"]
    assert "zarr.json" in listed and len(listed) == len(digests.metadata_files(ckpt)) > 10
    check_fixture_reads_as_recorded(FIXTURE_V5, 5)

"""Incremental saves: block hashes, deltas over hard-linked bases, rebases, and damage named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store import CorruptStoreError, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.storage import increments
from fiited_store.tools import compact_store, verify_store
from fiited_store.verify import check_store
from tests.helpers import train_steps

BLOCK = increments.BLOCK_BYTES


@settings(max_examples=60, deadline=None)
@given(nbytes=st.integers(1, 5 * BLOCK + 17), data=st.data())
def test_one_changed_byte_changes_exactly_its_blocks_hash(nbytes, data):
    rng = np.random.default_rng(nbytes)
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    at = data.draw(st.integers(0, nbytes - 1))
    b = a.copy()
    b[at] ^= np.uint8(data.draw(st.integers(1, 255)))
    ha, hb = increments.hashes_of(a), increments.hashes_of(b)
    assert ha.size == increments.n_blocks(nbytes)
    np.testing.assert_array_equal(np.flatnonzero(ha != hb), [at // BLOCK])


def test_equal_content_at_different_blocks_hashes_differently():
    a = np.zeros(4 * BLOCK, np.uint8)  # four identical blocks: their numbers tell them apart
    assert np.unique(increments.hashes_of(a)).size == 4


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 700), cols=st.sampled_from([1, 3, 8, 16]), dtype=st.sampled_from(["f4", "i4", "u2", "i8"]))
def test_gathered_blocks_applied_to_the_old_array_give_the_new_one(rows, cols, dtype):
    rng = np.random.default_rng(rows * cols)
    old = rng.integers(0, 1000, (rows, cols)).astype(dtype)
    new = old.copy()
    touched = rng.integers(0, rows, max(1, rows // 10))
    new[touched] += 1
    changed = np.flatnonzero(increments.hashes_of(old) != increments.hashes_of(new)).astype(np.int64)
    rebuilt = old.copy()
    increments.apply_blocks(rebuilt, changed, increments.gather_blocks(new, changed))
    np.testing.assert_array_equal(rebuilt, new)


TABLES = [
    TableConfig("a", dim=8, chunks=2, num_embeddings=3000, optimizer="adagrad"),
    TableConfig("b", dim=16, chunks=4, num_embeddings=3000),
]
CACHE = StoreConfig(mode="cache", budget_fraction=0.3, prune_period=4)


@pytest.fixture
def every_array_incremental(monkeypatch):
    """The test stores are small: let every array take deltas, as a big store's do."""
    monkeypatch.setattr(increments, "WHOLE_BELOW_BYTES", 0)


def lookups(store):
    return {t.name: store.lookup(t.name, np.arange(t.num_embeddings)).copy() for t in TABLES}


def assert_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def described(path: Path) -> dict:
    ckpt = path / json.loads((path / "fiited.json").read_text())["checkpoint"]
    return json.loads((ckpt / "zarr.json").read_text())["attributes"]["state"].get("increments", {})


def delta_dirs(path: Path) -> list[Path]:
    return sorted(path.glob("ckpt-*/**/*.deltas/[0-9][0-9][0-9][0-9]"))


def inodes(ckpt: Path) -> set[int]:
    return {f.stat().st_ino for f in ckpt.rglob("*") if f.is_file()}


def new_bytes(ckpt: Path, before: set[int] = frozenset()) -> int:
    """Bytes in files of this checkpoint that are not links to files in ``before`` (what the save wrote)."""
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.stat().st_ino not in before)


def test_a_second_save_writes_deltas_of_the_blocks_that_changed(tmp_path, every_array_incremental):
    path = tmp_path / "s"
    s = EmbeddingStore(TABLES, CACHE, path=path)
    train_steps(s, TABLES, 6, np.random.default_rng(1), id_range=3000)
    first = s.save()
    whole = new_bytes(first)
    assert described(path) == {} and delta_dirs(path) == []
    linked = inodes(first)
    ids = np.arange(40)  # a few rows change: the next save writes a few blocks
    s.insert_or_assign("a", ids, np.full((40, 8), 2.5, np.float32))
    second = s.save()
    expect = lookups(s)
    inc = described(path)
    assert inc and all(v["deltas"] == 1 for v in inc.values())
    assert new_bytes(second, linked) < whole / 4
    assert not first.exists()  # the older checkpoint goes; its files live on as links
    s.close()
    with EmbeddingStore.open(path, "r") as r:
        assert_equal(expect, lookups(r))
        assert check_store(r) == []
    assert verify_store(path) == []


def saved_twice(path, seed: int, table: str, rows: np.ndarray):
    """A store trained five steps and saved, then ``table``'s first rows set to ``rows`` and
    saved again (the second save writes deltas); returns the store and that checkpoint."""
    s = EmbeddingStore(TABLES, CACHE, path=path)
    train_steps(s, TABLES, 5, np.random.default_rng(seed), id_range=3000)
    s.save()
    s.insert_or_assign(table, np.arange(rows.shape[0]), rows)
    return s, s.save()


def test_an_unchanged_save_links_everything_and_reads_the_same(tmp_path, every_array_incremental):
    path = tmp_path / "s"
    s, second = saved_twice(path, 2, "b", np.ones((5, 16), np.float32))
    before, linked = described(path), inodes(second)
    third = s.save()  # nothing changed since
    assert described(path) == before
    assert new_bytes(third, linked) < 64 << 10  # metadata only
    expect = lookups(s)
    s.close()
    with EmbeddingStore.open(path, "r") as r:
        assert_equal(expect, lookups(r))


def test_reopened_for_writing_the_next_save_is_incremental_and_exact(tmp_path, every_array_incremental):
    path = tmp_path / "s"
    s = EmbeddingStore(TABLES, CACHE, path=path)
    rng = np.random.default_rng(3)
    train_steps(s, TABLES, 5, rng, id_range=3000)
    s.save()
    s.close()
    with EmbeddingStore.open(path, "r+") as w:
        w.insert_or_assign("a", np.arange(10), np.full((10, 8), -1.0, np.float32))
        w.save()
        assert described(path)  # the hashes came from the open
        train_steps(w, TABLES, 3, rng, id_range=3000)
        w.save()
        expect = lookups(w)
    with EmbeddingStore.open(path, "r") as r:
        assert_equal(expect, lookups(r))
        assert check_store(r) == []


def test_a_save_elsewhere_is_whole_and_compaction_leaves_no_deltas(tmp_path, every_array_incremental):
    path = tmp_path / "s"
    s, _ = saved_twice(path, 4, "a", np.full((10, 8), 3.0, np.float32))
    other = tmp_path / "copy"
    s.save(other)
    expect = lookups(s)
    s.close()
    assert described(other) == {} and delta_dirs(other) == []
    assert delta_dirs(path)
    compact_store(path, progress=False)
    assert described(path) == {} and delta_dirs(path) == []
    for p in (other, path):
        with EmbeddingStore.open(p, "r") as r:
            assert_equal(expect, lookups(r))


def test_deltas_are_rebased_once_they_pass_a_quarter_of_the_array(tmp_path, every_array_incremental, monkeypatch):
    path = tmp_path / "s"
    s = EmbeddingStore(TABLES, CACHE, path=path)
    s.save()
    rng = np.random.default_rng(5)
    counts = []  # deltas of the pool's vectors after each save
    for i in range(30):
        s.insert_or_assign("a", rng.integers(0, 3000, 12), np.full((12, 8), float(i), np.float32))
        s.save()
        inc = described(path)
        counts.append(inc.get("pool_0/vectors", {"deltas": 0})["deltas"])
        for v in inc.values():
            assert v["delta_bytes"] <= increments.REBASE_FRACTION * v["base_bytes"]
    peak = counts.index(max(counts))
    assert max(counts) >= 3 and min(counts[peak:]) < max(counts), counts  # grew, then rebased
    monkeypatch.setattr(increments, "MAX_DELTAS", 2)
    for i in range(4):
        s.insert_or_assign("a", np.arange(i, i + 1), np.full((1, 8), 9.0, np.float32))
        s.save()
        assert all(v["deltas"] <= 2 for v in described(path).values())
    expect = lookups(s)
    s.close()
    with EmbeddingStore.open(path, "r") as r:
        assert_equal(expect, lookups(r))


def _store_with_a_delta(path: Path) -> Path:
    s = EmbeddingStore(TABLES, CACHE, path=path)
    train_steps(s, TABLES, 4, np.random.default_rng(6), id_range=3000)
    s.save()
    s.insert_or_assign("a", np.arange(30), np.full((30, 8), 7.0, np.float32))
    s.save()
    s.close()
    dirs = delta_dirs(path)
    assert dirs
    return dirs[0]


def test_a_missing_delta_is_named_not_an_older_value(tmp_path, every_array_incremental):
    delta = _store_with_a_delta(tmp_path / "s")
    shutil.rmtree(delta)
    rel = delta.relative_to(delta.parents[2])  # e.g. entries/addr.deltas/0000
    with pytest.raises(CorruptStoreError, match=rf"{rel}/\S+ is missing \((the checkpoint lists it|listed in \S+)\)"):
        EmbeddingStore.open(tmp_path / "s", "r")
    assert verify_store(tmp_path / "s")


def test_a_corrupt_delta_chunk_is_named(tmp_path, every_array_incremental):
    delta = _store_with_a_delta(tmp_path / "s")
    chunk = sorted((delta / "data").rglob("c/*/*"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=r"\.deltas/0000"):
        EmbeddingStore.open(tmp_path / "s", "r")


def test_delta_blocks_out_of_range_are_named(tmp_path, every_array_incremental):
    import zarr

    delta = _store_with_a_delta(tmp_path / "s")
    blocks = zarr.open_array(delta / "blocks", mode="r+")
    bad = blocks[:]
    bad[-1] = 1 << 40
    # written through zarr, so its checksum is right: the range check must catch it
    blocks[:] = bad
    with pytest.raises(CorruptStoreError, match=r"blocks"):
        EmbeddingStore.open(tmp_path / "s", "r")

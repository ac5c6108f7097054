"""A checkpoint's metadata is covered by digests: any edit of a ``zarr.json`` or of the
manifest, a lowered format version, a missing or added metadata file is a
``CorruptStoreError`` naming the file, from open, verify and the command line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiited_store import CorruptStoreError, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.storage import digests
from fiited_store.tools import verify_store
from tests.helpers import train_steps

TABLES = [
    TableConfig("u", dim=8, chunks=2, num_embeddings=300),
    TableConfig("h", dim=8, chunks=2, num_embeddings=300, index="hashed"),
]
FIXTURE_V4 = Path(__file__).parents[1] / "fixtures" / "store_v4"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("digests") / "s"
    s = EmbeddingStore(TABLES, StoreConfig(mode="cache", budget_fraction=0.25, prune_period=5), path=path)
    train_steps(s, TABLES, 6, np.random.default_rng(0), id_range=300)
    s.save()
    s.close()
    return path


@pytest.fixture
def store(saved, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(saved, path)
    return path


def checkpoint_of(path: Path) -> Path:
    return path / json.loads((path / "fiited.json").read_text())["checkpoint"]


def refused_everywhere(path: Path, match: str) -> None:
    for mode in ("r", "r+"):
        with pytest.raises(CorruptStoreError, match=match):
            EmbeddingStore.open(path, mode)
    problems = verify_store(path)
    assert problems and any(re.search(match, p) for p in problems), problems


def test_every_metadata_file_of_a_checkpoint_is_listed_and_the_store_opens_and_verifies(store):
    ckpt = checkpoint_of(store)
    listed = json.loads((ckpt / digests.DIGESTS).read_text())["files"]
    assert "zarr.json" in listed and "entries/zarr.json" in listed and "tier_0/data/zarr.json" in listed
    assert sorted(listed) == digests.metadata_files(ckpt)
    with EmbeddingStore.open(store, "r") as s:
        assert s.step_count == 6
    assert verify_store(store) == []


@pytest.mark.parametrize("which", ["zarr.json", "entries/zarr.json", "entries/addr/zarr.json", "tier_0/data/zarr.json"])
def test_a_flipped_byte_in_any_metadata_file_is_named(store, which):
    f = checkpoint_of(store) / which
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x20
    f.write_bytes(bytes(data))
    refused_everywhere(store, f"metadata file {f} was changed since it was saved")


@pytest.mark.parametrize(
    "which, old, new",
    [
        ("zarr.json", '"step_count": 6', '"step_count": 7'),  # a root attribute, same size
        ("zarr.json", '"seed": 0', '"seed": 9'),
        ("entries/addr/zarr.json", '"separator": "/"', '"separator": "."'),  # the chunk-key separator
        ("pool_0/vectors/zarr.json", '"endian": "little"', '"endian": "big"'),  # the vectors' byte order
    ],
)
def test_a_valid_edit_of_the_same_size_or_not_is_named(store, which, old, new):
    f = checkpoint_of(store) / which
    text = f.read_text()
    assert old in text, (which, text[:400])
    f.write_text(text.replace(old, new, 1))
    refused_everywhere(store, f"metadata file {f} was changed since it was saved")


def test_an_edited_manifest_or_digest_list_is_named(store):
    m = store / "fiited.json"
    doc = json.loads(m.read_text())
    m.write_text(json.dumps({**doc, "checkpoint": doc["checkpoint"]}, indent=4))  # the same, reformatted: fine
    with EmbeddingStore.open(store, "r"):
        pass
    d = checkpoint_of(store) / digests.DIGESTS
    d.write_text(d.read_text().replace('"algorithm"', '"algorithm" '))
    refused_everywhere(store, f"{d} was changed since it was saved")
    m.write_text(json.dumps({**doc, "digests_sha256": "0" * 64}))
    refused_everywhere(store, "fiited.json was changed since it was written")


@pytest.mark.parametrize("version", [4, 3, 2])
def test_a_lowered_format_version_is_refused(store, version):
    m = store / "fiited.json"
    doc = json.loads(m.read_text())
    m.write_text(json.dumps({**doc, "format_version": version}))
    refused_everywhere(store, f"says format_version {version} but carries")
    clean = {k: v for k, v in doc.items() if k not in ("sha256", "digests_sha256")}
    m.write_text(json.dumps({**clean, "format_version": version}))  # the digests stripped as well
    refused_everywhere(store, f"format_version {version} but (holds digests.json|its checkpoint .* is format 5)")


def test_a_missing_digest_list_a_missing_or_an_added_metadata_file_is_named(store, tmp_path):
    ckpt = checkpoint_of(store)
    other = tmp_path / "other"
    shutil.copytree(store, other)
    (ckpt / digests.DIGESTS).unlink()
    refused_everywhere(store, "digests.json is missing")
    o = checkpoint_of(other)
    (o / "entries" / "extra").mkdir()
    (o / "entries" / "extra" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    refused_everywhere(other, "extra/zarr.json is not listed")
    shutil.rmtree(o / "entries" / "extra")
    (o / "pool_0" / "owner" / "zarr.json").unlink()
    refused_everywhere(other, "owner/zarr.json is missing")


def test_an_unparsable_metadata_file_of_an_older_format_is_named_not_a_bare_json_error(tmp_path):
    path = tmp_path / "v4"
    shutil.copytree(FIXTURE_V4, path)
    f = checkpoint_of(path) / "entries" / "zarr.json"
    f.write_bytes(b"x" + f.read_bytes()[1:])  # same size: the listed sizes still match
    with pytest.raises(CorruptStoreError, match=f"metadata file {f} is not valid JSON"):
        EmbeddingStore.open(path, "r")
    assert any("is not valid JSON" in p for p in verify_store(path))


def test_a_resave_of_an_older_store_writes_the_current_format_with_its_digests(tmp_path):
    path = tmp_path / "v4"
    shutil.copytree(FIXTURE_V4, path)
    with EmbeddingStore.open(path, "r+") as s:
        s.save()
    doc = json.loads((path / "fiited.json").read_text())
    assert doc["format_version"] == 5 and (checkpoint_of(path) / digests.DIGESTS).exists()
    assert verify_store(path) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_of_any_metadata_file_changed_is_refused_by_name(saved, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("edit") / "s"
    shutil.copytree(saved, path)
    ckpt = checkpoint_of(path)
    files = [ckpt / rel for rel in digests.metadata_files(ckpt)] + [ckpt / digests.DIGESTS, path / "fiited.json"]
    f = data.draw(st.sampled_from(files))
    raw = bytearray(f.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda v: v != raw[at]))
    raw[at] = new
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=re.escape(f.name)):
        EmbeddingStore.open(path, "r")
    assert verify_store(path)

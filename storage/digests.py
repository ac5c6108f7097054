"""Integrity of a checkpoint's metadata: a digest of every ``zarr.json`` and of the manifest.

Chunk files carry their own crc32c, and a checkpoint lists its files with their sizes,
but the metadata documents said nothing about themselves: a flipped byte in a
``zarr.json`` surfaced as a bare JSON error, and a same-size edit (a chunk-key
separator, the vectors' byte order, a root attribute such as ``step_count`` or
``learning_rate``) opened as another store. From format 5:

- each checkpoint holds ``digests.json``, the sha256 of every ``zarr.json`` under it
  (written after the last of them, before the checkpoint is synced and renamed);
- the manifest holds the sha256 of that ``digests.json`` (``digests_sha256``) and of
  itself without that field (``sha256``);
- an open checks the manifest, then ``digests.json``, then every ``zarr.json`` against
  it, before zarr parses any of them: a missing, unlisted, changed or unparsable file is
  a :class:`~fiited_store.CorruptStoreError` that names it;
- a manifest or checkpoint whose format version says less than what its files hold
  (digests from format 5 on) is refused, so lowering the version does not skip checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError

DIGESTS = "digests.json"
#: the first format whose checkpoints and manifests carry digests
SINCE_VERSION = 5
METADATA = "zarr.json"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata_files(ckpt: Path) -> list[str]:
    """Every ``zarr.json`` under ``ckpt``, as sorted paths relative to it."""
    out = []
    for dirpath, _dirs, files in os.walk(ckpt):
        if METADATA in files:
            out.append(str((Path(dirpath) / METADATA).relative_to(ckpt)))
    return sorted(out)


def write_digests(ckpt: Path) -> str:
    """Write ``ckpt/digests.json`` for the metadata files there now; returns its sha256."""
    doc = {
        "algorithm": "sha256",
        "files": {rel: sha256_of((ckpt / rel).read_bytes()) for rel in metadata_files(ckpt)},
    }
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    (ckpt / DIGESTS).write_bytes(data)
    return sha256_of(data)


def digests_sha256(ckpt: Path) -> str | None:
    """The sha256 of ``ckpt/digests.json``, or None for a checkpoint of a format before 5."""
    f = ckpt / DIGESTS
    return sha256_of(f.read_bytes()) if f.exists() else None


def check_metadata(ckpt: Path, expect_sha256: str | None) -> None:
    """Every ``zarr.json`` of ``ckpt`` against its ``digests.json`` (itself against
    ``expect_sha256`` when the manifest names this checkpoint)."""
    f = ckpt / DIGESTS
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        raise CorruptStoreError(f"{f} is missing: a checkpoint of format 5 lists its metadata digests there") from None
    if expect_sha256 is not None and sha256_of(raw) != expect_sha256:
        raise CorruptStoreError(f"{f} was changed since it was saved: its sha256 is not the one the manifest holds")
    try:
        doc = json.loads(raw)
        listed = dict(doc["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{f} is not a list of digests: {exc!r}") from exc
    found = metadata_files(ckpt)
    for rel in sorted(set(listed) - set(found)):
        raise CorruptStoreError(f"metadata file {ckpt / rel} is missing (listed in {f})")
    for rel in sorted(set(found) - set(listed)):
        raise CorruptStoreError(f"metadata file {ckpt / rel} is not listed in {f}: it was added after the save")
    for rel in found:
        actual = sha256_of((ckpt / rel).read_bytes())
        if actual != listed[rel]:
            raise CorruptStoreError(
                f"metadata file {ckpt / rel} was changed since it was saved (sha256 {actual[:16]}..., "
                f"{f.name} lists {str(listed[rel])[:16]}...)"
            )


def first_unreadable_metadata(ckpt: Path) -> str | None:
    """The first ``zarr.json`` under ``ckpt`` that is not JSON, as a sentence, or None
    (to name the file when zarr's own parse fails on a store of a format before 5)."""
    for rel in metadata_files(ckpt):
        try:
            json.loads((ckpt / rel).read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            return f"metadata file {ckpt / rel} is not valid JSON: {exc}"
    return None


def _self_digest(doc: dict[str, Any]) -> str:
    return sha256_of(json.dumps({k: v for k, v in doc.items() if k != "sha256"}, sort_keys=True).encode())


def seal_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its own digest added (format 5 on)."""
    return {**doc, "sha256": _self_digest(doc)}


def check_manifest(f: Path, doc: dict[str, Any]) -> None:
    """A manifest of format 5 on must carry its digests and match its own; one of an older
    format must carry none (else its version was lowered)."""
    version = doc.get("format_version")
    has = [k for k in ("sha256", "digests_sha256") if k in doc]
    if isinstance(version, int) and version < SINCE_VERSION:
        if has:
            raise CorruptStoreError(
                f"{f} says format_version {version} but carries {has}, which format {SINCE_VERSION} introduced: "
                "its version was changed"
            )
        return
    if len(has) != 2 or not all(isinstance(doc[k], str) for k in has):
        raise CorruptStoreError(f"{f} lacks its digests (format {version} keeps 'sha256' and 'digests_sha256')")
    if doc["sha256"] != _self_digest(doc):
        raise CorruptStoreError(f"{f} was changed since it was written: its sha256 does not match its contents")

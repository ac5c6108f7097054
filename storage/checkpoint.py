"""Checkpoints: a store directory, crash-safe, with one writer at a time.

Layout of a store directory::

    PATH/
      fiited.json          manifest: format, version, and which checkpoint is current
      ckpt-00000007/       a Zarr v3 group: entry arrays, pools, tier back-pointers,
        zarr.json            and attributes holding the configs and counters as JSON
        entries/ pool_0/ tier_0/owner
        tier_0/data/       a snapshot of the disk tier: hard links to its chunk files
      live/tier_0/         the disk tier the open store writes to
      .lock                the writer's pid; the lock is a flock on PATH itself, held by the one writer

A save writes ``ckpt-N.partial``, fsyncs it, renames it to ``ckpt-N`` and only then
replaces the manifest (temporary file, fsync, ``os.replace``); older checkpoints
are removed last. A crash at any moment leaves the manifest pointing at a
complete checkpoint. The tier snapshot costs no copy: zarr replaces a chunk file
by renaming a new one over it, so later writes to the live tier never touch the
inodes a checkpoint links to.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .. import compaction, tiering
from ..config import config_from_json, config_to_json
from ..entry_table import EntryArrays, EntryTable, row_bases
from ..errors import ConfigError, CorruptStoreError, StorageError, StoreLockedError, StoreReadOnlyError
from ..kernels.layout import util_from_float
from ..pool import ChunkPool, PoolArrays
from . import digests, increments
from .zarr_tier import storage_error

FORMAT = "fiited-store"
#: 2: entries hold a direct index (row_base, seen) beside the hashed one, and
#: utilities are bfloat16 (uint16). Version 1 stores (hashed only, float32
#: utilities) still open: every table is read as hashed, utilities are rounded.
#: 3: every array carries crc32c checksums (Zarr's codec, the disk tier's chunk files
#: too), every chunk is written even when it holds only fill values, and the root
#: attributes list every file of the checkpoint with its size.
#: 4: a CPU store's disk tier is an append-only log of segments (``storage/segment_tier.py``),
#: each a sealed Zarr shard the checkpoint keeps by a hard link; the state names each
#: tier's kind ("segments", or "blocks" for the block-allocated tier of formats 1 to 3).
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MANIFEST = "fiited.json"
LOCK = ".lock"
ROWS_PER_CHUNK = 65536

#: a hook the crash-safety tests use to stop a save at a named point
_save_hook: Callable[[str], None] | None = None


def _at(point: str) -> None:
    if _save_hook is not None:
        _save_hook(point)


# ------------------------------------------------------------------------ lock
class StoreLock:
    """An exclusive ``flock`` on the store's directory itself, held while a store is open
    for writing: deleting or replacing a file cannot let a second writer in.

    ``PATH/.lock`` is still opened (created) first: it proves the directory writable
    before anything else happens, and holds the writer's pid for a person to read. A
    lock taken on a directory that holds no store (a refused open, a refused compact)
    leaves no file behind when it is released.
    """

    def __init__(self, path: Path):
        self.path = path
        lock_file = path / LOCK
        self._created = not lock_file.exists()
        try:
            self._fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, f"cannot open store at {path} for writing") from exc
        try:
            self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            os.close(self._fd)
            raise storage_error(exc, f"cannot open store at {path} for writing") from exc
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            os.close(self._dir_fd)
            self._fd = self._dir_fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    exc.errno, f"store at {path} is already open for writing (its directory is locked)"
                ) from None
            raise storage_error(exc, f"locking store at {path}") from exc
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._dir_fd is None:
            return
        if self._created and not (self.path / MANIFEST).exists():
            (self.path / LOCK).unlink(missing_ok=True)  # nothing was stored here: leave nothing
        os.close(self._fd)
        fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
        os.close(self._dir_fd)
        self._fd = self._dir_fd = None


def acquire_lock(path: Path) -> StoreLock:
    return StoreLock(path)


class CheckpointPin:
    """A shared ``flock`` on a checkpoint's directory, held by a read-only handle.

    A save removes an older checkpoint only when it can lock that directory
    exclusively, so a checkpoint stays whole, tier files included, for as long as a
    reader holds it; the next save after the reader closes removes it.
    """

    def __init__(self, fd: int, checkpoint: Path):
        self._fd: int | None = fd
        self.checkpoint = checkpoint

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def pin_current_checkpoint(path: Path, attempts: int = 50) -> CheckpointPin:
    """Pin the checkpoint the manifest names, retrying while a concurrent save replaces it."""
    for attempt in range(attempts):
        doc = read_manifest(path, check_checkpoint=attempt == attempts - 1)
        ckpt = path / doc["checkpoint"]
        try:
            fd = os.open(ckpt, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # replaced and removed since the manifest was read
            time.sleep(0.001 * attempt)
            continue
        except OSError as exc:
            raise storage_error(exc, f"opening checkpoint {ckpt}") from exc
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:  # the lock holds only if the directory was not removed before it was taken
            if os.stat(ckpt).st_ino == os.fstat(fd).st_ino:
                return CheckpointPin(fd, ckpt)
        except FileNotFoundError:
            pass
        os.close(fd)
    raise CorruptStoreError(f"{path}: the checkpoint the manifest names kept disappearing ({attempts} attempts)")


def _remove_unpinned(ckpt: Path) -> bool:
    """Remove an old checkpoint unless a reader pins it; True when it is gone."""
    try:
        fd = os.open(ckpt, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # a reader holds it: kept until a later save
    try:
        shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        os.close(fd)
    return not ckpt.exists()


# ------------------------------------------------------------------------ manifest
def load_json(f: Path) -> Any:
    """A manifest's JSON; what is not JSON is a CorruptStoreError naming the file."""
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptStoreError(f"{f} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise storage_error(exc, f"reading {f}") from exc


def read_manifest(path: Path, check_checkpoint: bool = True) -> dict[str, Any]:
    f = path / MANIFEST
    if not path.is_dir():
        raise CorruptStoreError(f"{path} is not a directory")
    if not f.exists():
        raise CorruptStoreError(f"{path} is not a fiited-store store: {MANIFEST} is missing")
    doc = load_json(f)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptStoreError(f"{f} does not describe a {FORMAT} store")
    if doc.get("format_version") not in READABLE_VERSIONS:
        raise CorruptStoreError(
            f"{f} has format_version {doc.get('format_version')!r}; this version reads {list(READABLE_VERSIONS)}"
        )
    digests.check_manifest(f, doc)
    if not isinstance(doc.get("checkpoint"), str) or (check_checkpoint and not (path / doc["checkpoint"]).is_dir()):
        raise CorruptStoreError(f"{f} names checkpoint {doc.get('checkpoint')!r}, which does not exist in {path}")
    return doc


def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_path(target.parent, directory=True)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src under dst (copying across file systems). Metadata
    documents are copied: zarr rewrites them in place, and a checkpoint's must not move."""
    for dirpath, _dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.endswith(".partial") or name == "staging.f32":
                continue  # a write that never finished, or a tier's scratch staging map
            s, d = Path(dirpath) / name, dst / rel / name
            if name == "zarr.json":
                shutil.copy2(s, d)
                continue
            try:
                os.link(s, d)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copy2(s, d)


def _checkpoint_number(name: str) -> int:
    try:
        return int(name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


# ------------------------------------------------------------------------ save
def _write_array(group, name: str, data: np.ndarray, fill) -> None:
    # every chunk is written, even one of fill values only, so that a missing chunk
    # file is always damage; each carries its crc32c
    chunks = (min(max(data.shape[0], 1), ROWS_PER_CHUNK),) + tuple(data.shape[1:])
    arr = group.create_array(
        name,
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        fill_value=fill,
        compressors=[Crc32cCodec()],
        overwrite=True,
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


class _Saving:
    """One save's arrays: where it writes, the checkpoint it may build on, and what each
    array holds once it is written (the store's history becomes that when the save lands)."""

    def __init__(self, history: increments.SaveHistory | None, previous: Path | None, partial: Path):
        self.history = history
        self.previous = previous if history is not None and history.describes(previous) else None
        self.partial = partial
        self.written: dict[str, increments.SavedArray] = {}

    def save(self, group, gpath: str, name: str, data: np.ndarray, fill) -> None:
        key = f"{gpath}/{name}"
        if self.history is None:
            _write_array(group, name, data, fill)
            return
        hashes = increments.hashes_of(data)
        inc = self.history.plan(key, data, hashes, self.previous)
        if inc.whole:
            _write_array(group, name, data, fill)
        else:
            prev = inc.previous
            _link_tree(self.previous / gpath / name, self.partial / gpath / name)  # the base
            deltas_dir = f"{name}.deltas"
            if prev.deltas:
                _link_tree(self.previous / gpath / deltas_dir, self.partial / gpath / deltas_dir)
            if inc.changed.size:
                self._write_delta(group.require_group(deltas_dir).create_group(f"{prev.deltas:04d}"), data, inc)
        self.written[key] = self.history.written(data, hashes, inc)

    @staticmethod
    def _write_delta(dg, data: np.ndarray, inc: increments.Increment) -> None:
        _write_array(dg, "blocks", inc.changed, 0)
        arr = dg.create_array(
            "data",
            shape=(inc.changed.size, increments.BLOCK_BYTES),
            chunks=(max(1, min(inc.changed.size, increments.DELTA_CHUNK_BLOCKS)), increments.BLOCK_BYTES),
            dtype=np.uint8,
            fill_value=0,
            compressors=[Crc32cCodec()],
            config={"write_empty_chunks": True},
        )
        step = increments.DELTA_CHUNK_BLOCKS * 8  # gathered a few chunks at a time: memory stays small
        for lo in range(0, inc.changed.size, step):
            arr[lo : lo + step] = increments.gather_blocks(data, inc.changed[lo : lo + step])

    def described(self) -> dict[str, dict[str, int]]:
        return {k: increments.SaveHistory.describe(v) for k, v in self.written.items() if v.deltas}


def _file_sizes(root: Path) -> dict[str, int]:
    """{path relative to root: bytes} of every file under root, but root's own zarr.json."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != "zarr.json":
                out[rel] = os.stat(os.path.join(dirpath, name)).st_size
    return out


def check_files(ckpt: Path, files: dict[str, int]) -> list[str]:
    """What is missing or resized among the files a checkpoint listed when it was saved (stat only)."""
    problems = []
    for rel, size in files.items():
        try:
            actual = os.stat(ckpt / rel).st_size
        except FileNotFoundError:
            problems.append(f"{ckpt}/{rel} is missing (the checkpoint lists it)")
            continue
        except OSError as exc:
            problems.append(f"{ckpt}/{rel} cannot be read: {exc}")
            continue
        if actual != size:
            problems.append(f"{ckpt}/{rel} has {actual} bytes, the checkpoint lists {size} (truncated or rewritten)")
    return problems


def save_store(store, path: Path | None, *, remove_older: bool = True, whole: bool = False) -> Path:
    """Write ``store`` to ``path`` (its own directory when None); returns the checkpoint directory.

    Into its own directory, an array is saved as the blocks that changed since the last
    checkpoint there (:mod:`fiited_store.storage.increments`); ``whole=True`` writes
    every array whole (a compacted store carries no deltas). ``remove_older=False``
    keeps the older checkpoints: a sharded store removes them only once its global
    manifest names the new ones (see :mod:`fiited_store.distributed.checkpoint`)."""
    if path is None:
        raise ConfigError("this store has no directory: pass save(path)")
    path = Path(path)
    own = store.path is not None and path.resolve() == store.path.resolve()
    if own and store.read_only:
        raise StoreReadOnlyError(errno.EROFS, f"store at {path} is open read-only; save it to another directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"creating store directory {path}") from exc
    lock = None if own else acquire_lock(path)
    try:
        if not own and (path / MANIFEST).exists() and path.resolve() not in store.saved_to:
            raise StorageError(
                errno.EEXIST,
                f"save({str(path)!r}): that directory holds another store; nothing was changed. Save to a new or "
                "empty directory, or remove that store first",
            )
        saved = _save_locked(store, path, remove_older, incremental=own and not whole)
        store.saved_to.add(path.resolve())
        return saved
    finally:
        if lock is not None:
            lock.release()


def _save_locked(store, path: Path, remove_older: bool = True, incremental: bool = False) -> Path:
    b = store.backend
    existing = [p.name for p in path.iterdir() if p.name.startswith("ckpt-") and not p.name.endswith(".partial")]
    number = max([_checkpoint_number(n) for n in existing] + [0]) + 1
    name = f"ckpt-{number:08d}"
    partial = path / f"{name}.partial"
    final = path / name
    shutil.rmtree(partial, ignore_errors=True)
    # a segment tier's garbage under its bound and its rows in sealed files first: what the
    # entries written below point at is then what the checkpoint links
    compaction.before_checkpoint(store)
    for tier in store.tiers:
        if tier is not None and not tier.keeps_owners:
            tier.seal()
    previous = path / store.checkpoint if store.checkpoint else None
    saving = _Saving(store.save_history if incremental else None, previous, partial)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(str(partial)), mode="w")
        _at("group-created")
        ea = store.entries.arrays
        entries = root.create_group("entries")
        saving.save(entries, "entries", "row_base", b.to_host(ea.row_base), 0)
        saving.save(entries, "entries", "seen", b.to_host(ea.seen), 0)
        saving.save(entries, "entries", "keys", b.to_host(ea.keys), 0)
        saving.save(entries, "entries", "table_ids", b.to_host(ea.table_ids), -1)
        saving.save(entries, "entries", "addr", b.to_host(ea.addr), -1)
        saving.save(entries, "entries", "util", b.to_host(ea.util), 0)
        _at("entries-written")
        pools_state = []
        for pool in store.pools:
            pa = pool.arrays
            gpath = f"pool_{pool.plan.group}"
            g = root.create_group(gpath)
            saving.save(g, gpath, "vectors", b.to_host(pa.vectors), 0.0)
            saving.save(g, gpath, "opt_state", b.to_host(pa.opt_state), 0.0)
            saving.save(g, gpath, "owner", b.to_host(pa.owner), -1)
            saving.save(g, gpath, "free_stack", b.to_host(pa.free_stack), 0)
            pools_state.append({"n_free": pool.n_free})
            _at(f"pool-{pool.plan.group}-written")
        tiers_state = []
        for gi, tier in enumerate(store.tiers):
            if tier is None:
                tiers_state.append(None)
                continue
            tg = root.create_group(f"tier_{gi}")
            if tier.keeps_owners:
                saving.save(tg, f"tier_{gi}", "owner", tier.owner, -1)
                tier.flush()
                _link_tree(tier.root, partial / f"tier_{gi}" / "data")
                tiers_state.append({"kind": "blocks", "capacity": tier.capacity})
            else:
                _link_tree(tier.root, partial / f"tier_{gi}" / "data")  # sealed segments: links, no copy
                tiers_state.append(tier.describe())
            _at(f"tier-{gi}-linked")
        root.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": config_to_json(store.tables, store.config),
                "files": _file_sizes(partial),
                "state": {
                    "step_count": store.clock.step_count,
                    "scale_origin": store.clock.scale_origin,
                    "prune_round": store.clock.prune_round,
                    "counters": dataclasses.asdict(store.counters),
                    "hit_counts": store.residency.hit_counts(),
                    "pools": pools_state,
                    "tiers": tiers_state,
                    "increments": saving.described(),
                    "saved_at": time.time(),
                },
            }
        )
        _at("attrs-written")
        digests_sha256 = digests.write_digests(partial)  # after the last zarr.json
        _fsync_tree(partial)
        _at("fsynced")
        os.rename(partial, final)
        _fsync_path(path, directory=True)
        _at("renamed")
        write_atomic(path / MANIFEST, manifest_bytes(name, FORMAT_VERSION, digests_sha256))
        _at("manifest-replaced")
        if saving.history is not None:
            saving.history.commit(final, saving.written)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise storage_error(exc, f"saving checkpoint {name} in {path}") from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if remove_older:
        remove_checkpoints_except(path, name)
    return final


def remove_checkpoints_except(path: Path, keep: str) -> None:
    """Remove every checkpoint of ``path`` but ``keep`` (those a reader pins stay, until a later save)."""
    for p in path.iterdir():
        if p.name.startswith("ckpt-") and p.name != keep:
            if p.name.endswith(".partial"):  # a save that crashed: never pinned
                shutil.rmtree(p, ignore_errors=True)
            else:
                _remove_unpinned(p)


# ------------------------------------------------------------------------ open
def _read(group, name: str, dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    return _decode(_read_node(group, name, dtype, shape, where), Ellipsis, where, name)


class _Opening:
    """One open's arrays: each read with the deltas the checkpoint's state counts for it
    applied in order, and hashed into the store's history when it is opened for writing."""

    def __init__(self, ckpt: Path, root, state: dict, history: increments.SaveHistory | None):
        self.ckpt, self.root, self.history = ckpt, root, history
        self.increments = state.get("increments", {}) or {}

    def read(self, group, gpath: str, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        where = f"{self.ckpt}/{gpath}"
        data = _read(group, name, dtype, shape, where)
        described = self.increments.get(f"{gpath}/{name}")
        deltas = int(described["deltas"]) if described else 0
        if deltas:
            if f"{name}.deltas" not in group:
                raise CorruptStoreError(f"{where}/{name}.deltas is missing (the checkpoint counts {deltas} deltas)")
            dg = group[f"{name}.deltas"]
            nblocks = increments.n_blocks(data.nbytes)
            for k in range(deltas):
                at = f"{where}/{name}.deltas/{k:04d}"
                if f"{k:04d}" not in dg:
                    raise CorruptStoreError(f"{at} is missing (the checkpoint counts {deltas} deltas)")
                d = dg[f"{k:04d}"]
                n = int(d["blocks"].shape[0]) if "blocks" in d else 0
                blocks = _read(d, "blocks", np.int64, (n,), at)
                if n and (blocks[0] < 0 or blocks[-1] >= nblocks or np.any(np.diff(blocks) <= 0)):
                    raise CorruptStoreError(
                        f"{at}/blocks must be ascending block numbers below {nblocks}, got {blocks[:5].tolist()}..."
                    )
                step = increments.DELTA_CHUNK_BLOCKS * 8
                arr = _read_node(d, "data", np.uint8, (n, increments.BLOCK_BYTES), at)
                for lo in range(0, n, step):
                    increments.apply_blocks(
                        data, blocks[lo : lo + step], _decode(arr, slice(lo, lo + step), at, "data")
                    )
        if self.history is not None:
            self.history.opened(self.ckpt, f"{gpath}/{name}", data, described)
        return data


def _read_node(group, name: str, dtype, shape: tuple[int, ...], where: str):
    """The Zarr array ``name`` of ``group``, its dtype and shape checked, not read."""
    try:
        arr = group[name]
    except KeyError:
        raise CorruptStoreError(f"{where}/{name} is missing") from None
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise CorruptStoreError(f"{where}/{name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if tuple(arr.shape) != tuple(shape):
        raise CorruptStoreError(f"{where}/{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    return arr


def _decode(arr, selection, where: str, name: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(arr[selection])
    except OSError as exc:
        raise storage_error(exc, f"reading {where}/{name}") from exc
    except Exception as exc:  # a codec error on a truncated or corrupt chunk file
        raise CorruptStoreError(f"{where}/{name} cannot be decoded (truncated or corrupt chunk): {exc}") from exc


def manifest_bytes(checkpoint: str, version: int, digests_sha256: str | None) -> bytes:
    """The manifest naming ``checkpoint`` of format ``version`` (with its digests from format 5 on)."""
    doc: dict[str, Any] = {"format": FORMAT, "format_version": int(version), "checkpoint": checkpoint}
    if version >= digests.SINCE_VERSION:
        doc = digests.seal_manifest({**doc, "digests_sha256": digests_sha256})
    return json.dumps(doc, indent=2).encode()


def open_checkpoint_group(path: Path, pin: CheckpointPin | None = None, checkpoint: str | None = None):
    """(checkpoint directory, its root group, its attributes), its metadata checked first."""
    doc = read_manifest(path, check_checkpoint=pin is None and checkpoint is None)
    if pin is not None:
        ckpt = pin.checkpoint
    else:
        ckpt = path / (checkpoint if checkpoint is not None else doc["checkpoint"])
    # the manifest's digest of digests.json holds for the checkpoint it names (a pinned one
    # may be older); any checkpoint with digests.json has each zarr.json checked against it
    named = ckpt.name == doc["checkpoint"]
    checked = (named and doc["format_version"] >= digests.SINCE_VERSION) or (ckpt / digests.DIGESTS).exists()
    if checked:
        digests.check_metadata(ckpt, doc.get("digests_sha256") if named else None)
    else:  # an older format: at least every metadata file is JSON, or the one that is not is named
        bad = digests.first_unreadable_metadata(ckpt)
        if bad:
            raise CorruptStoreError(bad)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(str(ckpt), read_only=True), mode="r")
        attrs = dict(root.attrs)
    except Exception as exc:
        raise CorruptStoreError(f"checkpoint {ckpt} cannot be opened as a Zarr group: {exc}") from exc
    version = attrs.get("format_version")
    if attrs.get("format") != FORMAT or version not in READABLE_VERSIONS:
        raise CorruptStoreError(f"checkpoint {ckpt} carries format {attrs.get('format')!r} v{version!r}")
    if named and version != doc["format_version"]:
        raise CorruptStoreError(
            f"{path / MANIFEST} says format_version {doc['format_version']} but its checkpoint {ckpt.name} is "
            f"format {version}"
        )
    if version >= digests.SINCE_VERSION and not checked:
        raise CorruptStoreError(f"{ckpt / digests.DIGESTS} is missing: a checkpoint of format {version} keeps one")
    if version < digests.SINCE_VERSION and checked:
        raise CorruptStoreError(
            f"checkpoint {ckpt} says format_version {version} but holds {digests.DIGESTS}, which format "
            f"{digests.SINCE_VERSION} introduced: its version was changed"
        )
    return ckpt, root, attrs


def pin_checkpoint(path: Path, checkpoint: str) -> CheckpointPin:
    """Pin a named checkpoint of ``path`` (a shard opened at its global manifest's checkpoint)."""
    ckpt = path / checkpoint
    try:
        fd = os.open(ckpt, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CorruptStoreError(f"checkpoint {ckpt} is missing") from None
    except OSError as exc:
        raise storage_error(exc, f"opening checkpoint {ckpt}") from exc
    fcntl.flock(fd, fcntl.LOCK_SH)
    return CheckpointPin(fd, ckpt)


def open_store(
    store_class,
    path: Path,
    mode: str = "r",
    device: str | None = None,
    *,
    check_listed_files: bool = True,
    checkpoint: str | None = None,
):
    """Open a store directory as a ``store_class`` (see ``EmbeddingStore.open``, which passes
    itself); ``check_listed_files=False`` lets ``verify`` go past missing or resized files to
    report what else is wrong. ``checkpoint`` names the checkpoint to open instead of the one
    the store's manifest names (opened for writing, the manifest is pointed back at it)."""
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = Path(path)
    # a writer holds the store's lock, so nothing removes its checkpoint; a reader pins its own
    lock = acquire_lock(path) if mode == "r+" else None
    pin = None
    try:
        if mode == "r":
            read_manifest(path, check_checkpoint=False)  # a missing or foreign store is named before any retry
            pin = pin_current_checkpoint(path) if checkpoint is None else pin_checkpoint(path, checkpoint)
        ckpt, root, attrs = open_checkpoint_group(path, pin, checkpoint)
        version = int(attrs["format_version"])
        if version >= 3 and check_listed_files:
            listed = attrs.get("files")
            if not isinstance(listed, dict) or not listed:
                raise CorruptStoreError(f"checkpoint {ckpt} does not list its files")
            problems = check_files(ckpt, listed)
            if problems:
                raise CorruptStoreError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        # a version 1 store has only the hashed index, whatever its tables declare
        tables, config = config_from_json(attrs.get("config", {}), hashed_only=version < 2)
        if device is not None and device != config.device:
            config = dataclasses.replace(config, device=device)
        state = attrs.get("state", {})

        def restore(store) -> None:
            b = store.backend
            # opened for writing at the manifest's format, the next save builds on this checkpoint
            history = store.save_history if mode == "r+" and version == FORMAT_VERSION else None
            opening = _Opening(ckpt, root, state, history)
            entries_g = root["entries"] if "entries" in root else None
            if entries_g is None:
                raise CorruptStoreError(f"{ckpt}/entries is missing")
            if "keys" not in entries_g:
                raise CorruptStoreError(f"{ckpt}/entries/keys is missing")
            cap = int(entries_g["keys"].shape[0])
            if cap & (cap - 1):
                raise CorruptStoreError(f"{ckpt}/entries/keys has {cap} rows; the capacity must be a power of two")
            where = f"{ckpt}/entries"
            expect_base = row_bases([t.num_embeddings if t.direct else 0 for t in tables])
            nd = int(expect_base[-1])
            if version >= 2:
                base = opening.read(entries_g, "entries", "row_base", np.int64, expect_base.shape)
                if not np.array_equal(base, expect_base):
                    raise CorruptStoreError(
                        f"{where}/row_base is {base.tolist()}, the tables declare {expect_base.tolist()}"
                    )
                seen = opening.read(entries_g, "entries", "seen", np.uint32, (max((nd + 31) // 32, 1),))
            else:
                seen = np.zeros(1, np.uint32)
            arrays = EntryArrays(
                row_base=b.from_host(expect_base),
                seen=b.persist(seen),
                keys=b.persist(opening.read(entries_g, "entries", "keys", np.int64, (cap,))),
                table_ids=b.persist(opening.read(entries_g, "entries", "table_ids", np.int16, (cap,))),
                addr=b.persist(opening.read(entries_g, "entries", "addr", np.int32, (nd + cap, store.kmax))),
                util=b.persist(
                    opening.read(entries_g, "entries", "util", np.uint16, (nd + cap, store.util_width))
                    if version >= 2
                    else util_from_float(_read(entries_g, "util", np.float32, (cap, store.util_width), where))
                ),
            )
            store.entries = EntryTable.from_arrays(b, arrays, [t.name for t in tables], config.max_load)
            store.pools = []
            for plan, pstate in zip(store.plans, state.get("pools", [])):
                where = f"{ckpt}/pool_{plan.group}"
                if f"pool_{plan.group}" not in root:
                    raise CorruptStoreError(f"{where} is missing")
                gpath = f"pool_{plan.group}"
                pg = root[gpath]
                pa = PoolArrays(
                    vectors=b.persist(opening.read(pg, gpath, "vectors", np.float32, (plan.slots, plan.chunk_width))),
                    opt_state=b.persist(
                        opening.read(pg, gpath, "opt_state", np.float32, (plan.slots, plan.state_width))
                    ),
                    owner=b.persist(opening.read(pg, gpath, "owner", np.int32, (plan.slots,))),
                    free_stack=b.persist(opening.read(pg, gpath, "free_stack", np.int32, (plan.slots,))),
                    n_free=b.from_host(np.array([int(pstate["n_free"])], np.int64)),
                )
                store.pools.append(ChunkPool.from_arrays(b, plan, pa))
            if len(store.pools) != len(store.plans):
                raise CorruptStoreError(
                    f"{ckpt}: {len(store.plans)} pools expected, state lists {len(state.get('pools', []))}"
                )
            for gi, tstate in enumerate(state.get("tiers", [])):
                if tstate is None:
                    continue
                where = f"{ckpt}/tier_{gi}"
                snapshot = ckpt / f"tier_{gi}" / "data"
                if tstate.get("kind") == "segments":
                    if mode == "r":
                        store.tiers[gi] = tiering.open_segment_tier(store, gi, snapshot, tstate, read_only=True)
                    else:
                        live = path / "live" / f"tier_{gi}"
                        shutil.rmtree(live, ignore_errors=True)
                        _link_tree(snapshot, live)
                        store.tiers[gi] = tiering.open_segment_tier(store, gi, live, tstate, read_only=False)
                    continue
                owner = opening.read(root[f"tier_{gi}"], f"tier_{gi}", "owner", np.int32, (int(tstate["capacity"]),))
                if mode == "r":
                    store.tiers[gi] = tiering.open_saved_tier(store, gi, snapshot, owner, read_only=True)
                else:
                    live = path / "live" / f"tier_{gi}"
                    shutil.rmtree(live, ignore_errors=True)
                    _link_tree(snapshot, live)
                    store.tiers[gi] = tiering.open_saved_tier(store, gi, live, owner, read_only=False)
            store.clock.step_count = int(state.get("step_count", 0))
            store.clock.scale_origin = int(state.get("scale_origin", 0))
            store.clock.prune_round = int(state.get("prune_round", 0))
            for k, v in state.get("counters", {}).items():
                if hasattr(store.counters, k):
                    setattr(store.counters, k, int(v))
            store.residency.restore_hit_counts(state.get("hit_counts", {}))
            store.path = path
            store.read_only = mode == "r"
            store.hold(lock=lock, pin=pin)
            store.checkpoint = ckpt.name
            if mode == "r+" and checkpoint is not None and read_manifest(path, False)["checkpoint"] != checkpoint:
                write_atomic(path / MANIFEST, manifest_bytes(checkpoint, version, digests.digests_sha256(ckpt)))

        return store_class(tables, config, _restore=restore)
    except BaseException:
        if lock is not None:
            lock.release()
        if pin is not None:
            pin.release()
        raise

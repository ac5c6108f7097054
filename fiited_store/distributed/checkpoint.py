"""Checkpoints of a sharded store: one ordinary store per shard, one global manifest.

Layout::

    PATH/
      fiited-sharded.json      the global manifest: format, world size, routing (buckets,
                               salt), configs, step, and per shard its directory, bucket
                               range and checkpoint
      w0002-shard-00000/       an ordinary store directory (fiited.json, ckpt-N/, live/):
      w0002-shard-00001/       the offline tools open each one on its own

A save is two-phase: every shard writes checkpoint N keeping N-1; once every rank
reports success, rank 0 replaces the global manifest (temporary file, fsync,
rename) and only then do the shards remove N-1. A crash before the manifest
commit leaves the previous global checkpoint whole, since opening reads the
checkpoint each shard has in the global manifest, never a shard's own pointer.

Opening at another world size reshards: rank r of W' copies, from the old shards
(row-wise, those whose bucket ranges overlap its new range), every entry it now
owns: its utilities, its resident chunks' vectors and optimizer state, and its
spilled chunks' tier rows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import tiering
from ..errors import ConfigError, CorruptStoreError, FiitedError, PeerRankError
from ..kernels.layout import tier_slot_of, util_to_float

SHARDED_MANIFEST = "fiited-sharded.json"
FORMAT = "fiited-store-sharded"
FORMAT_VERSION = 1

#: a hook the crash tests use to stop a rank at a named point of a save
_save_hook: Callable[[str, int], None] | None = None


def _at(point: str, rank: int) -> None:
    if _save_hook is not None:
        _save_hook(point, rank)


def shard_dir_name(world: int, rank: int) -> str:
    return f"w{world:04d}-shard-{rank:05d}"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDED_MANIFEST).exists()


def read_sharded_manifest(path: str | Path) -> dict[str, Any]:
    from ..storage.checkpoint import load_json

    f = Path(path) / SHARDED_MANIFEST
    if not f.exists():
        raise CorruptStoreError(f"{path} is not a sharded fiited-store store: {SHARDED_MANIFEST} is missing")
    doc = load_json(f)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptStoreError(f"{f} does not describe a {FORMAT} store")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CorruptStoreError(
            f"{f} has format_version {doc.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    shards = doc.get("shards")
    if not isinstance(shards, list) or len(shards) != doc.get("world_size"):
        raise CorruptStoreError(
            f"{f} lists {len(shards) if isinstance(shards, list) else shards!r} shards for "
            f"world_size {doc.get('world_size')!r}"
        )
    slack = doc.setdefault("pool_slack", 0.0)  # manifests before it had none: shards without slack
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not (0 <= slack < float("inf")):
        raise CorruptStoreError(f"{f} has pool_slack {slack!r}; it must be a finite number >= 0")
    return doc


def _agree(exchange, error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed ``what`` (its own error where it failed)."""
    flags = np.zeros(exchange.world, np.int64)
    flags[exchange.rank] = error is not None
    flags = exchange.max(flags)
    if error is not None:
        raise error
    if flags.any():
        raise PeerRankError(f"rank(s) {np.flatnonzero(flags).tolist()} failed to {what} (this is rank {exchange.rank})")


def save_sharded(store, path: str | Path | None = None) -> Path:
    """Save every shard and commit the global manifest (a collective); returns ``path``."""
    from ..config import config_to_json
    from ..storage.checkpoint import remove_checkpoints_except, save_store, write_atomic

    path = Path(path) if path is not None else store.path
    if path is None:
        raise ConfigError("this sharded store has no directory: pass save(path)")
    ex, rank, world = store.exchange, store.rank, store.world
    shard_dir = path / shard_dir_name(world, rank)
    name, error = None, None
    try:
        shard_dir.mkdir(parents=True, exist_ok=True)
        name = save_store(store.shard, shard_dir, remove_older=False).name
    except (FiitedError, OSError) as exc:
        error = exc
    _at("shard-saved", rank)
    names = ex.all_gather_object(name)
    if error is not None:
        raise error
    if any(n is None for n in names):
        raise PeerRankError(
            f"rank(s) {[r for r, n in enumerate(names) if n is None]} failed to save their shard; "
            f"the previous global checkpoint stands (this is rank {rank})"
        )
    error = None
    if rank == 0:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "world_size": world,
            "routing": store.routing.to_json(),
            "config": config_to_json(store.tables, store.config),
            "pool_slack": store.pool_slack,
            "step": store.shard.step_count,
            "prune_round": store.shard.clock.prune_round,
            "shards": [
                {
                    "rank": r,
                    "dir": shard_dir_name(world, r),
                    "checkpoint": names[r],
                    **store.routing.shard_json(r, world),
                }
                for r in range(world)
            ],
        }
        try:
            write_atomic(path / SHARDED_MANIFEST, json.dumps(doc, indent=2).encode())
        except OSError as exc:
            error = exc
    _at("manifest-committed", rank)
    _agree(ex, error, "commit the global manifest")
    # the new global checkpoint is whole: older ones go
    remove_checkpoints_except(shard_dir, names[rank])
    if rank == 0:
        listed = {shard_dir_name(world, r) for r in range(world)}
        for p in path.iterdir():
            if p.is_dir() and p.name.startswith("w") and "-shard-" in p.name and p.name not in listed:
                shutil.rmtree(p, ignore_errors=True)  # shards of an older world size
    if store.shard.path is not None and store.shard.path.resolve() == shard_dir.resolve():
        store.shard.checkpoint = names[rank]
    store.checkpoint = names[rank]
    return path


def open_shard(path: str | Path, mode: str, exchange) -> tuple:
    """This rank's part of a saved sharded store on ``exchange``'s world (a collective),
    resharding when the world's size changed: (tables, config, routing, pool slack, shard)."""
    from ..config import config_from_json
    from ..store import EmbeddingStore
    from .routing import routing_from_json

    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = Path(path)
    ex = exchange
    shard, error = None, None
    tables = config = routing = slack = None
    try:
        doc = read_sharded_manifest(path)
        tables, config = config_from_json(doc["config"])
        routing = routing_from_json(doc["routing"])
        routing.check_world(ex.world)
        slack = float(doc["pool_slack"])
        if doc["world_size"] == ex.world:
            entry = doc["shards"][ex.rank]
            shard = EmbeddingStore.open(path / entry["dir"], mode, checkpoint=entry["checkpoint"])
        else:
            shard = reshard(path, doc, tables, config, routing, ex.rank, ex.world, mode, slack)
    except (FiitedError, OSError) as exc:
        error = exc
    try:
        _agree(ex, error, f"open their shard of {path}")
    except BaseException:
        if shard is not None:
            shard.close()
        raise
    return tables, config, routing, slack, shard


def reshard(path: Path, doc: dict, tables, config, routing, rank: int, world: int, mode: str, pool_slack: float):
    """This rank's shard of a world of ``world``, built from the saved shards of another size."""
    from ..store import EmbeddingStore
    from .layout import shard_config

    shard_tables, shard_cfg = shard_config(tables, config, world, routing, rank, pool_slack)
    target = None
    if mode == "r+":
        target = path / shard_dir_name(world, rank)
        if target.exists():  # left by a resharded open that never saved: not in the manifest
            shutil.rmtree(target)
    new = EmbeddingStore(shard_tables, shard_cfg, path=target)
    try:
        mine = routing.shard_json(rank, world)
        counters = None
        for entry in doc["shards"]:
            if "buckets" in mine and "buckets" in entry:  # row-wise: only old shards whose ranges overlap
                (lo, hi), (olo, ohi) = mine["buckets"], entry["buckets"]
                if ohi <= lo or olo >= hi:
                    continue
            src = EmbeddingStore.open(path / entry["dir"], "r", checkpoint=entry["checkpoint"])
            try:
                at = src.clock.as_tuple()
                if counters is not None and at != counters:
                    raise CorruptStoreError(
                        f"shard {entry['dir']} is at (step, scale origin, prune round) {at}, "
                        f"another shard at {counters}"
                    )
                counters = at
                live = np.flatnonzero(src.entries.table_of_entries() >= 0)
                t, ids = src.entries.keys_of(live)
                import_entries(new, src, live[routing.owners(t.astype(np.int16), ids, world) == rank])
            finally:
                src.close()
        if counters is not None:
            new.clock.step_count, new.clock.scale_origin, new.clock.prune_round = counters
            new.counters.steps = counters[0]
            new.counters.prunes = counters[2]
        if mode == "r":
            new.read_only = True
        return new
    except BaseException:
        new.close()
        raise


def import_entries(dst, src, src_entries: np.ndarray) -> None:
    """Copy entries of ``src`` (a store on the CPU) into ``dst``, which holds none of their keys.

    Utilities are copied as stored (both stores are at the same step and scale
    origin). Chunks resident in ``src`` become resident while ``dst``'s pool has
    free slots, the most useful first; the rest go to ``dst``'s tier when it spills,
    and are dropped otherwise. Spilled chunks stay spilled."""
    if src_entries.size == 0:
        return
    t, ids = src.entries.keys_of(src_entries)
    q = t.astype(np.int16)
    found, _, n_hashed = dst.entries.find_counted(q, ids)
    if (found >= 0).any():
        raise CorruptStoreError(f"key (table {int(t[found >= 0][0])}, id {int(ids[found >= 0][0])}) is in two shards")
    if dst.entries.needs_rehash(n_hashed):
        cap = dst.entries.rehash_capacity(n_hashed)
        dst.check_memory_budget(cap)
        dst.rehash(cap)
        found, _ = dst.entries.find(q, ids)
    dst.entries.insert_missing(q, ids, found)
    dst_e, _ = dst.entries.find(q, ids)
    sa, da = src.entries.arrays, dst.entries.arrays
    da.util[dst_e] = sa.util[src_entries]
    addr = sa.addr[src_entries]  # [n, kmax]
    K = np.array([tt.chunks for tt in src.tables])[t]
    group = src.host_meta["table_group"][t]
    util = util_to_float(sa.util[src_entries])
    from .. import placement

    for pool in dst.pools:
        g = pool.plan.group
        ks = np.arange(addr.shape[1])
        has = (ks[None, :] < K[:, None]) & (group[:, None] == g)
        res_i, res_k = np.nonzero(has & (addr >= 0))
        sp_i, sp_k = np.nonzero(has & (addr <= -2))
        src_pool = src.pools[g].arrays
        vec_res = src_pool.vectors[addr[res_i, res_k]]
        st_res = src_pool.opt_state[addr[res_i, res_k]]
        if sp_i.size:
            vec_sp, st_sp = src.tiers[g].read(tier_slot_of(addr[sp_i, sp_k]).astype(np.int64))
        else:
            vec_sp = np.empty((0, pool.plan.chunk_width), np.float32)
            st_sp = np.empty((0, pool.plan.state_width), np.float32)
        # more resident chunks than free slots (a smaller world, or uneven buckets): the
        # most useful stay resident, the others move to the tier or are dropped
        order = np.argsort(-util[res_i, np.minimum(res_k, util.shape[1] - 1)], kind="stable")
        fits = order[: pool.n_free]
        over = order[pool.n_free :]
        e_in, k_in = dst_e[res_i[fits]], res_k[fits]
        placed = placement.allocate(dst, pool, e_in, k_in)
        assert placed == fits.size
        slots = da.addr[e_in, k_in]
        pool.arrays.vectors[slots] = vec_res[fits]
        pool.arrays.opt_state[slots] = st_res[fits]
        to_tier_e = np.concatenate([dst_e[sp_i], dst_e[res_i[over]]]) if dst.config.spills else dst_e[sp_i]
        to_tier_k = np.concatenate([sp_k, res_k[over]]) if dst.config.spills else sp_k
        vec_t = np.concatenate([vec_sp, vec_res[over]]) if dst.config.spills else vec_sp
        st_t = np.concatenate([st_sp, st_res[over]]) if dst.config.spills else st_sp
        if to_tier_e.size:
            tier = tiering.tier_of(dst, g)
            tslots = tier.allocate(to_tier_e.size)
            tier.write(tslots, vec_t, st_t)
            da.addr[to_tier_e, to_tier_k] = (-2 - tslots).astype(np.int32)
            if tier.keeps_owners:
                tier.owner[tslots] = to_tier_e

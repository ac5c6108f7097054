"""Offline work on a sharded store: inspect, verify, compact and reshard, from one process.

Each shard is an ordinary store directory; these functions run the single-store
tools on every shard in parallel (threads: the kernels and the Zarr reads release
the GIL) and merge what they find into one report, adding what only the whole can
tell: every key sits on the shard its routing names, and no key is in two shards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, FiitedError
from .checkpoint import SHARDED_MANIFEST, read_sharded_manifest, shard_dir_name


def _each_shard(doc: dict, fn: Callable[[dict], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=min(8, len(doc["shards"]))) as pool:
        return list(pool.map(fn, doc["shards"]))


def inspect_sharded(path: Path) -> dict[str, Any]:
    """One report for the whole store (entries, residency, kept dimensions, utility
    quantiles over every shard), with each shard's totals under ``shards``."""
    from ..config import config_from_json
    from ..store import EmbeddingStore
    from ..tools import inspect_store, table_utilities, utility_quantiles
    from .sharded_store import merge_stats

    doc = read_sharded_manifest(path)
    tables, config = config_from_json(doc["config"])

    def one(entry):
        with EmbeddingStore.open(path / entry["dir"], "r", checkpoint=entry["checkpoint"]) as shard:
            return inspect_store(shard), table_utilities(shard), shard.stats()

    parts = _each_shard(doc, one)
    merged = merge_stats(tables, [p[2] for p in parts], config)
    for t in tables:
        info = merged["tables"][t.name]
        hist = {}
        for report, _, _ in parts:
            for d, n in report["tables"][t.name]["kept_dim_histogram"].items():
                hist[d] = hist.get(d, 0) + n
        info["kept_dim_histogram"] = hist
        info["utility_quantiles"] = utility_quantiles(np.concatenate([p[1][t.name] for p in parts]))
    total = merged["total"]
    total["resident_vs_budget"] = sum(
        p[0]["total"]["resident_vs_budget"] * p[0]["total"]["budget_bytes"] for p in parts
    ) / max(total["budget_bytes"], 1)
    total["memory_budget_bytes"] = None
    total["bytes"]["on_disk"] = sum(p[0]["total"]["bytes"].get("on_disk", 0) for p in parts)
    first = parts[0][0]
    return {
        "path": str(path),
        "world_size": doc["world_size"],
        "routing": doc["routing"],
        "config": first["config"],
        "step": doc["step"],
        "tables": merged["tables"],
        "total": total,
        "pools": [dict(p, shard=r) for r, (report, _, _) in enumerate(parts) for p in report["pools"]],
        "counters": {k: sum(p[0]["counters"][k] for p in parts) for k in first["counters"]},
        "shards": [
            dict(s, dir=e["dir"], checkpoint=e["checkpoint"], buckets=e["buckets"])
            for s, e in zip(merged["shards"], doc["shards"])
        ],
    }


def format_sharded_inspection(info: dict[str, Any]) -> str:
    from ..tools import format_inspection

    lines = [
        format_inspection(info),
        f"sharded row-wise over {info['world_size']} shards ({info['routing']['n_buckets']} virtual buckets):",
    ]
    for s in info["shards"]:
        lines.append(
            f"  {s['dir']} ({s['checkpoint']}, buckets {s['buckets'][0]}..{s['buckets'][1] - 1}): "
            f"{s['entries']:,} entries, {s['resident_chunks']:,} resident chunks, "
            f"{s['memory_total']:,} bytes in memory"
        )
    return "\n".join(lines)


def verify_sharded(path: Path, progress: bool = False) -> list[str]:
    """Every problem in every shard (prefixed with its directory), and keys outside their owner's range."""
    from ..store import EmbeddingStore
    from ..tools import verify_store
    from .routing import routing_from_json

    try:
        doc = read_sharded_manifest(path)
        routing = routing_from_json(doc["routing"])
    except FiitedError as exc:
        return [str(exc)]

    def one(entry):
        problems = [
            f"{entry['dir']}: {p}"
            for p in verify_store(path / entry["dir"], progress=False, checkpoint=entry["checkpoint"])
        ]
        if problems:
            return problems
        with EmbeddingStore.open(path / entry["dir"], "r", checkpoint=entry["checkpoint"]) as shard:
            live = np.flatnonzero(shard.entries.table_of_entries() >= 0)
            t, ids = shard.entries.keys_of(live)
            owner = routing.owners(t.astype(np.int16), ids, doc["world_size"])
            out = owner != entry["rank"]
            if out.any():
                i = int(np.argmax(out))
                where = (
                    f"buckets outside its range [{entry['buckets'][0]}, {entry['buckets'][1]})"
                    if "buckets" in entry
                    else f"tables it does not own ({entry.get('tables')})"
                )
                problems.append(
                    f"{entry['dir']}: {int(out.sum())} keys route to {where}, the first "
                    f"(table {int(t[i])}, id {int(ids[i])}) to rank {int(owner[i])}"
                )
        return problems

    found = _each_shard(doc, one)
    expect = [dict(routing.shard_json(r, doc["world_size"]), rank=r) for r in range(doc["world_size"])]
    listed = [{k: e.get(k) for k in expect[i]} for i, e in enumerate(doc["shards"])]
    if listed != expect:
        found.append([f"{SHARDED_MANIFEST}: shards list {listed}, the routing places them as {expect}"])
    return [p for ps in found for p in ps]


def compact_sharded(path: Path, progress: bool = False) -> dict[str, Any]:
    """Compact every shard (keeping its previous checkpoint), then commit a manifest naming the new ones."""
    from ..storage.checkpoint import remove_checkpoints_except, write_atomic
    from ..tools import compact_store

    doc = read_sharded_manifest(path)
    results = _each_shard(
        doc, lambda e: compact_store(path / e["dir"], progress=False, checkpoint=e["checkpoint"], remove_older=False)
    )
    for entry, r in zip(doc["shards"], results):
        entry["checkpoint"] = r["checkpoint"]
    write_atomic(path / SHARDED_MANIFEST, json.dumps(doc, indent=2).encode())
    for entry in doc["shards"]:
        remove_checkpoints_except(path / entry["dir"], entry["checkpoint"])
    keys = ("bytes_before", "bytes_after", "entries_before", "entries_after", "dropped_entries")
    return {k: sum(r[k] for r in results) for k in keys}


def reshard_offline(path: Path, world: int, progress: bool = False) -> dict[str, Any]:
    """Rewrite a sharded store for ``world`` ranks, from one process (``fiited-store reshard``).

    New shard directories are written and saved first; the manifest is replaced
    once they all are, and only then do the old directories go: a crash at any
    point leaves a whole store behind."""
    from ..config import config_from_json
    from ..storage.checkpoint import save_store, write_atomic
    from .checkpoint import FORMAT, FORMAT_VERSION, reshard
    from .routing import routing_from_json

    doc = read_sharded_manifest(path)
    if world < 1:
        raise CorruptStoreError(f"a world needs at least one rank, got {world}")
    if world == doc["world_size"]:
        return {"world_size": world, "moved": False, "entries_per_shard": None}
    tables, config = config_from_json(doc["config"])
    routing = routing_from_json(doc["routing"])
    routing.check_world(world)

    def one(rank):
        shard = reshard(path, doc, tables, config, routing, rank, world, "r+", float(doc["pool_slack"]))
        try:
            name = save_store(shard, path / shard_dir_name(world, rank)).name
            return name, shard.entries.n_live
        finally:
            shard.close()

    with ThreadPoolExecutor(max_workers=min(8, world)) as pool:
        made = list(pool.map(one, range(world)))
    old_dirs = [e["dir"] for e in doc["shards"]]
    new_doc = dict(
        doc,
        format=FORMAT,
        format_version=FORMAT_VERSION,
        world_size=world,
        shards=[
            {"rank": r, "dir": shard_dir_name(world, r), "checkpoint": made[r][0], **routing.shard_json(r, world)}
            for r in range(world)
        ],
    )
    write_atomic(path / SHARDED_MANIFEST, json.dumps(new_doc, indent=2).encode())
    for d in old_dirs:
        shutil.rmtree(path / d, ignore_errors=True)
    return {"world_size": world, "moved": True, "entries_per_shard": [n for _, n in made]}

"""Offline work on a store directory: inspect, verify, compact, export."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import compaction, tiering
from .errors import CorruptStoreError, FiitedError
from .kernels.layout import spilled_code, util_to_float
from .storage.zarr_tier import storage_error
from .store import EmbeddingStore
from .verify import check_store

UTILITY_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _runs(free_mask: np.ndarray) -> tuple[int, int]:
    """(number of runs of consecutive free slots, longest run)."""
    if not free_mask.any():
        return 0, 0
    padded = np.concatenate([[False], free_mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return int(starts.size), int((ends - starts).max())


def _fragmentation(free_mask: np.ndarray) -> dict[str, Any]:
    n_free = int(free_mask.sum())
    runs, longest = _runs(free_mask)
    return {
        "free": n_free,
        "free_runs": runs,
        "longest_free_run": longest,
        "fragmentation": 0.0 if n_free == 0 else 1.0 - longest / n_free,
    }


def inspect_store(store: EmbeddingStore) -> dict[str, Any]:
    """Everything ``fiited-store inspect`` shows, as a JSON-able dict."""
    b = store.backend
    st = store.stats()
    tids = store.entries.table_of_entries()
    addr = b.to_host(store.entries.arrays.addr)
    utils = table_utilities(store)
    tables = {}
    for i, t in enumerate(store.tables):
        rows = tids == i
        kept = (addr[rows, : t.chunks] >= 0).sum(axis=1) * t.chunk_width
        hist = np.bincount(kept // t.chunk_width, minlength=t.chunks + 1)
        u = utils[t.name]
        info = st["tables"][t.name]
        info["kept_dim_histogram"] = {str(k * t.chunk_width): int(hist[k]) for k in range(t.chunks + 1)}
        info["utility_quantiles"] = utility_quantiles(u)
        tables[t.name] = info
    pools = []
    for pool, pst in zip(store.pools, st["pools"]):
        owner = b.to_host(pool.arrays.owner)
        entry = {
            **pst,
            **_fragmentation(owner < 0),
            "vector_bytes": pool.vector_bytes,
            "optimizer_state_bytes": pool.state_bytes,
        }
        tier = store.tiers[pool.plan.group]
        if tier is not None:
            entry["tier"] = {
                "location": tier.location,
                "capacity": tier.capacity,
                "used": tier.n_used,
                "bytes_on_disk": tier.nbytes,
                **(
                    _fragmentation(tier.owner < 0)
                    if tier.keeps_owners
                    else {
                        "kind": "segments",
                        "segments": len(tier.segments()),
                        "live_bytes": tier.live_bytes,
                        "garbage_fraction": tier.garbage_fraction(),
                    }
                ),
            }
        pools.append(entry)
    out = {
        "path": str(store.path) if store.path else None,
        "config": {
            "mode": store.config.mode,
            "on_evict": store.config.on_evict,
            "utility": store.config.utility,
            "gamma": store.config.gamma,
            "prune_period": store.config.prune_period,
            "pruning": repr(store.config.pruning),
        },
        "step": store.step_count,
        "tables": tables,
        "total": st["total"],
        "pools": pools,
        "counters": st["counters"],
    }
    if store.path is not None:
        out["total"]["bytes"]["on_disk"] = directory_bytes(store.path)
    return out


def utility_quantiles(u: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.quantile(u, q)) for q in UTILITY_QUANTILES} if u.size else {}


def table_utilities(store: EmbeddingStore) -> dict[str, np.ndarray]:
    """Per table, the true utilities of its entries' chunks, float32[entries, K or 1]."""
    util = util_to_float(store.backend.to_host(store.entries.arrays.util)) * np.float32(
        store.config.gamma ** (store.step_count - store.clock.scale_origin)
    )
    tids = store.entries.table_of_entries()
    return {t.name: util[tids == i][:, : min(t.chunks, util.shape[1])] for i, t in enumerate(store.tables)}


def format_inspection(info: dict[str, Any]) -> str:
    lines = [
        f"store {info['path']}  step {info['step']}  {info['config']['mode']} mode, "
        f"utility {info['config']['utility']}, "
        f"{info['config']['pruning']}"
    ]
    lines.append(
        f"{'table':<12} {'dim':>4} {'K':>2} {'entries':>10}  resident / spilled / absent per chunk   avg kept dim"
        "  hit rate"
    )
    for name, t in info["tables"].items():
        per = "  ".join(
            f"{r}/{s}/{a}" for r, s, a in zip(t["resident_per_chunk"], t["spilled_per_chunk"], t["absent_per_chunk"])
        )
        hit = "-" if t.get("hit_rate") is None else f"{t['hit_rate']:.1%}"
        lines.append(
            f"{name:<12} {t['dim']:>4} {t['chunks']:>2} {t['entries']:>10}  {per:<38} "
            f"{t['average_kept_dim']:>12.2f}  {hit:>8}"
        )
    lines.append("kept-dimension histogram (rows per kept dimension):")
    for name, t in info["tables"].items():
        lines.append(f"  {name:<12} " + "  ".join(f"{d}:{n}" for d, n in t["kept_dim_histogram"].items()))
    lines.append("utility quantiles (q: value):")
    for name, t in info["tables"].items():
        lines.append(f"  {name:<12} " + "  ".join(f"{q}:{v:.3g}" for q, v in t["utility_quantiles"].items()))
    tb = info["total"]["bytes"]
    lines.append("bytes: " + ", ".join(f"{k} {v:,}" for k, v in tb.items()))
    tot = info["total"]
    if tot["dense_bytes"]:
        lines.append(
            f"memory / dense weights: {tot['memory_vs_dense']:.4f}   "
            f"memory / (dense weights + optimizer state): {tot['memory_vs_dense_with_optimizer']:.4f}"
        )
    lines.append(
        f"pool budget {tot['budget_bytes']:,} bytes, {tot['resident_vs_budget']:.1%} resident"
        + (
            f"; memory budget {tot['memory_budget_bytes']:,} bytes, {tot['memory_vs_budget']:.1%} used"
            if tot["memory_budget_bytes"]
            else ""
        )
    )
    for p in info["pools"]:
        lines.append(
            f"pool c={p['chunk_width']}: {p['used']:,}/{p['slots']:,} slots used, {p['free_runs']} free runs, "
            f"longest {p['longest_free_run']:,}, fragmentation {p['fragmentation']:.3f}"
        )
        if "tier" in p and "segments" in p["tier"]:
            t = p["tier"]
            lines.append(
                f"  disk tier {t['location']}: {t['used']:,} live slots ({t['live_bytes']:,} bytes) in "
                f"{t['segments']} segments, {t['bytes_on_disk']:,} bytes on disk, garbage {t['garbage_fraction']:.1%}"
            )
        elif "tier" in p:
            t = p["tier"]
            lines.append(
                f"  disk tier {t['location']}: {t['used']:,}/{t['capacity']:,} slots, {t['bytes_on_disk']:,} bytes, "
                f"fragmentation {t['fragmentation']:.3f}"
            )
    return "\n".join(lines)


def plot_inspection(store: EmbeddingStore, info: dict[str, Any], path: Path) -> dict[str, list[str]]:
    """Kept-dimension and utility histograms, one colour per table, to ``path``; returns each panel's legend."""
    from .plotting import pyplot

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(info["tables"])
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        h = info["tables"][name]["kept_dim_histogram"]
        x = np.arange(len(h)) + i * width
        ax1.bar(x, list(h.values()), width=width, label=name)
        ax1.set_xticks(np.arange(len(h)) + 0.4 - width / 2, list(h.keys()))
    ax1.set_xlabel("kept dimension")
    ax1.set_ylabel("rows")
    ax1.set_title("Kept dimension per row")
    ax1.legend(title="table", fontsize=7, ncol=1 + len(names) // 10)
    util = util_to_float(store.backend.to_host(store.entries.arrays.util))
    tids = store.entries.table_of_entries()
    scale = store.config.gamma ** (store.step_count - store.clock.scale_origin)
    logs = {}
    for name in names:
        u = util[tids == store.table_index(name)].ravel() * scale
        logs[name] = np.log10(u[u > 0])
    spread = np.concatenate([v for v in logs.values() if v.size] or [np.zeros(1)])
    bins = np.linspace(spread.min(), spread.max() + 1e-6, 61)
    for name, v in logs.items():  # one outline per table, so that every table stays visible
        ax2.hist(v, bins=bins, histtype="step", lw=1.2, label=f"{name} ({v.size:,} chunks)")
    ax2.legend(title="table", fontsize=7, ncol=1 + len(names) // 10)
    ax2.set_xlabel("log10 utility (chunks with utility > 0)")
    ax2.set_ylabel("chunks")
    ax2.set_title("Utility distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    legends = {
        "kept_dim": [t.get_text() for t in ax1.get_legend().get_texts()],
        "utility": [t.get_text() for t in ax2.get_legend().get_texts()],
    }
    plt.close(fig)
    return legends


def verify_store(path: Path, progress: bool = False, checkpoint: str | None = None) -> list[str]:
    """Every problem found in the store at ``path`` (empty when it is sound).

    Every byte is read: the files the checkpoint lists (present, same size), every
    array and tier chunk through its crc32c, every invariant, and finite values in
    vectors and optimizer state. ``checkpoint`` names one other than the manifest's.
    """
    from .storage.checkpoint import check_files, open_checkpoint_group

    problems: list[str] = []
    try:
        ckpt, _root, attrs = open_checkpoint_group(Path(path), checkpoint=checkpoint)
        if int(attrs["format_version"]) >= 3:
            problems += check_files(ckpt, attrs.get("files") or {})
            if not attrs.get("files"):
                problems.append(f"checkpoint {ckpt} does not list its files")
        store = EmbeddingStore.open(Path(path), "r", check_listed_files=False, checkpoint=checkpoint)
    except FiitedError as exc:
        return problems + [str(exc)]
    with store:
        problems += check_store(store)
        for g, tier in enumerate(store.tiers):
            if tier is None:
                continue
            if not tier.keeps_owners:
                problems += _verify_segments(g, tier, progress)
                continue
            step = tier.block_rows
            for lo in tqdm(range(0, tier.capacity, step), disable=not progress, desc=f"tier_{g}", unit="block"):
                try:
                    vec, st = tier.read(np.arange(lo, min(lo + step, tier.capacity)))
                except FiitedError as exc:
                    problems.append(str(exc))
                    continue
                used = tier.owner[lo : lo + step] >= 0
                if not np.all(np.isfinite(vec[used])):
                    problems.append(f"tier_{g}: NaN or inf in the vectors of slots {lo}..{lo + step - 1}")
                if not np.all(np.isfinite(st[used])):
                    problems.append(f"tier_{g}: NaN or inf in the optimizer state of slots {lo}..{lo + step - 1}")
    return problems


def _verify_segments(g: int, tier, progress: bool) -> list[str]:
    """Every written slot of every segment read (every inner chunk's crc32c checked), and
    the live rows' values finite."""
    problems = []
    for seg in tqdm(tier.segments(), disable=not progress, desc=f"tier_{g}", unit="segment"):
        file_problems = tier.check_segment(seg["id"])
        problems += file_problems
        if file_problems:
            continue
        slots = seg["id"] * tier.segment_slots + np.arange(seg["written"], dtype=np.int64)
        try:
            vec, st = tier.read(slots)
        except FiitedError as exc:
            problems.append(str(exc))
            continue
        live = ~tier.is_free(slots)
        for what, rows in (("vectors", vec), ("optimizer state", st)):
            bad = ~np.all(np.isfinite(rows), axis=1) & live
            if bad.any():
                problems.append(
                    f"tier_{g}: NaN or inf in the {what} of slots {slots[bad][:5].tolist()} (segment {seg['id']})"
                )
    return problems


def _compact_pools(store: EmbeddingStore) -> None:
    """Pack resident chunks into the lowest slots; zero the rest (it compresses away on disk)."""
    b = store.backend
    addr = b.to_host(store.entries.arrays.addr).copy()
    for pool in store.pools:
        a = pool.arrays
        owner = b.to_host(a.owner)
        used = np.nonzero(owner >= 0)[0]
        n = used.size
        vec = np.zeros_like(b.to_host(a.vectors))
        st = np.zeros_like(b.to_host(a.opt_state))
        vec[:n] = b.to_host(a.vectors)[used]
        st[:n] = b.to_host(a.opt_state)[used]
        new_owner = np.full_like(owner, -1)
        new_owner[:n] = owner[used]
        k_of = np.argmax(addr[owner[used]] == used[:, None], axis=1)
        addr[owner[used], k_of] = np.arange(n, dtype=np.int32)
        free = np.arange(pool.slots - 1, n - 1, -1, dtype=np.int32)
        stack = np.zeros(pool.slots, np.int32)
        stack[: free.size] = free
        pool.arrays = type(a)(
            b.from_host(vec),
            b.from_host(st),
            b.from_host(new_owner),
            b.from_host(stack),
            b.from_host(np.array([pool.slots - n], np.int64)),
        )
    store.entries.arrays = store.entries.arrays._replace(addr=b.from_host(addr))


def _compact_tiers(store: EmbeddingStore, progress: bool) -> None:
    """Rewrite every tier densely (slots 0..used-1) and cut its files to size."""
    from .storage.zarr_tier import ZarrTier

    b = store.backend
    for g, tier in enumerate(store.tiers):
        if tier is None:
            continue
        if not tier.keeps_owners:  # every segment with a dead slot moves its live rows and goes
            compaction.compact(store, g, target=0.0)
            continue
        used = np.nonzero(tier.owner >= 0)[0]
        root = tier.root.parent / f"{tier.root.name}.compact"
        shutil.rmtree(root, ignore_errors=True)
        try:
            fresh = ZarrTier(
                root, tier.chunk_width, tier.state_width, capacity=max(used.size, 1), block_rows=tier.block_rows
            )
            new_slots = fresh.allocate(used.size)
            step = 16 * tier.block_rows
            for lo in tqdm(range(0, used.size, step), disable=not progress, desc=f"tier_{g}", unit="block"):
                vec, st = tier.read(used[lo : lo + step])
                fresh.write(new_slots[lo : lo + step], vec, st)
            # the packed rows sit in fresh's staging file until flushed into its Zarr chunks;
            # reopened from the files alone, unflushed rows would be gone
            fresh.flush()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # the live tier is untouched; nothing half-done stays
            raise
        owner = tier.owner[used]
        fresh.owner[new_slots] = owner
        addr = b.to_host(store.entries.arrays.addr).copy()
        k_of = np.argmax(addr[owner] == spilled_code(used)[:, None], axis=1)
        addr[owner, k_of] = spilled_code(new_slots).astype(np.int32)
        store.entries.arrays = store.entries.arrays._replace(addr=b.from_host(addr))
        fresh.close()
        tier.close()
        old_root = tier.root
        shutil.rmtree(old_root)
        root.rename(old_root)
        store.tiers[g] = tiering.open_saved_tier(store, g, old_root, fresh.owner, read_only=False)


def compact_store(
    path: Path, progress: bool = True, checkpoint: str | None = None, remove_older: bool = True
) -> dict[str, Any]:
    """Drop dead entries, pack the pool and the disk tier, shrink the entry table, save.

    ``checkpoint`` compacts that checkpoint instead of the manifest's, and
    ``remove_older=False`` keeps the older ones (a shard of a sharded store, whose
    global manifest moves on only once every shard is compacted)."""
    from .storage.checkpoint import save_store

    before = directory_bytes(path)
    phases = ["drop dead entries", "pack pool", "pack disk tier", "shrink entry table", "save"]
    bar = tqdm(total=len(phases), disable=not progress, desc="compact", unit="phase")
    with EmbeddingStore.open(Path(path), "r+", checkpoint=checkpoint) as store:
        n_before = store.entries.n_live
        bar.set_postfix_str(phases[0])
        dropped = store.drop_dead_entries()
        bar.update(1)
        bar.set_postfix_str(phases[1])
        _compact_pools(store)
        bar.update(1)
        bar.set_postfix_str(phases[2])
        _compact_tiers(store, progress=False)
        bar.update(1)
        bar.set_postfix_str(phases[3])
        store.rehash(store.entries.rehash_capacity(0))
        bar.update(1)
        bar.set_postfix_str(phases[4])
        problems = check_store(store)
        if problems:
            raise CorruptStoreError("compaction produced an unsound store, nothing was saved: " + "; ".join(problems))
        saved = save_store(store, Path(path), remove_older=remove_older, whole=True)
        bar.update(1)
        n_after = store.entries.n_live
    bar.close()
    return {
        "bytes_before": before,
        "bytes_after": directory_bytes(path),
        "entries_before": n_before,
        "entries_after": n_after,
        "dropped_entries": dropped,
        "checkpoint": saved.name,
    }


EXPORT_FORMAT = "fiited-store-export"
#: 2: the compact form keeps a chunk mask (version 1 kept an int32 index per chunk; still read)
EXPORT_VERSION = 2


def export_store(path: Path, out: Path, fmt: str = "dense", progress: bool = True) -> dict[str, Any]:
    """An inference export: no utilities, no optimizer state.

    ``dense``: per table ``ids`` int64[n] and ``weights`` float32[n, D] (absent chunks are zeros).
    ``compact``: per table ``ids`` int64[n], ``chunk_mask`` bool[n, K] (which chunks the row
    keeps) and ``values`` float32[m, c], the kept chunks row after row: one bit of
    information per chunk (a byte before compression, K / 4D of a dense row), and no
    bytes at all for an absent chunk, where the dense form stores zeros.
    Rows that keep no chunk read as zeros and are left out of both. A store that
    fails :func:`verify_store` is refused (``CorruptStoreError``), and a failed export
    leaves nothing behind.
    """
    if fmt not in ("dense", "compact"):
        raise ValueError(f"format must be 'dense' or 'compact', got {fmt!r}")
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new directory")
    # every byte checked (checksums, files, finite values) before a row is exported
    problems = verify_store(path, progress=progress)
    if problems:
        more = f" (and {len(problems) - 1} more; run fiited-store verify)" if len(problems) > 1 else ""
        raise CorruptStoreError(f"{path} fails verification, nothing exported: {problems[0]}{more}")
    summary: dict[str, Any] = {"format": fmt, "tables": {}}
    tmp = out.parent / f".{out.name}.partial"
    try:
        summary = _export_verified(path, out, tmp, fmt, progress, summary)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written export left behind
        if isinstance(exc, FiitedError):
            raise
        raise storage_error(exc, f"writing export {out}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["bytes_on_disk"] = directory_bytes(out)
    return summary


def _export_verified(
    path: Path, out: Path, tmp: Path, fmt: str, progress: bool, summary: dict[str, Any]
) -> dict[str, Any]:
    import zarr

    with EmbeddingStore.open(path, "r") as store:
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(zarr.storage.LocalStore(str(tmp)), mode="w")
        tids = store.entries.table_of_entries()
        for i, t in enumerate(tqdm(store.tables, disable=not progress, desc="export", unit="table")):
            e = np.nonzero(tids == i)[0]
            ids = np.sort(store.entries.keys_of(e)[1])
            rows = store.lookup(t.name, ids) if ids.size else np.zeros((0, t.dim), np.float32)
            present = rows.reshape(ids.size, t.chunks, t.chunk_width).any(axis=2)
            keep = present.any(axis=1)
            ids, rows, present = ids[keep], rows[keep], present[keep]
            g = root.create_group(t.name)
            g.attrs.update({"dim": t.dim, "chunks": t.chunks})
            g.create_array("ids", data=ids, chunks=(max(min(ids.size, 65536), 1),))
            if fmt == "dense":
                g.create_array("weights", data=rows, chunks=(max(min(ids.size, 65536), 1), t.dim))
                nbytes = rows.nbytes
            else:
                values = rows.reshape(-1, t.chunks, t.chunk_width)[present]
                g.create_array("chunk_mask", data=present, chunks=(max(min(ids.size, 65536), 1), t.chunks))
                g.create_array("values", data=values, chunks=(max(min(values.shape[0], 65536), 1), t.chunk_width))
                nbytes = present.nbytes + values.nbytes
            summary["tables"][t.name] = {
                "rows": int(ids.size),
                "bytes": int(nbytes + ids.nbytes),
                "kept_chunks": int(present.sum()),
            }
        root.attrs.update({"format": EXPORT_FORMAT, "kind": fmt, "format_version": EXPORT_VERSION})
        tmp.rename(out)
    return summary


def read_export(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{table: (ids, weights float32[n, D])} from either export format."""
    import zarr

    root = zarr.open_group(zarr.storage.LocalStore(str(out), read_only=True), mode="r")
    if root.attrs.get("format") != EXPORT_FORMAT:
        raise CorruptStoreError(f"{out} is not a {EXPORT_FORMAT} directory")
    result = {}
    for name, g in root.groups():
        ids = g["ids"][...]
        if root.attrs["kind"] == "dense":
            result[name] = (ids, g["weights"][...])
        else:
            K, D = int(g.attrs["chunks"]), int(g.attrs["dim"])
            values = g["values"][...]
            w = np.zeros((ids.size, K, D // K), np.float32)
            if "chunk_mask" in g:
                w[g["chunk_mask"][...]] = values
            else:  # version 1
                index = g["chunk_index"][...]
                w[index >= 0] = values[index[index >= 0]]
            result[name] = (ids, w.reshape(ids.size, D))
    return result

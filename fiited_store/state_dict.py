"""The store as a flat dict of host arrays and back (what ``state_dict`` carries).

:func:`export_state` copies every array, tier rows included; :func:`import_state`
checks a dict against the store's configuration and layout, and every invariant the
verifier knows (:func:`~fiited_store.verify.check_store`, run over the dict's arrays
before they become the store's), before it replaces anything: a state that would
crash a kernel or read wrong values later is refused with nothing changed.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import tiering
from .entry_table import EntryTable
from .errors import ConfigError, CorruptStoreError, InputShapeError


def export_state(store) -> dict[str, np.ndarray]:
    """Every array of the store, host copies, tier rows included (for ``state_dict``)."""
    import json

    from .config import config_to_json

    b = store.backend
    out: dict[str, np.ndarray] = {}
    for k, v in store.entries.arrays._asdict().items():
        out[f"entries.{k}"] = np.array(b.to_host(v))
    for pool in store.pools:
        for k, v in pool.arrays._asdict().items():
            out[f"pool_{pool.plan.group}.{k}"] = np.array(b.to_host(v))
    for g, tier in enumerate(store.tiers):
        if tier is None:
            continue
        # the spilled chunks, read off the addresses (a segment tier keeps no owners)
        owner, _, used = tiering.spilled_chunks(store, g)
        vec, st = tier.read(used)
        out[f"tier_{g}.slots"] = used
        out[f"tier_{g}.owner"] = owner
        out[f"tier_{g}.vectors"], out[f"tier_{g}.states"] = vec, st
    out["meta.counters"] = np.array(store.clock.as_tuple(), np.int64)
    out["meta.config"] = np.frombuffer(json.dumps(config_to_json(store.tables, store.config)).encode(), np.uint8).copy()
    return out


class _ListedTier:
    """A state's tier rows as the verifier sees a tier: which entry each listed row holds,
    the rows numbered 0..n-1 in the order of their slots (the addresses are renumbered to
    match, so a slot number of any size costs nothing here)."""

    keeps_owners = True

    def __init__(self, owner: np.ndarray):
        self.capacity = int(owner.shape[0])
        self.owner = np.asarray(owner, np.int64)

    def is_free(self, slots: np.ndarray) -> np.ndarray:
        return self.owner[slots] < 0


def state_problems(store, st: dict[str, np.ndarray]) -> list[str]:
    """What is wrong with a state of this store's layout (shapes and dtypes already checked):
    the verifier's invariants over its arrays, and its tier rows' slots, owners and values."""
    from .backend import get_backend
    from .entry_table import EntryArrays
    from .pool import PoolArrays
    from .verify import check_store

    problems: list[str] = []
    tiers: list[Any] = []
    n_all = st["entries.addr"].shape[0]
    for g in range(len(store.plans)):
        if f"tier_{g}.slots" not in st:
            tiers.append(None)
            continue
        slots, owner = st[f"tier_{g}.slots"], st[f"tier_{g}.owner"]
        where = f"tier_{g}"
        if slots.size and (slots.min() < 0 or np.unique(slots).size != slots.size):
            problems.append(f"{where}.slots are negative or listed twice")
        elif owner.size and (owner.min() < 0 or owner.max() >= n_all):
            problems.append(f"{where}.owner names entries outside [0, {n_all})")
        else:
            order = np.argsort(slots, kind="stable")
            tiers.append((slots[order], _ListedTier(owner[order])))
        for k in ("vectors", "states"):
            bad = ~np.isfinite(st[f"{where}.{k}"]).all(axis=1)
            if bad.any():
                problems.append(f"{where}.{k} hold NaN or inf at rows {np.nonzero(bad)[0][:5].tolist()}")
    if problems:
        return problems
    cpu = get_backend("cpu")
    arrays = EntryArrays(*(np.array(st[f"entries.{k}"]) for k in EntryArrays._fields))
    entries = EntryTable.from_arrays(cpu, arrays, [t.name for t in store.tables], store.config.max_load)
    # spilled addresses renumbered as the listed rows are (one not listed points past them)
    addr = arrays.addr
    tids = entries.table_of_entries()
    groups = store.host_meta["table_group"][np.maximum(tids, 0)]
    for g, listed in enumerate(tiers):
        if listed is None:
            continue
        sorted_slots, tier = listed
        e, k = np.nonzero((addr <= -2) & ((tids >= 0) & (groups == g))[:, None])
        slot = -2 - addr[e, k].astype(np.int64)
        pos = np.searchsorted(sorted_slots, slot)
        found = pos < sorted_slots.size
        found[found] = sorted_slots[pos[found]] == slot[found]
        addr[e, k] = (-2 - np.where(found, pos, sorted_slots.size)).astype(np.int32)
        tiers[g] = tier
    pools = [
        SimpleNamespace(plan=p.plan, arrays=PoolArrays(*(st[f"pool_{p.plan.group}.{k}"] for k in PoolArrays._fields)))
        for p in store.pools
    ]
    view = SimpleNamespace(
        backend=cpu,
        entries=entries,
        tables=store.tables,
        kmax=store.kmax,
        util_width=store.util_width,
        host_meta=store.host_meta,
        pools=pools,
        tiers=tiers,
    )
    problems = check_store(view)
    steps, _, rounds = (int(x) for x in st["meta.counters"])
    if steps < 0 or rounds < 0:
        problems.append(f"meta.counters {st['meta.counters'].tolist()} are negative")
    return problems


def import_state(store, state: dict[str, Any]) -> None:
    """Replace this store's contents with an :meth:`export_state` of a store of the same configuration."""
    import dataclasses
    import json

    from .config import config_from_json
    from .entry_table import EntryArrays
    from .pool import PoolArrays

    store.check_writable()
    st = {k: np.asarray(v) for k, v in state.items()}
    if "meta.config" not in st:
        raise InputShapeError("state has no 'meta.config': not a fiited-store state")
    tables, config = config_from_json(json.loads(bytes(st["meta.config"].astype(np.uint8)).decode()))
    mine = dataclasses.replace(store.config, device="cpu")
    theirs = dataclasses.replace(config, device="cpu")
    if tuple(tables) != store.tables or mine != theirs:
        raise ConfigError(
            "state was saved from a store with another configuration: "
            f"tables {[t.name for t in tables]} / {theirs} vs {[t.name for t in store.tables]} / {mine}"
        )
    need = [f"entries.{k}" for k in EntryArrays._fields] + [
        f"pool_{p.plan.group}.{k}" for p in store.pools for k in PoolArrays._fields
    ]
    missing = [k for k in need if k not in st]
    if missing:
        raise InputShapeError(f"state lacks arrays {missing}")
    cap = st["entries.keys"].shape[0]
    nd = store.entries.direct_rows
    expect = {
        "entries.row_base": ((len(store.tables) + 1,), np.int64),
        "entries.seen": ((max((nd + 31) // 32, 1),), np.uint32),
        "entries.keys": ((cap,), np.int64),
        "entries.table_ids": ((cap,), np.int16),
        "entries.addr": ((nd + cap, store.kmax), np.int32),
        "entries.util": ((nd + cap, store.util_width), np.uint16),
    }
    for p in store.pools:
        g, plan = p.plan.group, p.plan
        expect.update(
            {
                f"pool_{g}.vectors": ((plan.slots, plan.chunk_width), np.float32),
                f"pool_{g}.opt_state": ((plan.slots, plan.state_width), np.float32),
                f"pool_{g}.owner": ((plan.slots,), np.int32),
                f"pool_{g}.free_stack": ((plan.slots,), np.int32),
                f"pool_{g}.n_free": ((1,), np.int64),
            }
        )
    expect["meta.counters"] = ((3,), np.int64)
    if "meta.counters" not in st:
        raise InputShapeError("state lacks arrays ['meta.counters']")
    for g, p in enumerate(store.plans):
        if f"tier_{g}.slots" not in st:
            continue
        n = st[f"tier_{g}.slots"].shape[0] if st[f"tier_{g}.slots"].ndim == 1 else -1
        for k, shape, dtype in (
            ("slots", (n,), np.int64),
            ("owner", (n,), np.int64),
            ("vectors", (n, p.chunk_width), np.float32),
            ("states", (n, p.state_width), np.float32),
        ):
            if f"tier_{g}.{k}" not in st:
                raise InputShapeError(f"state lacks arrays ['tier_{g}.{k}']")
            expect[f"tier_{g}.{k}"] = (shape, dtype)
    for k, (shape, dtype) in expect.items():
        if st[k].shape != shape or st[k].dtype != dtype:
            raise InputShapeError(f"state array {k} is {st[k].dtype}{st[k].shape}, expected {np.dtype(dtype)}{shape}")
    if not np.array_equal(st["entries.row_base"], store.backend.to_host(store.entries.arrays.row_base)):
        raise InputShapeError(f"state's direct index rows {st['entries.row_base'].tolist()} differ from this store's")
    problems = state_problems(store, st)
    if problems:
        raise CorruptStoreError("state is not a sound store, nothing was changed: " + "; ".join(problems[:5]))
    b = store.backend
    addr = st["entries.addr"].copy()
    new_tiers: list[Any] = [None] * len(store.plans)
    for g in range(len(store.plans)):
        if f"tier_{g}.slots" not in st:
            continue
        root = tiering.tier_root(store) / f"tier_{g}.import"
        shutil.rmtree(root, ignore_errors=True)
        tier = tiering.new_tier(store, g, root, capacity=st[f"tier_{g}.slots"].shape[0])
        new_slots = tier.allocate(st[f"tier_{g}.slots"].shape[0])
        tier.write(new_slots, st[f"tier_{g}.vectors"], st[f"tier_{g}.states"])
        owner = st[f"tier_{g}.owner"]
        if tier.keeps_owners:
            tier.owner[new_slots] = owner
        tier.flush()  # every row in the tier's files before it is reopened from them below
        # the rows moved: point their chunks at the new slots
        k_of = np.argmax(addr[owner] == (-2 - st[f"tier_{g}.slots"])[:, None], axis=1)
        addr[owner, k_of] = -2 - new_slots
        new_tiers[g] = tier
    store.replace_entries(
        EntryTable.from_arrays(
            b,
            EntryArrays(
                row_base=b.persist(st["entries.row_base"]),
                seen=b.persist(st["entries.seen"]),
                keys=b.persist(st["entries.keys"]),
                table_ids=b.persist(st["entries.table_ids"]),
                addr=b.persist(addr),
                util=b.persist(st["entries.util"]),
            ),
            [t.name for t in store.tables],
            store.config.max_load,
        )
    )
    for p in store.pools:
        g = p.plan.group
        p.arrays = PoolArrays(*(b.persist(st[f"pool_{g}.{k}"]) for k in PoolArrays._fields))
    for g, tier in enumerate(new_tiers):
        if store.tiers[g] is not None:
            store.tiers[g].close()
            shutil.rmtree(store.tiers[g].root, ignore_errors=True)
        if tier is not None:
            final = tiering.tier_root(store) / f"tier_{g}"
            shutil.rmtree(final, ignore_errors=True)
            tier.close()
            tier.root.rename(final)
            if tier.keeps_owners:
                store.tiers[g] = tiering.open_saved_tier(store, g, final, tier.owner, read_only=False)
            else:
                store.tiers[g] = tiering.open_segment_tier(store, g, final, tier.describe(), read_only=False)
        else:
            store.tiers[g] = None
    clock = store.clock
    clock.step_count, clock.scale_origin, clock.prune_round = (int(x) for x in st["meta.counters"])
    store.residency.drop_reads()

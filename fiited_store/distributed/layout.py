"""What one shard holds: its tables and the share of the store's budget its pools get.

Apart from the sharded store's front (:mod:`.sharded_store`) because a resharded open
(:mod:`.checkpoint`) builds shards of a new world from it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import FLOAT_BYTES, StoreConfig, TableConfig, plan_pools
from ..errors import ConfigError
from .global_pools import POOL_SLACK
from .routing import table_weights


def shard_config(
    tables: Sequence[TableConfig],
    config: StoreConfig,
    world: int,
    routing: Any = None,
    rank: int = 0,
    pool_slack: float = POOL_SLACK,
):
    """The tables and config of shard ``rank`` of ``world``.

    Row-wise, every table is on the hashed index (a shard holds a scattered subset
    of each table's rows) and each pool gets 1/W of its global budget. Table-wise,
    the tables a rank owns keep their index kind, the others (which it never holds
    a row of) are hashed, and each pool gets its owned tables' share. Either way a
    pool holds ``pool_slack`` more than its share. A world of one
    keeps the store as configured: its one shard is the whole store."""
    from ..config import memory_budget

    if config.device != "cpu":
        raise ConfigError(f"a sharded store runs its shards on the CPU for now, got device={config.device!r}")
    plans = plan_pools(tables, config)  # the global layout: validates the configs once
    if world == 1:
        return tuple(tables), config
    owned = routing.owns_tables(rank, world) if routing is not None else None
    if owned is None:  # row-wise
        shard_tables = tuple(dataclasses.replace(t, index="hashed") for t in tables)
        share = [1.0 / world] * len(plans)
    else:
        shard_tables = tuple(t if i in owned else dataclasses.replace(t, index="hashed") for i, t in enumerate(tables))
        weight = [float(w) for w in table_weights(tables)]
        share = [
            sum(weight[i] for i in p.tables if i in owned) / max(sum(weight[i] for i in p.tables), 1e-300)
            for p in plans
        ]
    slots = [int(p.slots * f) for p, f in zip(plans, share)]
    if owned is None and routing is not None:
        slots = _floor_slots_by_owner(tables, config, plans, slots, routing, world, rank)
    # room for the slots that the store-wide cutoff and admission give a shard whose
    # rows run hotter than its share (global_pools)
    slots = [n + math.ceil(n * pool_slack) for n in slots]
    # every pool keeps at least one slot (a pool of tables this rank holds no row of stays empty)
    pools = tuple(max(p.chunk_width * FLOAT_BYTES, n * p.chunk_width * FLOAT_BYTES) for p, n in zip(plans, slots))
    changes: dict[str, Any] = {"pool_budget_bytes": pools, "budget_bytes": None, "budget_fraction": None}
    cap = memory_budget(tables, config)
    if cap is not None:
        whole = sum(p.slots * p.chunk_width * FLOAT_BYTES for p in plans)
        changes.update(memory_budget_bytes=max(int(cap * sum(pools) / whole), 1), memory_budget_fraction=None)
    return shard_tables, dataclasses.replace(config, **changes)


def _floor_slots_by_owner(tables, config, plans, slots, routing, world: int, rank: int) -> list[int]:
    """Row-wise, a pool's floors (min_chunks, small tables, a floor_dim's floor table)
    go to the rank that owns each declared row, not 1/W to every rank: the rows
    hash unevenly, and a shard short of floor slots would leave rows of its own
    without the floor that one store gives every row. The rest is shared 1/W."""
    from ..config import table_floors

    floors = table_floors(tables, config)
    out = list(slots)
    for g, p in enumerate(plans):
        held = [(i, floors[i]) for i in p.tables if floors[i] and tables[i].num_embeddings]
        if not held:
            continue
        mine = total = 0
        for i, f in held:
            n = int(tables[i].num_embeddings)
            owners = routing.owners(np.full(n, i, np.int16), np.arange(n, dtype=np.int64), world)
            mine += f * int(np.count_nonzero(owners == rank))
            total += f * n
        rest = max(p.slots - total, 0)
        out[g] = (mine if p.slots >= total else p.slots * mine // total) + rest // world
    return out

"""What a store holds and costs: per-table chunk residency and the memory figures users
compare (against the budget, the dense weights, and the dense weights plus the same
optimizer's state)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import FLOAT_BYTES, optimizer_dense_bytes


def chunk_counts(store):
    """(entries int64[T], resident int64[T, kmax], spilled int64[T, kmax]) per table."""
    T = len(store.tables)
    entries = np.zeros(T, np.int64)
    resident = np.zeros((T, store.kmax), np.int64)
    spilled = np.zeros((T, store.kmax), np.int64)
    ea = store.entries.arrays
    store.k.count_chunks(ea.row_base, ea.seen, ea.table_ids, ea.addr, T, entries, resident, spilled)
    return entries, resident, spilled


def store_stats(store) -> dict[str, Any]:
    """Entries, chunk residency, kept dimensions and bytes, per table and in total, with
    the store's memory against its budget and against the dense weights (with and
    without the same optimizer's state), and its counters."""
    entries, resident, spilled = chunk_counts(store)
    hit_rates = store.residency.hit_rates([t.name for t in store.tables])
    needed = int(store.residency.needed.sum())
    per_table = {}
    for i, t in enumerate(store.tables):
        n = int(entries[i])
        res = resident[i, : t.chunks]
        kept = float(res.sum() * t.chunk_width / n) if n else 0.0
        per_table[t.name] = {
            "entries": n,
            "dim": t.dim,
            "chunks": t.chunks,
            "resident_per_chunk": res.tolist(),
            "spilled_per_chunk": spilled[i, : t.chunks].tolist(),
            "absent_per_chunk": (n - res - spilled[i, : t.chunks]).tolist(),
            "average_kept_dim": kept,
            "dense_bytes": t.dense_bytes,
            # cache mode: chunks training lookups found resident, against those they needed
            "hit_rate": hit_rates[t.name],
        }
    pool_vec = sum(p.vector_bytes for p in store.pools)
    pool_state = sum(p.state_bytes for p in store.pools)
    pool_mgr = sum(p.manager_bytes for p in store.pools)
    entry_bytes = store.entries.nbytes
    dense = sum(t.dense_bytes or 0 for t in store.tables) if all(t.dense_bytes for t in store.tables) else None
    dense_with_opt = dense + sum(optimizer_dense_bytes(t) for t in store.tables) if dense else None
    budget = sum(p.vector_bytes for p in store.pools)
    resident_bytes = sum(p.n_used * p.chunk_width * FLOAT_BYTES for p in store.pools)
    tier_bytes = sum(t.nbytes for t in store.tiers if t is not None)
    total_bytes = pool_vec + pool_state + pool_mgr + entry_bytes
    n_entries = int(entries.sum())
    total = {
        "entries": n_entries,
        "entry_capacity": store.entries.capacity,
        "resident_chunks": int(resident.sum()),
        "spilled_chunks": int(spilled.sum()),
        "average_kept_dim": float(
            sum(resident[i].sum() * t.chunk_width for i, t in enumerate(store.tables)) / n_entries
        )
        if n_entries
        else 0.0,
        "bytes": {
            "entries": entry_bytes,
            "pool_vectors": pool_vec,
            "optimizer_state": pool_state,
            "address_manager": pool_mgr,
            "memory_total": total_bytes,
            "disk_tier": tier_bytes,
        },
        # the pool budget (the paper's: resident chunk vectors), and how full the pool is
        "budget_bytes": budget,
        "resident_vs_budget": resident_bytes / budget,
        # the whole-store budget, when one was set; memory_total never exceeds it
        "memory_budget_bytes": store.memory_budget_bytes,
        "memory_vs_budget": (total_bytes / store.memory_budget_bytes) if store.memory_budget_bytes else None,
        "dense_bytes": dense,
        "dense_with_optimizer_bytes": dense_with_opt,
        "memory_vs_dense": (total_bytes / dense) if dense else None,
        "memory_vs_dense_with_optimizer": (total_bytes / dense_with_opt) if dense_with_opt else None,
        "step": store.step_count,
        "hit_rate": (1.0 - int(store.residency.missed.sum()) / needed) if needed else None,
    }
    pools = [
        {
            "chunk_width": p.chunk_width,
            "slots": p.slots,
            "used": p.n_used,
            "free": p.n_free,
            "tier_slots_used": (store.tiers[p.plan.group].n_used if store.tiers[p.plan.group] is not None else 0),
        }
        for p in store.pools
    ]
    return {"tables": per_table, "total": total, "pools": pools, "counters": dict(vars(store.counters))}

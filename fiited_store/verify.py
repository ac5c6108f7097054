"""Checks of every invariant in docs/design.md over a store's arrays (host-side, vectorised).

``check_store(store)`` returns a list of problems, each a sentence naming the
array and the position that is wrong; an empty list means the store is sound.
The tests call it after every operation and ``fiited-store verify`` reports it.
"""

from __future__ import annotations

import numpy as np

from .kernels.layout import EMPTY, TOMBSTONE, util_to_float


def _first(mask: np.ndarray, limit: int = 5) -> list[int]:
    return np.nonzero(mask)[0][:limit].tolist()


def check_store(store) -> list[str]:
    b = store.backend
    problems: list[str] = []
    ea = store.entries.arrays
    keys, h_tids = b.to_host(ea.keys), b.to_host(ea.table_ids)
    addr, util = b.to_host(ea.addr), b.to_host(ea.util)
    base, seen = np.asarray(b.to_host(ea.row_base)), b.to_host(ea.seen)
    cap, kmax, T = keys.shape[0], store.kmax, len(store.tables)
    expect_base = np.concatenate([[0], np.cumsum([t.num_embeddings if t.direct else 0 for t in store.tables])])
    if base.shape != (T + 1,) or not np.array_equal(base, expect_base):
        return [f"entries/row_base is {base.tolist()}, the tables declare {expect_base.tolist()}"]
    nd = int(base[-1])
    n_all = nd + cap

    # shapes and dtypes of the entry arrays
    for name, arr, dtype, shape in (
        ("seen", seen, np.uint32, (max((nd + 31) // 32, 1),)),
        ("keys", keys, np.int64, (cap,)),
        ("table_ids", h_tids, np.int16, (cap,)),
        ("addr", addr, np.int32, (n_all, kmax)),
        ("util", util, np.uint16, (n_all, store.util_width)),
    ):
        if arr.dtype != dtype or arr.shape != shape:
            problems.append(f"entries/{name} is {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{shape}")
    if problems:
        return problems
    if cap & (cap - 1):
        problems.append(f"entry capacity {cap} is not a power of two")

    bad_tid = (h_tids != EMPTY) & (h_tids != TOMBSTONE) & ((h_tids < 0) | (h_tids >= T))
    if bad_tid.any():
        problems.append(f"entries/table_ids hold unknown tables at hashed slots {_first(bad_tid)}")
    # the table of every entry, direct rows first (EMPTY where no key holds it)
    tids = store.entries.table_of_entries()
    seen_bits = np.unpackbits(np.ascontiguousarray(seen).view(np.uint8), bitorder="little")
    if seen_bits[nd:].any():
        problems.append(f"entries/seen has bits set past the {nd} direct rows")
    live = tids >= 0
    live &= tids < T
    if int(live.sum()) != store.entries.n_live:
        problems.append(f"{int(live.sum())} live entries but the table counts {store.entries.n_live}")

    # every live hashed key is found at its own position (no duplicates, intact probe chains)
    pos = np.nonzero(live[nd:])[0]
    if pos.size:
        found, _ = store.entries.find(b.from_host(h_tids[pos].astype(np.int16)), b.from_host(keys[pos]))
        found = b.to_host(found)
        wrong = found != pos + nd
        if wrong.any():
            i = int(np.argmax(wrong))
            problems.append(
                f"entry {int(pos[i]) + nd} (table {int(h_tids[pos[i]])}, id {int(keys[pos[i]])}) is found at "
                f"{int(found[i])}: duplicate key or broken probe chain"
            )

    chunks = store.host_meta["table_chunks"]
    groups = store.host_meta["table_group"]
    K_of = np.zeros(n_all, np.int64)
    K_of[live] = chunks[tids[live]]
    beyond = (np.arange(kmax)[None, :] >= K_of[:, None]) & (addr != -1)
    if beyond.any():
        e = int(np.nonzero(beyond.any(axis=1))[0][0])
        problems.append(f"entry {e} has addresses past its table's {int(K_of[e])} chunks: {addr[e].tolist()}")
    dead_addr = (~live[:, None]) & (addr != -1)
    if dead_addr.any():
        problems.append(f"empty or erased entries {_first(dead_addr.any(axis=1))} still hold addresses")
    util = util_to_float(util)
    if not np.all(np.isfinite(util)) or np.any(util < 0):
        problems.append(
            f"utilities are negative or not finite at entries {_first(~(np.isfinite(util) & (util >= 0)).all(axis=1))}"
        )

    # pools: owner <-> addr, free stack (invariants 1 and 2)
    for pool in store.pools:
        g = pool.plan.group
        pa = pool.arrays
        vectors, owner = b.to_host(pa.vectors), b.to_host(pa.owner)
        free_stack, n_free = b.to_host(pa.free_stack), int(b.to_host(pa.n_free)[0])
        S = pool.plan.slots
        where = f"pool_{g}"
        if vectors.shape != (S, pool.plan.chunk_width) or vectors.dtype != np.float32:
            problems.append(
                f"{where}/vectors is {vectors.dtype}{vectors.shape}, expected float32{(S, pool.plan.chunk_width)}"
            )
            continue
        if owner.shape != (S,) or free_stack.shape != (S,) or not 0 <= n_free <= S:
            problems.append(
                f"{where}: owner {owner.shape}, free_stack {free_stack.shape}, n_free {n_free} do not fit {S} slots"
            )
            continue
        if not np.all(np.isfinite(vectors)):
            problems.append(f"{where}/vectors hold NaN or inf at slots {_first(~np.isfinite(vectors).all(axis=1))}")
        opt_state = b.to_host(pool.arrays.opt_state)
        if not np.all(np.isfinite(opt_state)):
            problems.append(
                f"{where}/opt_state holds NaN or inf at slots {_first(~np.isfinite(opt_state).all(axis=1))}"
            )
        stack = free_stack[:n_free].astype(np.int64)
        if stack.size and (stack.min() < 0 or stack.max() >= S):
            problems.append(f"{where}/free_stack holds slots outside [0, {S})")
            continue
        if np.unique(stack).size != stack.size:
            problems.append(f"{where}/free_stack lists a slot twice")
        owned = owner >= 0
        on_stack = np.zeros(S, bool)
        on_stack[stack] = True
        both = owned & on_stack
        if both.any():
            problems.append(f"{where}: slots {_first(both)} are on the free stack and owned")
        neither = ~owned & ~on_stack
        if neither.any():
            problems.append(f"{where}: slots {_first(neither)} are neither free nor owned (leaked)")
        bad_owner = owned & (owner >= n_all)
        if bad_owner.any():
            problems.append(f"{where}/owner points past the entry table at slots {_first(bad_owner)}")
            continue
        s_idx = np.nonzero(owned)[0]
        e = owner[s_idx].astype(np.int64)
        matches = (addr[e] == s_idx[:, None]).sum(axis=1)
        if np.any(matches != 1):
            i = int(np.argmax(matches != 1))
            problems.append(
                f"{where}: slot {int(s_idx[i])} names entry {int(e[i])} as owner, but {int(matches[i])} of that "
                f"entry's chunks have this address ({addr[e[i]].tolist()})"
            )
        wrong_group = ~live[e] | (groups[np.maximum(tids[e], 0)] != g)
        if wrong_group.any():
            problems.append(f"{where}: slots {s_idx[wrong_group][:5].tolist()} are owned by entries outside this pool")
        # every resident chunk of this pool points to a slot that names it
        in_group = live & (groups[np.maximum(tids, 0)] == g)
        res = (addr >= 0) & in_group[:, None]
        re, rk = np.nonzero(res)
        rs = addr[re, rk]
        if rs.size and rs.max() >= S:
            problems.append(
                f"{where}: resident addresses past the pool's {S} slots at entries {re[rs >= S][:5].tolist()}"
            )
        else:
            mismatch = owner[rs] != re
            if mismatch.any():
                i = int(np.argmax(mismatch))
                problems.append(
                    f"{where}: entry {int(re[i])} chunk {int(rk[i])} is at slot {int(rs[i])}, "
                    f"whose owner is {int(owner[rs[i]])}"
                )

        # spilled chunks <-> tier back-pointers (invariant 6 depends on it)
        sp = (addr <= -2) & in_group[:, None]
        se, sk = np.nonzero(sp)
        tier = store.tiers[g]
        if se.size and tier is None:
            problems.append(f"{where}: {se.size} chunks are spilled but the pool has no tier")
        elif tier is not None:
            ts = -2 - addr[se, sk].astype(np.int64)
            if ts.size and ts.max() >= tier.capacity:
                problems.append(f"tier_{g}: spilled chunks point past its {tier.capacity} slots")
            elif not tier.keeps_owners:
                problems += _check_segment_tier(g, tier, se, sk, ts)
            else:
                wrong = tier.owner[ts] != se
                if wrong.any():
                    i = int(np.argmax(wrong))
                    problems.append(
                        f"tier_{g}: slot {int(ts[i])} holds entry {int(se[i])} chunk {int(sk[i])} "
                        f"but its owner is {int(tier.owner[ts[i]])}"
                    )
                towned = np.nonzero(tier.owner >= 0)[0]
                if towned.size != ts.size:
                    problems.append(f"tier_{g}: {towned.size} slots have owners but {ts.size} chunks are spilled")
                marked = tier.is_free(towned)
                if np.any(marked):
                    problems.append(f"tier_{g}: owned slots {towned[marked][:5].tolist()} are marked free")
    return problems


def _check_segment_tier(g: int, tier, se: np.ndarray, sk: np.ndarray, ts: np.ndarray) -> list[str]:
    """A segment tier keeps no owners: each spilled chunk's slot must be handed out, live,
    and held by that chunk alone, and the tier must count exactly those slots live."""
    problems = []
    uniq, first, counts = np.unique(ts, return_index=True, return_counts=True)
    if np.any(counts > 1):
        s = int(uniq[np.argmax(counts > 1)])
        holders = np.nonzero(ts == s)[0][:2]
        problems.append(
            f"tier_{g}: slot {s} holds both entry {int(se[holders[0]])} chunk {int(sk[holders[0]])} "
            f"and entry {int(se[holders[1]])} chunk {int(sk[holders[1]])}"
        )
    try:
        free = tier.is_free(uniq)
    except Exception as exc:  # noqa: BLE001 - a slot the tier never handed out
        return problems + [f"tier_{g}: {exc}"]
    if np.any(free):
        bad = uniq[free][:5].tolist()
        problems.append(f"tier_{g}: spilled chunks point at slots {bad}, which hold nothing live")
    if tier.n_used != uniq.size:
        problems.append(f"tier_{g}: {tier.n_used} slots are live but {uniq.size} chunks are spilled")
    return problems

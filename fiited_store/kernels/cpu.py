"""CPU kernels (numba ``njit``): pure functions over the flat arrays of the layout.

One kernel per operation; state lives in the arrays passed in, never in globals.
All kernels sit in this one module because numba's ``cache=True`` does not notice
when a jitted helper defined in another file changes.

Determinism: every decision that picks *which* chunk or key gets something
(sampling, admission order, the winners of an over-subscribed prune, initial
values) is a function of the keys and the seed, never of where an entry happens
to sit in the hash table. The CUDA backend inserts in a different order and
still reaches the same decisions, which is what lets the two backends agree.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .layout import (
    EMPTY,
    INIT_NORMAL,
    INIT_UNIFORM,
    OPT_ADAGRAD,
    OPT_ROWWISE_ADAGRAD,
    OPT_SGD,
    TOMBSTONE,
    UTIL_ACCESS,
    UTIL_GRADIENT,
)

_JIT = dict(cache=True, nogil=True)
_PAR = dict(cache=True, nogil=True, parallel=True)

_U64_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U64_C1 = np.uint64(0xBF58476D1CE4E5B9)
_U64_C2 = np.uint64(0x94D049BB133111EB)
_U64_C3 = np.uint64(0xD6E8FEB86659FD93)


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c rounded once, as torch's CPU optimizers and weighted bags compute it."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)

    return sig, codegen


# --------------------------------------------------------------------------- hashing


@njit(inline="always")
def mix64(z):
    """splitmix64's finaliser; z and the result are uint64 (int64 mixing overflows)."""
    z = (z ^ (z >> np.uint64(30))) * _U64_C1
    z = (z ^ (z >> np.uint64(27))) * _U64_C2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def key_hash(table, key):
    return mix64(np.uint64(key) ^ (np.uint64(table + 1) * _U64_GOLDEN))


@njit(inline="always")
def chunk_hash31(table, key, k):
    """31 bits that break utility ties between chunks, the same on every backend."""
    return mix64(key_hash(table, key) + np.uint64(k) * _U64_C3) >> np.uint64(33)


@njit(inline="always")
def _unit(h):
    """uint64 -> float64 in [0, 1) from its top 53 bits."""
    return np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always")
def init_value(seed, table, key, k, j, kind, scale):
    """Initial value of element j of chunk k of (table, key): a pure function."""
    if kind == INIT_UNIFORM:
        h = mix64(key_hash(table, key) ^ mix64(np.uint64(seed) + np.uint64(k * 65536 + j) * _U64_C3))
        return np.float32(scale * (2.0 * _unit(h) - 1.0))
    if kind == INIT_NORMAL:
        h1 = mix64(key_hash(table, key) ^ mix64(np.uint64(seed) + np.uint64(k * 65536 + j) * _U64_C3))
        h2 = mix64(h1 ^ _U64_GOLDEN)
        u1 = 1.0 - _unit(h1)  # (0, 1]
        u2 = _unit(h2)
        return np.float32(scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))
    return np.float32(0.0)


# --------------------------------------------------------------------------- entry table


@njit(**_PAR)
def find_entries(keys, table_ids, q_tables, q_ids, out):
    """out[i] = entry of (q_tables[i], q_ids[i]) or -1. Returns the number missing."""
    mask = np.uint64(keys.shape[0] - 1)
    n_missing = 0
    for i in prange(q_ids.shape[0]):
        t = q_tables[i]
        key = q_ids[i]
        pos = key_hash(t, key) & mask
        res = -1
        while True:
            tid = table_ids[pos]
            if tid == EMPTY:
                break
            if tid == t and keys[pos] == key:
                res = np.int64(pos)
                break
            pos = (pos + np.uint64(1)) & mask
        out[i] = res
        if res < 0:
            n_missing += 1
    return n_missing


@njit(**_JIT)
def insert_missing(keys, table_ids, addr, util, q_tables, q_ids, out, new_entries):
    """Insert every key with out[i] == -1; duplicates within the batch share one entry.

    Sequential on purpose: it only sees the keys that ``find_entries`` missed, and
    inserting in batch order makes ``new_entries`` list new keys by first occurrence.
    The caller guarantees room (the load factor stays below max_load).
    """
    mask = np.uint64(keys.shape[0] - 1)
    n_new = 0
    for i in range(q_ids.shape[0]):
        if out[i] >= 0:
            continue
        t = q_tables[i]
        key = q_ids[i]
        pos = key_hash(t, key) & mask
        while True:
            tid = table_ids[pos]
            if tid == EMPTY:
                keys[pos] = key
                table_ids[pos] = t
                addr[pos, :] = -1
                util[pos, :] = 0.0
                new_entries[n_new] = pos
                n_new += 1
                out[i] = pos
                break
            if tid == t and keys[pos] == key:
                out[i] = pos
                break
            pos = (pos + np.uint64(1)) & mask
    return n_new


@njit(**_JIT)
def rehash_into(keys, table_ids, addr, util, new_keys, new_table_ids, new_addr, new_util, old_to_new):
    """Move every live entry into fresh arrays (tombstones vanish); old_to_new maps positions."""
    mask = np.uint64(new_keys.shape[0] - 1)
    for e in range(keys.shape[0]):
        t = table_ids[e]
        if t < 0:
            old_to_new[e] = -1
            continue
        key = keys[e]
        pos = key_hash(t, key) & mask
        while new_table_ids[pos] != EMPTY:
            pos = (pos + np.uint64(1)) & mask
        new_keys[pos] = key
        new_table_ids[pos] = t
        new_addr[pos, :] = addr[e, :]
        new_util[pos, :] = util[e, :]
        old_to_new[e] = pos


@njit(**_PAR)
def remap_owner(owner, old_to_new, kmax):
    for s in prange(owner.shape[0]):
        o = owner[s]
        if o >= 0:
            owner[s] = old_to_new[o // kmax] * kmax + o % kmax


@njit(**_JIT)
def erase_entries(entries, table_ids, addr, util, owner, free_stack, n_free, table_group, group, kmax, tier_out):
    """Tombstone the given entries (each once). Pool slots of ``group`` go back on the stack.

    Spilled chunks are reported in tier_out (tier slot codes) for the caller to free.
    Returns (number erased, number of tier slots reported).
    """
    n_erased = 0
    n_tier = 0
    for i in range(entries.shape[0]):
        e = entries[i]
        t = table_ids[e]
        if t < 0:
            continue
        if table_group[t] != group:
            continue
        for k in range(kmax):
            s = addr[e, k]
            if s >= 0:
                owner[s] = -1
                free_stack[n_free[0]] = s
                n_free[0] += 1
            elif s <= -2:
                tier_out[n_tier] = -2 - s
                n_tier += 1
            addr[e, k] = -1
        util[e, :] = 0.0
        table_ids[e] = TOMBSTONE
        n_erased += 1
    return n_erased, n_tier


# --------------------------------------------------------------------------- pool


@njit(**_JIT)
def admit_new_chunks(new_entries, keys, table_ids, addr, table_chunks, table_group, group, vectors, opt_state,
                     owner, free_stack, n_free, seed, table_init_kind, table_init_scale, kmax):
    """Give free slots to the chunks of new keys, in first-occurrence order, while any remain."""
    c = vectors.shape[1]
    admitted = 0
    for i in range(new_entries.shape[0]):
        e = new_entries[i]
        t = table_ids[e]
        if table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            if n_free[0] == 0:
                return admitted
            n_free[0] -= 1
            s = free_stack[n_free[0]]
            addr[e, k] = s
            owner[s] = e * kmax + k
            for j in range(c):
                vectors[s, j] = init_value(seed, t, keys[e], k, j, table_init_kind[t], table_init_scale[t])
            opt_state[s, :] = 0.0
            admitted += 1
    return admitted


@njit(**_PAR)
def gather_slots(slots, vectors, opt_state, out_vectors, out_state):
    for i in prange(slots.shape[0]):
        s = slots[i]
        out_vectors[i, :] = vectors[s, :]
        out_state[i, :] = opt_state[s, :]


@njit(**_JIT)
def commit_evictions(ev_entries, ev_chunks, tier_slots, addr, owner, free_stack, n_free, kmax):
    """Evict chunks: their slots go back on the free stack.

    With tier_slots non-empty the chunk is spilled (addr = -2 - tier slot; the
    caller, who wrote the tier, sets the tier's back-pointers); otherwise it
    becomes absent.
    """
    spill = tier_slots.shape[0] > 0
    for i in range(ev_entries.shape[0]):
        e = ev_entries[i]
        k = ev_chunks[i]
        s = addr[e, k]
        owner[s] = -1
        free_stack[n_free[0]] = s
        n_free[0] += 1
        if spill:
            addr[e, k] = -2 - tier_slots[i]
        else:
            addr[e, k] = -1


@njit(**_PAR)
def chunk_codes(addr, entries, chunks, out):
    """addr[entries[i], chunks[i]] for a list of chunks."""
    for i in prange(entries.shape[0]):
        out[i] = addr[entries[i], chunks[i]]


@njit(**_JIT)
def commit_allocations(al_entries, al_chunks, restore_index, restored_vectors, restored_state, keys, table_ids,
                       addr, owner, free_stack, n_free, vectors, opt_state, seed, table_init_kind,
                       table_init_scale, kmax):
    """Give slots to chunks, in list order, while free slots remain.

    restore_index[i] >= 0: the chunk comes back with row restore_index[i] of the
    restored arrays (its trained values and optimizer state); -1: it is initialised.
    Returns how many were placed; the caller releases the tier slots of restored ones.
    """
    c = vectors.shape[1]
    for i in range(al_entries.shape[0]):
        if n_free[0] == 0:
            return i
        e = al_entries[i]
        k = al_chunks[i]
        n_free[0] -= 1
        s = free_stack[n_free[0]]
        addr[e, k] = s
        owner[s] = e * kmax + k
        r = restore_index[i]
        if r >= 0:
            vectors[s, :] = restored_vectors[r, :]
            opt_state[s, :] = restored_state[r, :]
        else:
            t = table_ids[e]
            for j in range(c):
                vectors[s, j] = init_value(seed, t, keys[e], k, j, table_init_kind[t], table_init_scale[t])
            opt_state[s, :] = 0.0
    return al_entries.shape[0]


@njit(**_PAR)
def assign_rows(entries, values, table_ids, addr, table_chunks, table_group, group, vectors, opt_state):
    """Write whole rows into the resident chunks of ``group``; resets their optimizer state."""
    c = vectors.shape[1]
    for i in prange(entries.shape[0]):
        e = entries[i]
        t = table_ids[e]
        if table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            s = addr[e, k]
            if s >= 0:
                for j in range(c):
                    vectors[s, j] = values[i, k * c + j]
                opt_state[s, :] = 0.0


# --------------------------------------------------------------------------- forward


@njit(**_PAR)
def expand_bags(offsets, bags_per_feature, feature_table, bag_of_occ, table_of_occ):
    """Per id occurrence: the bag it belongs to and the table it addresses."""
    for bag in prange(offsets.shape[0] - 1):
        t = feature_table[bag // bags_per_feature]
        for i in range(offsets[bag], offsets[bag + 1]):
            bag_of_occ[i] = bag
            table_of_occ[i] = t


@njit(inline="always")
def _source_row(s, sp_slots):
    """Row of a chunk's values: (0, slot) in the pool, (1, j) in the read-through rows, (-1, 0) none."""
    if s >= 0:
        return 0, s
    if s <= -2 and sp_slots.shape[0] > 0:
        ts = -2 - s
        j = np.searchsorted(sp_slots, ts)
        if j < sp_slots.shape[0] and sp_slots[j] == ts:
            return 1, j
    return -1, 0


@njit(**_PAR)
def pooled_forward(entry_idx, offsets, weights, mean, bags_per_feature, feature_table, feature_col, addr,
                   vectors, table_chunks, table_group, group, sp_slots, sp_vectors, out):
    """out[b, col_f : col_f + D] = sum (or mean) over the bag of the zero-padded rows.

    Each bag is one feature of one sample; the output slice of a feature is written
    only by the call for its table's pool group. weights has length 0 or nnz.
    Spilled chunks read as zeros unless their tier rows are given in
    (sp_slots ascending, sp_vectors): the read-through path of cache mode.
    """
    c = vectors.shape[1]
    weighted = weights.shape[0] > 0
    for bag in prange(offsets.shape[0] - 1):
        f = bag // bags_per_feature
        b = bag - f * bags_per_feature
        t = feature_table[f]
        if table_group[t] != group:
            continue
        col = feature_col[f]
        K = table_chunks[t]
        out[b, col:col + K * c] = 0.0
        for i in range(offsets[bag], offsets[bag + 1]):
            e = entry_idx[i]
            if e < 0:
                continue
            for k in range(K):
                where, r = _source_row(addr[e, k], sp_slots)
                if where < 0:
                    continue
                src = vectors if where == 0 else sp_vectors
                base = col + k * c
                if weighted:
                    w = weights[i]
                    for j in range(c):
                        out[b, base + j] = fma32(src[r, j], w, out[b, base + j])
                else:
                    for j in range(c):
                        out[b, base + j] += src[r, j]
        n = offsets[bag + 1] - offsets[bag]
        if mean and n > 0:
            inv = np.float32(n)
            for j in range(K * c):
                out[b, col + j] = out[b, col + j] / inv


# --------------------------------------------------------------------------- backward


@njit(**_JIT)
def group_occurrences(entry_idx, uniq, ptr, order):
    """Counting sort of id occurrences by entry, keeping batch order inside each group.

    uniq lists entries by first occurrence; the occurrences of uniq[u] are
    order[ptr[u]:ptr[u+1]]. Negative entries (unknown keys) are skipped.
    Returns the number of distinct entries.
    """
    n = entry_idx.shape[0]
    size = 1
    while size < 2 * n + 2:
        size *= 2
    hkeys = np.full(size, -1, np.int64)
    hvals = np.empty(size, np.int64)
    which = np.empty(n, np.int64)
    mask = np.uint64(size - 1)
    n_uniq = 0
    for i in range(n):
        e = entry_idx[i]
        if e < 0:
            which[i] = -1
            continue
        pos = mix64(np.uint64(e)) & mask
        while True:
            h = hkeys[pos]
            if h == -1:
                hkeys[pos] = e
                hvals[pos] = n_uniq
                uniq[n_uniq] = e
                ptr[n_uniq + 1] = 0
                which[i] = n_uniq
                n_uniq += 1
                break
            if h == e:
                which[i] = hvals[pos]
                break
            pos = (pos + np.uint64(1)) & mask
        ptr[which[i] + 1] += 1
    ptr[0] = 0
    for u in range(n_uniq):
        ptr[u + 1] += ptr[u]
    fill = ptr[:n_uniq].copy()
    for i in range(n):
        u = which[i]
        if u >= 0:
            order[fill[u]] = i
            fill[u] += 1
    return n_uniq


@njit(**_JIT)
def first_nonfinite(a):
    """Flat index of the first NaN or inf in a 2-D array, or -1."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not np.isfinite(a[i, j]):
                return i * a.shape[1] + j
    return -1


@njit(**_PAR)
def backward_update(uniq, ptr, order, bag_of_occ, weights, mean, offsets, bags_per_feature, feature_col,
                    grad_out, table_ids, addr, util, vectors, opt_state, table_chunks, table_group, group,
                    table_opt, table_lr, table_eps, util_mode, growth, grad_buf):
    """Per distinct entry: sum its gradient, update its utilities, and step resident chunks.

    Utilities are stored scaled by ``growth = gamma ** -(steps since the scale was
    last folded in)``, so decaying every utility at every step costs nothing:
    adding ``a * g * growth`` is the same as ``u = gamma * u + a * g`` on the true scale.
    A chunk that is not resident gets its utility and nothing else (invariant 4).
    """
    c = vectors.shape[1]
    for u in prange(uniq.shape[0]):
        e = uniq[u]
        t = table_ids[e]
        if table_group[t] != group:
            continue
        K = table_chunks[t]
        D = K * c
        g = grad_buf[u]
        g[:D] = 0.0
        for p in range(ptr[u], ptr[u + 1]):
            i = order[p]
            bag = bag_of_occ[i]
            f = bag // bags_per_feature
            b = bag - f * bags_per_feature
            col = feature_col[f]
            if weights.shape[0] > 0:
                w = weights[i]
                for j in range(D):
                    g[j] += w * grad_out[b, col + j]
            elif mean:
                w = np.float32(1.0) / np.float32(offsets[bag + 1] - offsets[bag])
                for j in range(D):
                    g[j] += grad_out[b, col + j] * w
            else:
                for j in range(D):
                    g[j] += grad_out[b, col + j]
        accesses = np.float64(ptr[u + 1] - ptr[u])
        if util_mode == UTIL_GRADIENT:
            for k in range(K):
                sq = 0.0
                for j in range(k * c, (k + 1) * c):
                    sq += np.float64(g[j]) * np.float64(g[j])
                util[e, k] += np.float32(accesses * np.sqrt(sq) * growth)
        elif util_mode == UTIL_ACCESS:
            util[e, 0] += np.float32(accesses * growth)
        else:
            sq = 0.0
            for j in range(D):
                sq += np.float64(g[j]) * np.float64(g[j])
            util[e, 0] += np.float32(accesses * np.sqrt(sq) * growth)

        opt = table_opt[t]
        neg_lr = np.float32(-table_lr[t])
        eps = np.float32(table_eps[t])
        for k in range(K):
            s = addr[e, k]
            if s < 0:
                continue
            base = k * c
            if opt == OPT_SGD:
                for j in range(c):
                    vectors[s, j] = fma32(neg_lr, g[base + j], vectors[s, j])
            elif opt == OPT_ADAGRAD:
                for j in range(c):
                    gj = g[base + j]
                    st = opt_state[s, j] + gj * gj
                    opt_state[s, j] = st
                    vectors[s, j] = fma32(neg_lr, gj / (np.sqrt(st) + eps), vectors[s, j])
            elif opt == OPT_ROWWISE_ADAGRAD:
                sq32 = np.float32(0.0)
                for j in range(c):
                    sq32 += g[base + j] * g[base + j]
                st = opt_state[s, 0] + sq32 / np.float32(c)
                opt_state[s, 0] = st
                mult = neg_lr / (np.sqrt(st) + eps)
                for j in range(c):
                    vectors[s, j] = fma32(mult, g[base + j], vectors[s, j])


@njit(**_PAR)
def per_sample_weight_grads(entry_idx, bag_of_occ, bags_per_feature, feature_col, grad_out, table_ids, addr,
                            vectors, table_chunks, table_group, group, out):
    """d loss / d w_i = <grad_out[bag], row_i> over the resident chunks of ``group``."""
    c = vectors.shape[1]
    for i in prange(entry_idx.shape[0]):
        e = entry_idx[i]
        if e < 0:
            continue
        t = table_ids[e]
        if table_group[t] != group:
            continue
        bag = bag_of_occ[i]
        f = bag // bags_per_feature
        b = bag - f * bags_per_feature
        col = feature_col[f]
        acc = np.float32(0.0)
        for k in range(table_chunks[t]):
            s = addr[e, k]
            if s < 0:
                continue
            for j in range(c):
                acc += grad_out[b, col + k * c + j] * vectors[s, j]
        out[i] = acc


@njit(**_PAR)
def scale_utilities(util, factor):
    """Fold the growth factor back in: stored utilities become true utilities."""
    for e in prange(util.shape[0]):
        for k in range(util.shape[1]):
            util[e, k] = np.float32(np.float64(util[e, k]) * factor)


# --------------------------------------------------------------------------- prune


@njit(**_JIT)
def sample_utilities(keys, table_ids, util, table_chunks, table_group, group, accept_below, seed, round_id, out):
    """Bernoulli sample of entries of ``group`` by key hash: rows of out get their
    utilities (NaN past the table's K). Returns the number sampled (capped by out)."""
    salt = mix64(np.uint64(seed) ^ mix64(np.uint64(round_id) + _U64_GOLDEN))
    n = 0
    U = util.shape[1]
    for e in range(keys.shape[0]):
        t = table_ids[e]
        if t < 0 or table_group[t] != group:
            continue
        if mix64(key_hash(t, keys[e]) ^ salt) >= accept_below:
            continue
        if n == out.shape[0]:
            return n
        for k in range(out.shape[1]):
            if U == 1:
                out[n, k] = util[e, 0] if k < table_chunks[t] else np.nan
            else:
                out[n, k] = util[e, k] if k < table_chunks[t] else np.nan
        n += 1
    return n


@njit(inline="always")
def _keeps(resident, u, thr):
    # A resident chunk keeps its slot at the threshold; an absent one must beat it.
    return u >= thr if resident else u > thr


@njit(inline="always")
def _composite(ubits, resident, table, key, k):
    """Total order of chunks: utility, then residents first (no churn on ties), then hash.

    ubits is the utility's float32 bit pattern; utilities are >= 0, where the bit
    pattern orders like the value.
    """
    r = np.uint64(1) if resident else np.uint64(0)
    return (np.uint64(ubits) << np.uint64(32)) | (r << np.uint64(31)) | chunk_hash31(table, key, k)


@njit(**_JIT)
def prune_count(table_ids, addr, util, table_chunks, table_group, group, thresholds):
    """(resident chunks that keep, absent/spilled chunks that qualify, resident chunks that fall below)."""
    U = util.shape[1]
    keep = 0
    cand = 0
    drop = 0
    for e in range(table_ids.shape[0]):
        t = table_ids[e]
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            u = util[e, k] if U > 1 else util[e, 0]
            resident = addr[e, k] >= 0
            if _keeps(resident, u, thresholds[k]):
                if resident:
                    keep += 1
                else:
                    cand += 1
            elif resident:
                drop += 1
    return keep, cand, drop


@njit(**_JIT)
def prune_composites(keys, table_ids, addr, util, util_bits, table_chunks, table_group, group, thresholds, out):
    """Composite ranks of every chunk that qualifies for a slot; returns how many."""
    U = util.shape[1]
    n = 0
    for e in range(table_ids.shape[0]):
        t = table_ids[e]
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            u = util[e, k] if U > 1 else util[e, 0]
            resident = addr[e, k] >= 0
            if _keeps(resident, u, thresholds[k]):
                out[n] = _composite(util_bits[e, k] if U > 1 else util_bits[e, 0], resident, t, keys[e], k)
                n += 1
    return n


@njit(**_JIT)
def prune_select(keys, table_ids, addr, util, util_bits, table_chunks, table_group, group, thresholds, use_cutoff, cutoff,
                 ev_entries, ev_chunks, al_entries, al_chunks, al_rank):
    """List the chunks to evict and to allocate.

    A chunk keeps (or wins) a slot when it passes its threshold and, when slots are
    over-subscribed, ranks at or above ``cutoff``. Allocations carry their composite
    rank so the caller can place them best-first.
    """
    U = util.shape[1]
    n_ev = 0
    n_al = 0
    for e in range(table_ids.shape[0]):
        t = table_ids[e]
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            u = util[e, k] if U > 1 else util[e, 0]
            resident = addr[e, k] >= 0
            keep = _keeps(resident, u, thresholds[k])
            rank = np.uint64(0)
            if keep:
                rank = _composite(util_bits[e, k] if U > 1 else util_bits[e, 0], resident, t, keys[e], k)
                if use_cutoff and rank < cutoff:
                    keep = False
            if resident and not keep:
                ev_entries[n_ev] = e
                ev_chunks[n_ev] = k
                n_ev += 1
            elif keep and not resident:
                al_entries[n_al] = e
                al_chunks[n_al] = k
                al_rank[n_al] = rank
                n_al += 1
    return n_ev, n_al


@njit(**_JIT)
def find_dead_entries(table_ids, addr, util, floor, out):
    """Entries with no resident chunk and every utility below floor (stored scale)."""
    n = 0
    for e in range(table_ids.shape[0]):
        if table_ids[e] < 0:
            continue
        alive = False
        for k in range(addr.shape[1]):
            if addr[e, k] >= 0:
                alive = True
                break
        if alive:
            continue
        for k in range(util.shape[1]):
            if util[e, k] >= floor:
                alive = True
                break
        if not alive:
            out[n] = e
            n += 1
    return n


# --------------------------------------------------------------------------- cache mode


@njit(**_JIT)
def missing_chunks(uniq, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks):
    """Chunks of the batch's entries that are not resident (absent or spilled)."""
    n = 0
    for i in range(uniq.shape[0]):
        e = uniq[i]
        t = table_ids[e]
        if table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            if addr[e, k] < 0:
                out_entries[n] = e
                out_chunks[n] = k
                n += 1
    return n


@njit(**_JIT)
def pick_victims(owner, util, kmax, pinned_sorted, threshold, start, out_entries, out_chunks):
    """Resident chunks below threshold whose entry is not pinned, scanning from start.

    pinned_sorted holds the batch's entries in ascending order. Returns
    (number found, position to resume from).
    """
    S = owner.shape[0]
    U = util.shape[1]
    n = 0
    limit = out_entries.shape[0]
    for step in range(S):
        s = (start + step) % S
        o = owner[s]
        if o < 0:
            continue
        e = o // kmax
        k = o - e * kmax
        u = util[e, k] if U > 1 else util[e, 0]
        if u >= threshold:
            continue
        j = np.searchsorted(pinned_sorted, e)
        if j < pinned_sorted.shape[0] and pinned_sorted[j] == e:
            continue
        out_entries[n] = e
        out_chunks[n] = k
        n += 1
        if n == limit:
            return n, (s + 1) % S
    return n, start


@njit(**_JIT)
def slot_utilities(owner, util, kmax, positions, out):
    """Utilities of the chunks held by the given slots (NaN for free slots)."""
    U = util.shape[1]
    for i in range(positions.shape[0]):
        o = owner[positions[i]]
        if o < 0:
            out[i] = np.nan
        else:
            e = o // kmax
            k = o - e * kmax
            out[i] = util[e, k] if U > 1 else util[e, 0]


# --------------------------------------------------------------------------- stats and export


@njit(**_JIT)
def count_chunks(table_ids, addr, n_tables, entries, resident, spilled):
    """Per table: live entries, and resident / spilled chunks per chunk index."""
    for e in range(table_ids.shape[0]):
        t = table_ids[e]
        if t < 0:
            continue
        entries[t] += 1
        for k in range(addr.shape[1]):
            a = addr[e, k]
            if a >= 0:
                resident[t, k] += 1
            elif a <= -2:
                spilled[t, k] += 1


@njit(**_JIT)
def entries_of_table(table_ids, table, out):
    n = 0
    for e in range(table_ids.shape[0]):
        if table_ids[e] == table:
            out[n] = e
            n += 1
    return n

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
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import (
    EMPTY,
    INIT_NORMAL,
    INIT_UNIFORM,
    OPT_ADAGRAD,
    OPT_ROWWISE_ADAGRAD,
    OPT_SGD,
    OUT_OF_RANGE,
    TOMBSTONE,
    UTIL_ACCESS,
    UTIL_GRADIENT,
)
from .layout import (
    FLOOR_RANK_BITS as _FLOOR_RANK_BITS,
)

_JIT = dict(cache=True, nogil=True)
_PAR = dict(cache=True, nogil=True, parallel=True)

_U64_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FLOOR_RANK_BITS = np.uint16(_FLOOR_RANK_BITS)
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


@intrinsic
def prefetch(typingctx, arr, idx):
    """Ask for the cache line of arr[idx] (of row idx of a 2-D array) ahead of use.

    The kernels chase pointers (entry -> addresses -> chunk rows); issuing the
    loads a few iterations early hides most of the memory latency.
    """
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        index = [i] + [context.get_constant(types.intp, 0)] * (aty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, index, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern of a float32, as uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, b):
    """The float32 with bit pattern b (uint32)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


# --------------------------------------------------------------------------- utilities in 16 bits
# A utility is kept as the top half of its float32 (bfloat16): the float32 range, so the
# growth scale still fits, and 8 significant bits, which ranking needs. Additions round
# stochastically with bits drawn from the key, the chunk and the step: an increment far
# below the stored value's last bit still adds its expected value, where rounding to
# nearest would drop it (a hot row at gamma = 0.999 would stop gaining utility).


@njit(inline="always")
def util_load(b):
    """float32 value of a stored (bfloat16) utility."""
    return bits_f32(np.uint32(b) << np.uint32(16))


@njit(inline="always")
def util_round(x, r16):
    """bfloat16 of x >= 0, rounded up with probability (dropped bits) / 2**16; r16 is uniform in [0, 2**16)."""
    return np.uint16((np.uint64(f32_bits(np.float32(x))) + np.uint64(r16)) >> np.uint64(16))


@njit(inline="always")
def util_nearest(x):
    """bfloat16 of x >= 0, rounded to nearest even."""
    b = np.uint64(f32_bits(np.float32(x)))
    return np.uint16((b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))


@njit(inline="always")
def util_random16(kh, k, salt):
    """16 random bits for rounding chunk k's utility of the key with hash kh at this step."""
    return mix64(kh ^ salt ^ (np.uint64(k + 1) * _U64_C3)) >> np.uint64(48)


#: how far ahead (in output rows) the forward pass prefetches entry addresses and chunk rows
PREFETCH_ADDR = 8
PREFETCH_ROWS = 2


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


@njit(**_JIT)
def init_table(seed, kmax, c):
    """uint64[kmax, c]: the per-(chunk, element) half of the initialiser's hash.

    An initial value is a function of mix64(key_hash ^ table[k, j]), so that it
    depends on (seed, table, id, chunk, element) only; computing this half once per
    call leaves one hash per initialised float.
    """
    out = np.empty((kmax, c), np.uint64)
    for k in range(kmax):
        for j in range(c):
            out[k, j] = mix64(np.uint64(seed) + np.uint64(k * 65536 + j) * _U64_C3)
    return out


@njit(inline="always")
def init_chunk(dst, trow, kh, kind, scale):
    """Initial values of one chunk: trow = init_table(...)[k], kh = key_hash(table, id)."""
    if kind == INIT_UNIFORM:
        for j in range(dst.shape[0]):
            h = mix64(kh ^ trow[j])
            dst[j] = np.float32(scale * (2.0 * _unit(h) - 1.0))
    elif kind == INIT_NORMAL:
        for j in range(dst.shape[0]):
            h = mix64(kh ^ trow[j])
            u1 = 1.0 - _unit(h)  # (0, 1]
            u2 = _unit(mix64(h ^ _U64_GOLDEN))
            dst[j] = np.float32(scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))
    else:
        dst[:] = 0.0


# --------------------------------------------------------------------------- entry table


@njit(inline="always")
def entry_table(e, row_base, seen, table_ids):
    """The table of entry e, or EMPTY / TOMBSTONE when no key holds it.

    Entries below ``row_base[-1]`` are the direct rows of declared tables (row i of
    table t is entry ``row_base[t] + i``; the ``seen`` bit says whether the key has
    an entry); above it, the hashed slots. The table of a direct row is found by a
    binary search over T + 1 bounds, which stay in L1 (scans use ``scan_table``).
    """
    T = row_base.shape[0] - 1
    nd = row_base[T]
    if e >= nd:
        return np.int64(table_ids[e - nd])
    if (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1) == np.uint32(0):
        return np.int64(EMPTY)
    return np.int64(direct_table(e, row_base))


@njit(inline="always")
def entry_key(e, t, row_base, keys):
    """The id held by live entry e of table t."""
    nd = row_base[row_base.shape[0] - 1]
    if e < nd:
        return np.int64(e - row_base[t])
    return keys[e - nd]


@njit(inline="always")
def direct_table(e, row_base):
    """The direct table holding row e (0 past the direct rows): a binary search over T + 1 bounds."""
    T = row_base.shape[0] - 1
    if e >= row_base[T]:
        return 0
    t = 0
    hi = T
    while hi - t > 1:
        mid = (t + hi) >> 1
        if row_base[mid] <= e:
            t = mid
        else:
            hi = mid
    return t


@njit(inline="always")
def scan_table(e, cursor, row_base, seen, table_ids):
    """``entry_table`` for scans in ascending e: (table or EMPTY / TOMBSTONE, cursor).

    The cursor moves forward over the direct tables' bounds instead of searching
    them for every entry.
    """
    nd = row_base[row_base.shape[0] - 1]
    if e >= nd:
        return np.int64(table_ids[e - nd]), cursor
    while e >= row_base[cursor + 1]:
        cursor += 1
    if (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1) == np.uint32(0):
        return np.int64(EMPTY), cursor
    return np.int64(cursor), cursor


@njit(**_JIT)
def count_seen(row_base, seen, out):
    """out[t] += the direct rows of table t that hold a key (whole words of the bitmap at a time)."""
    for t in range(row_base.shape[0] - 1):
        lo = row_base[t]
        hi = row_base[t + 1]
        e = lo
        n = 0
        while e < hi:
            if (e & 31) == 0 and e + 32 <= hi:
                w = seen[e >> 5]
                while w:  # popcount
                    w &= w - np.uint32(1)
                    n += 1
                e += 32
            else:
                n += (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1)
                e += 1
        out[t] += n


@njit(inline="always")
def _set_seen(seen, e, on):
    bit = np.uint32(1) << np.uint32(e & 31)
    if on:
        seen[e >> 5] |= bit
    else:
        seen[e >> 5] &= ~bit


#: how far ahead the hash probe prefetches the home bucket of a later key
PREFETCH_PROBE = 16


@njit(inline="always")
def hashed_entry(t, key, keys, table_ids, mask, nd):
    """The entry of (table t, key) in the hashed index (its slot past the nd direct
    rows), or -1: linear probing from the key's home bucket to the first empty slot."""
    pos = key_hash(t, key) & mask
    while True:
        tid = table_ids[pos]
        if tid == EMPTY:
            return np.int64(-1)
        if tid == t and keys[pos] == key:
            return nd + np.int64(pos)
        pos = (pos + np.uint64(1)) & mask


@njit(**_PAR)
def find_entries(row_base, seen, keys, table_ids, q_tables, q_ids, out):
    """out[i] = entry of (q_tables[i], q_ids[i]), -1 when absent, OUT_OF_RANGE for an id
    outside its direct table's rows.

    A direct table's id is its row: no probe. Returns (keys missing, of which in
    hashed tables, ids out of range). Counts are kept per block of queries, not as
    prange reductions, which numba compiles into a slower loop.
    """
    nd = row_base[row_base.shape[0] - 1]
    cap = keys.shape[0]
    mask = np.uint64(max(cap, 1) - 1)
    n = q_ids.shape[0]
    nb = _FIND_BLOCKS
    step = (n + nb - 1) // nb
    counts = np.zeros((nb, 3), np.int64)
    for blk in prange(nb):
        for i in range(blk * step, min((blk + 1) * step, n)):
            t = q_tables[i]
            key = q_ids[i]
            base = row_base[t]
            if row_base[t + 1] > base:
                if key < 0 or key >= row_base[t + 1] - base:
                    out[i] = OUT_OF_RANGE
                    counts[blk, 2] += 1
                    continue
                e = base + key
                if (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1):
                    out[i] = e
                else:
                    out[i] = -1
                    counts[blk, 0] += 1
                continue
            if i + PREFETCH_PROBE < n:
                ahead = key_hash(q_tables[i + PREFETCH_PROBE], q_ids[i + PREFETCH_PROBE]) & mask
                prefetch(keys, ahead)
                prefetch(table_ids, ahead)
            res = hashed_entry(t, key, keys, table_ids, mask, nd)
            out[i] = res
            if res < 0:
                counts[blk, 0] += 1
                counts[blk, 1] += 1
    return counts[:, 0].sum(), counts[:, 1].sum(), counts[:, 2].sum()


#: query blocks of find_entries (enough for every thread, few enough to count cheaply)
_FIND_BLOCKS = 64


@njit(**_JIT)
def insert_missing(row_base, seen, keys, table_ids, addr, util, q_tables, q_ids, out, new_entries):
    """Insert every key with out[i] == -1; duplicates within the batch share one entry.

    Sequential on purpose: it only sees the keys that ``find_entries`` missed, and
    inserting in batch order makes ``new_entries`` list new keys by first occurrence.
    A direct row only gets its ``seen`` bit. The caller guarantees room in the
    hashed slots (the load factor stays below max_load).
    Returns (new keys, of which in hashed tables).
    """
    nd = row_base[row_base.shape[0] - 1]
    mask = np.uint64(max(keys.shape[0], 1) - 1)
    n_new = 0
    n_new_hashed = 0
    for i in range(q_ids.shape[0]):
        if out[i] >= 0:
            continue
        t = q_tables[i]
        key = q_ids[i]
        base = row_base[t]
        if row_base[t + 1] > base:
            e = base + key
            if not (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1):
                _set_seen(seen, e, True)
                addr[e, :] = -1
                util[e, :] = 0
                new_entries[n_new] = e
                n_new += 1
            out[i] = e
            continue
        pos = key_hash(t, key) & mask
        while True:
            tid = table_ids[pos]
            if tid == EMPTY:
                keys[pos] = key
                table_ids[pos] = t
                e = nd + np.int64(pos)
                addr[e, :] = -1
                util[e, :] = 0
                new_entries[n_new] = e
                n_new += 1
                n_new_hashed += 1
                out[i] = e
                break
            if tid == t and keys[pos] == key:
                out[i] = nd + np.int64(pos)
                break
            pos = (pos + np.uint64(1)) & mask
    return n_new, n_new_hashed


@njit(**_JIT)
def rehash_into(row_base, keys, table_ids, addr, util, new_keys, new_table_ids, new_addr, new_util, old_to_new):
    """Move every live hashed entry into fresh slots (tombstones vanish); direct rows
    keep their place. old_to_new maps entries."""
    nd = row_base[row_base.shape[0] - 1]
    for e in range(nd):
        new_addr[e, :] = addr[e, :]
        new_util[e, :] = util[e, :]
        old_to_new[e] = e
    mask = np.uint64(new_keys.shape[0] - 1)
    for h in range(keys.shape[0]):
        t = table_ids[h]
        e = nd + h
        if t < 0:
            old_to_new[e] = -1
            continue
        key = keys[h]
        pos = key_hash(t, key) & mask
        while new_table_ids[pos] != EMPTY:
            pos = (pos + np.uint64(1)) & mask
        new_keys[pos] = key
        new_table_ids[pos] = t
        new_addr[nd + pos, :] = addr[e, :]
        new_util[nd + pos, :] = util[e, :]
        old_to_new[e] = nd + np.int64(pos)


@njit(**_PAR)
def remap_owner(owner, old_to_new):
    for s in prange(owner.shape[0]):
        o = owner[s]
        if o >= 0:
            owner[s] = old_to_new[o]


@njit(inline="always")
def chunk_at(arow, code):
    """The chunk index k with arow[k] == code (a slot, or a spilled code), or -1."""
    for k in range(arow.shape[0]):
        if arow[k] == code:
            return k
    return -1


@njit(**_JIT)
def erase_entries(
    entries, row_base, seen, table_ids, addr, util, owner, free_stack, n_free, table_group, group, kmax, tier_out
):
    """Tombstone the given entries (each once); a direct row loses its ``seen`` bit.
    Pool slots of ``group`` go back on the stack.

    Spilled chunks are reported in tier_out (tier slot codes) for the caller to free.
    Returns (number erased, of which hashed, number of tier slots reported).
    """
    nd = row_base[row_base.shape[0] - 1]
    n_erased = 0
    n_hashed = 0
    n_tier = 0
    for i in range(entries.shape[0]):
        e = entries[i]
        t = entry_table(e, row_base, seen, table_ids)
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
        util[e, :] = 0
        if e >= nd:
            table_ids[e - nd] = TOMBSTONE
            n_hashed += 1
        else:
            _set_seen(seen, e, False)
        n_erased += 1
    return n_erased, n_hashed, n_tier


# --------------------------------------------------------------------------- pool


@njit(**_JIT)
def admit_new_chunks(
    new_entries,
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    table_chunks,
    table_group,
    group,
    vectors,
    opt_state,
    owner,
    free_stack,
    n_free,
    seed,
    table_init_kind,
    table_init_scale,
    kmax,
    limit,
):
    """Give free slots to the chunks of new keys, in first-occurrence order, while any
    remain and fewer than ``limit`` were given (a shard admits its share of the
    whole store's free slots, not every slot it holds)."""
    c = vectors.shape[1]
    itab = init_table(seed, kmax, c)
    admitted = 0
    for i in range(new_entries.shape[0]):
        e = new_entries[i]
        t = entry_table(e, row_base, seen, table_ids)
        if table_group[t] != group:
            continue
        kh = key_hash(t, entry_key(e, t, row_base, keys))
        for k in range(table_chunks[t]):
            if n_free[0] == 0 or admitted == limit:
                return admitted
            n_free[0] -= 1
            s = free_stack[n_free[0]]
            addr[e, k] = s
            owner[s] = e
            init_chunk(vectors[s], itab[k], kh, table_init_kind[t], table_init_scale[t])
            opt_state[s, :] = 0.0
            admitted += 1
    return admitted


@njit(**_PAR)
def gather_slots(slots, vectors, opt_state, out_vectors, out_state):
    for i in prange(slots.shape[0]):
        s = slots[i]
        for j in range(vectors.shape[1]):  # element loops: a row slice costs more than its copy
            out_vectors[i, j] = vectors[s, j]
        for j in range(opt_state.shape[1]):
            out_state[i, j] = opt_state[s, j]


@njit(**_PAR)
def commit_evictions(ev_entries, ev_chunks, tier_slots, addr, owner, free_stack, n_free, kmax):
    """Evict chunks: their slots go back on the free stack so that the next
    allocations take them in list order (a row evicted whole, in chunk order, is
    given back as the same run of adjacent slots, which the forward copies as one).

    With tier_slots non-empty the chunk is spilled (addr = -2 - tier slot; the
    caller, who wrote the tier, sets the tier's back-pointers); otherwise it
    becomes absent.
    """
    spill = tier_slots.shape[0] > 0
    top = n_free[0]
    n = ev_entries.shape[0]
    for i in prange(n):
        e = ev_entries[i]
        k = ev_chunks[i]
        s = addr[e, k]
        owner[s] = -1
        free_stack[top + n - 1 - i] = s
        if spill:
            addr[e, k] = -2 - tier_slots[i]
        else:
            addr[e, k] = -1
    n_free[0] = top + ev_entries.shape[0]


@njit(**_PAR)
def chunk_codes(addr, entries, chunks, out):
    """addr[entries[i], chunks[i]] for a list of chunks."""
    for i in prange(entries.shape[0]):
        out[i] = addr[entries[i], chunks[i]]


@njit(**_JIT)
def restore_plan(codes, restore_index, tier_slots):
    """Per allocated chunk, its row among the restored ones (-1: starts anew), and the
    tier slots to read, in list order; returns how many are restored."""
    n = 0
    for i in range(codes.shape[0]):
        if codes[i] <= -2:
            restore_index[i] = n
            tier_slots[n] = -2 - codes[i]  # layout.tier_slot_of
            n += 1
        else:
            restore_index[i] = -1
    return n


@njit(**_JIT)
def still_missing(entries, chunks, addr, out_entries, out_chunks):
    """The chunks of a list that are still not resident, in list order; returns how many."""
    n = 0
    for i in range(entries.shape[0]):
        if addr[entries[i], chunks[i]] < 0:
            out_entries[n] = entries[i]
            out_chunks[n] = chunks[i]
            n += 1
    return n


@njit(**_PAR)
def commit_allocations(
    al_entries,
    al_chunks,
    restore_index,
    restored_vectors,
    restored_state,
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    owner,
    free_stack,
    n_free,
    vectors,
    opt_state,
    seed,
    table_init_kind,
    table_init_scale,
    kmax,
):
    """Give slots to chunks, in list order, while free slots remain.

    restore_index[i] >= 0: the chunk comes back with row restore_index[i] of the
    restored arrays (its trained values and optimizer state); -1: it is initialised.
    An empty restore_index initialises every one.
    Allocation i takes the i-th slot from the top of the free stack, so the work
    splits across threads and the result does not depend on their number.
    Returns how many were placed; the caller releases the tier slots of restored ones.
    """
    top = n_free[0]
    placed = min(al_entries.shape[0], top)
    itab = init_table(seed, kmax, vectors.shape[1])
    restoring = restore_index.shape[0] > 0
    for i in prange(placed):
        e = al_entries[i]
        k = al_chunks[i]
        s = free_stack[top - 1 - i]
        addr[e, k] = s
        owner[s] = e
        r = restore_index[i] if restoring else -1
        v = vectors[s]
        if r >= 0:
            for j in range(v.shape[0]):
                v[j] = restored_vectors[r, j]
            for j in range(opt_state.shape[1]):
                opt_state[s, j] = restored_state[r, j]
        else:
            t = entry_table(e, row_base, seen, table_ids)
            init_chunk(
                v, itab[k], key_hash(t, entry_key(e, t, row_base, keys)), table_init_kind[t], table_init_scale[t]
            )
            opt_state[s, :] = 0.0
    n_free[0] = top - placed
    return placed


@njit(**_PAR)
def assign_rows(entries, values, row_base, seen, table_ids, addr, table_chunks, table_group, group, vectors, opt_state):
    """Write whole rows into the resident chunks of ``group``; resets their optimizer state."""
    c = vectors.shape[1]
    for i in prange(entries.shape[0]):
        e = entries[i]
        t = entry_table(e, row_base, seen, table_ids)
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
def equal_arrays(a, b):
    """a == b element for element (same length); each block stops at its first difference."""
    n = a.shape[0]
    if n != b.shape[0]:
        return False
    nb = _FIND_BLOCKS
    step = (n + nb - 1) // nb
    differs = np.zeros(nb, np.bool_)
    for blk in prange(nb):
        for i in range(blk * step, min((blk + 1) * step, n)):
            if a[i] != b[i]:
                differs[blk] = True
                break
    return not differs.any()


@njit(**_JIT)
def first_decrease(a):
    """The first i with a[i] > a[i + 1], or -1 (offsets must not decrease)."""
    for i in range(a.shape[0] - 1):
        if a[i] > a[i + 1]:
            return i
    return -1


@njit(**_PAR)
def expand_bags(offsets, bags_per_feature, feature_table, bag_of_occ, table_of_occ):
    """Per id occurrence: the table it addresses, and the bag it belongs to (unless
    bag_of_occ is empty: a lookup that will not be trained needs no bags)."""
    with_bags = bag_of_occ.shape[0] > 0
    for bag in prange(offsets.shape[0] - 1):
        t = feature_table[bag // bags_per_feature]
        for i in range(offsets[bag], offsets[bag + 1]):
            if with_bags:
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


@njit(inline="always")
def _copy_chunk(dst, code, sp_slots, vectors, sp_vectors):
    """dst[:] = a chunk's values (its pool row, or its read-through tier row), zeros when it has none."""
    where, r = _source_row(code, sp_slots)
    if where < 0:
        dst[:] = 0.0
    else:
        src = vectors[r] if where == 0 else sp_vectors[r]
        for j in range(dst.shape[0]):
            dst[j] = src[j]


@njit(inline="always")
def _prefetch_bag(entry_idx, offsets, bag, addr, vectors, sp_slots, deep):
    """Prefetch the address row of the bag's first id, and (deep) its chunk rows."""
    lo = offsets[bag]
    if lo < offsets[bag + 1]:
        e = entry_idx[lo]
        if e >= 0:
            if deep:
                arow = addr[e]
                for k in range(arow.shape[0]):
                    if arow[k] >= 0:
                        prefetch(vectors, arow[k])
            else:
                prefetch(addr, e)


@njit(**_PAR)
def pooled_forward(
    entry_idx,
    offsets,
    weights,
    mean,
    bags_per_feature,
    feature_table,
    feature_col,
    addr,
    vectors,
    table_chunks,
    table_group,
    group,
    sp_slots,
    sp_vectors,
    out,
):
    """out[b, col_f : col_f + D] = sum (or mean) over the bag of the zero-padded rows.

    Bags are feature-major (bag = f * B + b); the loop runs over output rows b so
    that each thread writes whole rows of ``out``. The output slice of a feature is
    written only by the call for its table's pool group. weights has length 0 or
    nnz. Spilled chunks read as zeros unless their tier rows are given in
    (sp_slots ascending, sp_vectors): the read-through path of cache mode.
    """
    c = vectors.shape[1]
    B = bags_per_feature
    F = feature_table.shape[0]
    weighted = weights.shape[0] > 0
    for b in prange(B):
        orow = out[b]
        for f in range(F):
            t = feature_table[f]
            if table_group[t] != group:
                continue
            bag = f * B + b
            if b + PREFETCH_ADDR < B:
                _prefetch_bag(entry_idx, offsets, bag + PREFETCH_ADDR, addr, vectors, sp_slots, False)
            if b + PREFETCH_ROWS < B:
                _prefetch_bag(entry_idx, offsets, bag + PREFETCH_ROWS, addr, vectors, sp_slots, True)
            col = feature_col[f]
            K = table_chunks[t]
            lo = offsets[bag]
            hi = offsets[bag + 1]
            if hi - lo == 1 and not weighted and entry_idx[lo] >= 0:
                # one id, no weight: a copy (the common case of one-hot features)
                arow = addr[entry_idx[lo]]
                for k in range(K):
                    _copy_chunk(orow[col + k * c : col + (k + 1) * c], arow[k], sp_slots, vectors, sp_vectors)
                continue
            orow[col : col + K * c] = 0.0
            for i in range(lo, hi):
                e = entry_idx[i]
                if e < 0:
                    continue
                arow = addr[e]
                for k in range(K):
                    where, r = _source_row(arow[k], sp_slots)
                    if where < 0:
                        continue
                    src = vectors[r] if where == 0 else sp_vectors[r]
                    dst = orow[col + k * c : col + (k + 1) * c]
                    if weighted:
                        w = weights[i]
                        for j in range(c):
                            dst[j] = fma32(src[j], w, dst[j])
                    else:
                        for j in range(c):
                            dst[j] += src[j]
            n = hi - lo
            if mean and n > 0:
                inv = np.float32(n)
                dst = orow[col : col + K * c]
                for j in range(K * c):
                    dst[j] = dst[j] / inv


@njit(inline="always")
def _occurrence_entry(i, f, entry_idx, ids, feature_rows):
    """The entry of occurrence i: found already (entry_idx), or, for a feature whose table
    has a direct index, its row: ``feature_rows[f] = (row_base, num_embeddings)``."""
    if entry_idx.shape[0] > 0:
        return entry_idx[i]
    key = ids[i]
    if key < 0 or key >= feature_rows[f, 1]:
        return np.int64(OUT_OF_RANGE)
    return feature_rows[f, 0] + key


@njit(inline="always")
def _row_source(e, K, addr_flat, ukmax):
    """Where row e's values come from: its first slot when its K chunks are resident in
    adjacent slots (one contiguous run, copied like a dense row), -1 when it has no
    entry, -2 - e otherwise (chunk by chunk)."""
    if e < 0:
        return np.int64(-1)
    ab = np.uint64(e) * ukmax
    s0 = addr_flat[ab]
    if s0 < 0:
        return -2 - e
    for k in range(1, K):
        if addr_flat[ab + np.uint64(k)] != s0 + k:
            return -2 - e
    return np.int64(s0)


@njit(inline="always")
def _add_chunks(e, K, addr_flat, ukmax, vec_flat, uc, c, out_flat, o0):
    """out[o0 : o0 + K * c] += row e's resident chunks."""
    ab = np.uint64(e) * ukmax
    for k in range(K):
        s = addr_flat[ab + np.uint64(k)]
        if s < 0:
            continue
        o = o0 + np.uint64(k) * uc
        v = np.uint64(s) * uc
        for j in range(c):
            out_flat[o + np.uint64(j)] += vec_flat[v + np.uint64(j)]


def pooled_sum_forward(
    entry_idx,
    ids,
    feature_rows,
    offsets,
    bags_per_feature,
    feature_chunks,
    feature_col,
    addr_flat,
    kmax,
    vec_flat,
    c,
    out_flat,
    width,
):
    """The common case of ``pooled_forward``, lean: unweighted sums, pool rows only.

    Entries come from ``entry_idx``, or, when it is empty (every feature's table has a
    direct index and nothing will be trained), straight from the ids: no find before
    it. A row never seen has no chunk, so it reads as zeros without its seen bit.
    Returns the number of ids outside their table's rows (the caller raises).

    Two passes, so that neither chases a pointer: the first reads every occurrence's
    address row (independent loads, in order) and notes where its values start; the
    second copies rows from those sources like a dense gather, prefetching ahead.
    ``feature_chunks[f]`` is K of feature f's table, or 0 when that table is in another
    pool; ``width`` is out's row length. Unsigned flat indexing lets the copies vectorise.
    """
    src = np.empty(offsets[offsets.shape[0] - 1], np.int64)
    bad = sum_sources(entry_idx, ids, feature_rows, offsets, bags_per_feature, feature_chunks, addr_flat, kmax, src)
    sum_gather(
        src, offsets, bags_per_feature, feature_chunks, feature_col, vec_flat, c, addr_flat, kmax, out_flat, width
    )
    return bad


def pooled_sum_forward_probed(
    ids,
    feature_table,
    row_base,
    seen,
    keys,
    table_ids,
    offsets,
    bags_per_feature,
    feature_chunks,
    feature_col,
    addr_flat,
    kmax,
    vec_flat,
    c,
    out_flat,
    width,
):
    """``pooled_sum_forward`` for a request with features on the hashed index, nothing to
    train: the keys are found inside the address pass (:func:`probe_sources`) instead
    of by a find pass over a per-occurrence table list first. ``seen`` is not read
    here: a direct row never seen has no chunk, so it reads as zeros either way."""
    src = np.empty(offsets[offsets.shape[0] - 1], np.int64)
    bad = probe_sources(
        ids, feature_table, row_base, keys, table_ids, offsets, bags_per_feature, feature_chunks, addr_flat, kmax, src
    )
    sum_gather(
        src, offsets, bags_per_feature, feature_chunks, feature_col, vec_flat, c, addr_flat, kmax, out_flat, width
    )
    return bad


@njit(inline="always")
def _block_feature(lo, offsets, B):
    """The feature of occurrence lo and where that feature's occurrences end."""
    f = 0
    while offsets[(f + 1) * B] <= lo:
        f += 1
    return f, offsets[(f + 1) * B]


@njit(**_PAR)
def sum_sources(entry_idx, ids, feature_rows, offsets, bags_per_feature, feature_chunks, addr_flat, kmax, src):
    """The address pass of ``pooled_sum_forward``: src[i] = where occurrence i's values
    start (see :func:`_row_source`). Returns the number of ids out of range.

    A flat walk over the occurrences, each block finding its first occurrence's
    feature once (a walk per bag cost a quarter more)."""
    B = bags_per_feature
    nnz = offsets[offsets.shape[0] - 1]
    ukmax = np.uint64(kmax)
    n_entries = addr_flat.shape[0] // kmax
    nb = _FIND_BLOCKS
    step = (nnz + nb - 1) // nb
    bad = np.zeros(nb, np.int64)
    for blk in prange(nb):
        lo = blk * step
        hi = min(lo + step, nnz)
        if lo >= hi:
            continue
        f, f_end = _block_feature(lo, offsets, B)
        for i in range(lo, hi):
            while i >= f_end:
                f += 1
                f_end = offsets[(f + 1) * B]
            K = feature_chunks[f]
            if K == 0:
                continue
            if i + PREFETCH_PROBE < f_end:
                ea = _occurrence_entry(i + PREFETCH_PROBE, f, entry_idx, ids, feature_rows)
                if 0 <= ea < n_entries:
                    prefetch(addr_flat, np.uint64(ea) * ukmax)
            e = _occurrence_entry(i, f, entry_idx, ids, feature_rows)
            if e == OUT_OF_RANGE:
                bad[blk] += 1
            src[i] = _row_source(e, K, addr_flat, ukmax)
    return bad.sum()


#: the probed address pass prefetches home buckets this many occurrences ahead, finds
#: keys (and prefetches their address rows) PROBE_AHEAD ahead, and keeps the entries
#: found ahead in a ring of PROBE_RING (a power of two above PROBE_AHEAD)
PROBE_BUCKETS_AHEAD = 32
PROBE_AHEAD = 12
PROBE_RING = 16


@njit(inline="always")
def _entry_of(t, key, row_base, keys, table_ids, mask, nd):
    """An occurrence's entry: its row for a direct table (OUT_OF_RANGE outside it),
    its hashed slot otherwise (-1 when absent)."""
    base = row_base[t]
    rows = row_base[t + 1] - base
    if rows > 0:
        if key < 0 or key >= rows:
            return np.int64(OUT_OF_RANGE)
        return base + key
    return hashed_entry(t, key, keys, table_ids, mask, nd)


@njit(**_PAR)
def probe_sources(
    ids, feature_table, row_base, keys, table_ids, offsets, bags_per_feature, feature_chunks, addr_flat, kmax, src
):
    """``sum_sources`` that finds each key itself, three stages deep: the home bucket
    of occurrence i + PROBE_BUCKETS_AHEAD is prefetched, occurrence i + PROBE_AHEAD is
    found (its bucket in cache by then) and its address row prefetched, and
    occurrence i takes the entry found for it then. A find pass before a lookup
    waited on the same lines with nothing else in flight."""
    B = bags_per_feature
    nnz = offsets[offsets.shape[0] - 1]
    ukmax = np.uint64(kmax)
    mask = np.uint64(max(keys.shape[0], 1) - 1)
    nd = row_base[row_base.shape[0] - 1]
    n_entries = addr_flat.shape[0] // kmax
    ring_mask = PROBE_RING - 1
    nb = _FIND_BLOCKS
    step = (nnz + nb - 1) // nb
    bad = np.zeros(nb, np.int64)
    for blk in prange(nb):
        lo = blk * step
        hi = min(lo + step, nnz)
        if lo >= hi:
            continue
        ring = np.empty(PROBE_RING, np.int64)
        f, f_end = _block_feature(lo, offsets, B)
        f_b, f_b_end = f, f_end  # the feature of the bucket prefetched
        f_a, f_a_end = f, f_end  # the feature of the occurrence found ahead
        for j in range(lo, min(lo + PROBE_AHEAD, hi)):
            while j >= f_a_end:
                f_a += 1
                f_a_end = offsets[(f_a + 1) * B]
            ring[j & ring_mask] = _entry_of(feature_table[f_a], ids[j], row_base, keys, table_ids, mask, nd)
        for i in range(lo, hi):
            while i >= f_end:
                f += 1
                f_end = offsets[(f + 1) * B]
            jb = i + PROBE_BUCKETS_AHEAD
            if jb < hi:
                while jb >= f_b_end:
                    f_b += 1
                    f_b_end = offsets[(f_b + 1) * B]
                tb = feature_table[f_b]
                if row_base[tb + 1] == row_base[tb]:
                    h = key_hash(tb, ids[jb]) & mask
                    prefetch(table_ids, h)
                    prefetch(keys, h)
            ja = i + PROBE_AHEAD
            if ja < hi:
                while ja >= f_a_end:
                    f_a += 1
                    f_a_end = offsets[(f_a + 1) * B]
                ea = _entry_of(feature_table[f_a], ids[ja], row_base, keys, table_ids, mask, nd)
                ring[ja & ring_mask] = ea
                if 0 <= ea < n_entries:
                    prefetch(addr_flat, np.uint64(ea) * ukmax)
            K = feature_chunks[f]
            if K == 0:
                continue
            e = ring[i & ring_mask]
            if e == OUT_OF_RANGE:
                bad[blk] += 1
            src[i] = _row_source(e, K, addr_flat, ukmax)
    return bad.sum()


@njit(**_PAR)
def sum_gather(
    src, offsets, bags_per_feature, feature_chunks, feature_col, vec_flat, c, addr_flat, kmax, out_flat, width
):
    """The copy pass of ``pooled_sum_forward``: every bag's rows from their sources,
    summed into out, like a dense gather, prefetching the rows of later bags."""
    B = bags_per_feature
    F = feature_chunks.shape[0]
    uc = np.uint64(c)
    ukmax = np.uint64(kmax)
    for b in prange(B):
        ob = np.uint64(b) * np.uint64(width)
        for f in range(F):
            K = feature_chunks[f]
            if K == 0:
                continue
            bag = f * B + b
            lo = offsets[bag]
            hi = offsets[bag + 1]
            n = np.uint64(K) * uc
            if b + PREFETCH_ROWS < B:
                a = offsets[bag + PREFETCH_ROWS]
                if a < offsets[bag + PREFETCH_ROWS + 1] and src[a] >= 0:
                    v = np.uint64(src[a]) * uc
                    for j in range(0, K * c, 16):  # every 64-byte line of the run
                        prefetch(vec_flat, v + np.uint64(j))
            o0 = ob + np.uint64(feature_col[f])
            if hi - lo == 1 and src[lo] >= 0:
                v = np.uint64(src[lo]) * uc
                for j in range(n):
                    out_flat[o0 + j] = vec_flat[v + j]
                continue
            for j in range(n):
                out_flat[o0 + np.uint64(j)] = 0.0
            for i in range(lo, hi):
                r = src[i]
                if r >= 0:
                    v = np.uint64(r) * uc
                    for j in range(n):
                        out_flat[o0 + j] += vec_flat[v + j]
                elif r <= -2:
                    _add_chunks(-2 - r, K, addr_flat, ukmax, vec_flat, uc, c, out_flat, o0)


# --------------------------------------------------------------------------- backward


@njit(**_PAR)
def group_occurrences(entry_idx, table_of_occ, n_tables, uniq, counts, which):
    """Distinct entries of a batch.

    uniq[u] is the u-th distinct entry, counts[u] how often it occurs and
    which[i] the u of occurrence i (-1 for unknown keys). An entry belongs to one
    table, so each table is grouped on its own (in parallel, with a hash map sized
    to its share of the batch) and the tables' lists are concatenated in table
    order; within a table, entries are listed by first occurrence.
    Returns the number of distinct entries.
    """
    n = entry_idx.shape[0]
    per_table = np.zeros(n_tables + 1, np.int64)
    for i in range(n):
        per_table[table_of_occ[i] + 1] += 1
    occ_start = np.zeros(n_tables + 1, np.int64)
    for t in range(n_tables):
        occ_start[t + 1] = occ_start[t] + per_table[t + 1]
    # occurrences of each table in batch order
    occ = np.empty(n, np.int64)
    fill = occ_start[:n_tables].copy()
    for i in range(n):
        t = table_of_occ[i]
        occ[fill[t]] = i
        fill[t] += 1
    n_uniq_t = np.zeros(n_tables, np.int64)
    for t in prange(n_tables):
        lo = occ_start[t]
        hi = occ_start[t + 1]
        if hi == lo:
            continue
        size = 1
        while size < 2 * (hi - lo) + 2:
            size *= 2
        hkeys = np.full(size, -1, np.int64)
        hvals = np.empty(size, np.int64)
        mask = np.uint64(size - 1)
        nu = 0
        for p in range(lo, hi):
            i = occ[p]
            e = entry_idx[i]
            if e < 0:
                which[i] = -1
                continue
            pos = mix64(np.uint64(e)) & mask
            while True:
                h = hkeys[pos]
                if h == -1:
                    hkeys[pos] = e
                    hvals[pos] = nu
                    # written at the table's block of the output; moved into place below
                    uniq[lo + nu] = e
                    counts[lo + nu] = 1
                    which[i] = nu
                    nu += 1
                    break
                if h == e:
                    u = hvals[pos]
                    which[i] = u
                    counts[lo + u] += 1
                    break
                pos = (pos + np.uint64(1)) & mask
        n_uniq_t[t] = nu
    # compact the per-table blocks: table t's distinct entries start at base[t]
    base = np.zeros(n_tables + 1, np.int64)
    for t in range(n_tables):
        base[t + 1] = base[t] + n_uniq_t[t]
    for t in range(n_tables):
        lo = occ_start[t]
        if base[t] != lo:
            for j in range(n_uniq_t[t]):
                uniq[base[t] + j] = uniq[lo + j]
                counts[base[t] + j] = counts[lo + j]
    for t in prange(n_tables):
        shift = base[t]
        for p in range(occ_start[t], occ_start[t + 1]):
            i = occ[p]
            if which[i] >= 0:
                which[i] += shift
    return base[n_tables]


@njit(**_JIT)
def first_nonfinite(a):
    """Flat index of the first NaN or inf in a 2-D array, or -1."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not np.isfinite(a[i, j]):
                return i * a.shape[1] + j
    return -1


@njit(**_PAR)
def accumulate_gradients(
    which,
    offsets,
    weights,
    mean,
    bags_per_feature,
    feature_table,
    feature_col,
    grad_out,
    table_chunks,
    table_group,
    group,
    c,
    n_tables,
    split,
    grad_buf,
):
    """grad_buf[u, :D] = the summed gradient of distinct entry u, occurrences in batch order.

    Work is split by table (an entry belongs to one table, so two tables never
    touch the same row of grad_buf) and, within a table, by u modulo ``split``; each
    part streams its features' columns of grad_out top to bottom, which the
    hardware prefetcher follows, and adds into grad_buf rows that stay in cache.
    Flat unsigned indexing (no view per occurrence) lets the row adds vectorise.
    Every row of grad_buf must be zero on entry.
    """
    B = bags_per_feature
    F = feature_table.shape[0]
    weighted = weights.shape[0] > 0
    g_width = np.uint64(grad_out.shape[1])
    b_width = np.uint64(grad_buf.shape[1])
    g_flat = grad_out.reshape(-1)
    buf = grad_buf.reshape(-1)
    for item in prange(n_tables * split):
        t = item // split
        part = item - t * split
        if table_group[t] != group:
            continue
        D = np.uint64(table_chunks[t] * c)
        for f in range(F):
            if feature_table[f] != t:
                continue
            col = np.uint64(feature_col[f])
            for b in range(B):
                bag = f * B + b
                lo = offsets[bag]
                hi = offsets[bag + 1]
                s0 = np.uint64(b) * g_width + col
                for i in range(lo, hi):
                    u = which[i]
                    if u < 0 or u % split != part:
                        continue
                    d0 = np.uint64(u) * b_width
                    if weighted:
                        w = weights[i]
                        for j in range(D):
                            buf[d0 + j] += w * g_flat[s0 + j]
                    elif mean:
                        w = np.float32(1.0) / np.float32(hi - lo)
                        for j in range(D):
                            buf[d0 + j] += g_flat[s0 + j] * w
                    else:
                        for j in range(D):
                            buf[d0 + j] += g_flat[s0 + j]


@njit(**_PAR)
def zero_rows(a, n):
    for i in prange(n):
        a[i, :] = 0.0


@njit(**_PAR)
def count_nonfinite_rows(a, n):
    """Rows among the first n of a holding a NaN or inf, or values whose squares overflow
    float32 (a finite 3e38 would turn Adagrad's state and the utilities into inf);
    counted per block, not by a prange reduction."""
    nb = _FIND_BLOCKS
    step = (n + nb - 1) // nb
    bad = np.zeros(nb, np.int64)
    for blk in prange(nb):
        for i in range(blk * step, min((blk + 1) * step, n)):
            row = a[i]
            ss = np.float32(0.0)
            for j in range(row.shape[0]):
                ss += row[j] * row[j]  # NaN or inf in, or an overflow: ss is not finite
            if not np.isfinite(ss):
                bad[blk] += 1
    return bad.sum()


@njit(**_PAR)
def apply_gradients(
    uniq,
    counts,
    grad_buf,
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    util,
    vectors,
    opt_state,
    table_chunks,
    table_group,
    group,
    table_opt,
    table_lr,
    table_eps,
    util_mode,
    growth,
    salt,
):
    """Per distinct entry: update its utilities and step its resident chunks.

    Utilities are stored scaled by ``growth = gamma ** -(steps since the scale was
    last folded in)``, so decaying every utility at every step costs nothing:
    adding ``a * g * growth`` is the same as ``u = gamma * u + a * g`` on the true scale.
    The sum is rounded to 16 bits stochastically (``util_round``), with ``salt``
    differing from step to step.
    A chunk that is not resident gets its utility and nothing else (invariant 4).
    Rows are addressed flat (unsigned offsets, no view per chunk).
    """
    c = vectors.shape[1]
    uc = np.uint64(c)
    U = uniq.shape[0]
    gw = np.uint64(grad_buf.shape[1])
    sw = np.uint64(opt_state.shape[1])
    g_flat = grad_buf.reshape(-1)
    v_flat = vectors.reshape(-1)
    s_flat = opt_state.reshape(-1)
    for u in prange(U):
        if u + 2 * PREFETCH_ROWS < U:
            prefetch(addr, uniq[u + 2 * PREFETCH_ROWS])
            prefetch(util, uniq[u + 2 * PREFETCH_ROWS])
        if u + PREFETCH_ROWS < U:
            ahead = addr[uniq[u + PREFETCH_ROWS]]
            for k in range(ahead.shape[0]):
                if ahead[k] >= 0:
                    prefetch(vectors, ahead[k])
                    prefetch(opt_state, ahead[k])
        e = uniq[u]
        t = entry_table(e, row_base, seen, table_ids)
        if table_group[t] != group:
            continue
        K = table_chunks[t]
        g0 = np.uint64(u) * gw
        accesses = np.float64(counts[u])
        urow = util[e]
        kh = key_hash(t, entry_key(e, t, row_base, keys))
        if util_mode == UTIL_GRADIENT:
            for k in range(K):
                gk = g0 + np.uint64(k) * uc
                sq = 0.0
                for j in range(uc):
                    x = np.float64(g_flat[gk + j])
                    sq += x * x
                urow[k] = util_round(
                    util_load(urow[k]) + np.float32(accesses * np.sqrt(sq) * growth), util_random16(kh, k, salt)
                )
        elif util_mode == UTIL_ACCESS:
            urow[0] = util_round(util_load(urow[0]) + np.float32(accesses * growth), util_random16(kh, 0, salt))
        else:
            sq = 0.0
            for j in range(np.uint64(K) * uc):
                x = np.float64(g_flat[g0 + j])
                sq += x * x
            urow[0] = util_round(
                util_load(urow[0]) + np.float32(accesses * np.sqrt(sq) * growth), util_random16(kh, 0, salt)
            )

        opt = table_opt[t]
        neg_lr = np.float32(-table_lr[t])
        eps = np.float32(table_eps[t])
        arow = addr[e]
        for k in range(K):
            s = arow[k]
            if s < 0:
                continue
            gk = g0 + np.uint64(k) * uc
            v0 = np.uint64(s) * uc
            s0 = np.uint64(s) * sw
            if opt == OPT_SGD:
                for j in range(uc):
                    v_flat[v0 + j] = fma32(neg_lr, g_flat[gk + j], v_flat[v0 + j])
            elif opt == OPT_ADAGRAD:
                for j in range(uc):
                    gj = g_flat[gk + j]
                    acc = s_flat[s0 + j] + gj * gj
                    s_flat[s0 + j] = acc
                    v_flat[v0 + j] = fma32(neg_lr, gj / (np.sqrt(acc) + eps), v_flat[v0 + j])
            elif opt == OPT_ROWWISE_ADAGRAD:
                sq32 = np.float32(0.0)
                for j in range(uc):
                    gj = g_flat[gk + j]
                    sq32 += gj * gj
                acc = s_flat[s0] + sq32 / np.float32(c)
                s_flat[s0] = acc
                mult = neg_lr / (np.sqrt(acc) + eps)
                for j in range(uc):
                    v_flat[v0 + j] = fma32(mult, g_flat[gk + j], v_flat[v0 + j])


@njit(**_PAR)
def nonfinite_in_empty_bags(offsets, bags_per_feature, feature_col, feature_table, table_dim, grad_out):
    """Rows of grad_out that no id reads (empty bags) must be finite too; count the bad ones."""
    n_bad = 0
    for bag in prange(offsets.shape[0] - 1):
        if offsets[bag + 1] != offsets[bag]:
            continue
        f = bag // bags_per_feature
        col = feature_col[f]
        row = grad_out[bag - f * bags_per_feature, col : col + table_dim[feature_table[f]]]
        for j in range(row.shape[0]):
            if not np.isfinite(row[j]):
                n_bad += 1
                break
    return n_bad


@njit(**_PAR)
def per_sample_weight_grads(
    entry_idx,
    bag_of_occ,
    bags_per_feature,
    feature_col,
    grad_out,
    row_base,
    seen,
    table_ids,
    addr,
    vectors,
    table_chunks,
    table_group,
    group,
    out,
):
    """d loss / d w_i = <grad_out[bag], row_i> over the resident chunks of ``group``."""
    c = vectors.shape[1]
    for i in prange(entry_idx.shape[0]):
        e = entry_idx[i]
        if e < 0:
            continue
        t = entry_table(e, row_base, seen, table_ids)
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
            util[e, k] = util_nearest(np.float64(util_load(util[e, k])) * factor)


# --------------------------------------------------------------------------- prune


@njit(inline="always")
def _sample_block(
    row_base,
    seen,
    keys,
    table_ids,
    util,
    table_chunks,
    table_group,
    group,
    accept_below,
    salt,
    lo,
    hi,
    write,
    n,
    out,
    out_tables,
):
    U = util.shape[1]
    cursor = direct_table(lo, row_base)
    for e in range(lo, hi):
        t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
        if t < 0 or table_group[t] != group:
            continue
        if mix64(key_hash(t, entry_key(e, t, row_base, keys)) ^ salt) >= accept_below:
            continue
        if write and n < out.shape[0]:
            out_tables[n] = t
            for k in range(out.shape[1]):
                if k >= table_chunks[t]:
                    out[n, k] = np.nan
                else:
                    out[n, k] = util_load(util[e, 0] if U == 1 else util[e, k])
        n += 1
    return n


@njit(**_PAR)
def sample_utilities(
    row_base,
    seen,
    keys,
    table_ids,
    util,
    table_chunks,
    table_group,
    group,
    accept_below,
    seed,
    round_id,
    out,
    out_tables,
):
    """Bernoulli sample of entries of ``group`` by key hash, in entry order: rows of out get
    their utilities (NaN past the table's K), out_tables their table. Returns the number
    sampled (capped by out).
    Blocks of entries are counted, then filled from their prefix sums."""
    salt = mix64(np.uint64(seed) ^ mix64(np.uint64(round_id) + _U64_GOLDEN))
    cap = util.shape[0]
    starts = np.zeros(SCAN_BLOCKS + 1, np.int64)
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        starts[blk + 1] = _sample_block(
            row_base,
            seen,
            keys,
            table_ids,
            util,
            table_chunks,
            table_group,
            group,
            accept_below,
            salt,
            lo,
            hi,
            False,
            0,
            out,
            out_tables,
        )
    for blk in range(SCAN_BLOCKS):
        starts[blk + 1] += starts[blk]
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        _sample_block(
            row_base,
            seen,
            keys,
            table_ids,
            util,
            table_chunks,
            table_group,
            group,
            accept_below,
            salt,
            lo,
            hi,
            True,
            starts[blk],
            out,
            out_tables,
        )
    return min(starts[SCAN_BLOCKS], out.shape[0])


@njit(inline="always")
def _keeps(resident, u, thr):
    # A resident chunk keeps its slot at the threshold; an absent one must beat it.
    return u >= thr if resident else u > thr


@njit(inline="always")
def _classify(addr, util, thresholds, t, e, k):
    """(resident, passes its threshold, rank bits) of chunk k of entry e of table t.

    ``thresholds`` is float32[tables, kmax]; -inf marks a table's floor chunk, which
    always passes and ranks above every utility (FLOOR_RANK_BITS) when slots are short.
    """
    bits = util[e, k] if util.shape[1] > 1 else util[e, 0]
    u = util_load(bits)
    resident = addr[e, k] >= 0
    thr = thresholds[t, k]
    if thr == -np.inf:
        return resident, True, FLOOR_RANK_BITS
    return resident, _keeps(resident, u, thr), bits


@njit(inline="always")
def _composite(ubits, resident, table, key, k):
    """Total order of chunks: utility, then residents first (no churn on ties), then hash.

    ubits is the utility's float32 bit pattern; utilities are >= 0, where the bit
    pattern orders like the value.
    """
    r = np.uint64(1) if resident else np.uint64(0)
    return (np.uint64(ubits) << np.uint64(32)) | (r << np.uint64(31)) | chunk_hash31(table, key, k)


SCAN_BLOCKS = 256


@njit(inline="always")
def _block(e_count, blk):
    step = (e_count + SCAN_BLOCKS - 1) // SCAN_BLOCKS
    lo = blk * step
    return lo, min(lo + step, e_count)


@njit(**_PAR)
def prune_composites(
    row_base, seen, keys, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts, out
):
    """Composite ranks of every chunk that qualifies for a slot, in entry order; returns how many."""
    cap = addr.shape[0]
    starts = np.zeros(SCAN_BLOCKS + 1, np.int64)
    for blk in range(SCAN_BLOCKS):
        starts[blk + 1] = starts[blk] + block_counts[blk, 0] + block_counts[blk, 1]
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        n = starts[blk]
        cursor = direct_table(lo, row_base)
        for e in range(lo, hi):
            t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
            if t < 0 or table_group[t] != group:
                continue
            for k in range(table_chunks[t]):
                resident, passes, bits = _classify(addr, util, thresholds, t, e, k)
                if passes:
                    out[n] = _composite(bits, resident, t, entry_key(e, t, row_base, keys), k)
                    n += 1
    return starts[SCAN_BLOCKS]


@njit(inline="always")
def _select_block(
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    util,
    table_chunks,
    table_group,
    group,
    thresholds,
    use_cutoff,
    cutoff,
    rank_allocations,
    lo,
    hi,
    write,
    n_ev,
    n_al,
    ev_entries,
    ev_chunks,
    al_entries,
    al_chunks,
    al_rank,
):
    cursor = direct_table(lo, row_base)
    for e in range(lo, hi):
        t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            resident, keep, bits = _classify(addr, util, thresholds, t, e, k)
            rank = np.uint64(0)
            # the rank (a hash per chunk) is needed for the cut, and for allocations' order
            # when they may outnumber the free slots
            if keep and (use_cutoff or (rank_allocations and write and not resident)):
                rank = _composite(bits, resident, t, entry_key(e, t, row_base, keys), k)
                if use_cutoff and rank < cutoff:
                    keep = False
            if resident and not keep:
                if write:
                    ev_entries[n_ev] = e
                    ev_chunks[n_ev] = k
                n_ev += 1
            elif keep and not resident:
                if write:
                    al_entries[n_al] = e
                    al_chunks[n_al] = k
                    al_rank[n_al] = rank
                n_al += 1
    return n_ev, n_al


@njit(**_PAR)
def prune_select(
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    util,
    table_chunks,
    table_group,
    group,
    thresholds,
    use_cutoff,
    cutoff,
    rank_allocations,
    block_counts,
    ev_entries,
    ev_chunks,
    al_entries,
    al_chunks,
    al_rank,
):
    """List the chunks to evict and to allocate, in entry order.

    A chunk keeps (or wins) a slot when it passes its threshold and, when slots are
    over-subscribed, ranks at or above ``cutoff``. Allocations carry their composite
    rank so the caller can place them best-first. Two passes over blocks of
    entries: count, then fill from each block's prefix sum. Without a cutoff the
    counts are ``prune_lists``'s (``block_counts``: drops are evictions, candidates
    allocations), and the first pass is skipped.
    """
    cap = addr.shape[0]
    starts = np.zeros((SCAN_BLOCKS + 1, 2), np.int64)
    for blk in prange(SCAN_BLOCKS):
        if use_cutoff:
            lo, hi = _block(cap, blk)
            n_ev, n_al = _select_block(
                row_base,
                seen,
                keys,
                table_ids,
                addr,
                util,
                table_chunks,
                table_group,
                group,
                thresholds,
                use_cutoff,
                cutoff,
                rank_allocations,
                lo,
                hi,
                False,
                0,
                0,
                ev_entries,
                ev_chunks,
                al_entries,
                al_chunks,
                al_rank,
            )
        else:
            n_ev, n_al = block_counts[blk, 2], block_counts[blk, 1]
        starts[blk + 1, 0] = n_ev
        starts[blk + 1, 1] = n_al
    for blk in range(SCAN_BLOCKS):
        starts[blk + 1, 0] += starts[blk, 0]
        starts[blk + 1, 1] += starts[blk, 1]
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        _select_block(
            row_base,
            seen,
            keys,
            table_ids,
            addr,
            util,
            table_chunks,
            table_group,
            group,
            thresholds,
            use_cutoff,
            cutoff,
            rank_allocations,
            lo,
            hi,
            True,
            starts[blk, 0],
            starts[blk, 1],
            ev_entries,
            ev_chunks,
            al_entries,
            al_chunks,
            al_rank,
        )
    return starts[SCAN_BLOCKS, 0], starts[SCAN_BLOCKS, 1]


@njit(**_PAR)
def _classify_into_blocks(
    row_base,
    seen,
    table_ids,
    addr,
    util,
    table_chunks,
    table_group,
    group,
    thresholds,
    block_counts,
    ev_codes,
    al_codes,
):
    """Per block of entries: resident chunks that keep their slot, absent or spilled
    chunks that qualify for one, resident chunks that fall below their threshold
    (block_counts[blk] = keep, candidates, drops), each candidate and drop listed as
    entry * kmax + chunk in the block's own region (from its first entry * kmax on)."""
    cap = addr.shape[0]
    kmax = addr.shape[1]
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        keep = 0
        cand = 0
        drop = 0
        base = lo * kmax
        cursor = direct_table(lo, row_base)
        for e in range(lo, hi):
            t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
            if t < 0 or table_group[t] != group:
                continue
            for k in range(table_chunks[t]):
                resident, passes, _ = _classify(addr, util, thresholds, t, e, k)
                if passes:
                    if resident:
                        keep += 1
                    else:
                        al_codes[base + cand] = e * kmax + k
                        cand += 1
                elif resident:
                    ev_codes[base + drop] = e * kmax + k
                    drop += 1
        block_counts[blk, 0] = keep
        block_counts[blk, 1] = cand
        block_counts[blk, 2] = drop


@njit(**_PAR)
def _gather_block_lists(block_counts, cap, kmax, ev_codes, al_codes, ev_entries, ev_chunks, al_entries, al_chunks):
    """The blocks' lists, decoded and laid end to end in block (so entry) order."""
    starts = np.zeros((SCAN_BLOCKS + 1, 2), np.int64)
    for blk in range(SCAN_BLOCKS):
        starts[blk + 1, 0] = starts[blk, 0] + block_counts[blk, 2]
        starts[blk + 1, 1] = starts[blk, 1] + block_counts[blk, 1]
    for blk in prange(SCAN_BLOCKS):
        lo, _ = _block(cap, blk)
        base = lo * kmax
        for j in range(block_counts[blk, 2]):
            c = ev_codes[base + j]
            ev_entries[starts[blk, 0] + j] = c // kmax
            ev_chunks[starts[blk, 0] + j] = c % kmax
        for j in range(block_counts[blk, 1]):
            c = al_codes[base + j]
            al_entries[starts[blk, 1] + j] = c // kmax
            al_chunks[starts[blk, 1] + j] = c % kmax


def prune_lists(row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts):
    """One pass: (keep, candidates, drops, evictions, allocations) of a prune without a
    cutoff. Evictions are the resident chunks below their threshold, allocations the
    others above it, both as (entries, chunks) in entry order; ``block_counts`` is
    filled per block, for a cutoff pass when slots turn out short.

    Each block lists into its own region of an entries x kmax scratch (on lazily
    mapped memory: only what is written is ever faulted in), so classifying and
    listing take one pass instead of a counting pass and a listing pass.
    """
    from ..hostmem import huge_empty

    cap, kmax = addr.shape
    ev_codes = huge_empty(max(cap * kmax, 1), np.int64)
    al_codes = huge_empty(max(cap * kmax, 1), np.int64)
    _classify_into_blocks(
        row_base,
        seen,
        table_ids,
        addr,
        util,
        table_chunks,
        table_group,
        group,
        thresholds,
        block_counts,
        ev_codes,
        al_codes,
    )
    keep, cand, drop = (int(x) for x in block_counts.sum(axis=0))
    ev_e, ev_k = np.empty(drop, np.int64), np.empty(drop, np.int64)
    al_e, al_k = np.empty(cand, np.int64), np.empty(cand, np.int64)
    _gather_block_lists(block_counts, cap, kmax, ev_codes, al_codes, ev_e, ev_k, al_e, al_k)
    return keep, cand, drop, ev_e, ev_k, al_e, al_k


@njit(**_PAR)
def allocation_ranks(row_base, seen, keys, table_ids, util, thresholds, al_entries, al_chunks, out):
    """Composite ranks of absent chunks that qualify for a slot (as prune_select gives them)."""
    U = util.shape[1]
    for i in prange(al_entries.shape[0]):
        e = al_entries[i]
        k = al_chunks[i]
        t = entry_table(e, row_base, seen, table_ids)
        bits = FLOOR_RANK_BITS if thresholds[t, k] == -np.inf else (util[e, k] if U > 1 else util[e, 0])
        out[i] = _composite(bits, False, t, entry_key(e, t, row_base, keys), k)


@njit(inline="always")
def _dead_block(row_base, seen, table_ids, addr, util, floor, lo, hi, write, n, out):
    cursor = direct_table(lo, row_base)
    for e in range(lo, hi):
        t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
        if t < 0:
            continue
        alive = False
        for k in range(addr.shape[1]):
            if addr[e, k] >= 0:
                alive = True
                break
        if alive:
            continue
        for k in range(util.shape[1]):
            if util_load(util[e, k]) >= floor:
                alive = True
                break
        if not alive:
            if write:
                out[n] = e
            n += 1
    return n


@njit(**_PAR)
def find_dead_entries(row_base, seen, table_ids, addr, util, floor, out):
    """Entries with no resident chunk and every utility below floor (stored scale), ascending.

    out is int64[entries]: each block writes its dead entries from its own first
    entry on, in one pass, and they are then moved to the front (few are dead in a
    prune, and untouched pages of out are never faulted in)."""
    cap = addr.shape[0]
    counts = np.zeros(SCAN_BLOCKS, np.int64)
    for blk in prange(SCAN_BLOCKS):
        lo, hi = _block(cap, blk)
        counts[blk] = _dead_block(row_base, seen, table_ids, addr, util, floor, lo, hi, True, lo, out) - lo
    n = 0
    for blk in range(SCAN_BLOCKS):
        lo, _ = _block(cap, blk)
        for j in range(counts[blk]):  # n <= lo + j: every position written was read already
            out[n] = out[lo + j]
            n += 1
    return n


# --------------------------------------------------------------------------- cache mode


@njit(inline="always")
def _missing_of_row(
    e, row_base, seen, table_ids, addr, table_chunks, table_group, group, write, n, out_entries, out_chunks
):
    """Entry e's chunks in pool ``group`` that are not resident, listed from n (when
    ``write``); returns n past them."""
    t = entry_table(e, row_base, seen, table_ids)
    if table_group[t] != group:
        return n
    for k in range(table_chunks[t]):
        if addr[e, k] < 0:
            if write:
                out_entries[n] = e
                out_chunks[n] = k
            n += 1
    return n


@njit(**_PAR)
def missing_chunks(uniq, row_base, seen, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks):
    """Chunks of the batch's entries that are not resident (absent or spilled), in the
    order of ``uniq`` and then of chunks: blocks count theirs, then fill their part."""
    n_u = uniq.shape[0]
    nb = _FIND_BLOCKS
    step = (n_u + nb - 1) // nb
    start = np.zeros(nb + 1, np.int64)
    for blk in prange(nb):
        n = 0
        for i in range(blk * step, min((blk + 1) * step, n_u)):
            n = _missing_of_row(
                uniq[i],
                row_base,
                seen,
                table_ids,
                addr,
                table_chunks,
                table_group,
                group,
                False,
                n,
                out_entries,
                out_chunks,
            )
        start[blk + 1] = n
    for blk in range(nb):
        start[blk + 1] += start[blk]
    for blk in prange(nb):
        n = start[blk]
        for i in range(blk * step, min((blk + 1) * step, n_u)):
            n = _missing_of_row(
                uniq[i],
                row_base,
                seen,
                table_ids,
                addr,
                table_chunks,
                table_group,
                group,
                True,
                n,
                out_entries,
                out_chunks,
            )
    return start[nb]


#: how far past the last match the walk of take_staged looks
_STAGED_LOOKAHEAD = 64


@njit(inline="always")
def _take_row(staged_vectors, staged_state, j, out_vectors, out_state, i):
    for c in range(out_vectors.shape[1]):  # element loops: a row slice costs more than its copy
        out_vectors[i, c] = staged_vectors[j, c]
    for c in range(out_state.shape[1]):
        out_state[i, c] = staged_state[j, c]


@njit(**_JIT)
def _take_staged_by_search(staged_slots, staged_vectors, staged_state, tslots, hit, out_vectors, out_state):
    order = np.argsort(staged_slots)
    by_slot = staged_slots[order]
    n_staged = by_slot.shape[0]
    taken = 0
    for i in range(tslots.shape[0]):
        if hit[i]:
            continue
        r = np.searchsorted(by_slot, tslots[i])
        if r < n_staged and by_slot[r] == tslots[i]:
            _take_row(staged_vectors, staged_state, order[r], out_vectors, out_state, i)
            hit[i] = True
            taken += 1
    return taken


@njit(**_JIT)
def take_staged(staged_slots, staged_vectors, staged_state, tslots, hit, out_vectors, out_state):
    """Rows of ``tslots`` from a background read of ``staged_slots``. The prefetch listed a
    batch's spilled chunks in the order its allocation lists them, less those restored
    in between, so each slot is usually found a few places after the last: one walk
    over both lists. Slots the walk did not find (a list in another order) are then
    searched for in a sorted copy. Marks ``hit`` and returns how many were taken."""
    n_staged = staged_slots.shape[0]
    p = 0
    taken = 0
    missed = 0
    for i in range(tslots.shape[0]):
        if hit[i]:
            continue
        ts = tslots[i]
        j = -1
        for q in range(p, min(p + _STAGED_LOOKAHEAD, n_staged)):
            if staged_slots[q] == ts:
                j = q
                break
        if j < 0:
            missed += 1
            continue
        _take_row(staged_vectors, staged_state, j, out_vectors, out_state, i)
        hit[i] = True
        taken += 1
        p = j + 1
    if missed and n_staged:
        taken += _take_staged_by_search(staged_slots, staged_vectors, staged_state, tslots, hit, out_vectors, out_state)
    return taken


@njit(inline="always")
def _is_victim(owner, addr, util, pinned_bits, threshold, s):
    e = owner[s]
    if e < 0:
        return False
    k = chunk_at(addr[e], s)
    u = util_load(util[e, k] if util.shape[1] > 1 else util[e, 0])
    if u >= threshold:
        return False
    return ((pinned_bits[e >> 6] >> np.uint64(e & 63)) & np.uint64(1)) == 0


#: slots examined per parallel window of the victim scan, and blocks per window
_VICTIM_WINDOW = 1 << 15
_VICTIM_BLOCKS = 64


@njit(**_PAR)
def pick_victims(owner, addr, util, pinned, threshold, start, out_entries, out_chunks):
    """The first resident chunks below threshold whose entry is not pinned, in slot order
    from ``start`` (wrapping). ``pinned`` holds entries in any order (repeats allowed).

    The scan goes window by window and stops once enough are found; inside a window,
    blocks classify their slots in parallel (once: a flag per slot) and are filled
    from their prefix sums, so the result is the sequential scan's. Pinned entries
    are marked in a bitmap first, so a slot's check costs no search.
    Returns (number found, position to resume from).
    """
    S = owner.shape[0]
    limit = out_entries.shape[0]
    n_entries = addr.shape[0]
    pinned_bits = np.zeros(n_entries // 64 + 1, np.uint64)
    for i in range(pinned.shape[0]):
        e = pinned[i]
        if 0 <= e < n_entries:
            pinned_bits[e >> 6] |= np.uint64(1) << np.uint64(e & 63)
    step = _VICTIM_WINDOW // _VICTIM_BLOCKS
    counts = np.zeros(_VICTIM_BLOCKS + 1, np.int64)
    flags = np.zeros(_VICTIM_WINDOW, np.bool_)
    found = 0
    w0 = 0
    while w0 < S and found < limit:
        for blk in prange(_VICTIM_BLOCKS):
            n = 0
            for r in range(w0 + blk * step, min(w0 + (blk + 1) * step, S)):
                v = _is_victim(owner, addr, util, pinned_bits, threshold, (start + r) % S)
                flags[r - w0] = v
                if v:
                    n += 1
            counts[blk + 1] = n
        counts[0] = found
        for blk in range(_VICTIM_BLOCKS):
            counts[blk + 1] += counts[blk]
        for blk in prange(_VICTIM_BLOCKS):
            pos = counts[blk]
            if pos >= limit:
                continue
            for r in range(w0 + blk * step, min(w0 + (blk + 1) * step, S)):
                if flags[r - w0]:
                    s = (start + r) % S
                    e = owner[s]
                    out_entries[pos] = e
                    out_chunks[pos] = chunk_at(addr[e], s)
                    pos += 1
                    if pos >= limit:
                        break
        if counts[_VICTIM_BLOCKS] >= limit:
            # resume right after the limit-th victim of this window
            seen = found
            for r in range(w0, min(w0 + _VICTIM_WINDOW, S)):
                if flags[r - w0]:
                    seen += 1
                    if seen == limit:
                        return limit, (start + r + 1) % S
        found = counts[_VICTIM_BLOCKS]
        w0 += _VICTIM_WINDOW
    return min(found, limit), start


@njit(**_JIT)
def slot_utilities(owner, addr, util, positions, out):
    """Utilities of the chunks held by the given slots (NaN for free slots)."""
    U = util.shape[1]
    for i in range(positions.shape[0]):
        e = owner[positions[i]]
        if e < 0:
            out[i] = np.nan
        else:
            k = chunk_at(addr[e], positions[i])
            out[i] = util_load(util[e, k] if U > 1 else util[e, 0])


# --------------------------------------------------------------------------- stats and export


@njit(**_JIT)  # stats only: serial compiles in a third of the time
def count_chunks(row_base, seen, table_ids, addr, n_tables, entries, resident, spilled):
    """Per table: live entries, and resident / spilled chunks per chunk index (added to the outputs)."""
    kmax = addr.shape[1]
    cap = addr.shape[0]
    # one partial count per block; fewer blocks when there are many tables
    nb = max(1, min(SCAN_BLOCKS, (1 << 22) // (n_tables * (2 * kmax + 1))))
    step = (cap + nb - 1) // nb
    part = np.zeros((nb, n_tables, 2 * kmax + 1), np.int64)
    for blk in prange(nb):
        lo = blk * step
        hi = min(lo + step, cap)
        cursor = direct_table(lo, row_base)
        for e in range(lo, hi):
            t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
            if t < 0:
                continue
            part[blk, t, 0] += 1
            for k in range(kmax):
                a = addr[e, k]
                if a >= 0:
                    part[blk, t, 1 + k] += 1
                elif a <= -2:
                    part[blk, t, 1 + kmax + k] += 1
    for blk in range(nb):
        for t in range(n_tables):
            entries[t] += part[blk, t, 0]
            for k in range(kmax):
                resident[t, k] += part[blk, t, 1 + k]
                spilled[t, k] += part[blk, t, 1 + kmax + k]


# --------------------------------------------------------------------------- sharding
# The requester's and the owner's halves of a sharded lookup (fiited_store.distributed).
# Their arithmetic mirrors pooled_forward and accumulate_gradients operation for
# operation, so that a sharded store fed a global batch in pieces computes what one
# store fed the whole batch computes, to the bit.


@njit(**_JIT)
def dedupe_keys(tables, ids, first, inverse):
    """Distinct (table, id) keys in first-occurrence order.

    first[u] is the position of key u's first occurrence, inverse[i] the key of
    occurrence i. Returns the number of distinct keys. Shapes: int16[n], int64[n] ->
    int64[n] (first n entries used), int64[n].
    """
    n = ids.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    slot_key = np.full(size, -1, np.int64)
    mask = np.uint64(size - 1)
    nu = 0
    for i in range(n):
        t = tables[i]
        key = ids[i]
        pos = key_hash(t, key) & mask
        while True:
            u = slot_key[pos]
            if u == -1:
                slot_key[pos] = nu
                first[nu] = i
                inverse[i] = nu
                nu += 1
                break
            j = first[u]
            if ids[j] == key and tables[j] == t:
                inverse[i] = u
                break
            pos = (pos + np.uint64(1)) & mask
    return nu


@njit(**_PAR)
def key_buckets(tables, ids, salt, n_buckets, out):
    """out[i] = the virtual bucket of key (tables[i], ids[i]): a salted hash modulo n_buckets.

    The salt keeps routing independent of prune sampling (which hashes the same keys):
    with one hash for both, every sampled key would sit on one shard."""
    nb = np.uint64(n_buckets)
    for i in prange(ids.shape[0]):
        out[i] = np.int64(mix64(key_hash(tables[i], ids[i]) ^ salt) % nb)


@njit(**_PAR)
def gather_entry_rows(
    entries, q_tables, addr, vectors, table_chunks, table_group, group, sp_slots, sp_vectors, row_start, out
):
    """out[row_start[i] : + K * c] = entry i's chunks of pool ``group``, zeros where absent.

    Rows are packed at each key's own width (``row_start`` from the tables' dims);
    spilled chunks read as zeros unless their tier rows are given (cache-mode reads)."""
    c = vectors.shape[1]
    for i in prange(entries.shape[0]):
        t = q_tables[i]
        if table_group[t] != group:
            continue
        K = table_chunks[t]
        s0 = row_start[i]
        e = entries[i]
        for k in range(K):
            if e < 0:
                out[s0 + k * c : s0 + (k + 1) * c] = 0.0
            else:
                _copy_chunk(out[s0 + k * c : s0 + (k + 1) * c], addr[e, k], sp_slots, vectors, sp_vectors)


@njit(**_PAR)
def pool_key_rows(key_of_occ, offsets, weights, mean, bags_per_feature, feature_dim, feature_col, rows, row_start, out):
    """out[b, col_f : col_f + D_f] = the sum (or mean, or weighted sum) of bag (f, b)'s rows.

    ``rows`` holds one packed row per distinct key (``row_start[u]``); the
    arithmetic is pooled_forward's: a lone unweighted id is copied, weights enter by
    fused multiply-add, a mean divides the sum. Flat unsigned indexing lets the
    copies vectorise; the rows of the bag PREFETCH_ROWS ahead are prefetched."""
    B = bags_per_feature
    F = feature_dim.shape[0]
    weighted = weights.shape[0] > 0
    width = np.uint64(out.shape[1])
    out_flat = out.reshape(-1)
    for b in prange(B):
        for f in range(F):
            bag = f * B + b
            lo = offsets[bag]
            hi = offsets[bag + 1]
            D = np.uint64(feature_dim[f])
            o0 = np.uint64(b) * width + np.uint64(feature_col[f])
            if b + PREFETCH_ROWS < B:
                a = offsets[bag + PREFETCH_ROWS]
                if a < offsets[bag + PREFETCH_ROWS + 1]:
                    prefetch(rows, row_start[key_of_occ[a]])
            if hi - lo == 1 and not weighted:
                s = np.uint64(row_start[key_of_occ[lo]])
                for j in range(D):
                    out_flat[o0 + j] = rows[s + j]
                continue
            for j in range(D):
                out_flat[o0 + j] = 0.0
            for i in range(lo, hi):
                s = np.uint64(row_start[key_of_occ[i]])
                if weighted:
                    w = weights[i]
                    for j in range(D):
                        out_flat[o0 + j] = fma32(rows[s + j], w, out_flat[o0 + j])
                else:
                    for j in range(D):
                        out_flat[o0 + j] += rows[s + j]
            n = hi - lo
            if mean and n > 0:
                inv = np.float32(n)
                for j in range(D):
                    out_flat[o0 + j] = out_flat[o0 + j] / inv


@njit(**_JIT)
def sum_key_gradients(
    key_of_occ, offsets, weights, mean, bags_per_feature, feature_dim, feature_col, grad_out, row_start, out
):
    """out[row_start[u] : + D] += every gradient row key u's occurrences receive, in batch
    order (feature, bag, position), with accumulate_gradients' arithmetic. ``out``
    must be zero on entry."""
    B = bags_per_feature
    weighted = weights.shape[0] > 0
    width = np.uint64(grad_out.shape[1])
    g_flat = grad_out.reshape(-1)
    nnz = key_of_occ.shape[0]
    for f in range(feature_dim.shape[0]):
        D = np.uint64(feature_dim[f])
        col = np.uint64(feature_col[f])
        for b in range(B):
            bag = f * B + b
            lo = offsets[bag]
            hi = offsets[bag + 1]
            inv_n = np.float32(1.0) / np.float32(max(hi - lo, 1))
            g0 = np.uint64(b) * width + col
            for i in range(lo, hi):
                if i + PREFETCH_ADDR < nnz:
                    prefetch(out, row_start[key_of_occ[i + PREFETCH_ADDR]])
                s = np.uint64(row_start[key_of_occ[i]])
                if weighted:
                    w = weights[i]
                    for j in range(D):
                        out[s + j] += w * g_flat[g0 + j]
                elif mean:
                    for j in range(D):
                        out[s + j] += g_flat[g0 + j] * inv_n
                else:
                    for j in range(D):
                        out[s + j] += g_flat[g0 + j]


@njit(inline="always")
def _occurrence_gradient(g, src, weighted, w_occ, mean, inv_n, D):
    """g[:D] += the gradient one occurrence contributes (accumulate_gradients' arithmetic)."""
    if weighted:
        for j in range(D):
            g[j] += w_occ * src[j]
    elif mean:
        for j in range(D):
            g[j] += src[j] * inv_n
    else:
        for j in range(D):
            g[j] += src[j]


@njit(**_PAR)
def occurrence_gradients(offsets, weights, mean, bags_per_feature, feature_dim, feature_col, grad_out, occ_start, out):
    """out[occ_start[i] : + D] = the gradient row occurrence i contributes (weighted, or
    divided by its bag's size), for owners that sum them in the single-store order."""
    B = bags_per_feature
    weighted = weights.shape[0] > 0
    for bag in prange(offsets.shape[0] - 1):
        f = bag // B
        b = bag - f * B
        D = feature_dim[f]
        col = feature_col[f]
        lo = offsets[bag]
        hi = offsets[bag + 1]
        inv_n = np.float32(1.0) / np.float32(max(hi - lo, 1))
        src = grad_out[b, col : col + D]
        for i in range(lo, hi):
            s = occ_start[i]
            dst = out[s : s + D]
            dst[:] = 0.0
            _occurrence_gradient(dst, src, weighted, weights[i] if weighted else np.float32(0.0), mean, inv_n, D)


@njit(**_JIT)
def sum_rows_by_group(order, group_of, row_start, row_dim, rows, grad_buf):
    """grad_buf[group_of[i], :D] += row i, rows taken in ``order``; grad_buf zero on entry."""
    for p in range(order.shape[0]):
        i = order[p]
        u = group_of[i]
        if u < 0:
            continue
        s = row_start[i]
        g = grad_buf[u]
        for j in range(row_dim[i]):
            g[j] += rows[s + j]


# --------------------------------------------------------------------------- the segment tier
# A segment tier keeps no owner per slot: which chunk a tier slot holds is read off the
# addresses. These list spilled chunks by the segment their slot lies in (compaction,
# export, verify) and a row's resident chunks (cache mode evicts whole rows, so that a
# row comes back in one read).


@njit(**_JIT)
def list_spilled(
    row_base,
    seen,
    table_ids,
    addr,
    table_chunks,
    table_group,
    group,
    segment_slots,
    segments,
    out_entries,
    out_chunks,
    out_slots,
):
    """(entry, chunk, tier slot) of every spilled chunk of pool ``group`` whose slot lies in a
    segment flagged in ``segments`` (uint8 per segment id; all ones: every spilled chunk), in
    entry order then chunk order. Returns how many (at most the outputs' length)."""
    n = 0
    limit = out_entries.shape[0]
    cursor = direct_table(0, row_base)
    n_seg = segments.shape[0]
    for e in range(addr.shape[0]):
        t, cursor = scan_table(e, cursor, row_base, seen, table_ids)
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            a = addr[e, k]
            if a <= -2:
                s = np.int64(-2) - np.int64(a)
                seg = s // segment_slots
                if seg < n_seg and segments[seg]:
                    if n < limit:
                        out_entries[n] = e
                        out_chunks[n] = k
                        out_slots[n] = s
                    n += 1
    return n


@njit(**_JIT)
def move_spilled(entries, chunks, new_slots, addr):
    """addr[entries[i], chunks[i]] = the spilled code of new_slots[i] (a compaction's move)."""
    for i in range(entries.shape[0]):
        addr[entries[i], chunks[i]] = np.int32(-2 - new_slots[i])


@njit(**_JIT)
def resident_chunks(
    entries, row_base, seen, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks
):
    """Every resident chunk in pool ``group`` of these entries, entry by entry (each entry
    once, however often it is listed). Returns how many."""
    n = 0
    last = -1
    for i in range(entries.shape[0]):
        e = entries[i]
        if e == last:
            continue
        last = e
        t = entry_table(e, row_base, seen, table_ids)
        if t < 0 or table_group[t] != group:
            continue
        for k in range(table_chunks[t]):
            if addr[e, k] >= 0 and n < out_entries.shape[0]:
                out_entries[n] = e
                out_chunks[n] = k
                n += 1
    return n


@njit(**_JIT)
def count_by_table(entries, row_base, seen, table_ids, n_tables, table_chunks, per_chunk, out):
    """out[t] += entries of table t (times its chunks when ``per_chunk``)."""
    for i in range(entries.shape[0]):
        t = entry_table(entries[i], row_base, seen, table_ids)
        if t >= 0:
            out[t] += table_chunks[t] if per_chunk else 1

"""CUDA kernels (numba.cuda) over the same flat layout as ``kernels/cpu.py``.

Each public function here has the name and signature of its CPU twin, so the
store runs unchanged on either backend; it launches one or a few kernels and
returns host integers where the CPU function returns them.

How the GPU reaches the CPU's decisions:

- find-or-insert: the batch's missing keys are deduplicated first (a scratch hash
  of occurrence indices, the first occurrence kept with an atomic min), so the
  threads that insert carry distinct, absent keys. A thread claims an empty entry
  with a compare-and-swap on the 32-bit word holding its 16-bit table id (EMPTY ->
  BUSY), writes the key, then publishes the table id; a prober treats BUSY as
  "another key" and moves on, which is right because no two inserters share a key.
  New keys are then ranked by first occurrence (a scan), which is the order the
  CPU admits them in.
- sums of duplicate gradients are taken in batch order: one thread per (table,
  column) walks the batch top to bottom, as the CPU does per entry.
- allocation i takes the i-th slot from the top of the free stack, as on the CPU.
- which chunks win a prune, and their initial values, depend on keys only.

Slot numbers and entry positions differ between the backends; no lookup or
trained value does (up to the fused multiply-adds the GPU compiler may form).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import config as numba_config
from numba import cuda

from .layout import (
    EMPTY,
    FLOOR_RANK_BITS,
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

SIMULATED = bool(numba_config.ENABLE_CUDASIM)
#: threads per block: small under the simulator, where each thread is a Python thread
TPB = 32 if SIMULATED else 256
SCAN_TPB = 32 if SIMULATED else 256
BUSY = -3
SCAN_BLOCKS = 1  # the CPU's block-parallel scans need per-block counts; atomics need none here

U64_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
U64_C1 = np.uint64(0xBF58476D1CE4E5B9)
U64_C2 = np.uint64(0x94D049BB133111EB)
U64_C3 = np.uint64(0xD6E8FEB86659FD93)


def _grid(n: int) -> tuple[int, int]:
    return max(1, (int(n) + TPB - 1) // TPB), TPB


# --------------------------------------------------------------------------- device functions


@cuda.jit(device=True, inline=True)
def mix64(z):
    z = (z ^ (z >> np.uint64(30))) * U64_C1
    z = (z ^ (z >> np.uint64(27))) * U64_C2
    return z ^ (z >> np.uint64(31))


@cuda.jit(device=True, inline=True)
def key_hash(table, key):
    return mix64(np.uint64(key) ^ (np.uint64(table + 1) * U64_GOLDEN))


@cuda.jit(device=True, inline=True)
def chunk_hash31(table, key, k):
    return mix64(key_hash(table, key) + np.uint64(k) * U64_C3) >> np.uint64(33)


@cuda.jit(device=True, inline=True)
def unit(h):
    return np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@cuda.jit(device=True, inline=True)
def init_element(kh, trow_j, kind, scale):
    h = mix64(kh ^ trow_j)
    if kind == INIT_UNIFORM:
        return np.float32(scale * (2.0 * unit(h) - 1.0))
    if kind == INIT_NORMAL:
        u1 = 1.0 - unit(h)
        u2 = unit(mix64(h ^ U64_GOLDEN))
        return np.float32(scale * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return np.float32(0.0)


@cuda.jit(device=True, inline=True)
def keeps(resident, u, thr):
    if resident:
        return u >= thr
    return u > thr


@cuda.jit(device=True, inline=True)
def rank_bits(util, thr, e, k):
    """The bits a chunk ranks by: its utility's, or above every utility for a floor chunk (thr = -inf)."""
    if thr == -np.inf:
        return np.uint16(FLOOR_RANK_BITS)
    return util_bits_of(util, e, k)


@cuda.jit(device=True, inline=True)
def composite(ubits, resident, table, key, k):
    r = np.uint64(1) if resident else np.uint64(0)
    return (np.uint64(ubits) << np.uint64(32)) | (r << np.uint64(31)) | chunk_hash31(table, key, k)


# The float32 <-> bit pattern bridge: libdevice on a GPU; the simulator runs device
# functions as Python, where a numpy view does it.
if SIMULATED:

    @cuda.jit(device=True)
    def f32_bits(x):
        return np.uint32(np.array([x], np.float32).view(np.uint32)[0])

    @cuda.jit(device=True)
    def bits_f32(b):
        return np.float32(np.array([b], np.uint32).view(np.float32)[0])
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def f32_bits(x):
        return np.uint32(libdevice.float_as_int(np.float32(x)))

    @cuda.jit(device=True, inline=True)
    def bits_f32(b):
        return libdevice.int_as_float(np.int32(b))


@cuda.jit(device=True, inline=True)
def util_load(b):
    """float32 value of a stored (bfloat16) utility (see kernels/cpu.py)."""
    return bits_f32(np.uint32(b) << np.uint32(16))


@cuda.jit(device=True, inline=True)
def util_round(x, r16):
    return np.uint16((np.uint64(f32_bits(np.float32(x))) + np.uint64(r16)) >> np.uint64(16))


@cuda.jit(device=True, inline=True)
def util_nearest(x):
    b = np.uint64(f32_bits(np.float32(x)))
    return np.uint16((b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))


@cuda.jit(device=True, inline=True)
def util_random16(kh, k, salt):
    return mix64(kh ^ salt ^ (np.uint64(k + 1) * U64_C3)) >> np.uint64(48)


@cuda.jit(device=True, inline=True)
def util_bits_of(util, e, k):
    if util.shape[1] > 1:
        return util[e, k]
    return util[e, 0]


@cuda.jit(device=True, inline=True)
def util_of(util, e, k):
    return util_load(util_bits_of(util, e, k))


@cuda.jit(device=True, inline=True)
def claim_entry(table_words, pos):
    """Try EMPTY -> BUSY on the 16-bit table id at pos; True when this thread got it."""
    w = pos >> np.uint64(1)
    shift = np.uint32((pos & np.uint64(1)) * np.uint64(16))
    half_mask = np.uint32(0xFFFF) << shift
    while True:
        old = table_words[w]
        half = (old & half_mask) >> shift
        if half != np.uint32(0xFFFF):  # not EMPTY (-1)
            return False
        new = (old & ~half_mask) | (np.uint32(BUSY & 0xFFFF) << shift)
        if cuda.atomic.cas(table_words, w, old, new) == old:
            return True


@cuda.jit(device=True, inline=True)
def publish_table(table_words, pos, t):
    """BUSY -> t at pos (the other half of the word may change under us: CAS loop)."""
    w = pos >> np.uint64(1)
    shift = np.uint32((pos & np.uint64(1)) * np.uint64(16))
    half_mask = np.uint32(0xFFFF) << shift
    while True:
        old = table_words[w]
        new = (old & ~half_mask) | ((np.uint32(t) & np.uint32(0xFFFF)) << shift)
        if cuda.atomic.cas(table_words, w, old, new) == old:
            return


@cuda.jit(device=True, inline=True)
def entry_table(e, row_base, seen, table_ids):
    """The table of entry e, or EMPTY / TOMBSTONE (see the CPU twin)."""
    T = row_base.shape[0] - 1
    nd = row_base[T]
    if e >= nd:
        return np.int64(table_ids[e - nd])
    if (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1) == np.uint32(0):
        return np.int64(EMPTY)
    lo = 0
    hi = T
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if row_base[mid] <= e:
            lo = mid
        else:
            hi = mid
    return np.int64(lo)


@cuda.jit(device=True, inline=True)
def entry_key(e, t, row_base, keys):
    nd = row_base[row_base.shape[0] - 1]
    if e < nd:
        return np.int64(e - row_base[t])
    return keys[e - nd]


@cuda.jit(device=True, inline=True)
def lower_bound(a, v):
    """First index i of ascending a with a[i] >= v (a.shape[0] when none)."""
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True, inline=True)
def source_row(s, sp_slots):
    """(0, slot) in the pool, (1, j) among read-through rows, (-1, 0) for none."""
    if s >= 0:
        return 0, s
    if s <= -2 and sp_slots.shape[0] > 0:
        ts = -2 - s
        lo = lower_bound(sp_slots, ts)
        if lo < sp_slots.shape[0] and sp_slots[lo] == ts:
            return 1, lo
    return -1, 0


# --------------------------------------------------------------------------- small utilities


@cuda.jit(cache=True)
def _fill_kernel(flat, value):
    i = cuda.grid(1)
    if i < flat.shape[0]:
        flat[i] = value


def fill(a, value) -> None:
    flat = a.reshape(-1)
    _fill_kernel[_grid(flat.shape[0])](flat, value)


def _zeros(n: int, dtype) -> Any:
    a = cuda.device_array(max(int(n), 1), dtype)
    fill(a, 0)
    return a


def _scalar(a) -> int:
    return int(a.copy_to_host()[0])


@cuda.jit(cache=True)
def _scan_block_kernel(x, out, sums, n):
    tmp = cuda.shared.array(SCAN_TPB, dtype=np.int64)
    i = cuda.grid(1)
    t = cuda.threadIdx.x
    tmp[t] = x[i] if i < n else 0
    cuda.syncthreads()
    offset = 1
    while offset < SCAN_TPB:
        v = tmp[t - offset] if t >= offset else 0
        cuda.syncthreads()
        tmp[t] += v
        cuda.syncthreads()
        offset *= 2
    if i < n:
        out[i] = tmp[t]
    if t == SCAN_TPB - 1:
        sums[cuda.blockIdx.x] = tmp[t]


@cuda.jit(cache=True)
def _scan_add_kernel(out, offsets, n):
    i = cuda.grid(1)
    if i < n and cuda.blockIdx.x > 0:
        out[i] += offsets[cuda.blockIdx.x - 1]


def inclusive_scan(x, n: int):
    """Inclusive prefix sum of int64 x[:n] on the device (blocks, then block sums recursively)."""
    out = cuda.device_array(max(n, 1), np.int64)
    if n == 0:
        return out
    blocks = (n + SCAN_TPB - 1) // SCAN_TPB
    sums = cuda.device_array(blocks, np.int64)
    _scan_block_kernel[blocks, SCAN_TPB](x, out, sums, n)
    if blocks > 1:
        scanned = inclusive_scan(sums, blocks)
        _scan_add_kernel[blocks, SCAN_TPB](out, scanned, n)
    return out


# --------------------------------------------------------------------------- entry table


@cuda.jit(cache=True)
def _find_kernel(row_base, seen, keys, table_ids, q_tables, q_ids, out, missing):
    i = cuda.grid(1)
    if i >= q_ids.shape[0]:
        return
    t = q_tables[i]
    key = q_ids[i]
    base = row_base[t]
    if row_base[t + 1] > base:
        if key < 0 or key >= row_base[t + 1] - base:
            out[i] = OUT_OF_RANGE
            cuda.atomic.add(missing, 2, 1)
            return
        e = base + key
        if (seen[e >> 5] >> np.uint32(e & 31)) & np.uint32(1):
            out[i] = e
        else:
            out[i] = -1
            cuda.atomic.add(missing, 0, 1)
        return
    nd = row_base[row_base.shape[0] - 1]
    mask = np.uint64(keys.shape[0] - 1)
    pos = key_hash(t, key) & mask
    res = -1
    while True:
        tid = table_ids[pos]
        if tid == EMPTY:
            break
        if tid == t and keys[pos] == key:
            res = nd + np.int64(pos)
            break
        pos = (pos + np.uint64(1)) & mask
    out[i] = res
    if res < 0:
        cuda.atomic.add(missing, 0, 1)
        cuda.atomic.add(missing, 1, 1)


def find_entries(row_base, seen, keys, table_ids, q_tables, q_ids, out):
    missing = _zeros(3, np.int64)
    if q_ids.shape[0]:
        _find_kernel[_grid(q_ids.shape[0])](row_base, seen, keys, table_ids, q_tables, q_ids, out, missing)
    m = missing.copy_to_host()
    return int(m[0]), int(m[1]), int(m[2])


@cuda.jit(cache=True)
def _dedupe_claim_kernel(q_tables, q_ids, out, hslot):
    """Missing occurrences register in a scratch hash; equal keys keep the first index."""
    i = cuda.grid(1)
    if i >= q_ids.shape[0] or out[i] >= 0:
        return
    mask = np.uint64(hslot.shape[0] - 1)
    t = q_tables[i]
    key = q_ids[i]
    h = key_hash(t, key) & mask
    while True:
        cur = cuda.atomic.cas(hslot, h, -1, i)
        if cur == -1:
            return
        if q_tables[cur] == t and q_ids[cur] == key:
            cuda.atomic.min(hslot, h, i)
            return
        h = (h + np.uint64(1)) & mask


@cuda.jit(cache=True)
def _dedupe_first_kernel(q_tables, q_ids, out, hslot, first_of, is_first):
    i = cuda.grid(1)
    if i >= q_ids.shape[0]:
        return
    if out[i] >= 0:
        is_first[i] = 0
        return
    mask = np.uint64(hslot.shape[0] - 1)
    t = q_tables[i]
    key = q_ids[i]
    h = key_hash(t, key) & mask
    while True:
        cur = hslot[h]
        if q_tables[cur] == t and q_ids[cur] == key:
            first_of[i] = cur
            is_first[i] = 1 if cur == i else 0
            return
        h = (h + np.uint64(1)) & mask


@cuda.jit(cache=True)
def _insert_first_kernel(
    row_base, seen, keys, table_words, addr, util, q_tables, q_ids, is_first, rank, out, new_entries, n_hashed
):
    i = cuda.grid(1)
    if i >= q_ids.shape[0] or is_first[i] == 0:
        return
    t = q_tables[i]
    key = q_ids[i]
    base = row_base[t]
    if row_base[t + 1] > base:
        # a direct row: no probe, only its seen bit (other rows share the word: atomic)
        e = base + key
        for k in range(addr.shape[1]):
            addr[e, k] = -1
        for k in range(util.shape[1]):
            util[e, k] = 0
        cuda.atomic.or_(seen, e >> 5, np.uint32(1) << np.uint32(e & 31))
        out[i] = e
        new_entries[rank[i] - 1] = e
        return
    nd = row_base[row_base.shape[0] - 1]
    mask = np.uint64(keys.shape[0] - 1)
    pos = key_hash(t, key) & mask
    while not claim_entry(table_words, pos):
        pos = (pos + np.uint64(1)) & mask
    e = nd + np.int64(pos)
    keys[pos] = key
    for k in range(addr.shape[1]):
        addr[e, k] = -1
    for k in range(util.shape[1]):
        util[e, k] = 0
    cuda.threadfence()
    publish_table(table_words, pos, t)
    out[i] = e
    new_entries[rank[i] - 1] = e
    cuda.atomic.add(n_hashed, 0, 1)


@cuda.jit(cache=True)
def _insert_copy_kernel(out, first_of, is_first, missing_before):
    i = cuda.grid(1)
    if i < out.shape[0] and missing_before[i] and is_first[i] == 0:
        out[i] = out[first_of[i]]


@cuda.jit(cache=True)
def _missing_flags_kernel(out, flags):
    i = cuda.grid(1)
    if i < out.shape[0]:
        flags[i] = 1 if out[i] < 0 else 0


def _scratch_table(n: int):
    """An empty open-addressing scratch table (all -1) for n keys, at most half full."""
    size = 1
    while size < 2 * n + 2:
        size *= 2
    table = cuda.device_array(size, np.int64)
    fill(table, -1)
    return table


def insert_missing(row_base, seen, keys, table_ids, addr, util, q_tables, q_ids, out, new_entries):
    """Insert every key with out[i] == -1; new entries listed by first occurrence.
    Returns (new keys, of which in hashed tables)."""
    n = q_ids.shape[0]
    if n == 0:
        return 0, 0
    hslot = _scratch_table(n)
    was_missing = cuda.device_array(n, np.int8)
    _missing_flags_kernel[_grid(n)](out, was_missing)
    _dedupe_claim_kernel[_grid(n)](q_tables, q_ids, out, hslot)
    first_of = cuda.device_array(n, np.int64)
    is_first = cuda.device_array(n, np.int64)
    _dedupe_first_kernel[_grid(n)](q_tables, q_ids, out, hslot, first_of, is_first)
    rank = inclusive_scan(is_first, n)
    n_new = int(rank[n - 1 : n].copy_to_host()[0])
    # a 16-bit table id is claimed by a CAS on its 32-bit word; an empty table has no words
    words = table_ids.view(np.uint32) if table_ids.shape[0] else cuda.device_array(1, np.uint32)
    n_hashed = _zeros(1, np.int64)
    _insert_first_kernel[_grid(n)](
        row_base, seen, keys, words, addr, util, q_tables, q_ids, is_first, rank, out, new_entries, n_hashed
    )
    _insert_copy_kernel[_grid(n)](out, first_of, is_first, was_missing)
    return n_new, _scalar(n_hashed)


@cuda.jit(cache=True)
def _copy_direct_kernel(nd, addr, util, new_addr, new_util, old_to_new):
    e = cuda.grid(1)
    if e >= nd:
        return
    for k in range(addr.shape[1]):
        new_addr[e, k] = addr[e, k]
    for k in range(util.shape[1]):
        new_util[e, k] = util[e, k]
    old_to_new[e] = e


@cuda.jit(cache=True)
def _rehash_kernel(nd, keys, table_ids, addr, util, new_keys, new_words, new_addr, new_util, old_to_new):
    h = cuda.grid(1)
    if h >= keys.shape[0]:
        return
    e = nd + h
    t = table_ids[h]
    if t < 0:
        old_to_new[e] = -1
        return
    mask = np.uint64(new_keys.shape[0] - 1)
    key = keys[h]
    pos = key_hash(t, key) & mask
    while not claim_entry(new_words, pos):
        pos = (pos + np.uint64(1)) & mask
    new_keys[pos] = key
    for k in range(addr.shape[1]):
        new_addr[nd + pos, k] = addr[e, k]
    for k in range(util.shape[1]):
        new_util[nd + pos, k] = util[e, k]
    cuda.threadfence()
    publish_table(new_words, pos, t)
    old_to_new[e] = nd + np.int64(pos)


def rehash_into(row_base, keys, table_ids, addr, util, new_keys, new_table_ids, new_addr, new_util, old_to_new):
    nd = int(row_base[row_base.shape[0] - 1 :].copy_to_host()[0])
    if nd:
        _copy_direct_kernel[_grid(nd)](nd, addr, util, new_addr, new_util, old_to_new)
    if keys.shape[0] and new_keys.shape[0]:
        _rehash_kernel[_grid(keys.shape[0])](
            nd, keys, table_ids, addr, util, new_keys, new_table_ids.view(np.uint32), new_addr, new_util, old_to_new
        )


@cuda.jit(cache=True)
def _remap_owner_kernel(owner, old_to_new):
    s = cuda.grid(1)
    if s < owner.shape[0] and owner[s] >= 0:
        owner[s] = old_to_new[owner[s]]


def remap_owner(owner, old_to_new):
    _remap_owner_kernel[_grid(owner.shape[0])](owner, old_to_new)


@cuda.jit(cache=True)
def _erase_kernel(
    entries, row_base, seen, table_ids, addr, util, owner, free_stack, n_free, table_group, group, tier_out, counts
):
    i = cuda.grid(1)
    if i >= entries.shape[0]:
        return
    e = entries[i]
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0 or table_group[t] != group:
        return
    for k in range(addr.shape[1]):
        s = addr[e, k]
        if s >= 0:
            owner[s] = -1
            p = cuda.atomic.add(n_free, 0, 1)
            free_stack[p] = s
        elif s <= -2:
            q = cuda.atomic.add(counts, 1, 1)
            tier_out[q] = -2 - s
        addr[e, k] = -1
    for k in range(util.shape[1]):
        util[e, k] = 0
    nd = row_base[row_base.shape[0] - 1]
    if e >= nd:
        table_ids[e - nd] = TOMBSTONE
        cuda.atomic.add(counts, 2, 1)
    else:
        cuda.atomic.and_(seen, e >> 5, ~(np.uint32(1) << np.uint32(e & 31)))
    cuda.atomic.add(counts, 0, 1)


def erase_entries(
    entries, row_base, seen, table_ids, addr, util, owner, free_stack, n_free, table_group, group, kmax, tier_out
):
    counts = _zeros(3, np.int64)
    if entries.shape[0]:
        _erase_kernel[_grid(entries.shape[0])](
            entries,
            row_base,
            seen,
            table_ids,
            addr,
            util,
            owner,
            free_stack,
            n_free,
            table_group,
            group,
            tier_out,
            counts,
        )
    c = counts.copy_to_host()
    return int(c[0]), int(c[2]), int(c[1])


# --------------------------------------------------------------------------- pool


def _init_table(seed: int, kmax: int, c: int):
    from .cpu import init_table

    return cuda.to_device(init_table(seed, kmax, c))


@cuda.jit(cache=True)
def _group_chunks_kernel(new_entries, row_base, seen, table_ids, table_chunks, table_group, group, want):
    r = cuda.grid(1)
    if r < new_entries.shape[0]:
        t = entry_table(new_entries[r], row_base, seen, table_ids)
        want[r] = table_chunks[t] if table_group[t] == group else 0


@cuda.jit(cache=True)
def _admit_kernel(
    new_entries,
    row_base,
    seen,
    keys,
    table_ids,
    addr,
    want,
    cum,
    top,
    bound,
    vectors,
    opt_state,
    owner,
    free_stack,
    itab,
    table_init_kind,
    table_init_scale,
):
    r = cuda.grid(1)
    if r >= new_entries.shape[0] or want[r] == 0:
        return
    e = new_entries[r]
    t = entry_table(e, row_base, seen, table_ids)
    start = cum[r] - want[r]
    kh = key_hash(t, entry_key(e, t, row_base, keys))
    for k in range(want[r]):
        idx = start + k
        if idx >= bound:
            return
        s = free_stack[top - 1 - idx]
        addr[e, k] = s
        owner[s] = e
        for j in range(vectors.shape[1]):
            vectors[s, j] = init_element(kh, itab[k, j], table_init_kind[t], table_init_scale[t])
        for j in range(opt_state.shape[1]):
            opt_state[s, j] = 0.0


@cuda.jit(cache=True)
def _set_scalar_kernel(a, value):
    if cuda.grid(1) == 0:
        a[0] = value


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
    """First-occurrence order, entry-major, while free slots remain and fewer than
    ``limit`` were given: as on the CPU."""
    n = new_entries.shape[0]
    if n == 0:
        return 0
    want = cuda.device_array(n, np.int64)
    _group_chunks_kernel[_grid(n)](new_entries, row_base, seen, table_ids, table_chunks, table_group, group, want)
    cum = inclusive_scan(want, n)
    total = int(cum[n - 1 : n].copy_to_host()[0])
    top = _scalar(n_free)
    admitted = min(total, top, limit)
    if admitted:
        _admit_kernel[_grid(n)](
            new_entries,
            row_base,
            seen,
            keys,
            table_ids,
            addr,
            want,
            cum,
            top,
            admitted,
            vectors,
            opt_state,
            owner,
            free_stack,
            _init_table(seed, kmax, vectors.shape[1]),
            table_init_kind,
            table_init_scale,
        )
        _set_scalar_kernel[1, 1](n_free, top - admitted)
    return admitted


@cuda.jit(cache=True)
def _gather_kernel(slots, vectors, opt_state, out_vectors, out_state):
    i = cuda.grid(1)
    if i < slots.shape[0]:
        s = slots[i]
        for j in range(vectors.shape[1]):
            out_vectors[i, j] = vectors[s, j]
        for j in range(opt_state.shape[1]):
            out_state[i, j] = opt_state[s, j]


def gather_slots(slots, vectors, opt_state, out_vectors, out_state):
    if slots.shape[0]:
        _gather_kernel[_grid(slots.shape[0])](slots, vectors, opt_state, out_vectors, out_state)


@cuda.jit(cache=True)
def _evict_kernel(ev_entries, ev_chunks, tier_slots, spill, addr, owner, free_stack, top):
    i = cuda.grid(1)
    if i >= ev_entries.shape[0]:
        return
    e = ev_entries[i]
    k = ev_chunks[i]
    s = addr[e, k]
    owner[s] = -1
    free_stack[top + ev_entries.shape[0] - 1 - i] = s
    if spill:
        addr[e, k] = -2 - tier_slots[i]
    else:
        addr[e, k] = -1


def commit_evictions(ev_entries, ev_chunks, tier_slots, addr, owner, free_stack, n_free, kmax):
    n = ev_entries.shape[0]
    if n == 0:
        return
    top = _scalar(n_free)
    _evict_kernel[_grid(n)](ev_entries, ev_chunks, tier_slots, tier_slots.shape[0] > 0, addr, owner, free_stack, top)
    _set_scalar_kernel[1, 1](n_free, top + n)


@cuda.jit(cache=True)
def _codes_kernel(addr, entries, chunks, out):
    i = cuda.grid(1)
    if i < entries.shape[0]:
        out[i] = addr[entries[i], chunks[i]]


def chunk_codes(addr, entries, chunks, out):
    if entries.shape[0]:
        _codes_kernel[_grid(entries.shape[0])](addr, entries, chunks, out)


@cuda.jit(cache=True)
def _allocate_kernel(
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
    top,
    placed,
    vectors,
    opt_state,
    itab,
    table_init_kind,
    table_init_scale,
):
    i = cuda.grid(1)
    if i >= placed:
        return
    e = al_entries[i]
    k = al_chunks[i]
    s = free_stack[top - 1 - i]
    addr[e, k] = s
    owner[s] = e
    r = restore_index[i] if restore_index.shape[0] > 0 else -1
    if r >= 0:
        for j in range(vectors.shape[1]):
            vectors[s, j] = restored_vectors[r, j]
        for j in range(opt_state.shape[1]):
            opt_state[s, j] = restored_state[r, j]
    else:
        t = entry_table(e, row_base, seen, table_ids)
        kh = key_hash(t, entry_key(e, t, row_base, keys))
        for j in range(vectors.shape[1]):
            vectors[s, j] = init_element(kh, itab[k, j], table_init_kind[t], table_init_scale[t])
        for j in range(opt_state.shape[1]):
            opt_state[s, j] = 0.0


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
    n = al_entries.shape[0]
    if n == 0:
        return 0
    top = _scalar(n_free)
    placed = min(n, top)
    if placed:
        _allocate_kernel[_grid(placed)](
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
            top,
            placed,
            vectors,
            opt_state,
            _init_table(seed, kmax, vectors.shape[1]),
            table_init_kind,
            table_init_scale,
        )
        _set_scalar_kernel[1, 1](n_free, top - placed)
    return placed


@cuda.jit(cache=True)
def _assign_kernel(
    entries, values, row_base, seen, table_ids, addr, table_chunks, table_group, group, vectors, opt_state
):
    i = cuda.grid(1)
    if i >= entries.shape[0]:
        return
    e = entries[i]
    t = entry_table(e, row_base, seen, table_ids)
    if table_group[t] != group:
        return
    c = vectors.shape[1]
    for k in range(table_chunks[t]):
        s = addr[e, k]
        if s >= 0:
            for j in range(c):
                vectors[s, j] = values[i, k * c + j]
            for j in range(opt_state.shape[1]):
                opt_state[s, j] = 0.0


def assign_rows(entries, values, row_base, seen, table_ids, addr, table_chunks, table_group, group, vectors, opt_state):
    if entries.shape[0]:
        _assign_kernel[_grid(entries.shape[0])](
            entries, values, row_base, seen, table_ids, addr, table_chunks, table_group, group, vectors, opt_state
        )


# --------------------------------------------------------------------------- forward


@cuda.jit(cache=True)
def _expand_kernel(offsets, bags_per_feature, feature_table, bag_of_occ, table_of_occ):
    bag = cuda.grid(1)
    if bag >= offsets.shape[0] - 1:
        return
    t = feature_table[bag // bags_per_feature]
    for i in range(offsets[bag], offsets[bag + 1]):
        if bag_of_occ.shape[0] > 0:
            bag_of_occ[i] = bag
        table_of_occ[i] = t


def expand_bags(offsets, bags_per_feature, feature_table, bag_of_occ, table_of_occ):
    if offsets.shape[0] > 1:
        _expand_kernel[_grid(offsets.shape[0] - 1)](offsets, bags_per_feature, feature_table, bag_of_occ, table_of_occ)


@cuda.jit(cache=True)
def _forward_kernel(
    entry_idx,
    offsets,
    weights,
    mean,
    B,
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
    dmax,
):
    """One thread per output element (bag, column): the bag's ids summed in order."""
    g = cuda.grid(1)
    n_bags = offsets.shape[0] - 1
    if g >= n_bags * dmax:
        return
    bag = g // dmax
    j = g - bag * dmax
    f = bag // B
    b = bag - f * B
    t = feature_table[f]
    if table_group[t] != group:
        return
    c = vectors.shape[1]
    K = table_chunks[t]
    if j >= K * c:
        return
    k = j // c
    jj = j - k * c
    acc = np.float32(0.0)
    weighted = weights.shape[0] > 0
    lo = offsets[bag]
    hi = offsets[bag + 1]
    for i in range(lo, hi):
        e = entry_idx[i]
        if e < 0:
            continue
        where, r = source_row(addr[e, k], sp_slots)
        if where < 0:
            continue
        v = vectors[r, jj] if where == 0 else sp_vectors[r, jj]
        if weighted:
            acc = cuda.fma(v, weights[i], acc)
        else:
            acc += v
    if mean and hi > lo:
        acc = acc / np.float32(hi - lo)
    out[b, feature_col[f] + j] = acc


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
    n_bags = offsets.shape[0] - 1
    # one thread per element of the widest row; threads past a narrower feature return at once
    width = int(table_chunks.copy_to_host().max()) * int(vectors.shape[1])
    if n_bags:
        _forward_kernel[_grid(n_bags * width)](
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
            width,
        )


@cuda.jit(cache=True)
def _sum_forward_kernel(
    entry_idx,
    ids,
    feature_rows,
    offsets,
    B,
    feature_chunks,
    feature_col,
    addr_flat,
    kmax,
    vec_flat,
    c,
    out_flat,
    width,
    dmax,
    bad,
):
    g = cuda.grid(1)
    n_bags = offsets.shape[0] - 1
    if g >= n_bags * dmax:
        return
    bag = g // dmax
    j = g - bag * dmax
    f = bag // B
    b = bag - f * B
    K = feature_chunks[f]
    if j >= K * c:
        return
    k = j // c
    jj = j - k * c
    acc = np.float32(0.0)
    for i in range(offsets[bag], offsets[bag + 1]):
        if entry_idx.shape[0] > 0:
            e = entry_idx[i]
        else:
            # a direct index: the row is the id (see the CPU twin)
            key = ids[i]
            if key < 0 or key >= feature_rows[f, 1]:
                if j == 0:
                    cuda.atomic.add(bad, 0, 1)
                continue
            e = feature_rows[f, 0] + key
        if e < 0:
            continue
        s = addr_flat[e * kmax + k]
        if s >= 0:
            acc += vec_flat[s * c + jj]
    out_flat[b * width + feature_col[f] + j] = acc


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
    n_bags = offsets.shape[0] - 1
    dmax = int(feature_chunks.copy_to_host().max()) * int(c)
    bad = _zeros(1, np.int64)
    if n_bags and dmax:
        _sum_forward_kernel[_grid(n_bags * dmax)](
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
            dmax,
            bad,
        )
    return _scalar(bad)


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
    """The CPU twin finds keys inside its address pass; here a thread per occurrence
    finds them first (the GPU hides a probe's latency behind its other threads)."""
    nnz = ids.shape[0]
    q_tables = cuda.device_array(max(nnz, 1), np.int16)[:nnz]
    expand_bags(offsets, bags_per_feature, feature_table, cuda.device_array(0, np.int64), q_tables)
    entries = cuda.device_array(max(nnz, 1), np.int64)[:nnz]
    _, _, n_bad = find_entries(row_base, seen, keys, table_ids, q_tables, ids, entries)
    pooled_sum_forward(
        entries,
        ids,
        cuda.device_array((1, 2), np.int64),
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
    )
    return n_bad


# --------------------------------------------------------------------------- backward


@cuda.jit(cache=True)
def _group_claim_kernel(entry_idx, hkeys):
    i = cuda.grid(1)
    if i >= entry_idx.shape[0]:
        return
    e = entry_idx[i]
    if e < 0:
        return
    mask = np.uint64(hkeys.shape[0] - 1)
    h = mix64(np.uint64(e)) & mask
    while True:
        cur = cuda.atomic.cas(hkeys, h, -1, e)
        if cur == -1 or cur == e:
            return
        h = (h + np.uint64(1)) & mask


@cuda.jit(cache=True)
def _group_number_kernel(hkeys, hvals, counter, uniq, counts):
    h = cuda.grid(1)
    if h < hkeys.shape[0] and hkeys[h] >= 0:
        u = cuda.atomic.add(counter, 0, 1)
        hvals[h] = u
        uniq[u] = hkeys[h]
        counts[u] = 0


@cuda.jit(cache=True)
def _group_assign_kernel(entry_idx, hkeys, hvals, which, counts):
    i = cuda.grid(1)
    if i >= entry_idx.shape[0]:
        return
    e = entry_idx[i]
    if e < 0:
        which[i] = -1
        return
    mask = np.uint64(hkeys.shape[0] - 1)
    h = mix64(np.uint64(e)) & mask
    while hkeys[h] != e:
        h = (h + np.uint64(1)) & mask
    u = hvals[h]
    which[i] = u
    cuda.atomic.add(counts, u, 1)


def group_occurrences(entry_idx, table_of_occ, n_tables, uniq, counts, which):
    """Distinct entries of a batch (their order is not meaningful here)."""
    n = entry_idx.shape[0]
    if n == 0:
        return 0
    hkeys = _scratch_table(n)
    hvals = cuda.device_array(hkeys.shape[0], np.int64)
    counter = _zeros(1, np.int64)
    _group_claim_kernel[_grid(n)](entry_idx, hkeys)
    _group_number_kernel[_grid(hkeys.shape[0])](hkeys, hvals, counter, uniq, counts)
    _group_assign_kernel[_grid(n)](entry_idx, hkeys, hvals, which, counts)
    return _scalar(counter)


@cuda.jit(cache=True)
def _first_nonfinite_kernel(flat, first):
    i = cuda.grid(1)
    if i < flat.shape[0] and not math.isfinite(flat[i]):
        cuda.atomic.min(first, 0, i)


def first_nonfinite(a):
    """The first flat position of a NaN or inf in a, or -1; only that integer crosses to the host."""
    flat = a.reshape(-1)
    n = flat.shape[0]
    first = cuda.to_device(np.array([n], np.int64))
    if n:
        _first_nonfinite_kernel[_grid(n)](flat, first)
    i = _scalar(first)
    return -1 if i >= n else i


# --------------------------------------------------------------------------- request checks on the device
# A CUDA store fed device tensors checks them where they are: one kernel widens what
# needs widening, one checks every rule, and five integers cross back.

#: status words of check_request
REQ_UINT64_OVER = 0  # first id of a uint64 request above int64's range (nnz if none)
REQ_DECREASE = 1  # first i with offsets[i] > offsets[i + 1] (len(offsets) if none)
REQ_NONFINITE = 2  # first non-finite per-sample weight (nnz if none)
REQ_FIRST = 3  # offsets[0]
REQ_LAST = 4  # offsets[-1]


@cuda.jit(cache=True)
def _widen_kernel(src, dst):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


@cuda.jit(cache=True)
def _check_request_kernel(ids, unsigned64, offsets, weights, status):
    i = cuda.grid(1)
    n_off = offsets.shape[0]
    if i == 0:
        status[REQ_FIRST] = offsets[0]
        status[REQ_LAST] = offsets[n_off - 1]
    # a uint64 id past int64's range wrapped to a negative int64 when it was widened
    if unsigned64 and i < ids.shape[0] and ids[i] < 0:
        cuda.atomic.min(status, REQ_UINT64_OVER, i)
    if i + 1 < n_off and offsets[i] > offsets[i + 1]:
        cuda.atomic.min(status, REQ_DECREASE, i)
    if i < weights.shape[0] and not math.isfinite(weights[i]):
        cuda.atomic.min(status, REQ_NONFINITE, i)


def widen(a, dtype):
    """a as a new device array of dtype (bit patterns of uint64 kept as int64)."""
    out = cuda.device_array(a.shape[0], dtype)
    if a.shape[0]:
        src = a.view(np.int64) if a.dtype == np.uint64 else a
        _widen_kernel[_grid(a.shape[0])](src, out)
    return out


def check_request(ids, unsigned64, offsets, weights):
    """Status words (host int64[5], see REQ_*) for int64 ids, int64 offsets, float32 weights."""
    nnz, n_off = ids.shape[0], offsets.shape[0]
    status = cuda.to_device(np.array([nnz, n_off, max(weights.shape[0], 1), 0, 0], np.int64))
    n = max(nnz, n_off, weights.shape[0])
    _check_request_kernel[_grid(n)](ids, bool(unsigned64), offsets, weights, status)
    return status.copy_to_host()


@cuda.jit(cache=True)
def _accumulate_kernel(
    which,
    offsets,
    weights,
    mean,
    B,
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
    """Thread (table, part, column): walks the batch in order, adding its column into
    the rows of the entries it owns (u % split == part): sums in batch order."""
    g = cuda.grid(1)
    dmax = grad_buf.shape[1]
    if g >= n_tables * split * dmax:
        return
    j = g % dmax
    item = g // dmax
    t = item // split
    part = item - t * split
    if table_group[t] != group or j >= table_chunks[t] * c:
        return
    weighted = weights.shape[0] > 0
    for f in range(feature_table.shape[0]):
        if feature_table[f] != t:
            continue
        col = feature_col[f] + j
        for b in range(B):
            bag = f * B + b
            lo = offsets[bag]
            hi = offsets[bag + 1]
            for i in range(lo, hi):
                u = which[i]
                if u < 0 or u % split != part:
                    continue
                x = grad_out[b, col]
                if weighted:
                    grad_buf[u, j] += weights[i] * x
                elif mean:
                    grad_buf[u, j] += x * (np.float32(1.0) / np.float32(hi - lo))
                else:
                    grad_buf[u, j] += x


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
    dmax = grad_buf.shape[1]
    # enough independent columns to fill the device; the sum order stays the batch order
    split = max(1, (1 << 16) // max(n_tables * dmax, 1)) if not SIMULATED else 1
    _accumulate_kernel[_grid(n_tables * split * dmax)](
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
    )


@cuda.jit(cache=True)
def _zero_rows_kernel(a, n):
    g = cuda.grid(1)
    if g < n * a.shape[1]:
        a[g // a.shape[1], g % a.shape[1]] = 0.0


def zero_rows(a, n):
    if n:
        _zero_rows_kernel[_grid(n * a.shape[1])](a, n)


@cuda.jit(cache=True)
def _nonfinite_rows_kernel(a, n, bad):
    i = cuda.grid(1)
    if i < n:
        ss = np.float32(0.0)
        for j in range(a.shape[1]):
            ss += a[i, j] * a[i, j]  # NaN or inf in, or a square past float32: ss is not finite
        if not math.isfinite(ss):
            cuda.atomic.add(bad, 0, 1)


def count_nonfinite_rows(a, n):
    bad = _zeros(1, np.int64)
    if n:
        _nonfinite_rows_kernel[_grid(n)](a, n, bad)
    return _scalar(bad)


@cuda.jit(cache=True)
def _empty_bags_kernel(offsets, B, feature_col, feature_table, table_dim, grad_out, bad):
    bag = cuda.grid(1)
    if bag >= offsets.shape[0] - 1 or offsets[bag + 1] != offsets[bag]:
        return
    f = bag // B
    col = feature_col[f]
    for j in range(table_dim[feature_table[f]]):
        if not math.isfinite(grad_out[bag - f * B, col + j]):
            cuda.atomic.add(bad, 0, 1)
            return


def nonfinite_in_empty_bags(offsets, bags_per_feature, feature_col, feature_table, table_dim, grad_out):
    bad = _zeros(1, np.int64)
    if offsets.shape[0] > 1:
        _empty_bags_kernel[_grid(offsets.shape[0] - 1)](
            offsets, bags_per_feature, feature_col, feature_table, table_dim, grad_out, bad
        )
    return _scalar(bad)


@cuda.jit(cache=True)
def _apply_kernel(
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
    u = cuda.grid(1)
    if u >= uniq.shape[0]:
        return
    e = uniq[u]
    t = entry_table(e, row_base, seen, table_ids)
    if table_group[t] != group:
        return
    c = vectors.shape[1]
    K = table_chunks[t]
    accesses = np.float64(counts[u])
    kh = key_hash(t, entry_key(e, t, row_base, keys))
    if util_mode == UTIL_GRADIENT:
        for k in range(K):
            sq = 0.0
            for j in range(k * c, (k + 1) * c):
                sq += np.float64(grad_buf[u, j]) * np.float64(grad_buf[u, j])
            util[e, k] = util_round(
                util_load(util[e, k]) + np.float32(accesses * math.sqrt(sq) * growth), util_random16(kh, k, salt)
            )
    elif util_mode == UTIL_ACCESS:
        util[e, 0] = util_round(util_load(util[e, 0]) + np.float32(accesses * growth), util_random16(kh, 0, salt))
    else:
        sq = 0.0
        for j in range(K * c):
            sq += np.float64(grad_buf[u, j]) * np.float64(grad_buf[u, j])
        util[e, 0] = util_round(
            util_load(util[e, 0]) + np.float32(accesses * math.sqrt(sq) * growth), util_random16(kh, 0, salt)
        )
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
                vectors[s, j] = cuda.fma(neg_lr, grad_buf[u, base + j], vectors[s, j])
        elif opt == OPT_ADAGRAD:
            for j in range(c):
                gj = grad_buf[u, base + j]
                acc = opt_state[s, j] + gj * gj
                opt_state[s, j] = acc
                vectors[s, j] = cuda.fma(neg_lr, gj / (np.float32(math.sqrt(acc)) + eps), vectors[s, j])
        elif opt == OPT_ROWWISE_ADAGRAD:
            sq32 = np.float32(0.0)
            for j in range(c):
                sq32 += grad_buf[u, base + j] * grad_buf[u, base + j]
            acc = opt_state[s, 0] + sq32 / np.float32(c)
            opt_state[s, 0] = acc
            mult = neg_lr / (np.float32(math.sqrt(acc)) + eps)
            for j in range(c):
                vectors[s, j] = cuda.fma(mult, grad_buf[u, base + j], vectors[s, j])


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
    if uniq.shape[0]:
        _apply_kernel[_grid(uniq.shape[0])](
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
            np.uint64(salt),
        )


@cuda.jit(cache=True)
def _psw_kernel(
    entry_idx,
    bag_of_occ,
    B,
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
    i = cuda.grid(1)
    if i >= entry_idx.shape[0]:
        return
    e = entry_idx[i]
    if e < 0:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if table_group[t] != group:
        return
    bag = bag_of_occ[i]
    f = bag // B
    b = bag - f * B
    c = vectors.shape[1]
    acc = np.float32(0.0)
    for k in range(table_chunks[t]):
        s = addr[e, k]
        if s < 0:
            continue
        for j in range(c):
            acc += grad_out[b, feature_col[f] + k * c + j] * vectors[s, j]
    out[i] = acc


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
    if entry_idx.shape[0]:
        _psw_kernel[_grid(entry_idx.shape[0])](
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
        )


@cuda.jit(cache=True)
def _scale_kernel(util, factor):
    g = cuda.grid(1)
    if g < util.shape[0] * util.shape[1]:
        e = g // util.shape[1]
        k = g - e * util.shape[1]
        util[e, k] = util_nearest(np.float64(util_load(util[e, k])) * factor)


def scale_utilities(util, factor):
    _scale_kernel[_grid(util.shape[0] * util.shape[1])](util, factor)


# --------------------------------------------------------------------------- prune


@cuda.jit(cache=True)
def _sample_kernel(
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
    out,
    out_tables,
    counter,
):
    e = cuda.grid(1)
    if e >= util.shape[0]:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0 or table_group[t] != group:
        return
    if mix64(key_hash(t, entry_key(e, t, row_base, keys)) ^ salt) >= accept_below:
        return
    n = cuda.atomic.add(counter, 0, 1)
    if n >= out.shape[0]:
        return
    out_tables[n] = t
    for k in range(out.shape[1]):
        if k < table_chunks[t]:
            out[n, k] = util_of(util, e, k)
        else:
            out[n, k] = np.nan


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
    from .cpu import mix64 as host_mix64

    salt = host_mix64(np.uint64(seed) ^ host_mix64(np.uint64(round_id) + np.uint64(0x9E3779B97F4A7C15)))
    counter = _zeros(1, np.int64)
    _sample_kernel[_grid(util.shape[0])](
        row_base,
        seen,
        keys,
        table_ids,
        util,
        table_chunks,
        table_group,
        group,
        np.uint64(accept_below),
        np.uint64(salt),
        out,
        out_tables,
        counter,
    )
    return min(_scalar(counter), out.shape[0])


@cuda.jit(cache=True)
def _prune_count_kernel(row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, totals):
    e = cuda.grid(1)
    if e >= addr.shape[0]:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0 or table_group[t] != group:
        return
    for k in range(table_chunks[t]):
        u = util_of(util, e, k)
        resident = addr[e, k] >= 0
        if keeps(resident, u, thresholds[t, k]):
            cuda.atomic.add(totals, 0 if resident else 1, 1)
        elif resident:
            cuda.atomic.add(totals, 2, 1)


def prune_count(row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts):
    totals = _zeros(3, np.int64)
    _prune_count_kernel[_grid(addr.shape[0])](
        row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, totals
    )
    t = totals.copy_to_host()
    return int(t[0]), int(t[1]), int(t[2])


@cuda.jit(cache=True)
def _composites_kernel(
    row_base, seen, keys, table_ids, addr, util, table_chunks, table_group, group, thresholds, out, counter
):
    e = cuda.grid(1)
    if e >= addr.shape[0]:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0 or table_group[t] != group:
        return
    for k in range(table_chunks[t]):
        resident = addr[e, k] >= 0
        if keeps(resident, util_of(util, e, k), thresholds[t, k]):
            n = cuda.atomic.add(counter, 0, 1)
            bits = rank_bits(util, thresholds[t, k], e, k)
            out[n] = composite(bits, resident, t, entry_key(e, t, row_base, keys), k)


def prune_composites(
    row_base, seen, keys, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts, out
):
    counter = _zeros(1, np.int64)
    _composites_kernel[_grid(addr.shape[0])](
        row_base, seen, keys, table_ids, addr, util, table_chunks, table_group, group, thresholds, out, counter
    )
    return _scalar(counter)


@cuda.jit(cache=True)
def _select_kernel(
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
    ev_entries,
    ev_chunks,
    al_entries,
    al_chunks,
    al_rank,
    counters,
):
    e = cuda.grid(1)
    if e >= addr.shape[0]:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0 or table_group[t] != group:
        return
    for k in range(table_chunks[t]):
        u = util_of(util, e, k)
        resident = addr[e, k] >= 0
        keep = keeps(resident, u, thresholds[t, k])
        rank = np.uint64(0)
        if keep and (use_cutoff or (rank_allocations and not resident)):
            bits = rank_bits(util, thresholds[t, k], e, k)
            rank = composite(bits, resident, t, entry_key(e, t, row_base, keys), k)
            if use_cutoff and rank < cutoff:
                keep = False
        if resident and not keep:
            n = cuda.atomic.add(counters, 0, 1)
            ev_entries[n] = e
            ev_chunks[n] = k
        elif keep and not resident:
            n = cuda.atomic.add(counters, 1, 1)
            al_entries[n] = e
            al_chunks[n] = k
            al_rank[n] = rank


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
    counters = _zeros(2, np.int64)
    _select_kernel[_grid(addr.shape[0])](
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
        bool(use_cutoff),
        np.uint64(cutoff),
        bool(rank_allocations),
        ev_entries,
        ev_chunks,
        al_entries,
        al_chunks,
        al_rank,
        counters,
    )
    c = counters.copy_to_host()
    return int(c[0]), int(c[1])


def prune_lists(row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts):
    """(keep, candidates, drops, evictions, allocations) of a prune without a cutoff, as
    on the CPU: a counting pass, then the listing pass into arrays of those sizes."""
    keep, cand, drop = prune_count(
        row_base, seen, table_ids, addr, util, table_chunks, table_group, group, thresholds, block_counts
    )
    ev_e, ev_k = cuda.device_array(max(drop, 1), np.int64), cuda.device_array(max(drop, 1), np.int64)
    al_e, al_k = cuda.device_array(max(cand, 1), np.int64), cuda.device_array(max(cand, 1), np.int64)
    al_r = cuda.device_array(max(cand, 1), np.uint64)
    # the listing pass needs keys only for ranks, which it is not asked for
    prune_select(
        row_base,
        seen,
        _zeros(1, np.int64),
        table_ids,
        addr,
        util,
        table_chunks,
        table_group,
        group,
        thresholds,
        False,
        0,
        False,
        block_counts,
        ev_e,
        ev_k,
        al_e,
        al_k,
        al_r,
    )
    return keep, cand, drop, ev_e[:drop], ev_k[:drop], al_e[:cand], al_k[:cand]


@cuda.jit(cache=True)
def _allocation_ranks_kernel(row_base, seen, keys, table_ids, util, thresholds, al_entries, al_chunks, out):
    i = cuda.grid(1)
    if i >= al_entries.shape[0]:
        return
    e = al_entries[i]
    k = al_chunks[i]
    t = entry_table(e, row_base, seen, table_ids)
    out[i] = composite(rank_bits(util, thresholds[t, k], e, k), False, t, entry_key(e, t, row_base, keys), k)


def allocation_ranks(row_base, seen, keys, table_ids, util, thresholds, al_entries, al_chunks, out):
    if al_entries.shape[0]:
        _allocation_ranks_kernel[_grid(al_entries.shape[0])](
            row_base, seen, keys, table_ids, util, thresholds, al_entries, al_chunks, out
        )


@cuda.jit(cache=True)
def _dead_kernel(row_base, seen, table_ids, addr, util, floor, out, counter):
    e = cuda.grid(1)
    if e >= addr.shape[0] or entry_table(e, row_base, seen, table_ids) < 0:
        return
    for k in range(addr.shape[1]):
        if addr[e, k] >= 0:
            return
    for k in range(util.shape[1]):
        if util_load(util[e, k]) >= floor:
            return
    out[cuda.atomic.add(counter, 0, 1)] = e


def find_dead_entries(row_base, seen, table_ids, addr, util, floor, out):
    counter = _zeros(1, np.int64)
    _dead_kernel[_grid(addr.shape[0])](row_base, seen, table_ids, addr, util, np.float32(floor), out, counter)
    return _scalar(counter)


# --------------------------------------------------------------------------- cache mode, stats


@cuda.jit(cache=True)
def _missing_kernel(
    uniq, row_base, seen, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks, counter
):
    i = cuda.grid(1)
    if i >= uniq.shape[0]:
        return
    e = uniq[i]
    t = entry_table(e, row_base, seen, table_ids)
    if table_group[t] != group:
        return
    for k in range(table_chunks[t]):
        if addr[e, k] < 0:
            n = cuda.atomic.add(counter, 0, 1)
            out_entries[n] = e
            out_chunks[n] = k


def missing_chunks(uniq, row_base, seen, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks):
    counter = _zeros(1, np.int64)
    if uniq.shape[0]:
        _missing_kernel[_grid(uniq.shape[0])](
            uniq, row_base, seen, table_ids, addr, table_chunks, table_group, group, out_entries, out_chunks, counter
        )
    return _scalar(counter)


@cuda.jit(device=True, inline=True)
def chunk_at(addr, e, code):
    for k in range(addr.shape[1]):
        if addr[e, k] == code:
            return k
    return -1


@cuda.jit(cache=True)
def _pin_kernel(pinned, bits):
    i = cuda.grid(1)
    if i >= pinned.shape[0]:
        return
    e = pinned[i]
    if 0 <= e < bits.shape[0] * 32:
        cuda.atomic.or_(bits, e >> 5, np.uint32(1) << np.uint32(e & 31))


@cuda.jit(cache=True)
def _victim_flags_kernel(owner, addr, util, pinned_bits, threshold, start, flags):
    r = cuda.grid(1)
    S = owner.shape[0]
    if r >= S:
        return
    s = (start + r) % S
    flags[r] = 0
    e = owner[s]
    if e < 0:
        return
    k = chunk_at(addr, e, s)
    if util_of(util, e, k) >= threshold:
        return
    if (pinned_bits[e >> 5] >> np.uint32(e & 31)) & np.uint32(1):
        return
    flags[r] = 1


@cuda.jit(cache=True)
def _victim_take_kernel(owner, addr, start, flags, rank, limit, out_entries, out_chunks, last):
    r = cuda.grid(1)
    S = owner.shape[0]
    if r >= S or flags[r] == 0 or rank[r] > limit:
        return
    s = (start + r) % S
    e = owner[s]
    out_entries[rank[r] - 1] = e
    out_chunks[rank[r] - 1] = chunk_at(addr, e, s)
    cuda.atomic.max(last, 0, r)


def pick_victims(owner, addr, util, pinned, threshold, start, out_entries, out_chunks):
    """The first resident, unpinned chunks below threshold, scanning slots from start (as on the CPU);
    ``pinned`` holds entries in any order."""
    S = owner.shape[0]
    limit = out_entries.shape[0]
    bits = _zeros(addr.shape[0] // 32 + 1, np.uint32)
    if pinned.shape[0]:
        _pin_kernel[_grid(pinned.shape[0])](pinned, bits)
    flags = cuda.device_array(S, np.int64)
    _victim_flags_kernel[_grid(S)](owner, addr, util, bits, np.float32(threshold), int(start), flags)
    rank = inclusive_scan(flags, S)
    total = int(rank[S - 1 : S].copy_to_host()[0])
    last = _zeros(1, np.int64)
    _victim_take_kernel[_grid(S)](owner, addr, int(start), flags, rank, limit, out_entries, out_chunks, last)
    n = min(total, limit)
    nxt = (int(start) + _scalar(last) + 1) % S if n == limit else int(start)
    return n, nxt


@cuda.jit(cache=True)
def _slot_util_kernel(owner, addr, util, positions, out):
    i = cuda.grid(1)
    if i >= positions.shape[0]:
        return
    e = owner[positions[i]]
    if e < 0:
        out[i] = np.nan
    else:
        out[i] = util_of(util, e, chunk_at(addr, e, positions[i]))


def slot_utilities(owner, addr, util, positions, out):
    if positions.shape[0]:
        _slot_util_kernel[_grid(positions.shape[0])](owner, addr, util, positions, out)


@cuda.jit(cache=True)
def _count_kernel(row_base, seen, table_ids, addr, entries, resident, spilled):
    e = cuda.grid(1)
    if e >= addr.shape[0]:
        return
    t = entry_table(e, row_base, seen, table_ids)
    if t < 0:
        return
    cuda.atomic.add(entries, t, 1)
    for k in range(addr.shape[1]):
        a = addr[e, k]
        if a >= 0:
            cuda.atomic.add(resident, (t, k), 1)
        elif a <= -2:
            cuda.atomic.add(spilled, (t, k), 1)


def count_chunks(row_base, seen, table_ids, addr, n_tables, entries, resident, spilled):
    """Per-table counts into the given host arrays."""
    d_entries = cuda.to_device(np.zeros_like(entries))
    d_res = cuda.to_device(np.zeros_like(resident))
    d_sp = cuda.to_device(np.zeros_like(spilled))
    _count_kernel[_grid(addr.shape[0])](row_base, seen, table_ids, addr, d_entries, d_res, d_sp)
    entries += d_entries.copy_to_host()
    resident += d_res.copy_to_host()
    spilled += d_sp.copy_to_host()


# --------------------------------------------------------------------------- the backend


def is_device_array(a: Any) -> bool:
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return isinstance(a, FakeCUDAArray)
    return cuda.is_cuda_array(a)


def as_device(a: Any):
    """A device array over a torch CUDA tensor (no copy), a device array, or a copy of host data.

    The one place that bridges torch and numba: under the simulator there is no
    ``__cuda_array_interface__``, and a CPU tensor is copied in.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(a, torch.Tensor):
        if a.device.type == "cuda" and not SIMULATED:
            return cuda.as_cuda_array(a.detach().contiguous())
        return cuda.to_device(np.ascontiguousarray(a.detach().cpu().numpy()))
    if is_device_array(a):
        return a
    return cuda.to_device(np.ascontiguousarray(a))


class CudaBackend:
    """GPU memory and numba.cuda kernels."""

    name = "cuda"

    def __init__(self) -> None:
        if not cuda.is_available():
            from ..errors import ConfigError

            raise ConfigError("device='cuda' needs a CUDA GPU (or NUMBA_ENABLE_CUDASIM=1 for the simulator)")
        import sys

        self.k = sys.modules[__name__]

    def empty(self, shape: Any, dtype: Any):
        return cuda.device_array(shape, dtype)

    def full(self, shape: Any, value: Any, dtype: Any):
        a = cuda.device_array(shape, dtype)
        if a.size:
            fill(a, np.dtype(dtype).type(value))
        return a

    def to_host(self, a: Any) -> np.ndarray:
        return a.copy_to_host() if is_device_array(a) else np.asarray(a)

    def from_host(self, a: Any):
        return as_device(a)

    def persist(self, a: np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a))

    def copy(self, a):
        out = cuda.device_array(a.shape, a.dtype)
        out.copy_to_device(a)
        return out

    def as_input(self, a: Any):
        return as_device(a)

    def device_view(self, a: Any):
        """A device array over a (no copy) when a already lives on this GPU, else None.

        Torch CUDA tensors are made contiguous on the device; a tensor whose dtype
        numba cannot view (bfloat16, say) answers None and takes the host path.
        """
        if SIMULATED:
            return a if is_device_array(a) else None
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        if torch is not None and isinstance(a, torch.Tensor):
            if a.device.type != "cuda":
                return None
            try:
                return cuda.as_cuda_array(a.detach().contiguous())
            except (TypeError, ValueError, NotImplementedError):
                return None
        return a if is_device_array(a) else None

    def memory_bytes(self) -> int:
        """Total memory of the current GPU (the simulator, which reports none or infinity: the host's)."""
        from ..hostmem import host_memory_bytes

        try:
            total = float(cuda.current_context().get_memory_info().total)
        except (AttributeError, NotImplementedError, RuntimeError):
            return host_memory_bytes()
        return int(total) if np.isfinite(total) else host_memory_bytes()

    def synchronize(self) -> None:
        cuda.synchronize()

"""Moving chunk rows between a tier's files or staging map and a batch, in one pass each way.

A staged row is ``c`` vector floats then ``w`` optimizer-state floats; a batch keeps
them as two arrays. numpy's fancy indexing would copy the rows twice (a temporary,
then each half); these copy each float once. They are serial and release the GIL:
reads run on the prefetch thread while the training thread runs its own kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def scatter_rows(stage, slots, vectors, states):
    """stage[slots[i]] = vectors[i] ++ states[i]."""
    c = vectors.shape[1]
    for i in range(slots.shape[0]):
        s = slots[i]
        for j in range(c):
            stage[s, j] = vectors[i, j]
        for j in range(states.shape[1]):
            stage[s, c + j] = states[i, j]


@njit(cache=True, nogil=True)
def gather_rows(stage, slots, vectors, states):
    """vectors[i] ++ states[i] = stage[slots[i]]."""
    c = vectors.shape[1]
    for i in range(slots.shape[0]):
        s = slots[i]
        for j in range(c):
            vectors[i, j] = stage[s, j]
        for j in range(states.shape[1]):
            states[i, j] = stage[s, c + j]


@njit(cache=True, nogil=True)
def take_free_slots(free, block_free, block_rows, out):
    """Fill ``out`` with free slots, ascending, from the emptiest blocks: blocks are
    chosen by free count (most first, lower index first among equals) until they hold
    enough, then their free slots are taken in slot order. The slots become held.

    A counting sort over the free counts picks the blocks, so a call costs a pass over
    the blocks and the chosen blocks' rows, never a sort or a row index of the tier."""
    n = out.shape[0]
    nb = block_free.shape[0]
    counts = np.zeros(block_rows + 1, np.int64)
    for b in range(nb):
        counts[block_free[b]] += 1
    level = block_rows  # blocks with more free slots than this are all taken
    have = 0
    while level > 0 and have + counts[level] * level < n:
        have += counts[level] * level
        level -= 1
    at_level = (n - have + level - 1) // level if level > 0 else 0  # blocks taken at `level`
    got = 0
    for b in range(nb):
        if got == n:
            break
        c = block_free[b]
        if c < level or c == 0:
            continue
        if c == level:
            if at_level == 0:
                continue
            at_level -= 1
        lo = b * block_rows
        for s in range(lo, lo + block_rows):
            if free[s]:
                free[s] = False
                block_free[b] -= 1
                out[got] = s
                got += 1
                if got == n:
                    break
    return got


@njit(cache=True, nogil=True)
def release_slots(slots, free, quarantined, owner, block_free, block_rows, quarantine):
    """Slots back to the free space (or into quarantine): the index of the first slot out
    of range or not held, with nothing changed, or -1 when all were released.

    One pass that checks and writes each slot while its line is in cache; a bad slot
    (a bug in the caller) undoes the slots already written."""
    cap = free.shape[0]
    n = slots.shape[0]
    for i in range(n):
        s = slots[i]
        bad = s < 0 or s >= cap
        if not bad:
            bad = free[s] or quarantined[s]
        if bad:
            for j in range(i):  # undo: none of them was free or quarantined before
                u = slots[j]
                if quarantine:
                    quarantined[u] = False
                else:
                    free[u] = False
                    block_free[u // block_rows] -= 1
            return i
        if quarantine:
            quarantined[s] = True
        else:
            free[s] = True
            block_free[s // block_rows] += 1
    # owners last: an undo would have had to restore them
    for i in range(n):
        owner[slots[i]] = -1
    return -1


@njit(cache=True, nogil=True)
def end_quarantine(slots, free, quarantined, block_free, block_rows):
    """Quarantined slots into the free space."""
    for i in range(slots.shape[0]):
        s = slots[i]
        quarantined[s] = False
        free[s] = True
        block_free[s // block_rows] += 1


def sorted_unique(a):
    """np.unique of an ascending array, without its sort."""
    if a.shape[0] == 0:
        return a
    keep = np.empty(a.shape[0], bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


# ----------------------------------------------------------------------------- the segment tier's rows
# Checksums are crc32c (Castagnoli), the one Zarr's ``crc32c`` codec writes; a segment's
# inner chunk is G rows of bytes followed by the crc32c of them.
def _crc_table() -> np.ndarray:
    poly = np.uint32(0x82F63B78)  # Castagnoli, reflected
    table = np.zeros((8, 256), np.uint32)
    for i in range(256):
        c = np.uint32(i)
        for _ in range(8):
            c = (c >> np.uint32(1)) ^ poly if c & np.uint32(1) else c >> np.uint32(1)
        table[0, i] = c
    for i in range(256):
        c = table[0, i]
        for k in range(1, 8):
            c = table[0, c & np.uint32(0xFF)] ^ (c >> np.uint32(8))
            table[k, i] = c
    return table


CRC_TABLE = _crc_table()


@njit(cache=True, nogil=True)
def _crc32c_range(table, buf, start, length):
    crc = np.uint32(0xFFFFFFFF)
    i = start
    end = start + length
    while i + 8 <= end:  # slicing by 8
        lo = (
            np.uint32(buf[i])
            | (np.uint32(buf[i + 1]) << np.uint32(8))
            | (np.uint32(buf[i + 2]) << np.uint32(16))
            | (np.uint32(buf[i + 3]) << np.uint32(24))
        ) ^ crc
        crc = (
            table[7, lo & np.uint32(0xFF)]
            ^ table[6, (lo >> np.uint32(8)) & np.uint32(0xFF)]
            ^ table[5, (lo >> np.uint32(16)) & np.uint32(0xFF)]
            ^ table[4, lo >> np.uint32(24)]
            ^ table[3, buf[i + 4]]
            ^ table[2, buf[i + 5]]
            ^ table[1, buf[i + 6]]
            ^ table[0, buf[i + 7]]
        )
        i += 8
    while i < end:
        crc = table[0, (crc ^ np.uint32(buf[i])) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
        i += 1
    return crc ^ np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _crc32c_many(table, buf, starts, lengths, out):
    for j in range(starts.shape[0]):
        out[j] = _crc32c_range(table, buf, starts[j], lengths[j])


def crc32c(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint32[n]: the crc32c of ``buf[starts[j] : starts[j] + lengths[j]]`` for each j."""
    out = np.empty(len(starts), np.uint32)
    _crc32c_many(CRC_TABLE, buf, np.asarray(starts, np.int64), np.asarray(lengths, np.int64), out)
    return out


@njit(cache=True, nogil=True)
def place_rows(table, buf, base, rows, first, g, inner_bytes):
    """Write byte rows (uint8[n, rec]) as slots ``first, first + 1, ...`` of a segment whose
    inner chunk j starts at byte ``j * inner_bytes - base`` of ``buf``; each inner chunk
    that the rows complete gets its crc32c after it. Returns the end of what was written
    in ``buf``."""
    rec = rows.shape[1]
    end = 0
    for i in range(rows.shape[0]):
        p = first + i
        j = p // g
        at = j * inner_bytes - base + (p - j * g) * rec
        for b in range(rec):
            buf[at + b] = rows[i, b]
        end = at + rec
        if (p + 1) % g == 0:
            lo = j * inner_bytes - base
            crc = _crc32c_range(table, buf, lo, g * rec)
            for b in range(4):
                buf[end + b] = np.uint8((crc >> np.uint32(8 * b)) & np.uint32(0xFF))
            end += 4
    return end


@njit(cache=True, nogil=True)
def check_inner_chunks(table, buf, starts, body, bad):
    """Each inner chunk at ``buf[starts[j]:]`` against its stored crc32c: the index of the
    first that fails (its stored and computed sums in ``bad``), or -1."""
    for j in range(starts.shape[0]):
        s = starts[j]
        stored = (
            np.uint32(buf[s + body])
            | (np.uint32(buf[s + body + 1]) << np.uint32(8))
            | (np.uint32(buf[s + body + 2]) << np.uint32(16))
            | (np.uint32(buf[s + body + 3]) << np.uint32(24))
        )
        computed = _crc32c_range(table, buf, s, body)
        if stored != computed:
            bad[0] = stored
            bad[1] = computed
            return j
    return -1


@njit(cache=True, nogil=True)
def copy_rows(buf, src, take, out):
    """out[i] = the row of bytes at src[i] of buf, for each i with take[i]."""
    rec = out.shape[1]
    for i in range(src.shape[0]):
        if take[i]:
            s = src[i]
            for b in range(rec):
                out[i, b] = buf[s + b]

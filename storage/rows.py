"""Moving chunk rows between a tier's staging map and a batch, in one pass each way.

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

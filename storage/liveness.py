"""Which slots of a segment tier hold a live chunk: one flat bitmap over every slot
number and a count per segment, changed by kernels that check a whole request first.

A cache-mode step releases and allocates thousands of tier slots; done per segment with
numpy masks and ``ufunc.at`` that was about 4 ms of a 40 ms step. Each kernel here is one
pass over the request (a second one only to undo a refused change).

Shapes: ``bits`` uint8[ceil(capacity / 8)] (bit ``s & 7`` of byte ``s >> 3`` is slot
``s``); ``live`` int64[segment ids], the live slots of each segment; ``slots`` int64[n].
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def first_outside(slots, allocated, segment_slots):
    """Index of the first slot that its segment never handed out (``allocated[i]``: slots
    handed out by segment i, 0 for one the tier does not have), or -1."""
    n_ids = allocated.shape[0]
    for i in range(slots.shape[0]):
        s = slots[i]
        if s < 0:
            return i
        seg = s // segment_slots
        if seg >= n_ids or s - seg * segment_slots >= allocated[seg]:
            return i
    return -1


@njit(cache=True, nogil=True)
def free_mask(bits, slots):
    """bool[n]: whether each slot holds nothing live (a slot past the bitmap holds nothing)."""
    out = np.empty(slots.shape[0], np.bool_)
    limit = bits.shape[0] * 8
    for i in range(slots.shape[0]):
        s = slots[i]
        out[i] = s < 0 or s >= limit or (bits[s >> 3] >> (s & 7)) & 1 == 0
    return out


@njit(inline="always")
def _set(bits, live, s, segment_slots, on):
    if on:
        bits[s >> 3] |= np.uint8(1 << (s & 7))
        live[s // segment_slots] += 1
    else:
        bits[s >> 3] &= np.uint8(~(1 << (s & 7)) & 0xFF)
        live[s // segment_slots] -= 1


@njit(cache=True, nogil=True)
def mark(bits, live, slots, segment_slots, on):
    """Mark every slot live (``on``) or dead. Returns -1, or the index of the first slot
    already in that state (a repeated slot counts too), with nothing changed."""
    for i in range(slots.shape[0]):
        s = slots[i]
        if ((bits[s >> 3] >> (s & 7)) & 1 == 1) == on:
            for j in range(i):  # put back what this call changed
                _set(bits, live, slots[j], segment_slots, not on)
            return i
        _set(bits, live, s, segment_slots, on)
    return -1


def grown(bits: np.ndarray, live: np.ndarray, capacity: int, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """The bitmap and counts extended (with nothing live) to ``capacity`` slots and ``n_ids`` segments."""
    nbytes = (int(capacity) + 7) // 8
    if bits.shape[0] < nbytes:
        bits = np.concatenate([bits, np.zeros(nbytes - bits.shape[0], np.uint8)])
    if live.shape[0] < n_ids:
        live = np.concatenate([live, np.zeros(n_ids - live.shape[0], np.int64)])
    return bits, live

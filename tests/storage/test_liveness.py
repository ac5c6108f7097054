"""The segment tier's live-slot kernels against a set of live slots."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store.storage import liveness

S = 16  # slots per segment
IDS = 4


def fresh():
    return liveness.grown(np.zeros(0, np.uint8), np.zeros(0, np.int64), IDS * S, IDS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, IDS * S - 1), max_size=12)), max_size=20))
def test_mark_and_release_follow_a_set_and_a_refusal_changes_nothing(requests):
    bits, live = fresh()
    model: set[int] = set()
    for on, slots in requests:
        arr = np.array(slots, np.int64)
        before = (bits.copy(), live.copy())
        i = liveness.mark(bits, live, arr, S, on)
        # refused exactly when some slot is already in the asked state or given twice
        seen: set[int] = set()
        expect = -1
        for j, s in enumerate(slots):
            if (s in model) == on or s in seen:
                expect = j
                break
            seen.add(s)
        assert i == expect
        if i >= 0:
            assert np.array_equal(bits, before[0]) and np.array_equal(live, before[1])
        else:
            model = model | set(slots) if on else model - set(slots)
        every = np.arange(IDS * S, dtype=np.int64)
        assert set(every[~liveness.free_mask(bits, every)].tolist()) == model
        assert live.tolist() == [sum(1 for s in model if s // S == g) for g in range(IDS)]


def test_free_mask_counts_slots_past_the_bitmap_and_negative_ones_as_free():
    bits, live = fresh()
    assert liveness.mark(bits, live, np.arange(IDS * S, dtype=np.int64), S, True) == -1
    assert liveness.free_mask(bits, np.array([-1, 0, IDS * S, IDS * S + 9], np.int64)).tolist() == [
        True,
        False,
        True,
        True,
    ]


def test_first_outside_names_a_slot_its_segment_never_handed_out():
    allocated = np.array([16, 3, 0], np.int64)
    assert liveness.first_outside(np.array([0, 15, 16, 18], np.int64), allocated, S) == -1
    assert liveness.first_outside(np.array([0, 19], np.int64), allocated, S) == 1  # segment 1 gave 3
    assert liveness.first_outside(np.array([32], np.int64), allocated, S) == 0  # segment 2 gave none
    assert liveness.first_outside(np.array([48], np.int64), allocated, S) == 0  # no segment 3
    assert liveness.first_outside(np.array([-1], np.int64), allocated, S) == 0


def test_growing_keeps_what_is_live():
    bits, live = fresh()
    liveness.mark(bits, live, np.array([1, 17, 63], np.int64), S, True)
    bits2, live2 = liveness.grown(bits, live, 8 * S, 8)
    every = np.arange(8 * S, dtype=np.int64)
    assert every[~liveness.free_mask(bits2, every)].tolist() == [1, 17, 63]
    assert live2.tolist() == [1, 1, 0, 1, 0, 0, 0, 0]

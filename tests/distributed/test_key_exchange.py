"""The forward's key exchange against the plain one (counts, then keys), in a world of
threads: every rank's keys must reach their owners in rank order, whether they fit in
the agreed capacity or spill into the second exchange, and every rank must agree on
the capacity and on a refusal."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store.distributed.exchange import KeyExchange, starts_of


class ThreadWorld:
    """all_to_all among W threads: each deposits its send, all meet, each takes its rows."""

    def __init__(self, world: int):
        self.world = world
        self.boxes: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=20)  # a rank left waiting fails, not hangs
        self.calls = 0


class ThreadExchange:
    def __init__(self, shared: ThreadWorld, rank: int):
        self.shared, self.rank, self.world = shared, rank, shared.world
        self.collectives = 0

    def all_to_all(self, send, send_counts, recv_counts):
        self.collectives += 1
        sh = self.shared
        sh.boxes[self.rank] = (send, starts_of(send_counts), np.asarray(send_counts))
        sh.barrier.wait()
        parts = []
        for src in range(self.world):
            s_send, s_starts, s_counts = sh.boxes[src]
            assert s_send.shape[1:] == send.shape[1:], "ranks took different collectives"
            parts.append(s_send[s_starts[self.rank] : s_starts[self.rank] + s_counts[self.rank]])
        got = np.concatenate(parts)
        assert got.shape[0] == int(np.sum(recv_counts)), "a receiver's sizes disagree with the senders'"
        sh.barrier.wait()  # nobody refills a box before everyone has read it
        return got


def run_world(world: int, steps: list[list[tuple[np.ndarray, np.ndarray, bool]]]):
    """steps[i][r]: rank r's (keys, send_counts, refused) at step i; returns per rank, per
    step, (received keys, received counts, refused ranks, collectives, capacity after)."""
    shared = ThreadWorld(world)
    results: list[list] = [[] for _ in range(world)]
    errors: list = []

    def rank_main(r):
        try:
            ex, keys_ex = ThreadExchange(shared, r), KeyExchange()
            for step in steps:
                keys, counts, refused = step[r]
                before = ex.collectives
                got, recv_counts, refused_by = keys_ex.exchange(ex, keys, counts, refused)
                results[r].append((got, recv_counts, refused_by, ex.collectives - before, keys_ex.capacity))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            shared.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@settings(max_examples=60, deadline=None)
@given(data=st.data(), world=st.integers(1, 4), n_steps=st.integers(1, 5))
def test_keys_reach_their_owners_in_rank_order_whether_or_not_they_fit(data, world, n_steps):
    steps = []
    for _ in range(n_steps):
        step = []
        for r in range(world):
            counts = np.array(data.draw(st.lists(st.integers(0, 12), min_size=world, max_size=world)), np.int64)
            n = int(counts.sum())
            keys = np.stack([np.full(n, r, np.int64), np.arange(n, dtype=np.int64) + 1000 * r], axis=1)
            step.append((keys, counts, False))
        refuser = data.draw(st.integers(-1, world - 1))
        if refuser >= 0 and data.draw(st.booleans()):
            k, c, _ = step[refuser]
            step[refuser] = (np.empty((0, 2), np.int64), np.zeros(world, np.int64), True)
        steps.append(step)
    results = run_world(world, steps)
    for i, step in enumerate(steps):
        refused = np.array([step[r][2] for r in range(world)])
        for r in range(world):
            got, recv_counts, refused_by, collectives, capacity = results[r][i]
            # every rank agrees on the refusal and on the next capacity
            np.testing.assert_array_equal(refused_by, np.flatnonzero(refused))
            assert capacity == results[0][i][4]
            if refused.any():
                continue
            want = [step[src][0][starts_of(step[src][1])[r] :][: step[src][1][r]] for src in range(world)]
            np.testing.assert_array_equal(recv_counts, [step[src][1][r] for src in range(world)])
            np.testing.assert_array_equal(got.reshape(-1, 2), np.concatenate(want).reshape(-1, 2))
            # one collective when every load fitted the capacity agreed at the step before
            cap_before = results[r][i - 1][4] if i else 0
            most = max(int(step[src][1].max()) for src in range(world))
            assert collectives == (1 if most <= cap_before else 2)


def test_a_steady_batch_takes_one_collective_after_the_first():
    counts = np.array([5, 7, 6], np.int64)
    keys = np.stack([np.zeros(18, np.int64), np.arange(18, dtype=np.int64)], axis=1)
    steps = [[(keys, counts, False)] * 3 for _ in range(4)]
    results = run_world(3, steps)
    assert [res[3] for res in results[0]] == [2, 1, 1, 1]
    assert results[0][0][4] == 7 + 7 // 8

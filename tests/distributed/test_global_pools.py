"""The store-wide decisions of a sharded store's pools (global_pools), in a world of threads."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store.distributed.global_pools import pack_key_places, places_of, select_largest, tables_of
from fiited_store.placement import local_cutoff
from tests.distributed.test_key_exchange import ThreadExchange, ThreadWorld


class SummingExchange(ThreadExchange):
    """all_reduce(SUM) among the threads of a ThreadWorld."""

    def sum(self, values):
        sh = self.shared
        sh.boxes[self.rank] = np.asarray(values)
        sh.barrier.wait()
        total = np.sum([sh.boxes[r] for r in range(self.world)], axis=0)
        sh.barrier.wait()
        return total


def _in_threads(world: int, fn):
    shared = ThreadWorld(world)
    out, errors = [None] * world, []

    def run(rank):
        try:
            out[rank] = fn(SummingExchange(shared, rank), rank)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            shared.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ranks as the prune makes them: mostly distinct, some equal, spread over all 64 bits
rank_values = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 40), st.sampled_from([2**63, 2**48 + 5, 2**64 - 1]))


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.lists(rank_values, max_size=30), min_size=1, max_size=4), data=st.data())
def test_select_largest_is_the_kth_largest_of_every_rank_together(parts, data):
    allv = np.array([v for p in parts for v in p], np.uint64)
    if allv.size == 0:
        return
    k = data.draw(st.integers(1, allv.size))
    got = _in_threads(len(parts), lambda ex, r: select_largest(ex, np.array(parts[r], np.uint64), k))
    want = local_cutoff(allv, k)  # what one store's prune cuts at
    assert all(g == want for g in got), (got, want)
    assert np.count_nonzero(allv >= want) >= k > np.count_nonzero(allv > want)


@given(
    st.lists(st.tuples(st.integers(0, 2**15 - 1), st.integers(0, 2**16 - 2)), min_size=1, max_size=40),
    st.integers(0, 7),
)
def test_key_places_sort_as_feature_then_rank_then_position(keys, source):
    tables = np.array([t for t, _ in keys], np.int16)
    features = np.array(sorted(f for _, f in keys), np.int64)  # a rank's distinct keys: features ascending
    packed = pack_key_places(tables, features)
    np.testing.assert_array_equal(tables_of(packed), tables)
    places = places_of(packed, np.full(len(keys), source))
    assert (np.diff(places) > 0).all()
    # a key of an earlier feature comes first whatever its rank; within a feature, the lower rank
    other = places_of(pack_key_places(tables[:1], features[:1] + 1), np.zeros(1))
    assert other[0] > places[0]
    later_rank = places_of(pack_key_places(tables[:1], features[:1]), np.full(1, source + 1))
    assert places[0] < later_rank[0] < other[0]

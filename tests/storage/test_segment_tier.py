"""The disk tier as a log of sealed Zarr shards: the common tier tests, then what a log promises."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import zarr
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from fiited_store import CorruptStoreError, StorageFullError
from fiited_store.errors import InputShapeError
from fiited_store.storage import SegmentTier
from tests.storage.test_tiers import ChunkTierTests, DictModelRules, file_size_limit

SEGMENT = 250  # slots asked per segment: the tier rounds it to whole inner chunks (3 of 102 slots here)


class TestSegmentTier(ChunkTierTests):
    def make(self, tmp_path, capacity: int = 0):
        return SegmentTier(tmp_path / "tier", self.C, self.W, segment_slots=SEGMENT)

    def written(self, tmp_path, rng, n):
        tier = self.make(tmp_path)
        slots = tier.allocate(n)
        vec, st_ = self.rows(rng, n)
        tier.write(slots, vec, st_)
        return tier, slots, vec, st_

    def reopened(self, tier, live):
        desc = tier.describe()
        tier.close()
        again = SegmentTier.open(tier.root, desc["segments"])
        again.mark_live(live)
        return again

    def test_a_released_slot_is_never_handed_out_again(self, tmp_path):
        tier = self.make(tmp_path)
        slots = tier.allocate(50)
        tier.release(slots[:10])
        again = tier.allocate(10)
        assert np.intersect1d(again, slots).size == 0 and again.min() > slots.max()
        tier.close()

    def test_rows_out_of_allocation_order_are_refused(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(10)
        with pytest.raises(InputShapeError, match=r"in the order they were handed out .* got segment 0 slot 5"):
            tier.write(slots[5:], *self.rows(rng, 5))
        tier.write(slots, *self.rows(rng, 10))  # nothing was appended: the right order still works
        tier.close()

    def test_sealed_segments_reopen_from_their_description(self, tmp_path, rng):
        tier, slots, vec, st_ = self.written(tmp_path, rng, 5 * tier_slots(self) + 7)
        tier.release(slots[:20])
        tier.seal()
        assert all(s["sealed"] for s in tier.segments())
        again = self.reopened(tier, slots[20:])
        assert again.n_used == slots.size - 20
        np.testing.assert_array_equal(again.read(slots[20:])[0], vec[20:])
        np.testing.assert_array_equal(again.read(slots[20:])[1], st_[20:])
        assert all(again.check_segment(s["id"]) == [] for s in again.segments())
        more = again.allocate(5)  # appends after what was sealed, in a new segment
        assert np.intersect1d(more, slots).size == 0
        again.write(more, *self.rows(rng, 5))
        again.close()

    def test_the_segment_files_are_plain_zarr(self, tmp_path, rng):
        tier, slots, vec, st_ = self.written(tmp_path, rng, 3 * tier_slots(self))
        tier.seal()
        arr = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "tier"), read_only=True), path="chunks", mode="r")
        rows = arr[: slots.max() + 1]
        np.testing.assert_array_equal(rows[slots, : self.C], vec)
        np.testing.assert_array_equal(rows[slots, self.C :], st_)
        tier.close()

    @pytest.mark.parametrize("damage", ["missing", "truncated"])
    def test_a_missing_or_truncated_segment_is_named_on_open(self, tmp_path, rng, damage):
        tier, slots, _, _ = self.written(tmp_path, rng, 2 * tier_slots(self))
        tier.seal()
        desc = tier.describe()
        tier.close()
        f = tmp_path / "tier" / "chunks" / "c" / "1" / "0"
        if damage == "missing":
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[:100])
        match = "chunks/c/1/0 is missing" if damage == "missing" else r"chunks/c/1/0 has 100 bytes, expected \d+"
        with pytest.raises(CorruptStoreError, match=match):
            SegmentTier.open(tmp_path / "tier", desc["segments"])

    def test_a_corrupt_inner_chunk_is_named_by_read_background_read_and_check(self, tmp_path, rng):
        tier, slots, vec, _ = self.written(tmp_path, rng, 2 * tier_slots(self))
        tier.seal()
        f = tmp_path / "tier" / "chunks" / "c" / "0" / "0"
        raw = bytearray(f.read_bytes())
        raw[tier.inner_bytes + 9] ^= 0x01  # inner chunk 1 of segment 0
        f.write_bytes(bytes(raw))
        again = self.reopened(tier, slots)
        bad = slots[again.group : again.group + 1]
        with pytest.raises(CorruptStoreError, match=r"inner chunk 1 of segment file \S+/c/0/0 fails its checksum"):
            again.read(bad)
        fut, mark = again.read_async(bad)
        with pytest.raises(CorruptStoreError, match="fails its checksum"):
            fut.result(timeout=30)
        again.end_read(mark)
        np.testing.assert_array_equal(again.read(slots[:1])[0], vec[:1])  # inner chunk 0 is whole
        assert any("inner chunk 1" in p for p in again.check_segment(0))
        assert again.check_segment(1) == []
        again.close()

    def test_a_full_device_is_refused_at_allocate_and_changes_nothing(self, tmp_path, rng):
        tier, slots, vec, _ = self.written(tmp_path, rng, 10)
        # (the array's shape may have grown to cover the new id: a number, no data)
        before = (tier.n_used, tier.n_used * tier.record, tier.segments())
        with file_size_limit(4096):  # the kernel refuses to reserve a new segment's file: EFBIG
            with pytest.raises(StorageFullError, match="reserving segment"):
                tier.allocate(3 * tier_slots(self))
        assert (tier.n_used, tier.live_bytes, tier.segments()) == before
        assert not [p for p in (tmp_path / "tier").rglob("0.partial") if p.parent.name != "0"]
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        more = tier.allocate(3 * tier_slots(self))  # with room again it goes on
        tier.write(more, *self.rows(rng, more.size))
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        tier.close()

    def test_a_segment_is_dropped_only_once_empty_and_its_id_is_reused(self, tmp_path, rng):
        tier, slots, _, _ = self.written(tmp_path, rng, 3 * tier_slots(self))
        tier.seal()
        s = tier_slots(self)
        with pytest.raises(InputShapeError, match=rf"segment 1 still holds {s} live slots"):
            tier.drop_segments([1])
        tier.release(slots[s : 2 * s - 1])
        tier.release(slots[:3])
        assert tier.compaction_candidates(max_live=1.0)[:2] == [1, 0]  # emptiest first
        assert tier.compaction_candidates(max_live=0.5) == [1]
        tier.release(slots[2 * s - 1 : 2 * s])
        tier.drop_segments([1])
        assert not (tmp_path / "tier" / "chunks" / "c" / "1" / "0").exists()
        assert 1 not in [x["id"] for x in tier.segments()]
        nxt = tier.allocate(2)
        assert np.all(nxt // s == 1)  # the id comes back for the next segment
        tier.close()

    def test_an_allocation_running_into_a_reused_lower_segment_id_is_written_in_order(self, tmp_path, rng):
        # found by the crash tests: segment ids need not ascend within one allocation
        s = tier_slots(self)
        tier, first, _, _ = self.written(tmp_path, rng, s)  # segment 0, full: sealed
        part = tier.allocate(s // 2)  # segment 1, half handed out
        tier.write(part, *self.rows(rng, part.size))
        tier.release(first)
        tier.drop_segments([0])
        slots = tier.allocate(s)  # the rest of segment 1, then segment 0 again
        assert slots[0] // s == 1 and slots[-1] // s == 0
        vec, st_ = self.rows(rng, s)
        tier.write_async(slots, vec, st_)
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        np.testing.assert_array_equal(tier.read(slots)[1], st_)
        tier.close()

    def test_a_seal_refuses_slots_that_were_handed_out_and_never_written(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(12)
        tier.write(slots[:4], *self.rows(rng, 4))
        with pytest.raises(InputShapeError, match="8 allocated slots of segment 0 were never written"):
            tier.seal()
        tier.write(slots[4:], *self.rows(rng, 8))
        tier.seal()
        tier.close()

    def test_the_page_cache_holds_whole_segments_up_to_its_bound(self, tmp_path, rng):
        from fiited_store.storage.io import round_up

        probe = self.make(tmp_path / "probe")
        per = probe.data_bytes + round_up(probe.index_bytes)  # one segment's file
        probe.close()
        s = tier_slots(self)
        tier = SegmentTier(tmp_path / "tier", self.C, self.W, segment_slots=SEGMENT, page_cache_bytes=2 * per + 1)
        slots = tier.allocate(5 * s)
        vec, st_ = self.rows(rng, slots.size)
        tier.write(slots, vec, st_)
        assert tier.page_cached_bytes == 2 * per  # two of five segments admitted, no part of a third
        tier.seal()
        np.testing.assert_array_equal(tier.read(slots)[0], vec)  # both kinds read back the same
        np.testing.assert_array_equal(tier.read(slots[::7])[1], st_[::7])
        tier.release(slots[:s])
        tier.drop_segments([0])  # an admitted segment goes: its share comes back
        assert tier.page_cached_bytes == per
        more = tier.allocate(s)  # and the next segment takes it
        tier.write(more, *self.rows(rng, s))
        assert tier.page_cached_bytes == 2 * per
        desc = tier.describe()
        tier.close()
        again = SegmentTier.open(tier.root, desc["segments"], page_cache_bytes=per)
        again.mark_live(np.concatenate([slots[s:], more]))
        assert again.page_cached_bytes == per
        np.testing.assert_array_equal(again.read(slots[s:])[0], vec[s:])
        again.close()

    def test_a_tier_keeps_the_inner_chunk_size_it_was_made_with(self, tmp_path, rng, monkeypatch):
        from fiited_store.storage import segment_tier

        monkeypatch.setattr(segment_tier, "INNER_BYTES", 4 * segment_tier.INNER_BYTES)
        tier, slots, vec, _ = self.written(tmp_path, rng, 3 * SEGMENT)
        group = tier.group
        tier.seal()
        desc = tier.describe()
        tier.close()
        monkeypatch.undo()
        again = SegmentTier.open(tmp_path / "tier", desc["segments"])
        again.mark_live(slots)
        assert again.group == group != segment_tier.layout(self.C, self.W)[0]
        np.testing.assert_array_equal(again.read(slots)[0], vec)
        again.close()

    def test_reserved_space_makes_the_allocations_after_it_certain_and_a_seal_gives_it_back(
        self, tmp_path, rng, monkeypatch
    ):
        s = tier_slots(self)
        tier = self.make(tmp_path)
        first = tier.allocate(s // 2)
        tier.write(first, *self.rows(rng, first.size))
        tier.reserve(3 * s)  # the rest of segment 0, then three more set aside
        files = sorted((tmp_path / "tier" / "chunks" / "c").rglob("*"))

        def full(*args, **kwargs):
            raise AssertionError("a segment was started after the reservation")

        monkeypatch.setattr(SegmentTier, "_new_segment", full)
        more = tier.allocate(3 * s)  # crosses into the reserved segments only
        vec, st_ = self.rows(rng, more.size)
        tier.write(more, vec, st_)
        np.testing.assert_array_equal(tier.read(more)[0], vec)
        monkeypatch.undo()
        tier.reserve(2 * s)
        tier.seal()  # the reservation not handed out goes: no empty file in what a checkpoint links
        sealed = {p.name for p in (tmp_path / "tier" / "chunks" / "c").rglob("*") if p.is_file()}
        assert not any(n.endswith(".partial") for n in sealed), sealed
        assert sum(p.name == "0.partial" for p in files) >= 4  # the open segment and three set aside
        tier.close()


def tier_slots(tests: TestSegmentTier) -> int:
    """Slots per segment the tier's layout gives the tests' row width."""
    from fiited_store.storage.segment_tier import layout

    return layout(tests.C, tests.W, SEGMENT)[1]


class SegmentTierVsModel(DictModelRules):
    """Random allocate+write / release / read / seal / drop empty segments / reopen against a dict."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        # a third of the segments go through the page cache, the rest around it
        self.cache = 2 * (SegmentTier(f"{self.dir}/probe", self.C, self.W, segment_slots=40).data_bytes + 4096)
        self.tier = SegmentTier(f"{self.dir}/t", self.C, self.W, segment_slots=40, page_cache_bytes=self.cache)
        self.model: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def teardown(self):
        self.tier.close()

    @rule(n=st.integers(1, 130), seed=st.integers(0, 2**16), background=st.booleans())
    def allocate_and_write(self, n, seed, background):
        slots = self.tier.allocate(n)
        assert np.unique(slots).size == n and not set(slots.tolist()) & set(self.model)
        vec, sts = self.rows(seed, n, self.C), self.rows(seed + 1, n, self.W)
        (self.tier.write_async if background else self.tier.write)(slots, vec, sts)
        for s, v, t in zip(slots.tolist(), vec, sts):
            self.model[s] = (v, t)

    @rule()
    def seal(self):
        self.tier.seal()

    @rule()
    def drop_empty_segments(self):
        empty = [s["id"] for s in self.tier.segments() if s["sealed"] and s["live"] == 0]
        self.tier.drop_segments(empty)

    @rule()
    def reopen(self):
        self.tier.seal()
        desc = self.tier.describe()
        self.tier.close()
        self.tier = SegmentTier.open(f"{self.dir}/t", desc["segments"], page_cache_bytes=self.cache)
        self.tier.mark_live(np.array(sorted(self.model), np.int64))

    @invariant()
    def counts_agree(self):
        assert self.tier.n_used == len(self.model)
        assert self.tier.page_cached_bytes <= self.cache
        live = np.array(sorted(self.model), np.int64)
        assert not self.tier.is_free(live).any()


TestSegmentTierVsModel = SegmentTierVsModel.TestCase
TestSegmentTierVsModel.settings = settings(settings.default, max_examples=40, stateful_step_count=25, deadline=None)

"""Every tier passes the same tests (a reusable base class, as zarr's StoreTests)."""

from __future__ import annotations

import contextlib
import resource
import signal

import numpy as np
import pytest

from fiited_store import CorruptStoreError, StorageFullError
from fiited_store.errors import InputShapeError
from fiited_store.storage import MemoryTier, StagedZarrTier, ZarrTier


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Make the kernel refuse to grow any file past nbytes (EFBIG), then restore."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class ChunkTierTests:
    """What every tier does, the segment log included. Subclasses define
    ``make(tmp_path, capacity=0) -> ChunkTier``."""

    C, W = 4, 1

    def rows(self, rng, n):
        return rng.standard_normal((n, self.C)).astype(np.float32), rng.standard_normal((n, self.W)).astype(np.float32)

    def test_allocate_hands_out_distinct_ascending_free_slots(self, tmp_path):
        tier = self.make(tmp_path)
        a = tier.allocate(100)
        b = tier.allocate(50)
        assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)
        assert np.intersect1d(a, b).size == 0
        assert tier.n_used == 150

    def test_rows_written_in_allocation_order_read_back_in_any_order_with_repeats(self, tmp_path, rng):
        tier = self.make(tmp_path)
        first, second = tier.allocate(170), tier.allocate(130)
        vec, st = self.rows(rng, 300)
        tier.write(first, vec[:170], st[:170])
        tier.write(second, vec[170:], st[170:])
        slots = np.concatenate([first, second])
        q = rng.integers(0, 300, 400)  # repeats included
        got_v, got_s = tier.read(slots[q])
        np.testing.assert_array_equal(got_v, vec[q])
        np.testing.assert_array_equal(got_s, st[q])
        tier.close()

    def test_capacity_grows_and_keeps_what_was_written(self, tmp_path, rng):
        tier = self.make(tmp_path)
        first = tier.allocate(10)
        vec, st = self.rows(rng, 10)
        tier.write(first, vec, st)
        cap = tier.capacity
        more = tier.allocate(cap + 5)
        assert tier.capacity > cap
        assert np.intersect1d(first, more).size == 0
        np.testing.assert_array_equal(tier.read(first)[0], vec)
        tier.close()

    def test_a_double_release_is_refused_and_changes_nothing(self, tmp_path):
        tier = self.make(tmp_path)
        slots = tier.allocate(20)
        tier.release(slots[:10])
        assert tier.n_used == 10
        with pytest.raises(InputShapeError, match="already free"):
            tier.release(slots[[12, 3]])
        assert tier.n_used == 10 and not tier.is_free(slots[12:13])[0]
        tier.close()

    def test_out_of_range_slots_are_refused(self, tmp_path):
        tier = self.make(tmp_path)
        with pytest.raises(InputShapeError, match=r"\[-1\]"):
            tier.read(np.array([-1]))
        with pytest.raises(InputShapeError, match="outside"):
            tier.write(np.array([tier.capacity]), np.zeros((1, self.C), np.float32), np.zeros((1, self.W), np.float32))

    def test_wrong_row_shape_is_refused(self, tmp_path):
        tier = self.make(tmp_path)
        s = tier.allocate(2)
        with pytest.raises(InputShapeError, match=r"\(2, 3\)"):
            tier.write(s, np.zeros((2, 3), np.float32), np.zeros((2, self.W), np.float32))

    def test_a_background_write_then_read_equals_the_synchronous_ones(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(250)
        vec, st = self.rows(rng, 250)
        tier.write_async(slots, vec, st)  # a spill: the read after it sees it
        fut, mark = tier.read_async(slots[::-3])
        v, s = fut.result(timeout=30)
        tier.end_read(mark)
        np.testing.assert_array_equal(v, vec[::-3])
        np.testing.assert_array_equal(s, st[::-3])
        np.testing.assert_array_equal(tier.read(slots[::-3])[0], v)
        tier.close()


class TierTests(ChunkTierTests):
    """Tiers of blocks that reuse freed slots and keep an owner per slot."""

    def test_write_then_read_in_any_order(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(300)
        vec, st = self.rows(rng, 300)
        perm = rng.permutation(300)
        tier.write(slots[perm], vec[perm], st[perm])
        q = rng.permutation(300)[:120]
        got_v, got_s = tier.read(slots[q])
        np.testing.assert_array_equal(got_v, vec[q])
        np.testing.assert_array_equal(got_s, st[q])

    def test_release_makes_slots_reusable_and_refuses_double_release(self, tmp_path):
        tier = self.make(tmp_path)
        slots = tier.allocate(tier.block_rows)
        tier.release(slots[:10])
        assert tier.n_used == tier.block_rows - 10
        with pytest.raises(InputShapeError, match="already free"):
            tier.release(slots[:1])
        again = tier.allocate(10)
        np.testing.assert_array_equal(np.sort(again), np.sort(slots[:10]))

    def test_allocation_fills_the_emptiest_blocks_first(self, tmp_path):
        tier = self.make(tmp_path, capacity=4 * 4096)
        r = tier.block_rows
        slots = tier.allocate(4 * r)
        tier.release(slots[: r // 2])  # block 0 half empty
        tier.release(slots[2 * r : 3 * r])  # block 2 entirely empty
        got = tier.allocate(r)
        assert np.all(got // r == 2)  # one whole block: a whole-chunk write

    def test_background_read_equals_read(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(500)
        vec, st = self.rows(rng, 500)
        tier.write(slots, vec, st)
        fut, mark = tier.read_async(slots[::-3])  # any order
        tier.release(slots[:3])  # released while the read is pending: quarantined, not reused
        free_before = tier.n_free
        again = tier.allocate(tier.n_free)
        assert not np.isin(slots[:3], again).any()
        v, s = fut.result(timeout=30)
        np.testing.assert_array_equal(v, vec[::-3])
        np.testing.assert_array_equal(s, st[::-3])
        assert tier.quarantined_slots == 3
        with pytest.raises(InputShapeError, match="already free"):
            tier.release(slots[:1])
        tier.end_read(mark)
        assert tier.quarantined_slots == 0
        assert tier.n_free == 3  # out of quarantine, into the free space
        np.testing.assert_array_equal(np.sort(tier.allocate(3)), np.sort(slots[:3]))
        assert free_before == len(again)
        tier.close()

    def test_a_release_with_one_free_slot_releases_none(self, tmp_path):
        tier = self.make(tmp_path)
        slots = tier.allocate(10)
        tier.owner[slots] = np.arange(10)
        tier.release(slots[:2])
        free, owner = tier.n_free, tier.owner.copy()
        with pytest.raises(InputShapeError, match=rf"\[{slots[1]}\]"):
            tier.release(np.array([slots[5], slots[6], slots[1], slots[7]]))
        assert tier.n_free == free
        np.testing.assert_array_equal(tier.owner, owner)
        assert len(np.intersect1d(tier.allocate(tier.n_free), slots[5:8])) == 0  # still held
        tier.close()

    def test_overlapping_background_reads_keep_quarantine_short(self, tmp_path, rng):
        # a prefetch one batch ahead keeps two reads pending at all times: quarantine
        # must hold only what the older of them may still have read, not every release
        tier = self.make(tmp_path)
        slots = tier.allocate(400)
        tier.write(slots, *self.rows(rng, 400))
        pending = []
        for step in range(40):
            fut, mark = tier.read_async(slots[step * 10 : step * 10 + 10])
            pending.append((fut, mark))
            tier.release(slots[step * 10 : step * 10 + 5])
            if len(pending) > 2:
                old_fut, old_mark = pending.pop(0)
                old_fut.result(timeout=30)
                tier.end_read(old_mark)
            assert tier.quarantined_slots <= 10  # the releases since the older pending read
            assert tier.n_free + tier.quarantined_slots + (400 - 5 * (step + 1)) == tier.capacity
        for fut, mark in pending:
            fut.result(timeout=30)
            tier.end_read(mark)
        assert tier.quarantined_slots == 0
        assert tier.n_free == tier.capacity - 200
        tier.close()

    def test_free_space_is_derived_from_owners(self, tmp_path):
        tier = self.make(tmp_path)
        slots = tier.allocate(20)
        tier.owner[slots[:5]] = np.arange(5)
        tier.rebuild_free_space()
        assert tier.n_used == 5


class TestMemoryTier(TierTests):
    def make(self, tmp_path, capacity: int = 0):
        return MemoryTier(self.C, self.W, capacity)


class TestZarrTier(TierTests):
    def make(self, tmp_path, capacity: int = 0):
        return ZarrTier(tmp_path / "tier", self.C, self.W, capacity)

    def test_reopen_from_owners(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(50)
        vec, st = self.rows(rng, 50)
        tier.write(slots, vec, st)
        tier.owner[slots] = np.arange(50)
        tier.flush()  # rows reach the Zarr chunk files at a flush (a checkpoint does it)
        for read_only in (False, True):
            again = ZarrTier.open(tmp_path / "tier", tier.owner, read_only=read_only)
            np.testing.assert_array_equal(again.read(slots)[0], vec)
            np.testing.assert_array_equal(again.read(slots)[1], st)
            assert again.n_used == 50

    def test_the_chunk_files_are_plain_zarr(self, tmp_path, rng):
        import zarr

        tier = self.make(tmp_path)
        slots = tier.allocate(300)
        vec, st = self.rows(rng, 300)
        tier.write(slots, vec, st)
        tier.flush()
        arr = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "tier"), read_only=True), path="vectors", mode="r")
        np.testing.assert_array_equal(arr.oindex[np.sort(slots), :], vec[np.argsort(slots)])

    def test_truncated_chunk_file_is_reported(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(10)
        tier.write(slots, *self.rows(rng, 10))
        tier.flush()
        chunk = next(p for p in (tmp_path / "tier" / "vectors").rglob("*") if p.is_file() and p.name != "zarr.json")
        chunk.write_bytes(chunk.read_bytes()[:100])
        again = ZarrTier.open(tmp_path / "tier", tier.owner)  # nothing staged: the chunk must be read
        with pytest.raises(CorruptStoreError, match="truncated or corrupt"):
            again.read(slots)

    def test_full_device_changes_nothing(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(10)
        vec, st = self.rows(rng, 10)
        tier.write(slots, vec, st)
        tier.flush()
        more = tier.allocate(tier.block_rows)  # a whole new chunk file must be written
        with file_size_limit(4096):  # the kernel refuses larger files: EFBIG, as a full disk would
            with pytest.raises(StorageFullError, match="full"):
                tier.write(more, *self.rows(rng, more.size))
                tier.flush()
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        assert not list(tmp_path.rglob("*.partial"))  # no temporary file left behind

    def test_a_device_too_full_to_reserve_the_staging_file_raises_and_changes_nothing(self, tmp_path, rng, monkeypatch):
        import errno
        import os

        # a sparse staging file would take its blocks at the first store through the
        # map, and a full device answers that with SIGBUS; the blocks are reserved first
        tier = self.make(tmp_path)
        slots = tier.allocate(10)
        vec, st = self.rows(rng, 10)
        tier.write(slots, vec, st)
        cap = tier.capacity

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(StorageFullError, match="staging file .* the device is full"):
            tier.allocate(cap + 10)  # needs the tier to grow
        monkeypatch.undo()
        assert tier.capacity == cap and tier.n_free == cap - 10
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        more = tier.allocate(cap + 10)  # with room again it grows
        tier.write(more, *self.rows(rng, more.size))
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        tier.close()


class TestStagedZarrTier(TestZarrTier):
    """The same tests with a host cache small enough that rows go to disk and back."""

    def make(self, tmp_path, capacity: int = 0):
        return StagedZarrTier(tmp_path / "tier", self.C, self.W, capacity, cache_rows=64)

    def test_reopen_from_owners(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(50)
        vec, st = self.rows(rng, 50)
        tier.write(slots, vec, st)
        tier.owner[slots] = np.arange(50)
        tier.flush()  # what a checkpoint does before it links the files
        again = ZarrTier.open(tmp_path / "tier", tier.owner)
        np.testing.assert_array_equal(again.read(slots)[0], vec)

    def test_a_slot_overwritten_while_cached_reaches_the_disk_with_its_last_values(self, tmp_path, rng):
        # found by the state machine: the old cached row of slot 1 sat after the new one
        # and was flushed over it
        tier = self.make(tmp_path)
        slots = tier.allocate(3)
        tier.write(slots[[2, 0, 1]], *self.rows(rng, 3))
        tier.owner[slots] = 0
        tier.owner[0] = -1
        tier.release(np.array([0]))
        last = self.rows(rng, 1)
        tier.write(np.array([1]), *last)
        tier.flush()
        owner = tier.owner.copy()
        tier.close()
        again = type(tier).open(tier.root, owner, cache_rows=40)
        np.testing.assert_array_equal(again.read(np.array([1]))[0], last[0])
        again.close()

    def test_a_row_released_while_cached_never_reaches_the_disk(self, tmp_path, rng):
        tier = self.make(tmp_path)
        slots = tier.allocate(40)
        vec, st = self.rows(rng, 40)
        tier.write(slots, vec, st)
        np.testing.assert_array_equal(tier.read(slots)[0], vec)
        tier.release(slots)
        tier.flush()
        assert tier.disk_writes == 0
        more = tier.allocate(200)
        tier.write(more, *self.rows(rng, 200))  # past the cache: straight to disk
        assert tier.disk_writes == 200


# --------------------------------------------------------------------------- stateful
import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


class DictModelRules(RuleBasedStateMachine):
    """The rules every tier's state machine shares: reads (now, or on the tier's thread
    behind its queued writes) and releases of slots a dict says are held. A subclass
    makes ``self.tier`` and ``self.model`` and says what else a release must do."""

    C, W = 3, 2

    @staticmethod
    def rows(seed, n, w):
        return np.random.default_rng(seed).standard_normal((n, w)).astype(np.float32)

    def _held(self, data, max_size: int, unique: bool) -> np.ndarray:
        return np.array(
            data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=max_size, unique=unique))
        )

    def _as_modelled(self, slots: np.ndarray, vec: np.ndarray, sts: np.ndarray) -> None:
        np.testing.assert_array_equal(vec, np.stack([self.model[s][0] for s in slots.tolist()]))
        np.testing.assert_array_equal(sts, np.stack([self.model[s][1] for s in slots.tolist()]))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read(self, data):
        slots = self._held(data, 60, unique=False)
        self._as_modelled(slots, *self.tier.read(slots))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_in_background(self, data):
        """A prefetch's read, queued behind the background writes before it."""
        slots = self._held(data, 60, unique=True)
        future, mark = self.tier.read_async(slots)
        vec, sts = future.result(timeout=30)
        self.tier.end_read(mark)
        self._as_modelled(slots, vec, sts)

    def before_release(self, slots: np.ndarray) -> None:
        """What a tier's owner does before it releases slots (nothing by default)."""

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        slots = self._held(data, 60, unique=True)
        self.before_release(slots)
        self.tier.release(slots)
        for s in slots.tolist():
            del self.model[s]


class TierVsModel(DictModelRules):
    """Random allocate / write / overwrite / read / release / flush / reopen against a dict."""

    kind = "zarr"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.tier = self.make()
        self.model: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def make(self):
        if self.kind == "memory":
            return MemoryTier(self.C, self.W)
        if self.kind == "zarr":
            return ZarrTier(f"{self.dir}/t", self.C, self.W, block_rows=64)
        return StagedZarrTier(f"{self.dir}/t", self.C, self.W, block_rows=64, cache_rows=40)

    def teardown(self):
        self.tier.close()

    @rule(n=st.integers(1, 150), seed=st.integers(0, 2**16), background=st.booleans())
    def allocate_and_write(self, n, seed, background):
        slots = self.tier.allocate(n)
        assert np.unique(slots).size == n and not set(slots.tolist()) & set(self.model)
        vec, sts = self.rows(seed, n, self.C), self.rows(seed + 1, n, self.W)
        perm = np.random.default_rng(seed).permutation(n)
        # a spill's write: on the tier's thread, every later read and write after it
        (self.tier.write_async if background else self.tier.write)(slots[perm], vec[perm], sts[perm])
        self.tier.owner[slots] = 0
        for s, v, t in zip(slots.tolist(), vec, sts):
            self.model[s] = (v, t)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**16), background=st.booleans())
    def overwrite(self, data, seed, background):
        slots = np.array(data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=40, unique=True)))
        vec, sts = self.rows(seed, slots.size, self.C), self.rows(seed + 1, slots.size, self.W)
        (self.tier.write_async if background else self.tier.write)(slots, vec, sts)
        for s, v, t in zip(slots.tolist(), vec, sts):
            self.model[s] = (v, t)

    def before_release(self, slots: np.ndarray) -> None:
        self.tier.owner[slots] = -1  # the block tiers keep an owner per slot

    @rule()
    def flush(self):
        self.tier.flush()

    @precondition(lambda self: self.kind != "memory")
    @rule()
    def reopen(self):
        self.tier.flush()
        owner = self.tier.owner.copy()
        self.tier.close()
        cls = type(self.tier)
        self.tier = (
            cls.open(f"{self.dir}/t", owner, cache_rows=40)
            if cls is StagedZarrTier
            else cls.open(f"{self.dir}/t", owner)
        )

    @invariant()
    def counts_agree(self):
        assert self.tier.n_used == len(self.model)
        assert int((self.tier.owner >= 0).sum()) == len(self.model)


class MemoryTierVsModel(TierVsModel):
    kind = "memory"


class StagedTierVsModel(TierVsModel):
    kind = "staged"


_machine_settings = settings(settings.default, max_examples=25, stateful_step_count=20)
TestZarrTierVsModel = TierVsModel.TestCase
TestZarrTierVsModel.settings = _machine_settings
TestMemoryTierVsModel = MemoryTierVsModel.TestCase
TestMemoryTierVsModel.settings = _machine_settings
TestStagedTierVsModel = StagedTierVsModel.TestCase
TestStagedTierVsModel.settings = _machine_settings


# --------------------------------------------------------------------------- allocation rule
from hypothesis import given  # noqa: E402

from fiited_store.storage.rows import take_free_slots  # noqa: E402


def allocation_reference(free: np.ndarray, block_rows: int, n: int) -> np.ndarray:
    """The tier's allocation rule, written plainly: blocks by free count (most first,
    lower index first among equals) until they hold n, then their free slots ascending."""
    block_free = free.reshape(-1, block_rows).sum(axis=1)
    order = sorted(range(block_free.size), key=lambda b: (-block_free[b], b))
    chosen, held = [], 0
    for b in order:
        if held >= n:
            break
        chosen.append(b)
        held += block_free[b]
    rows = [s for b in sorted(chosen) for s in range(b * block_rows, (b + 1) * block_rows) if free[s]]
    return np.array(rows[:n], np.int64)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), block_rows=st.integers(1, 9), blocks=st.integers(1, 12))
def test_take_free_slots_follows_the_allocation_rule(data, block_rows, blocks):
    free = np.array(data.draw(st.lists(st.booleans(), min_size=block_rows * blocks, max_size=block_rows * blocks)))
    n = data.draw(st.integers(0, int(free.sum())))
    want = allocation_reference(free, block_rows, n)
    block_free = free.reshape(-1, block_rows).sum(axis=1).astype(np.int64)
    out = np.empty(n, np.int64)
    got_free = free.copy()
    assert take_free_slots(got_free, block_free, block_rows, out) == n
    np.testing.assert_array_equal(out, want)
    after = free.copy()
    after[want] = False
    np.testing.assert_array_equal(got_free, after)
    np.testing.assert_array_equal(block_free, after.reshape(-1, block_rows).sum(axis=1))


def test_a_failed_background_write_is_raised_by_the_next_wait_and_only_once():
    class FailingWrites(MemoryTier):
        def _deferred_write(self, slots, vectors, states):
            def job():
                raise OSError(28, "No space left on device")

            return job

    tier = FailingWrites(2, 1)
    slots = tier.allocate(3)
    tier.write_async(slots, np.ones((3, 2), np.float32), np.ones((3, 1), np.float32))
    tier.write_async(slots[:1], np.ones((1, 2), np.float32), np.ones((1, 1), np.float32))
    with pytest.raises(OSError, match="No space left"):
        tier.read(slots)
    vec, _ = tier.read(slots)  # both failures were waited for and reported once
    np.testing.assert_array_equal(vec, np.zeros((3, 2), np.float32))
    tier.close()

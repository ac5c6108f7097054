"""Bad input gets a named error that carries the offending value, and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fiited_store import (
    ConfigError,
    DynamicRatio,
    EmbeddingStore,
    InputDTypeError,
    InputShapeError,
    ManualRatios,
    NonFiniteGradientError,
    PoolCapacityError,
    StaleBatchError,
    StoreConfig,
    TableConfig,
    UnknownTableError,
)
from tests.helpers import assert_unchanged, snapshot, train_steps

TABLES = [
    TableConfig("user", dim=8, chunks=2, num_embeddings=200),
    TableConfig("item", dim=8, chunks=2, num_embeddings=200),
]


@pytest.fixture
def store(rng):
    s = EmbeddingStore(TABLES, StoreConfig(pruning=DynamicRatio(0.5), prune_period=4))
    train_steps(s, TABLES, 6, rng)
    yield s
    s.close()


def call_leaves_store_unchanged(store, fn, exc, match):
    before = snapshot(store)
    with pytest.raises(exc, match=match):
        fn()
    assert_unchanged(before, snapshot(store))


IDS = np.array([1, 2, 3], np.int64)
OFF = np.array([0, 1, 2, 3], np.int64)


@pytest.mark.parametrize(
    "fn, exc, match",
    [
        (lambda s: s.pooled_lookup("user", IDS.astype(np.float32), OFF, train=True), InputDTypeError, "float32"),
        (lambda s: s.pooled_lookup("user", IDS.astype(bool), OFF, train=True), InputDTypeError, "bool"),
        (lambda s: s.pooled_lookup("user", IDS.reshape(3, 1), OFF, train=True), InputShapeError, r"\(3, 1\)"),
        (lambda s: s.pooled_lookup("user", IDS, OFF.astype(np.float64), train=True), InputDTypeError, "float64"),
        (
            lambda s: s.pooled_lookup("user", IDS, np.array([0, 2, 1, 3]), train=True),
            InputShapeError,
            r"offsets\[1\] = 2 > offsets\[2\] = 1",
        ),
        (lambda s: s.pooled_lookup("user", IDS, np.array([1, 2, 3]), train=True), InputShapeError, r"offsets\[0\] = 1"),
        (
            lambda s: s.pooled_lookup("user", IDS, np.array([0, 1, 4]), train=True),
            InputShapeError,
            r"offsets\[-1\] = 4",
        ),
        (lambda s: s.pooled_lookup(["user", "item"], IDS, OFF, train=True), InputShapeError, "4 elements"),
        (
            lambda s: s.pooled_lookup("user", IDS, OFF, per_sample_weights=np.ones(2, np.float32), train=True),
            InputShapeError,
            r"\(2,\)",
        ),
        (
            lambda s: s.pooled_lookup("user", IDS, OFF, per_sample_weights=np.ones(3, np.int64), train=True),
            InputDTypeError,
            "int64",
        ),
        (
            lambda s: s.pooled_lookup(
                "user", IDS, OFF, per_sample_weights=np.array([1, np.nan, 1], np.float32), train=True
            ),
            NonFiniteGradientError,
            r"\[1\] = nan",
        ),
        (
            lambda s: s.pooled_lookup(
                "user", IDS, OFF, per_sample_weights=np.ones(3, np.float32), mode="mean", train=True
            ),
            InputShapeError,
            "mode='mean'",
        ),
        (lambda s: s.pooled_lookup("user", IDS, OFF, mode="max", train=True), InputShapeError, "'max'"),
        (lambda s: s.pooled_lookup("ads", IDS, OFF, train=True), UnknownTableError, "'ads'"),
        (lambda s: s.pooled_lookup(["user", "ads"], IDS, np.array([0, 1, 3]), train=True), UnknownTableError, "'ads'"),
        (lambda s: s.lookup("ads", IDS), UnknownTableError, "'ads'"),
        (lambda s: s.insert_or_assign("user", IDS, np.ones((3, 8))), InputDTypeError, "float64"),
        (lambda s: s.insert_or_assign("user", IDS, np.ones((3, 4), np.float32)), InputShapeError, r"\(3, 4\)"),
        (lambda s: s.insert_or_assign("user", IDS, np.full((3, 8), np.inf, np.float32)), NonFiniteGradientError, "inf"),
        (lambda s: s.erase("ads", IDS), UnknownTableError, "'ads'"),
        (lambda s: s.utilities("ads", IDS), UnknownTableError, "'ads'"),
        (lambda s: s.pooled_lookup(None, IDS, OFF), UnknownTableError, "unknown table None"),
        (lambda s: s.pooled_lookup("user", None, OFF, train=True), InputDTypeError, "got None"),
        (lambda s: s.find("user", 5), InputShapeError, "the scalar 5"),
        (lambda s: s.lookup("user", 5), InputShapeError, "the scalar 5"),
        (lambda s: s.contains("user", 5), InputShapeError, "the scalar 5"),
        (lambda s: s.lookup("user", IDS.astype("timedelta64[s]")), InputDTypeError, "timedelta64"),
        (
            lambda s: s.pooled_lookup("user", IDS, OFF.astype("timedelta64[s]"), train=True),
            InputDTypeError,
            "offsets .* timedelta64",
        ),
        (
            lambda s: s.pooled_lookup("user", IDS, np.array([0, 1, 2, 2**64 - 1], np.uint64), train=True),
            InputShapeError,
            r"offsets\[3\] = 18446744073709551615",
        ),
        (lambda s: s.backward(object(), np.ones((1, 8), np.float32)), InputDTypeError, "got object"),
    ],
)
def test_bad_request_is_named_and_changes_nothing(store, fn, exc, match):
    call_leaves_store_unchanged(store, lambda: fn(store), exc, match)


def test_unknown_table_error_lists_the_tables(store):
    with pytest.raises(UnknownTableError) as info:
        store.lookup("ads", IDS)
    assert "['user', 'item']" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_changes_nothing(store, rng, bad):
    b = store.pooled_lookup(["user", "item"], rng.integers(0, 100, 8), np.arange(9), train=True)
    grad = rng.standard_normal(b.output.shape).astype(np.float32)
    grad[2, 5] = bad
    call_leaves_store_unchanged(
        store, lambda: store.backward(b, grad), NonFiniteGradientError, rf"grad_out\[2, 5\] = {bad}"
    )
    grad[2, 5] = 0.0
    store.backward(b, grad)  # the same batch still trains once the gradient is clean


@pytest.mark.parametrize(
    "big, ids",
    [
        (3e38, [5, 6, 7, 8]),  # finite, but its square is not
        (1e19, [5, 5, 5, 5]),  # each square fits; the square of one id's summed gradient does not
    ],
)
def test_gradient_whose_square_overflows_changes_nothing(store, rng, big, ids):
    from fiited_store.verify import check_store

    b = store.pooled_lookup("user", np.array(ids), np.arange(5), train=True)
    grad = rng.standard_normal(b.output.shape).astype(np.float32)
    grad[:, 3] = big if len(set(ids)) < 4 else 0.0
    grad[2, 3] = big
    call_leaves_store_unchanged(
        store,
        lambda: store.backward(b, grad),
        NonFiniteGradientError,
        r"grad_out\[\d, 3\] = .*overflow float32 when squared",
    )
    store.backward(b, np.clip(grad, -1, 1))  # the same batch trains once the gradient is sane
    assert check_store(store) == []


@pytest.mark.parametrize(
    "grad, exc, match",
    [
        (np.ones((4, 16), np.float64), InputDTypeError, "float64"),
        (np.ones((4, 8), np.float32), InputShapeError, r"\(4, 8\)"),
        (np.ones((16,), np.float32), InputShapeError, r"\(16,\)"),
    ],
)
def test_gradient_of_wrong_dtype_or_shape(store, rng, grad, exc, match):
    b = store.pooled_lookup(["user", "item"], rng.integers(0, 100, 8), np.arange(9), train=True)
    call_leaves_store_unchanged(store, lambda: store.backward(b, grad), exc, match)


def test_backward_twice_or_without_train_is_refused(store, rng):
    b = store.pooled_lookup("user", IDS, OFF, train=True)
    store.backward(b, np.zeros((3, 8), np.float32))
    call_leaves_store_unchanged(
        store, lambda: store.backward(b, np.zeros((3, 8), np.float32)), StaleBatchError, "already ran"
    )
    evaluation = store.pooled_lookup("user", IDS, OFF)
    call_leaves_store_unchanged(
        store, lambda: store.backward(evaluation, np.zeros((3, 8), np.float32)), StaleBatchError, "train=True"
    )


def test_insert_or_assign_without_room_changes_nothing(rng):
    s = EmbeddingStore([TableConfig("t", dim=8, chunks=2, num_embeddings=10)], StoreConfig(pruning=DynamicRatio(0.5)))
    s.insert_or_assign("t", np.arange(5), np.ones((5, 8), np.float32))  # 10 slots, all taken
    call_leaves_store_unchanged(
        s,
        lambda: s.insert_or_assign("t", np.array([7]), np.ones((1, 8), np.float32)),
        PoolCapacityError,
        "needs 2 free slots",
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TableConfig("t", dim=10, chunks=4), "dim 10 is not divisible by chunks 4"),
        (lambda: TableConfig("t", dim=0), "dim must be a positive int, got 0"),
        (lambda: TableConfig("t", dim=8, optimizer="adam"), "'adam'"),
        (lambda: TableConfig("t", dim=8, learning_rate=float("nan")), "nan"),
        (lambda: TableConfig("", dim=8), "non-empty"),
        (lambda: StoreConfig(gamma=1.0), "gamma must lie in \\(0, 1\\), got 1.0"),
        (lambda: StoreConfig(budget_bytes=100, budget_fraction=0.5), "not both"),
        (lambda: StoreConfig(budget_bytes=-5), "-5"),
        (lambda: StoreConfig(mode="cache", on_evict="discard"), "discard"),
        (lambda: StoreConfig(utility="random"), "'random'"),
        (lambda: ManualRatios((0.5, 1.5)), "p_1 must lie in \\[0, 1\\], got 1.5"),
        (lambda: DynamicRatio(-0.1), "-0.1"),
        (
            lambda: EmbeddingStore([TableConfig("t", dim=64, chunks=4)], StoreConfig(budget_bytes=63)),
            "budget of 63 bytes .* one slot needs 64 bytes",
        ),
        (
            lambda: EmbeddingStore([TableConfig("t", dim=8, chunks=2)], StoreConfig(budget_fraction=0.5)),
            "undeclared: \\['t'\\]",
        ),
        (
            lambda: EmbeddingStore(
                [TableConfig("t", dim=8, chunks=2, num_embeddings=9)],
                StoreConfig(pruning=ManualRatios((0.1, 0.2, 0.3))),
            ),
            "2 chunks but 3 manual ratios",
        ),
        (
            lambda: EmbeddingStore([TableConfig("t", dim=8), TableConfig("t", dim=8)], StoreConfig(budget_bytes=1024)),
            "repeated: \\['t'\\]",
        ),
    ],
)
def test_bad_configuration_is_named(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_a_store_larger_than_memory_is_refused_naming_its_bytes_before_allocating():
    with pytest.raises(
        ConfigError, match=r"needs about 52,125,000,000,000 bytes .* more than the [0-9,]+ bytes of cpu memory"
    ):
        EmbeddingStore([TableConfig("t", dim=16, num_embeddings=10**12)])


def test_an_allocation_the_system_refuses_is_a_config_error_with_the_bytes(monkeypatch):
    import fiited_store.store as store_module

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(store_module, "ChunkPool", refuse)
    with pytest.raises(ConfigError, match=r"could not allocate the about [0-9,]+ bytes .*Cannot allocate memory"):
        EmbeddingStore([TableConfig("t", dim=16, num_embeddings=1000)])


def test_configs_are_frozen():
    t = TableConfig("t", dim=8)
    with pytest.raises(AttributeError):
        t.dim = 16  # type: ignore[misc]

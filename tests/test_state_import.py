"""``import_state`` takes a store's own export in either mode and refuses anything unsound,
changing nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiited_store import CorruptStoreError, EmbeddingStore, InputShapeError, StoreConfig, TableConfig
from fiited_store.verify import check_store
from tests.helpers import assert_unchanged, snapshot, train_steps


def tables(index: str):
    return [
        TableConfig("u", dim=8, chunks=2, num_embeddings=400, index=index, optimizer="adagrad"),
        TableConfig("v", dim=16, chunks=4, num_embeddings=400, index=index),
    ]


CACHE = StoreConfig(mode="cache", budget_fraction=0.25, prune_period=5)
BLOCK_TIER = StoreConfig(mode="cache", budget_fraction=0.25, prune_period=5, host_cache_bytes=1 << 14)


@pytest.mark.parametrize("config", [CACHE, BLOCK_TIER], ids=["segment-tier", "block-tier"])
@pytest.mark.parametrize("index", ["auto", "hashed"])
def test_a_cache_mode_state_with_rows_on_its_tier_imports_whole(tmp_path, config, index):
    t = tables(index)
    a = EmbeddingStore(t, config)
    train_steps(a, t, 10, np.random.default_rng(0), id_range=400)
    assert a.stats()["total"]["spilled_chunks"] > 0  # part of the model is on the tier
    b = EmbeddingStore(t, config, path=tmp_path / "b")
    b.import_state(a.export_state())
    for tab in t:
        ids = np.arange(tab.num_embeddings)
        np.testing.assert_array_equal(b.lookup(tab.name, ids), a.lookup(tab.name, ids))
    assert check_store(b) == []
    b.save()
    b.close()
    from fiited_store.tools import verify_store

    assert verify_store(tmp_path / "b") == []


@pytest.fixture
def trained():
    t = tables("auto")
    a = EmbeddingStore(t, CACHE)
    train_steps(a, t, 10, np.random.default_rng(1), id_range=400)
    b = EmbeddingStore(t, CACHE)
    train_steps(b, t, 3, np.random.default_rng(2), id_range=400)
    yield a.export_state(), b
    a.close()
    b.close()


def _resident(state):
    addr = state["entries.addr"]
    e, k = np.nonzero(addr >= 0)
    return e[0], k[0]


def _spilled(state):
    addr = state["entries.addr"]
    e, k = np.nonzero(addr <= -2)
    return e[0], k[0]


def _free_an_owned_slot(state):
    n = int(state["pool_0.n_free"][0])
    state["pool_0.free_stack"][n] = int(state["entries.addr"][_resident(state)])
    state["pool_0.n_free"][0] = n + 1


BREAKS = {
    "address past the pool": (
        lambda s: s["entries.addr"].__setitem__(_resident(s), 1 << 30),
        "resident addresses past the pool",
    ),
    "NaN vector in the pool": (lambda s: s["pool_0.vectors"].__setitem__((0, 0), np.nan), "NaN or inf"),
    "inf optimizer state": (lambda s: s["pool_0.opt_state"].__setitem__((1, 0), np.inf), "NaN or inf"),
    "owner of another entry": (
        lambda s: s["pool_0.owner"].__setitem__(int(s["entries.addr"][_resident(s)]), 399),
        "names entry 399 as owner|whose owner is 399",
    ),
    "slot both free and owned": (lambda s: _free_an_owned_slot(s), "on the free stack and owned"),
    "spilled chunk past the tier": (
        lambda s: s["entries.addr"].__setitem__(_spilled(s), -2 - (1 << 29)),
        "point past its",
    ),
    "tier row held by another entry": (
        lambda s: s["tier_0.owner"].__setitem__(0, (int(s["tier_0.owner"][0]) + 1) % 400),
        "holds entry .* but its owner is|slots have owners but",
    ),
    "NaN tier row": (lambda s: s["tier_0.vectors"].__setitem__((0, 0), np.nan), r"tier_0.vectors hold NaN"),
    "tier slot listed twice": (
        lambda s: s["tier_0.slots"].__setitem__(1, s["tier_0.slots"][0]),
        "negative or listed twice",
    ),
    "tier owner out of range": (lambda s: s["tier_0.owner"].__setitem__(0, 10**9), "outside"),
    "negative step count": (lambda s: s["meta.counters"].__setitem__(0, -5), "negative"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_an_unsound_state_is_refused_by_name_and_changes_nothing(trained, name):
    state, b = trained
    state = {k: np.array(v) for k, v in state.items()}
    breaks, match = BREAKS[name]
    breaks(state)
    before = snapshot(b)
    with pytest.raises(CorruptStoreError, match=f"state is not a sound store, nothing was changed: .*({match})"):
        b.import_state(state)
    assert_unchanged(before, snapshot(b))
    assert check_store(b) == []


def test_a_state_with_a_tier_array_missing_or_misshapen_is_refused(trained):
    state, b = trained
    short = {k: v for k, v in state.items() if k != "tier_0.states"}
    with pytest.raises(InputShapeError, match=r"lacks arrays \['tier_0.states'\]"):
        b.import_state(short)
    wrong = dict(state, **{"tier_0.vectors": state["tier_0.vectors"][:, :2].copy()})
    with pytest.raises(InputShapeError, match="tier_0.vectors is float32"):
        b.import_state(wrong)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_randomly_damaged_state_is_refused_or_imports_sound_and_never_crashes(trained, data):
    """Any one value of any array changed to a drawn bad value: the import either refuses it
    by name with nothing changed, or (the value was harmless) leaves a sound store."""
    state, b = trained
    state = {k: np.array(v) for k, v in state.items()}
    key = data.draw(st.sampled_from(sorted(k for k in state if k != "meta.config" and state[k].size)))
    arr = state[key]
    at = data.draw(st.integers(0, arr.size - 1))
    if arr.dtype.kind == "f":
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, 0.0]))
    else:
        info = np.iinfo(arr.dtype)
        value = data.draw(st.sampled_from([info.min, info.max, -1, -2, 0, 1, 1 << min(info.bits - 2, 30)]))
        value = np.array(value).astype(arr.dtype)  # wrapped as the array's type would hold it
    arr.reshape(-1)[at] = value
    before = snapshot(b)
    try:
        b.import_state(state)
    except (CorruptStoreError, InputShapeError):
        assert_unchanged(before, snapshot(b))
    else:
        assert check_store(b) == []
        for t in b.tables:
            assert np.isfinite(b.lookup(t.name, np.arange(t.num_embeddings))).all()

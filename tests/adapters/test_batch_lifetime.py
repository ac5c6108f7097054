"""What a batch and an output own: the caller's buffers may be reused, the store's may not.

A data loader refills the same ids / offsets / weights buffers every step, and a
model may keep a slice of an output while the next batch runs. Neither may change
what the store computes or what the caller holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fiited_store import EmbeddingStore, StoreConfig, TableConfig
from fiited_store.verify import check_store

TABLES = [
    TableConfig("a", dim=8, chunks=2, num_embeddings=50, optimizer="adagrad", learning_rate=0.1),
    TableConfig("h", dim=8, chunks=2, optimizer="sgd", learning_rate=0.1, index="hashed"),
]
NAMES = ["a", "h"]


def twins():
    cfg = StoreConfig(budget_bytes=4 * 8 * 200, prune_period=0, initial_capacity=8)
    return EmbeddingStore(TABLES, cfg), EmbeddingStore(TABLES, cfg)


def request(rng, batch=6):
    lengths = rng.integers(0, 4, 2 * batch)
    ids = rng.integers(0, 50, int(lengths.sum())).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = rng.random(ids.shape[0]).astype(np.float32)
    return ids, offsets, weights


@pytest.mark.parametrize("as_tensor", [False, True])
def test_refilling_the_callers_buffers_before_backward_changes_nothing(as_tensor):
    mine, ref = twins()
    rng = np.random.default_rng(0)
    for _step in range(6):
        ids, offsets, weights = request(rng)
        grad = rng.standard_normal((6, 16)).astype(np.float32)
        fed = [torch.from_numpy(x) for x in (ids, offsets, weights)] if as_tensor else [ids, offsets, weights]
        b = mine.pooled_lookup(NAMES, *fed, train=True)
        r = ref.pooled_lookup(NAMES, ids.copy(), offsets.copy(), weights.copy(), train=True)
        # the loader refills its buffers (offsets that would index far past the batch,
        # ids of new keys whose insertion could rehash) before the model's backward
        ids[:] = rng.integers(1000, 2000, ids.shape[0]) % 50
        offsets *= 7
        weights[:] = np.nan
        psw = mine.per_sample_weight_grads(b, grad)
        np.testing.assert_array_equal(
            mine.backend.to_host(psw), ref.backend.to_host(ref.per_sample_weight_grads(r, grad))
        )
        mine.backward(b, grad)
        ref.backward(r, grad)
        mine.step()
        ref.step()
    for name in NAMES:
        np.testing.assert_array_equal(mine.lookup(name, np.arange(50)), ref.lookup(name, np.arange(50)))
    assert check_store(mine) == []


def test_the_adapter_backward_uses_the_offsets_of_its_forward():
    from fiited_store.adapters import FiitedEmbeddingBag

    mods = [
        FiitedEmbeddingBag(
            30,
            8,
            chunks=2,
            mode="sum",
            optimizer="sgd",
            learning_rate=0.1,
            store_config=StoreConfig(budget_fraction=1.0, prune_period=0),
        )
        for _ in range(2)
    ]
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    for i, m in enumerate(mods):
        offsets = torch.tensor([0, 2, 5])
        out = m(ids, offsets)
        if i == 0:
            offsets.mul_(2)  # torch.nn.EmbeddingBag would refuse this; the store kept its own copy
        (out * torch.arange(24.0).view(3, 8)).sum().backward()
    np.testing.assert_array_equal(
        mods[0].store.lookup("table", np.arange(30)), mods[1].store.lookup("table", np.arange(30))
    )


# 16384 rows x 64 floats is 4 MiB: the output comes from a huge-page buffer whose
# slices reference the buffer's memory, not the output array
@pytest.mark.parametrize("bags", [8, 16384])
def test_a_kept_slice_of_an_output_is_never_overwritten(bags):
    s = EmbeddingStore(
        [TableConfig("t", dim=64, chunks=4, num_embeddings=1000)], StoreConfig(budget_fraction=1.0, prune_period=0)
    )
    rng = np.random.default_rng(1)
    s.lookup("t", np.arange(1000), train=True)
    bag_starts = np.arange(bags + 1)
    kept = s.pooled_lookup("t", rng.integers(0, 1000, bags), bag_starts).output[:, :16]
    expected = kept.copy()
    for _ in range(3):
        s.pooled_lookup("t", rng.integers(0, 1000, bags), bag_starts)
    np.testing.assert_array_equal(kept, expected)
    # and a tensor sharing an output through DLPack keeps it too
    shared = torch.from_dlpack(s.pooled_lookup("t", rng.integers(0, 1000, bags), bag_starts).output)[:, 3]
    expected = shared.clone()
    s.pooled_lookup("t", rng.integers(0, 1000, bags), bag_starts)
    torch.testing.assert_close(shared, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bags", [8, 16384])
def test_an_output_nobody_holds_is_reused(bags):
    s = EmbeddingStore(
        [TableConfig("t", dim=64, chunks=4, num_embeddings=1000)], StoreConfig(budget_fraction=1.0, prune_period=0)
    )
    bag_starts = np.arange(bags + 1)
    first = s.pooled_lookup("t", np.zeros(bags, np.int64), bag_starts).output
    address = first.__array_interface__["data"][0]
    del first
    again = s.pooled_lookup("t", np.ones(bags, np.int64), bag_starts).output
    assert again.__array_interface__["data"][0] == address

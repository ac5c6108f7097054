"""The PyTorch adapter: same numbers as torch.nn.EmbeddingBag, zero-copy output, fused backward."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fiited_store import (
    DynamicRatio,
    IdOutOfRangeError,
    InputDTypeError,
    InputShapeError,
    StoreConfig,
    TableConfig,
    UnknownTableError,
)
from fiited_store.adapters import FiitedEmbeddingBag, FiitedEmbeddingBagCollection, JaggedFeatures
from tests.helpers import assert_unchanged, snapshot

N, D = 40, 16
FULL = StoreConfig(pruning=DynamicRatio(0.0), budget_fraction=1.0, prune_period=0)


def twin(mode="sum", optimizer="sgd", lr=0.1, **kw):
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(N, D, mode=mode, sparse=True, **kw)
    ours = FiitedEmbeddingBag(
        N, D, chunks=4, mode=mode, optimizer=optimizer, learning_rate=lr, eps=1e-10, store_config=FULL, **kw
    )
    ours.store.insert_or_assign("table", np.arange(N), ref.weight.detach().numpy().copy())
    opt = (
        torch.optim.SGD(ref.parameters(), lr=lr)
        if optimizer == "sgd"
        else torch.optim.Adagrad(ref.parameters(), lr=lr, eps=1e-10)
    )
    return ref, ours, opt


def rows(module):
    module.eval()
    with torch.no_grad():
        out = module(torch.arange(N), torch.arange(N)) if isinstance(module, FiitedEmbeddingBag) else None
    module.train()
    return out


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_forward_backward_and_steps_equal_torch(mode, optimizer, rng):
    ref, ours, opt = twin(mode, optimizer)
    for _step in range(5):
        ids = torch.from_numpy(rng.permutation(N)[:18])  # unique ids: torch's duplicate order is its own
        offsets = torch.tensor([0, 3, 3, 9, 10, 15])
        target = torch.randn(6, D)
        opt.zero_grad()
        out_ref = ref(ids, offsets)
        out = ours(ids, offsets)
        tol = dict(rtol=0, atol=0) if optimizer == "sgd" else dict(rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(out, out_ref.detach(), **tol)
        (out_ref * target).sum().backward()
        (out * target).sum().backward()  # the store's optimizer steps inside this call
        opt.step()
        torch.testing.assert_close(rows(ours), ref.weight.detach(), **tol)
    assert ours.store.step_count == 5  # auto_step: one step per backward


def test_per_sample_weights_and_their_gradient_equal_torch(rng):
    ref, ours, _ = twin("sum")
    ids = torch.from_numpy(rng.integers(0, N, 12))
    offsets = torch.tensor([0, 4, 8])
    w_ref = torch.rand(12, requires_grad=True)
    w = w_ref.detach().clone().requires_grad_(True)
    target = torch.randn(3, D)
    (ref(ids, offsets, per_sample_weights=w_ref) * target).sum().backward()
    out = ours(ids, offsets, per_sample_weights=w)
    (out * target).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)


def test_two_dimensional_input_and_include_last_offset(rng):
    ref, ours, _ = twin("mean")
    x = torch.from_numpy(rng.integers(0, N, (5, 3)))
    torch.testing.assert_close(ours(x), ref(x).detach(), rtol=0, atol=0)
    ref2, ours2, _ = twin("sum", include_last_offset=True)
    ids = torch.from_numpy(rng.integers(0, N, 7))
    offs = torch.tensor([0, 2, 7])
    torch.testing.assert_close(ours2(ids, offs), ref2(ids, offs).detach(), rtol=0, atol=0)


def test_output_shares_memory_with_the_store_buffer(rng):
    _, ours, _ = twin()
    out = ours(torch.arange(6), torch.tensor([0, 2, 4]))
    pointers = {buf.ctypes.data for buf in ours.store._buffers.arrays()}
    assert out.data_ptr() in pointers  # no copy between the kernel and torch
    buf = next(b for b in ours.store._buffers.arrays() if b.ctypes.data == out.data_ptr())
    with torch.no_grad():
        out[0, 0] = 1234.5
    assert buf[0, 0] == 1234.5
    # while the tensor lives, the next forward gets another buffer, never this one
    out2 = ours(torch.arange(6), torch.tensor([0, 2, 4]))
    assert out2.data_ptr() != out.data_ptr()


def test_embeddings_are_not_torch_parameters():
    _, ours, _ = twin()
    assert list(ours.parameters()) == []


def test_eval_mode_inserts_nothing_and_needs_no_grad():
    ours = FiitedEmbeddingBag(N, D, chunks=4, store_config=FULL)
    ours.eval()
    out = ours(torch.tensor([N - 5, 1]), torch.tensor([0, 1]))
    assert not out.requires_grad
    assert torch.all(out == 0)
    assert not ours.store.contains("table", [N - 5, 1]).any()


@pytest.mark.parametrize("bad", [N, -1, 2**40])
def test_an_id_out_of_range_raises_like_torch_and_changes_nothing(bad):
    ref, ours, _ = twin()
    ids, offsets = torch.tensor([1, bad, 2]), torch.tensor([0, 2])
    with pytest.raises((IndexError, RuntimeError), match="(?i)out of range|index|valid range"):
        ref(ids, offsets)  # torch refuses it too
    before = snapshot(ours.store)
    with pytest.raises(IdOutOfRangeError, match=rf"id {bad} \(at position 1\) is out of range for table 'table'"):
        ours(ids, offsets)
    assert_unchanged(before, snapshot(ours.store))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m(torch.tensor([1.0, 2.0]), torch.tensor([0])), InputDTypeError, "torch.float32"),
        (lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])), InputShapeError, "must not decrease"),
        (lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0, 5])), InputShapeError, "must not decrease"),
        (lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([1, 2])), InputShapeError, r"offsets\[0\] = 1"),
        (lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0.0, 1.0])), InputDTypeError, "offsets"),
        (
            lambda m: m(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), per_sample_weights=torch.ones(2)),
            InputShapeError,
            r"\(3,\)",
        ),
        (lambda m: m(torch.tensor([1, 2, 3])), InputShapeError, "offsets are required"),
        (lambda m: m(torch.tensor([[[1]]])), InputShapeError, "1-D or 2-D"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    _, ours, _ = twin()
    with pytest.raises(exc, match=match):
        call(ours)


def test_state_dict_round_trip_through_torch_save(rng):
    _, ours, _ = twin("sum", "adagrad")
    for _ in range(3):
        ids = torch.from_numpy(rng.integers(0, N, 10))
        ours(ids, torch.tensor([0, 5])).pow(2).sum().backward()
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    fresh = FiitedEmbeddingBag(
        N, D, chunks=4, mode="sum", optimizer="adagrad", learning_rate=0.1, eps=1e-10, store_config=FULL
    )
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    ids = torch.arange(N)
    ours.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids, torch.arange(N)), ours(ids, torch.arange(N)), rtol=0, atol=0)
    ours.train(), fresh.train()
    # and training continues identically: the optimizer state came along
    x = torch.from_numpy(rng.integers(0, N, 8))
    ours(x, torch.tensor([0, 4])).sum().backward()
    fresh(x, torch.tensor([0, 4])).sum().backward()
    ours.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids, torch.arange(N)), ours(ids, torch.arange(N)), rtol=0, atol=0)


def test_state_dict_of_another_configuration_is_refused():
    _, ours, _ = twin()
    other = FiitedEmbeddingBag(N, 8, chunks=2, store_config=FULL)
    with pytest.raises(RuntimeError, match="another configuration"):
        other.load_state_dict(ours.state_dict())


def make_collection(**kw):
    tables = [
        TableConfig("user", dim=8, chunks=2, num_embeddings=30, optimizer="sgd", learning_rate=0.1),
        TableConfig("item", dim=4, chunks=1, num_embeddings=30, optimizer="sgd", learning_rate=0.1),
    ]
    return FiitedEmbeddingBagCollection(tables, store_config=FULL, **kw), tables


def test_collection_equals_one_embedding_bag_per_table(rng):
    ebc, tables = make_collection(output="dict")
    torch.manual_seed(1)
    refs = {t.name: torch.nn.EmbeddingBag(30, t.dim, mode="sum", sparse=True) for t in tables}
    for t in tables:
        ebc.store.insert_or_assign(t.name, np.arange(30), refs[t.name].weight.detach().numpy().copy())
    opt = torch.optim.SGD([p for r in refs.values() for p in r.parameters()], lr=0.1)
    for _ in range(3):
        lengths = torch.from_numpy(rng.integers(0, 3, 8))
        values = torch.from_numpy(rng.permutation(30)[: int(lengths[:4].sum())].copy())
        values = torch.cat([values, torch.from_numpy(rng.permutation(30)[: int(lengths[4:].sum())].copy())])
        kjt = JaggedFeatures(["user", "item"], values, lengths)
        out = ebc(kjt)
        assert set(out) == {"user", "item"} and out["user"].shape == (4, 8) and out["item"].shape == (4, 4)
        opt.zero_grad()
        loss_ref = 0.0
        for name, (ids, offs) in zip(["user", "item"], JaggedFeatures.per_feature_of(kjt)):
            r = refs[name](ids, offs[:-1])
            torch.testing.assert_close(out[name], r.detach(), rtol=0, atol=0)
            loss_ref = loss_ref + r.pow(2).sum()
        loss_ref.backward()
        opt.step()
        (out["user"].pow(2).sum() + out["item"].pow(2).sum()).backward()
    for t in tables:
        np.testing.assert_array_equal(ebc.store.lookup(t.name, np.arange(30)), refs[t.name].weight.detach().numpy())


def test_collection_accepts_a_dict_and_keyed_jagged_tensor_like_objects(rng):
    ebc, _ = make_collection()
    d = {"user": (torch.tensor([1, 2, 3]), torch.tensor([0, 1])), "item": (torch.tensor([4, 5]), torch.tensor([0, 1]))}
    out = ebc(d).values()
    assert out.shape == (2, 12)

    class KJTLike:  # the methods TorchRec's KeyedJaggedTensor offers, nothing else
        def keys(self):
            return ["user", "item"]

        def values(self):
            return torch.tensor([1, 2, 3, 4, 5])

        def offsets(self):
            return torch.tensor([0, 1, 3, 4, 5])

        def weights_or_none(self):
            return None

    torch.testing.assert_close(ebc(KJTLike()).values(), out, rtol=0, atol=0)
    with pytest.raises(UnknownTableError, match="'ads'"):
        ebc({"ads": (torch.tensor([1]), torch.tensor([0]))})

"""How the adapter fits PyTorch: torch's signatures, torch.compile, autograd semantics, TorchRec's shapes."""

from __future__ import annotations

import importlib.util
import inspect
import types

import numpy as np
import pytest
import torch

from fiited_store import (
    ConfigError,
    DynamicRatio,
    InputDTypeError,
    InputShapeError,
    StaleBatchError,
    StoreConfig,
    TableConfig,
    UnsupportedAutogradError,
)
from fiited_store.adapters import FiitedEmbeddingBag, FiitedEmbeddingBagCollection, JaggedFeatures, KeyedTensor
from tests.helpers import assert_unchanged, snapshot

N, D = 40, 8
FULL = StoreConfig(pruning=DynamicRatio(0.0), budget_fraction=1.0, prune_period=0)
HAS_TORCHREC = importlib.util.find_spec("torchrec") is not None


def twin(mode="sum", **kw):
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(N, D, mode=mode, **kw)
    ours = FiitedEmbeddingBag(
        N,
        D,
        mode=mode,
        chunks=2,
        optimizer="sgd",
        learning_rate=0.1,
        store_config=FULL,
        _weight=ref.weight.detach().clone(),
        **kw,
    )
    return ref, ours


# --- signatures -------------------------------------------------------------------------------------------------


def test_shared_arguments_take_torchs_positions_and_defaults():
    theirs = [
        p
        for p in inspect.signature(torch.nn.EmbeddingBag.__init__).parameters.values()
        if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    ours = [
        p
        for p in inspect.signature(FiitedEmbeddingBag.__init__).parameters.values()
        if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert [p.name for p in ours] == [p.name for p in theirs]
    assert [p.default for p in ours] == [p.default for p in theirs]
    fiited_only = [
        p.name for p in inspect.signature(FiitedEmbeddingBag.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    assert {"chunks", "store_config", "optimizer"} <= set(fiited_only)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((1000, 16, 2.0), {}, "max_norm=2.0"),
        ((1000, 16), {"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ((1000, 16), {"mode": "max"}, "'max'"),
        ((1000, 16), {"dtype": torch.float64}, "torch.float64"),
        ((1000, 16), {"padding_idx": 1000}, "padding_idx"),
        ((1000, 16), {"device": "cuda", "store_config": StoreConfig()}, "device='cuda'"),
    ],
)
def test_unsupported_torch_arguments_are_refused_by_name(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FiitedEmbeddingBag(*args, **kwargs)


def test_the_collection_refuses_a_store_config_in_torchrecs_is_weighted_position():
    with pytest.raises(ConfigError, match="is_weighted"):
        FiitedEmbeddingBagCollection([TableConfig("t", 4, chunks=1, num_embeddings=5)], FULL)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [0, -1])
def test_padding_idx_and_initial_weight_equal_torch(mode, padding_idx, rng):
    ref, ours = twin(mode, padding_idx=padding_idx)
    torch.testing.assert_close(ours.weight, ref.weight.detach(), rtol=0, atol=0)
    pad = padding_idx % N
    ids = torch.from_numpy(rng.permutation(N)[:10].copy())
    ids[[0, 3, 4]] = pad
    offsets = torch.tensor([0, 2, 5, 5, 8])  # bag 1 is padding only, bag 2 empty
    torch.testing.assert_close(ours(ids, offsets), ref(ids, offsets).detach(), rtol=1e-6, atol=1e-7)
    if mode == "sum":
        w_ref = torch.rand(10, requires_grad=True)
        w = w_ref.detach().clone().requires_grad_(True)
        target = torch.randn(5, D)
        (ref(ids, offsets, per_sample_weights=w_ref) * target).sum().backward()
        (ours(ids, offsets, per_sample_weights=w) * target).sum().backward()
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
        assert (w.grad[[0, 3, 4]] == 0).all()


def test_repr_names_tables_dims_chunks_budget_and_mode():
    bag = FiitedEmbeddingBag(1000, 16, mode="sum", chunks=4, store_config=StoreConfig(budget_fraction=0.25))
    text = repr(bag)
    for part in (
        "1000, 16",
        "mode='sum'",
        "chunks=4",
        "budget 15.6 KiB",
        "0.25 x dense",
        "store_mode='prune'",
        ".store",
    ):
        assert part in text, (part, text)
    ebc = FiitedEmbeddingBagCollection(
        [TableConfig("user", 16, chunks=4, num_embeddings=100), TableConfig("item", 8, chunks=2)],
        store_config=StoreConfig(budget_bytes=4096),
    )
    text = repr(ebc)
    for part in ("user: 100 rows x 16, chunks=4", "item: any int64 id x 8, chunks=2", "mode='sum'", "4.0 KiB"):
        assert part in text, (part, text)


def test_the_embeddings_are_in_the_state_dict_and_weight_reads_them(rng):
    ref, ours = twin()
    sd = ours.state_dict()
    assert any(k.startswith("store.") for k in sd) and list(ours.parameters()) == []
    torch.testing.assert_close(ours.weight, ref.weight.detach(), rtol=0, atol=0)
    hashed = FiitedEmbeddingBag(None, D, chunks=2, store_config=StoreConfig(budget_bytes=4096))
    with pytest.raises(ConfigError, match="no num_embeddings"):
        _ = hashed.weight


# --- autograd semantics -----------------------------------------------------------------------------------------


def test_autograd_grad_returns_weight_gradients_and_updates_nothing_until_backward(rng):
    ref, ours = twin()
    ids = torch.from_numpy(rng.integers(0, N, 9))
    offsets = torch.tensor([0, 4, 6])
    w_ref = torch.rand(9, requires_grad=True)
    w = w_ref.detach().clone().requires_grad_(True)
    loss = ours(ids, offsets, per_sample_weights=w).pow(2).sum()
    before = snapshot(ours.store)
    (g,) = torch.autograd.grad(loss, [w], retain_graph=True)
    assert_unchanged(before, snapshot(ours.store))  # a query, not a training step
    (g_ref,) = torch.autograd.grad(ref(ids, offsets, per_sample_weights=w_ref).pow(2).sum(), [w_ref])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    loss.backward(retain_graph=True)  # the one update of this batch
    assert ours.store.step_count == 1
    with pytest.raises(StaleBatchError, match="one update per training batch"):
        loss.backward()
    assert ours.store.step_count == 1


def test_double_backward_is_refused_before_anything_changes(rng):
    _, ours = twin()
    w = torch.rand(6, requires_grad=True)
    out = ours(torch.from_numpy(rng.integers(0, N, 6)), torch.tensor([0, 3]), per_sample_weights=w)
    before = snapshot(ours.store)
    with pytest.raises(UnsupportedAutogradError, match="create_graph"):
        torch.autograd.grad(out.pow(2).sum(), w, create_graph=True)
    assert_unchanged(before, snapshot(ours.store))


def test_a_forward_without_backward_leaves_nothing_pending():
    _, ours = twin()
    out = ours(torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    assert ours.pending_batches == 1
    del out  # autograd frees the graph, and with it the batch
    assert ours.pending_batches == 0


# --- torch.compile ----------------------------------------------------------------------------------------------


class Tower(torch.nn.Module):
    """A model whose embeddings are a FIITED store, optionally with a graph break after the lookup."""

    def __init__(self, emb: torch.nn.Module, width: int, graph_break: bool):
        super().__init__()
        torch.manual_seed(3)
        self.emb = emb
        self.top = torch.nn.Linear(width, 1)
        self.graph_break = graph_break

    def forward(self, features):
        x = self.emb(*features) if isinstance(features, tuple) else self.emb(features)
        if isinstance(x, dict):
            x = torch.cat(list(x.values()), dim=1)
        elif not isinstance(x, torch.Tensor):
            x = x.values()
        if self.graph_break:
            torch._dynamo.graph_break()
        return torch.sigmoid(self.top(torch.relu(x))).squeeze(1)


def _train(model, batches, compiled: bool):
    run = torch.compile(model, fullgraph=not model.graph_break) if compiled else model
    opt = torch.optim.SGD(model.top.parameters(), lr=0.05)
    losses = []
    for features, labels in batches:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(run(features), labels)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _bag(path=None, cache=False):
    cfg = (
        StoreConfig(mode="cache", budget_fraction=0.5, prune_period=2, sample_size=64)
        if cache
        else StoreConfig(pruning=DynamicRatio(0.5), prune_period=2, sample_size=64)
    )
    return FiitedEmbeddingBag(
        60, 8, mode="mean", chunks=2, optimizer="adagrad", learning_rate=0.2, store_config=cfg, path=path
    )


@pytest.mark.slow
@pytest.mark.parametrize("graph_break", [False, True], ids=["in-graph", "graph-break"])
@pytest.mark.parametrize("tier", ["pool", "disk"])
def test_a_compiled_model_trains_like_the_eager_one(graph_break, tier, tmp_path, rng):
    batches = []
    for _ in range(5):
        ids = torch.from_numpy(rng.integers(0, 60, 24))
        offsets = torch.from_numpy(np.sort(rng.choice(np.arange(1, 24), 7, replace=False))).to(torch.int64)
        batches.append(((ids, torch.cat([torch.tensor([0]), offsets])), torch.from_numpy(rng.random(8) < 0.5).float()))
    cache = tier == "disk"
    eager = Tower(_bag(tmp_path / "eager" if cache else None, cache), 8, graph_break)
    compiled = Tower(_bag(tmp_path / "compiled" if cache else None, cache), 8, graph_break)
    assert _train(compiled, batches, compiled=True) == pytest.approx(_train(eager, batches, compiled=False), abs=1e-6)
    for a, b in ((eager.emb.store, compiled.emb.store),):
        assert a.step_count == b.step_count == 5 and a.counters.prunes == b.counters.prunes >= 2
        np.testing.assert_allclose(a.lookup("table", np.arange(60)), b.lookup("table", np.arange(60)), atol=1e-6)
    if cache:
        assert compiled.emb.store.counters.spilled_chunks > 0  # the disk tier took part


@pytest.mark.slow
def test_a_compiled_collection_with_weights_trains_like_the_eager_one(rng):
    def ebc():
        return FiitedEmbeddingBagCollection(
            [
                TableConfig("user", 8, chunks=2, num_embeddings=30, optimizer="sgd", learning_rate=0.1),
                TableConfig("item", 4, chunks=1, num_embeddings=20, optimizer="sgd", learning_rate=0.1),
            ],
            is_weighted=True,
            store_config=FULL,
            output="dict",
        )

    batches = []
    for _ in range(3):
        lengths = torch.from_numpy(rng.integers(1, 3, 8))
        n = int(lengths.sum())
        values = torch.from_numpy(rng.integers(0, 20, n))
        batches.append(
            (
                JaggedFeatures(["user", "item"], values, lengths, torch.rand(n)),
                torch.from_numpy(rng.random(4) < 0.5).float(),
            )
        )
    eager, compiled = Tower(ebc(), 12, False), Tower(ebc(), 12, False)
    assert _train(compiled, batches, compiled=True) == pytest.approx(_train(eager, batches, compiled=False), abs=1e-6)
    for t in ("user", "item"):
        np.testing.assert_array_equal(
            eager.emb.store.lookup(t, np.arange(20)), compiled.emb.store.lookup(t, np.arange(20))
        )


# --- TorchRec's shapes ------------------------------------------------------------------------------------------


def test_keyed_output_lists_features_in_table_order_like_torchrec():
    tables = [TableConfig("user", 4, chunks=1, num_embeddings=10), TableConfig("item", 2, chunks=1, num_embeddings=10)]
    ebc = FiitedEmbeddingBagCollection(tables, store_config=FULL)
    kjt = JaggedFeatures(["item", "user"], torch.tensor([1, 2, 3]), torch.tensor([1, 0, 1, 1]))
    kt = ebc(kjt)
    assert kt.keys() == ["user", "item"] and kt.length_per_key() == [4, 2] and kt.offset_per_key() == [0, 4, 6]
    concat = FiitedEmbeddingBagCollection(tables, store_config=FULL, output="concat")
    concat.store.import_state(ebc.store.export_state())
    flat = concat(kjt)  # the input's order: item, then user
    torch.testing.assert_close(kt["user"], flat[:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(kt.to_dict()["item"], flat[:, :2], rtol=0, atol=0)


def test_our_keyed_tensor_has_torchrecs_methods():
    kt = KeyedTensor(["a", "b"], [2, 3], torch.arange(10.0).reshape(2, 5))
    assert kt.keys() == ["a", "b"] and kt.key_dim() == 1 and kt.offset_per_key() == [0, 2, 5]
    torch.testing.assert_close(kt["b"], torch.tensor([[2.0, 3, 4], [7, 8, 9]]))
    assert list(kt.to_dict()) == ["a", "b"]
    with pytest.raises(InputShapeError, match="key_dim"):
        KeyedTensor(["a"], [2], torch.zeros(2, 2), key_dim=0)


def test_torchrec_style_configs_are_accepted_without_torchrec():
    cfg = types.SimpleNamespace(
        name="t_user",
        embedding_dim=8,
        num_embeddings=50,
        feature_names=["user", "friend"],
        pooling=types.SimpleNamespace(name="MEAN"),
        init_fn=None,
        data_type="FP32",
        weight_init_min=-0.1,
        weight_init_max=0.1,
    )
    ebc = FiitedEmbeddingBagCollection([cfg], chunks=2)
    assert ebc.mode == "mean" and ebc.tables[0].chunks == 2 and ebc.tables[0].init_scale == 0.1
    assert ebc.embedding_names() == ["user", "friend"]
    kt = ebc(JaggedFeatures(["user", "friend"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0])))
    assert kt.keys() == ["user", "friend"] and kt.values().shape == (2, 16)
    with pytest.raises(ConfigError, match="init_fn"):
        FiitedEmbeddingBagCollection([types.SimpleNamespace(**{**vars(cfg), "init_fn": abs})])


@pytest.mark.skipif(not HAS_TORCHREC, reason="torchrec is not installed (docs/testing.md: how CI installs it)")
def test_torchrec_keyed_jagged_tensor_in_and_keyed_tensor_out_equal_torchrecs_collection(rng):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from torchrec.sparse.jagged_tensor import KeyedTensor as TorchRecKeyedTensor

    configs = [
        EmbeddingBagConfig(
            num_embeddings=30, embedding_dim=8, name="t_user", feature_names=["user"], pooling=PoolingType.MEAN
        ),
        EmbeddingBagConfig(
            num_embeddings=20, embedding_dim=4, name="t_item", feature_names=["item", "seen"], pooling=PoolingType.MEAN
        ),
    ]
    theirs = EmbeddingBagCollection(configs)
    ours = FiitedEmbeddingBagCollection(configs, store_config=FULL, chunks={"t_user": 2, "t_item": 1})
    for name, weight in theirs.state_dict().items():
        ours.store.insert_or_assign(name.split(".")[1], np.arange(weight.shape[0]), weight.numpy().copy())
    lengths = torch.from_numpy(rng.integers(0, 3, 12))
    kjt = KeyedJaggedTensor(
        keys=["seen", "user", "item"], values=torch.from_numpy(rng.integers(0, 20, int(lengths.sum()))), lengths=lengths
    )
    kt, ref = ours(kjt), theirs(kjt)
    assert isinstance(kt, TorchRecKeyedTensor)
    assert kt.keys() == ref.keys() == ["user", "item", "seen"] and kt.length_per_key() == ref.length_per_key()
    torch.testing.assert_close(kt.values(), ref.values().detach(), rtol=1e-6, atol=1e-7)


def _torchrec_like(name, features):
    return types.SimpleNamespace(
        name=name,
        embedding_dim=4,
        num_embeddings=20,
        feature_names=features,
        pooling=types.SimpleNamespace(name="SUM"),
        init_fn=None,
        data_type="FP32",
        weight_init_min=-0.1,
        weight_init_max=0.1,
    )


def test_a_feature_named_by_two_tables_is_refused_by_name():
    with pytest.raises(ConfigError, match="feature 'user' is named by table 't_a' and by table 't_b'"):
        FiitedEmbeddingBagCollection([_torchrec_like("t_a", ["user"]), _torchrec_like("t_b", ["user", "x"])])
    with pytest.raises(ConfigError, match="feature 'item' is named by table 't_a' and is table 'item'"):
        FiitedEmbeddingBagCollection(
            [_torchrec_like("t_a", ["item"]), TableConfig("item", 4, chunks=1, num_embeddings=20)]
        )


def test_a_batch_naming_a_feature_twice_is_refused_and_changes_nothing():
    ebc = FiitedEmbeddingBagCollection([_torchrec_like("t_a", ["user", "friend"])])
    before = snapshot(ebc.store)
    with pytest.raises(InputShapeError, match="feature 'user' appears 2 times in one batch"):
        ebc(JaggedFeatures(["user", "user"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0])))
    assert_unchanged(before, snapshot(ebc.store))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_dict_input_of_float_ids_is_refused_by_feature_and_dtype(compiled):
    ebc = FiitedEmbeddingBagCollection([_torchrec_like("t_a", ["user", "friend"])])
    run = torch.compile(ebc) if compiled else ebc
    good = {
        "user": (torch.tensor([1, 2]), torch.tensor([0, 1])),
        "friend": (torch.tensor([3, 4]), torch.tensor([0, 1])),
    }
    assert run(good).values().shape == (2, 8)
    bad = dict(good, friend=(torch.tensor([3.0, 4.0]), torch.tensor([0, 1])))
    with pytest.raises(
        InputDTypeError, match="feature 'friend': ids must be an int64 or int32 tensor, got torch.float32"
    ):
        run(bad)
    values = torch.tensor([1.0, 2.0, 3.0])  # a jagged batch of floats, eager and compiled alike
    with pytest.raises(InputDTypeError, match="input must be int64 or int32 .* got torch.float32"):
        run(JaggedFeatures(["user", "friend"], values, torch.tensor([1, 1, 1, 0])))


def test_a_module_holding_a_store_says_why_it_is_not_deep_copied_and_how_to_copy_it():
    import copy

    from fiited_store import StoreCopyError

    ebc = FiitedEmbeddingBagCollection([_torchrec_like("t_a", ["user"])])
    with pytest.raises(StoreCopyError, match="cannot be deep-copied: it holds a store .* load_state_dict"):
        copy.deepcopy(ebc)
    bag = FiitedEmbeddingBag(20, 4, chunks=1)
    with pytest.raises(StoreCopyError, match="FiitedEmbeddingBag cannot be deep-copied"):
        copy.deepcopy(bag)

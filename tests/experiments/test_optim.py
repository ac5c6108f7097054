"""The peers' embedding optimizers (``experiments/models/optim.py``): row-wise Adagrad
against a slow reference and against the store's own row-wise rule, and the memory each
optimizer is charged, and the ratio each peer is given at equal memory."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fiited_store import StoreConfig
from fiited_store.adapters import FiitedEmbeddingBag
from fiited_store.errors import ConfigError
from fiited_store.experiments.config import TrainConfig
from fiited_store.experiments.models.compressed import HashedEmbeddings
from fiited_store.experiments.models.dlrm import DenseEmbeddings, MixedDimEmbeddings
from fiited_store.experiments.models.optim import RowWiseAdagrad, sparse_optimizer, table_training_bytes
from fiited_store.experiments.sweep import memory_matched_ratio


def _reference(w, acc, grads, lr, eps=1e-8):
    """Row by row in float64: a_i += mean(g_i^2), w_i -= lr g_i / (sqrt(a_i) + eps)."""
    w, acc = w.astype(np.float64), acc.astype(np.float64)
    for g in grads:
        for i in range(w.shape[0]):
            if np.any(g[i] != 0):
                acc[i] += np.mean(g[i] ** 2)
                w[i] -= lr * g[i] / (np.sqrt(acc[i]) + eps)
    return w, acc


def _bags(rng, n, steps):
    """Batches of ids with repeats (a sparse gradient sums them) and their offsets."""
    out = []
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, n, size=12))
        ids[1] = ids[0]  # one id twice in a bag
        out.append((ids, torch.tensor([0, 5, 12])))
    return out


@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adagrad_matches_the_reference_row_by_row(sparse):
    rng = np.random.default_rng(0)
    bag = torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=sparse)
    w0 = bag.weight.detach().numpy().copy()
    opt = RowWiseAdagrad(bag.parameters(), lr=0.1)
    grads = []
    for ids, offsets in _bags(rng, 30, 5):
        opt.zero_grad()
        out = bag(ids, offsets[:-1])
        (out * torch.arange(1.0, 5.0)).sum().backward()
        grads.append(bag.weight.grad.to_dense().numpy().copy())
        opt.step()
    want_w, want_acc = _reference(w0, np.zeros(30), grads, 0.1)
    np.testing.assert_allclose(bag.weight.detach().numpy(), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.state[bag.weight]["sum"].numpy(), want_acc, rtol=1e-5)


def test_rowwise_adagrad_on_a_torch_table_trains_like_the_store_with_one_chunk_a_row():
    """The store's row-wise rule keeps one accumulator per chunk: with K = 1 that is
    FBGEMM's per row, the rule the torch peers run."""
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.uniform(-0.3, 0.3, size=(40, 8)).astype(np.float32))
    store = FiitedEmbeddingBag(
        40, 8, mode="sum", chunks=1, optimizer="rowwise_adagrad", learning_rate=0.05,
        store_config=StoreConfig(budget_fraction=1.0, prune_period=0), _weight=w.clone(),
    )  # fmt: skip
    bag = torch.nn.EmbeddingBag(40, 8, mode="sum", sparse=True, _weight=w.clone())
    opt = RowWiseAdagrad(bag.parameters(), lr=0.05)
    target = torch.from_numpy(rng.standard_normal((2, 8)).astype(np.float32))
    for ids, offsets in _bags(rng, 40, 6):
        opt.zero_grad()
        ((bag(ids, offsets[:-1]) - target) ** 2).sum().backward()
        opt.step()
        ((store(ids, offsets[:-1]) - target) ** 2).sum().backward()  # the store steps in backward
    np.testing.assert_allclose(store.weight.detach().numpy(), bag.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_each_optimizer_is_charged_its_own_state():
    emb = DenseEmbeddings([100, 10], dim=8)
    weights = (100 + 10) * 8 * 4
    assert emb.training_bytes() == emb.training_bytes("adagrad") == 2 * weights
    assert emb.training_bytes("rowwise_adagrad") == weights + (100 + 10) * 4
    assert table_training_bytes(emb.parameters(), "rowwise_adagrad") == weights + 440


def test_a_peer_at_the_memory_matched_ratio_holds_that_memory():
    cards, dim = [20_000, 5_000], 32
    dense_training = 2 * sum(cards) * dim * 4
    for optimizer in ("adagrad", "rowwise_adagrad"):
        cfg = TrainConfig(dim=dim, optimizer=optimizer, method="hashing")
        r = memory_matched_ratio(0.05, cfg)
        held = HashedEmbeddings(cards, dim, r).training_bytes(optimizer) / dense_training
        assert held == pytest.approx(0.05, rel=1e-3), optimizer
    # small-dim's rows are D (1 - r) wide: a row-wise accumulator is a larger share of them
    # (m = 4 / 64: three dimensions and their accumulator, of 32 and 32)
    r = memory_matched_ratio(0.0625, TrainConfig(dim=dim, optimizer="rowwise_adagrad", method="small-dim"))
    d = round(dim * (1 - r))
    tables = MixedDimEmbeddings(cards, [d, d], dim).bags.parameters()
    assert d == 3 and table_training_bytes(tables, "rowwise_adagrad") / dense_training == pytest.approx(0.0625)
    assert memory_matched_ratio(0.05, TrainConfig(dim=dim)) == pytest.approx(0.95)
    assert memory_matched_ratio(0.9, TrainConfig(dim=dim)) == pytest.approx(0.1)
    # more than a dense table with its state: the peer runs dense
    assert memory_matched_ratio(0.9, TrainConfig(dim=dim, optimizer="rowwise_adagrad")) == 0.0
    assert memory_matched_ratio(1.2, TrainConfig(dim=dim)) == 0.0


def test_bad_optimizer_names_and_shapes_are_refused_by_value():
    with pytest.raises(ConfigError, match="optimizer must be one of .* got 'adam'"):
        TrainConfig(optimizer="adam")
    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match="got 'sgd'"):
        sparse_optimizer("sgd", p, 0.1)
    with pytest.raises(ValueError, match="got 'sgd'"):
        table_training_bytes(p, "sgd")
    with pytest.raises(ValueError, match=r"needs 2-D parameters .* got shape \(3,\)"):
        RowWiseAdagrad([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        RowWiseAdagrad(p, lr=0)
    assert isinstance(sparse_optimizer("adagrad", p, 0.1), torch.optim.Adagrad)


def test_adaembed_at_the_store_matched_ratio_holds_that_memory():
    from fiited_store.experiments.sweep import store_matched_ratio
    from fiited_store.experiments.train import embeddings_of, load_dataset

    cfg = TrainConfig(method="adaembed", synthetic_cap=2_000, eval_samples=100, steps=1)
    _, _, _, names, cards, counts = load_dataset(cfg)
    yardstick = 2 * sum(cards) * cfg.dim * 4
    for target in (0.06, 0.2):
        r = store_matched_ratio(target, cfg)
        emb = embeddings_of(replace(cfg, ratio=r), names, cards, counts)
        assert emb.training_bytes() / yardstick == pytest.approx(target, rel=0.02), (target, r)
    # less than the entries alone: the store cannot be given it, and runs at its smallest pool
    assert store_matched_ratio(0.001, cfg) == pytest.approx(1 - 1e-6)

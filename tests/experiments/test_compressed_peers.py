"""The hashing trick and quotient-remainder embeddings against plain torch, and every
method's training memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fiited_store.adapters.floors import hash_ids
from fiited_store.experiments.data import Batch
from fiited_store.experiments.models.compressed import HashedEmbeddings, QREmbeddings, hashed_rows, qr_collisions
from fiited_store.experiments.models.dlrm import DenseEmbeddings, MixedDimEmbeddings

CARDS = [50, 7, 1000]


def batch(seed: int, B: int = 6) -> Batch:
    g = np.random.default_rng(seed)
    lengths = g.integers(0, 4, size=len(CARDS) * B)
    values = np.concatenate(
        [g.integers(0, CARDS[f], size=int(lengths[f * B : (f + 1) * B].sum())) for f in range(len(CARDS))]
    )
    return Batch(
        torch.zeros(B, 0),
        [f"f{i}" for i in range(len(CARDS))],
        torch.from_numpy(values.astype(np.int64)),
        torch.from_numpy(lengths.astype(np.int64)),
        torch.zeros(B),
    )


def bags_of(b: Batch):
    """[(feature, bag, ids of the bag)] in plain Python."""
    B, vals, lens = b.size, b.values.tolist(), b.lengths.tolist()
    out, at = [], 0
    for f in range(len(CARDS)):
        for j in range(B):
            n = lens[f * B + j]
            out.append((f, j, vals[at : at + n]))
            at += n
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hashed_embeddings_sum_the_hashed_rows_of_each_bag(seed):
    emb = HashedEmbeddings(CARDS, dim=4, ratio=0.9)
    b = batch(seed)
    got = emb(b).detach()
    D = 4
    for f, j, ids in bags_of(b):
        rows = hash_ids(torch.tensor(ids, dtype=torch.int64), emb.rows[f], salt=f * 104729 + 1)
        want = emb.bags[f].weight.detach()[rows].sum(0) if ids else torch.zeros(D)
        torch.testing.assert_close(got[j, f * D : (f + 1) * D], want)


def test_hashing_spreads_ids_over_every_row_and_keeps_small_tables_whole():
    rows = hash_ids(torch.arange(100_000), 1000, salt=3)
    counts = torch.bincount(rows, minlength=1000)
    assert int(counts.min()) > 50 and int(counts.max()) < 160  # about 100 each
    assert hashed_rows(10, 0.5) == 5 and hashed_rows(10, 0.999) == 1 and hashed_rows(3, 0.0) == 3
    assert HashedEmbeddings([10**6], dim=2, ratio=0.9975).rows == [2500]


@pytest.mark.parametrize("seed", [0, 1])
def test_qr_embeddings_multiply_the_quotient_and_remainder_rows(seed):
    emb = QREmbeddings(CARDS, dim=4, ratio=0.5)
    b = batch(seed)
    got = emb(b).detach()
    D = 4
    for f, j, ids in bags_of(b):
        m = emb.collisions[f]
        q, r = emb.quotient[f].weight.detach(), emb.remainder[f].weight.detach()
        want = sum((q[i // m] * r[i % m] for i in ids), torch.zeros(D))
        torch.testing.assert_close(got[j, f * D : (f + 1) * D], want)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**7), st.sampled_from([0.0, 0.5, 0.75, 0.9375, 0.99, 0.995, 0.9975]))
def test_qr_tables_fit_the_ratio_whenever_two_tables_can(n, ratio):
    m, ok = qr_collisions(n, ratio)
    rows = math.ceil(n / m) + (m if m > 1 else 0)
    budget = (1.0 - ratio) * n
    if ok:
        assert rows <= budget + 1e-9 or m == 1
        # no fewer collisions would fit
        if m > 2:
            assert math.ceil(n / (m - 1)) + m - 1 > budget
    else:  # no pair of tables fits: the smallest pair
        assert all(math.ceil(n / k) + k > budget for k in range(2, int(2 * math.sqrt(n)) + 3))
        assert m == math.ceil(math.sqrt(n))


def test_qr_collisions_end_where_only_the_real_valued_sizes_fit():
    """n = 17 at 50%: 8.5 rows, above 2 sqrt(17) = 8.25, but every m gives 9 or more (this looped forever)."""
    assert qr_collisions(17, 0.5) == (5, False)
    assert qr_collisions(16, 0.5) == (4, True)


def test_qr_and_hashing_train_with_sparse_adagrad():
    for emb in (QREmbeddings(CARDS, dim=4, ratio=0.75), HashedEmbeddings(CARDS, dim=4, ratio=0.75)):
        opt = torch.optim.Adagrad(emb.sparse_parameters(), lr=0.1)
        b = batch(5)
        before = [p.detach().clone() for p in emb.parameters()]
        emb(b).sum().backward()
        assert all(p.grad is None or p.grad.is_sparse for p in emb.parameters())
        opt.step()
        assert any(not torch.equal(a, p.detach()) for a, p in zip(before, emb.parameters()))


def test_training_memory_counts_weights_and_optimizer_state():
    dense = DenseEmbeddings(CARDS, dim=8)
    assert dense.training_bytes() == 2 * sum(CARDS) * 8 * 4
    h = HashedEmbeddings(CARDS, dim=8, ratio=0.9)
    assert h.training_bytes() == 2 * sum(h.rows) * 8 * 4
    q = QREmbeddings(CARDS, dim=8, ratio=0.5)
    rows = sum(e.num_embeddings for e in q.quotient) + sum(e.num_embeddings for e in q.remainder)
    assert q.training_bytes() == 2 * rows * 8 * 4
    md = MixedDimEmbeddings(CARDS, [8, 2, 4], dim=8)
    tables = (50 * 8 + 7 * 2 + 1000 * 4) * 4
    projections = (2 * 8 + 4 * 8) * 4  # the full-width table needs none
    assert md.training_bytes() == 2 * tables + 3 * projections

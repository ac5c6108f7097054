"""Datasets, metrics, the Mixed-Dimension rule, and a short real training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fiited_store.experiments.data.criteo import load_criteo_tsv
from fiited_store.experiments.data.movielens import DatasetError, load_movielens
from fiited_store.experiments.data.synthetic import SyntheticClickStream, scaled_cardinalities
from fiited_store.experiments.metrics import accuracy, auc, log_loss
from fiited_store.experiments.models.dlrm import md_dims

SHARED_ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"

RATINGS = [(1, 10, 5), (1, 20, 3), (2, 10, 4), (3, 30, 1), (2, 30, 4), (3, 10, 2)]
USERS = {1: (24, "M", "technician", "85711"), 2: (53, "F", "other", "94043"), 3: (24, "M", "writer", "32067")}
ITEMS = {
    10: ("Toy Story", 1995, ["Animation", "Comedy"]),
    20: ("GoldenEye", 1995, ["Action"]),
    30: ("Heat", 1996, ["Crime", "Drama", "Thriller"]),
}


def write_atomic(d: Path) -> Path:
    d.mkdir()
    (d / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t88000{k}\n" for k, (u, i, r) in enumerate(RATINGS))
    )
    (d / "x.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, (a, g, o, z) in USERS.items())
    )
    (d / "x.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t{y}\t{' '.join(g)}\n" for i, (t, y, g) in ITEMS.items())
    )
    return d


GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def write_original(d: Path) -> Path:
    d.mkdir()
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t88000{k}\n" for k, (u, i, r) in enumerate(RATINGS)))
    (d / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, (a, g, o, z) in USERS.items()))
    lines = []
    for i, (t, y, g) in ITEMS.items():
        flags = "|".join("1" if name in g else "0" for name in GENRES)
        lines.append(f"{i}|{t} ({y})|01-Jan-{y}||http://x|{flags}\n")
    (d / "u.item").write_text("".join(lines))
    return d


def test_movielens_atomic_and_original_formats_give_the_same_dataset(tmp_path):
    a = load_movielens(write_atomic(tmp_path / "atomic"))
    b = load_movielens(write_original(tmp_path / "orig"))
    assert a.feature_names == ["user", "item", "age", "gender", "occupation", "zip", "year", "genres"]
    np.testing.assert_array_equal(a.labels, [1, 0, 1, 0, 1, 0])  # rating >= 4
    assert a.cardinalities == b.cardinalities
    for va, vb, oa, ob in zip(a.values, b.values, a.offsets, b.offsets):
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(oa, ob)
    # genres: a pooled multi-hot bag per rating
    np.testing.assert_array_equal(np.diff(a.offsets[-1]), [2, 1, 2, 3, 3, 2])
    assert a.cardinalities[a.feature_names.index("age")] == 2


def test_movielens_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="neither RecBole atomic files nor"):
        load_movielens(tmp_path)
    d = write_atomic(tmp_path / "bad")
    (d / "x.inter").write_text("user_id:token\titem_id:token\trating:float\n9\t10\t5\n")
    with pytest.raises(DatasetError, match=r"users \['9'\]"):
        load_movielens(d)


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    data = SyntheticClickStream(scaled_cardinalities(cap=50), seed=1).dataset(1000, stream_seed=0)
    tr, va, te = data.split(seed=3)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)
    tr2, _, _ = data.split(seed=3)
    np.testing.assert_array_equal(tr.labels, tr2.labels)
    np.testing.assert_array_equal(tr.values[5], tr2.values[5])


def test_batches_are_feature_major_jagged(tmp_path):
    data = load_movielens(write_atomic(tmp_path / "a"))
    b = data.batch(np.array([3, 0]))
    assert b.keys == data.feature_names
    lengths = b.lengths.view(8, 2).numpy()
    assert lengths[-1].tolist() == [3, 2]  # genres of ratings 3 and 0
    assert b.values.shape[0] == lengths.sum()
    ids, offs = b.per_feature()[1]
    assert ids.tolist() == [data.values[1][3], data.values[1][0]] and offs.tolist() == [0, 1, 2]


def test_criteo_tsv(tmp_path):
    lines = []
    for i in range(5):
        ints = [str(i), "", "-3"] + [str(k) for k in range(10)]
        cats = [f"{(i * 7919 + j):08x}" if j != 4 else "" for j in range(26)]
        lines.append("\t".join([str(i % 2)] + ints + cats))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    d = load_criteo_tsv(tmp_path)
    assert len(d) == 5 and d.num_dense == 13 and len(d.feature_names) == 26
    np.testing.assert_allclose(d.dense[:, 0], np.log1p(np.arange(5)))
    assert np.all(d.dense[:, 1:3] == 0)  # empty and negative integers
    assert d.values[0][1] == 7919 % d.cardinalities[0]
    assert np.all(d.values[4] == d.cardinalities[4] - 1)  # empty categorical: id -1, folded into the table
    (tmp_path / "train.txt").write_text("1\t2\n")
    with pytest.raises(DatasetError, match="2 fields"):
        load_criteo_tsv(tmp_path)


def test_auc_log_loss_and_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.random(300).round(2)  # ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert auc(y, s) == pytest.approx(brute)
    assert log_loss([1, 0], [0.9, 0.1]) == pytest.approx(-np.log(0.9))
    assert accuracy([1, 0, 1], [0.7, 0.2, 0.4]) == pytest.approx(2 / 3)


def test_mixed_dimension_rule_fits_the_budget_and_favours_popular_rows():
    cards = [10, 1000, 100_000]
    counts = [np.full(c, 1000.0 / c) for c in cards]  # same traffic per table: small tables have hot rows
    dims = md_dims(counts, cards, 64, budget_fraction=0.25)
    assert dims[0] >= dims[1] >= dims[2] >= 1
    size = sum(n * d + (d * 64 if d < 64 else 0) for n, d in zip(cards, dims))
    assert size <= 0.25 * sum(cards) * 64


def real_ml100k_slice(tmp_path: Path) -> Path:
    """The shared ML-100K files when they are beside the repository (CI has them),
    otherwise a generated directory in the same format."""
    if SHARED_ML100K.is_dir():
        return SHARED_ML100K
    d = tmp_path / "ml"
    d.mkdir()
    rng = np.random.default_rng(0)
    users, items = 300, 400
    taste = rng.normal(size=(users, 4)) @ rng.normal(size=(4, items))
    u = rng.integers(1, users + 1, 20_000)
    i = rng.zipf(1.2, 20_000) % items + 1
    r = np.clip(np.round(3 + taste[u - 1, i - 1]), 1, 5).astype(int)
    (d / "m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{a}\t{b}\t{c}\t0\n" for a, b, c in zip(u, i, r))
    )
    (d / "m.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{k}\t{20 + k % 40}\t{'MF'[k % 2]}\tx{k % 9}\t{k % 50:05d}\n" for k in range(1, users + 1))
    )
    (d / "m.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{k}\tT{k}\t{1990 + k % 10}\tG{k % 5} G{k % 3}\n" for k in range(1, items + 1))
    )
    return d


@pytest.mark.slow
def test_a_short_training_run_on_movielens_improves_auc(tmp_path):
    """FIITED at 75% pruning on real ratings: one epoch lifts test AUC well above its start."""
    import torch

    from fiited_store.experiments.models.dlrm import DLRM, build_embeddings
    from fiited_store.experiments.train import evaluate

    data = load_movielens(real_ml100k_slice(tmp_path))
    data = data.subset(np.arange(min(len(data), 30_000)), "slice")
    train, val, test = data.split(seed=0)
    torch.manual_seed(0)
    emb = build_embeddings(
        "fiited-manual",
        data.feature_names,
        data.cardinalities,
        16,
        0.75,
        4,
        0.05,
        counts=train.access_counts(),
        prune_period=20,
        gamma=0.9,
    )
    model = DLRM(emb, len(data.feature_names), 16, 0)
    opt = torch.optim.Adam([p for p in model.parameters()], lr=1e-3)
    start = evaluate(model, test)["auc"]
    for batch in train.batches(256, shuffle=True, seed=0):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()
        opt.step()
    end = evaluate(model, test)["auc"]
    assert end > start + 0.05 and end > 0.65
    assert emb.store.stats()["total"]["resident_chunks"] <= emb.store.pools[0].slots

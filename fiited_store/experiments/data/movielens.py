"""MovieLens as a click-through task: label = rating >= 4.

Reads RecBole's atomic files (``*.inter``, ``*.user``, ``*.item``, tab-separated,
``name:type`` headers) or MovieLens' original ``u.data`` / ``u.user`` / ``u.item``.
Sparse features: user, item, age, gender, occupation, zip code, release year, and
the genres as one pooled multi-hot bag.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ...errors import CorruptStoreError
from . import TabularDataset, encode

FEATURES = ["user", "item", "age", "gender", "occupation", "zip", "year", "genres"]

ORIGINAL_GENRES = [
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


class DatasetError(CorruptStoreError):
    """A dataset directory is missing files or holds malformed rows."""


def _read_atomic(path: Path) -> dict[str, list[str]]:
    with open(path, newline="", encoding="latin-1") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        names = [h.split(":")[0] for h in header]
        cols: dict[str, list[str]] = {n: [] for n in names}
        for i, row in enumerate(reader):
            if len(row) != len(names):
                raise DatasetError(f"{path}: line {i + 2} has {len(row)} fields, the header {len(names)}")
            for n, v in zip(names, row):
                cols[n].append(v)
    return cols


def _atomic(directory: Path):
    inter = next(directory.glob("*.inter"), None)
    user = next(directory.glob("*.user"), None)
    item = next(directory.glob("*.item"), None)
    if inter is None or user is None or item is None:
        raise DatasetError(f"{directory}: RecBole atomic files *.inter, *.user and *.item are needed")
    ic, uc, tc = _read_atomic(inter), _read_atomic(user), _read_atomic(item)
    users = {
        u: (a, g, o, z)
        for u, a, g, o, z in zip(uc["user_id"], uc["age"], uc["gender"], uc["occupation"], uc["zip_code"])
    }
    items = {i: (y, c.split()) for i, y, c in zip(tc["item_id"], tc["release_year"], tc["class"])}
    ratings = np.array(ic["rating"], np.float64)
    return ic["user_id"], ic["item_id"], ratings, users, items


def _original(directory: Path):
    data = directory / "u.data"
    if not data.exists():
        raise DatasetError(f"{directory}: neither RecBole atomic files nor MovieLens' u.data were found")
    rows = [line.split("\t") for line in data.read_text(encoding="latin-1").splitlines() if line]
    uid, iid, rating = [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])
    users = {}
    for line in (directory / "u.user").read_text(encoding="latin-1").splitlines():
        if line:
            u, a, g, o, z = line.split("|")
            users[u] = (a, g, o, z)
    items = {}
    for line in (directory / "u.item").read_text(encoding="latin-1").splitlines():
        if line:
            parts = line.split("|")
            year = parts[2][-4:] if parts[2] else ""
            flags = parts[5 : 5 + len(ORIGINAL_GENRES)]
            items[parts[0]] = (year, [g for g, f in zip(ORIGINAL_GENRES, flags) if f == "1"])
    return uid, iid, rating, users, items


def load_movielens(path: str | Path) -> TabularDataset:
    """Load a MovieLens directory in either format as a :class:`TabularDataset`."""
    directory = Path(path)
    if not directory.is_dir():
        raise DatasetError(f"{directory} is not a directory")
    uid, iid, ratings, users, items = _atomic(directory) if any(directory.glob("*.inter")) else _original(directory)
    missing_u = sorted({u for u in uid if u not in users})[:3]
    missing_i = sorted({i for i in iid if i not in items})[:3]
    if missing_u or missing_i:
        raise DatasetError(f"{directory}: ratings name users {missing_u} / items {missing_i} with no profile")
    cols = {
        "user": np.array(uid),
        "item": np.array(iid),
        "age": np.array([users[u][0] for u in uid]),
        "gender": np.array([users[u][1] for u in uid]),
        "occupation": np.array([users[u][2] for u in uid]),
        "zip": np.array([users[u][3] for u in uid]),
        "year": np.array([items[i][0] for i in iid]),
    }
    n = len(uid)
    values, offsets, cards = [], [], []
    for name in FEATURES[:-1]:
        ids, card = encode(cols[name])
        values.append(ids)
        offsets.append(np.arange(n + 1, dtype=np.int64))
        cards.append(card)
    genre_lists = [items[i][1] for i in iid]
    genre_vocab = {g: k for k, g in enumerate(sorted({g for gl in genre_lists for g in gl}))}
    lengths = np.array([len(gl) for gl in genre_lists], np.int64)
    values.append(np.array([genre_vocab[g] for gl in genre_lists for g in gl], np.int64))
    offsets.append(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    cards.append(max(len(genre_vocab), 1))
    labels = (ratings >= 4).astype(np.float32)
    return TabularDataset(
        "movielens",
        list(FEATURES),
        cards,
        values,
        offsets,
        np.zeros((n, 0), np.float32),
        labels,
        {"source": str(directory)},
    )

"""DLRM (Naumov et al., 2019) over any embedding module, and the embedding methods it is compared with.

Methods, all returning float32[B, F * D] (features side by side):

- ``dense``: one ``torch.nn.EmbeddingBag`` per feature, unpruned (the baseline);
- ``md``: Mixed-Dimension embeddings (Ginart et al.): per-feature dimensions from
  access frequency by the power-law rule, projected to D by a linear map;
- ``hashing`` / ``qr``: full-width rows shared between ids, the hashing trick and
  quotient-remainder embeddings (:mod:`.compressed`);
- ``adaembed``: FIITED with K = 1 (whole rows pruned, AdaEmbed);
- ``fiited-manual``: FIITED with per-chunk ratios linear in the chunk index;
- ``fiited-dynamic``: FIITED with one global ratio;
- ``fiited-floor``: FIITED-manual on the chunks above a floor of ``floor_dim``
  dimensions that every row keeps (:mod:`fiited_store.adapters.floors`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...adapters import FiitedEmbeddingBagCollection
from ...config import DynamicRatio, FloorRatios, ManualRatios, StoreConfig, TableConfig, floor_budget_ratio
from ..config import METHODS, method_layout
from .compressed import HashedEmbeddings, QREmbeddings
from .dense import DenseEmbeddings
from .optim import table_training_bytes

#: bytes per weight of the dense parameters' optimizer (Adam: two moments) on top of the weight
ADAM_STATE_FLOATS = 2


def mlp(sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Bottom MLP on dense features, embeddings, pairwise dot interaction, top MLP.

    With no dense features the bottom vector is a learned constant, so the
    interaction keeps its form.

    >>> import torch
    >>> emb = DenseEmbeddings([10, 20], dim=4)
    >>> model = DLRM(emb, num_features=2, dim=4, num_dense=3)
    >>> from fiited_store.experiments.data import Batch
    >>> b = Batch(torch.zeros(5, 3), ["a", "b"], torch.zeros(10, dtype=torch.int64),
    ...           torch.ones(10, dtype=torch.int64), torch.zeros(5))
    >>> model(b).shape
    torch.Size([5])
    """

    def __init__(
        self,
        embeddings: nn.Module,
        num_features: int,
        dim: int,
        num_dense: int,
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (128, 64),
    ):
        super().__init__()
        self.embeddings = embeddings
        self.num_features = num_features
        self.dim = dim
        self.bottom = mlp([num_dense, *bottom, dim], last_activation=True) if num_dense else None
        self.constant = None if num_dense else nn.Parameter(torch.zeros(dim))
        n = num_features + 1
        self.pairs = torch.triu_indices(n, n, offset=1)
        self.top = mlp([dim + self.pairs.shape[1], *top, 1], last_activation=False)

    def forward(self, batch) -> torch.Tensor:
        B = batch.size
        x = self.bottom(batch.dense) if self.bottom is not None else self.constant.expand(B, self.dim)
        emb = self.embeddings(batch).view(B, self.num_features, self.dim)
        z = torch.cat([x.unsqueeze(1), emb], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


def md_dims(
    counts: Sequence[np.ndarray], cardinalities: Sequence[int], dim: int, budget_fraction: float, alpha: float = 0.3
) -> list[int]:
    """Per-feature dimensions by the power-law rule of Ginart et al.

    A feature whose rows are accessed with average probability p gets
    d = lambda * p**alpha (popular rows, large dimension), clipped to [1, D];
    lambda is set by bisection so that the weights fit ``budget_fraction`` of the
    dense size (the projections are counted too).
    """
    n = np.array(cardinalities, np.float64)
    total = np.array([c.sum() for c in counts], np.float64)
    p = np.maximum(total / np.maximum(total.sum(), 1.0) / n, 1e-12)  # per-row access probability
    budget = budget_fraction * float(n.sum()) * dim

    def size(lam: float) -> tuple[float, np.ndarray]:
        d = np.clip(np.round(lam * p**alpha), 1, dim)
        proj = np.where(d < dim, d * dim, 0)
        return float((n * d).sum() + proj.sum()), d

    lo, hi = 0.0, 1.0
    while size(hi)[0] < budget and hi < 1e30:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid)[0] <= budget else (lo, mid)
    return [int(x) for x in size(lo)[1]]


class MixedDimEmbeddings(nn.Module):
    """Mixed-Dimension embeddings: a d_f-wide table per feature, projected to D."""

    def __init__(self, cardinalities: Sequence[int], dims: Sequence[int], dim: int, init_scale: float | None = None):
        super().__init__()
        self.dims = list(dims)
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(int(n), int(d), mode="sum", sparse=True) for n, d in zip(cardinalities, dims)
        )
        for b, d in zip(self.bags, dims):
            nn.init.uniform_(b.weight, -1.0 / np.sqrt(d), 1.0 / np.sqrt(d))
        self.proj = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(int(d), dim, bias=False) for d in dims)

    def forward(self, batch) -> torch.Tensor:
        return torch.cat(
            [p(bag(ids, offs[:-1])) for bag, p, (ids, offs) in zip(self.bags, self.proj, batch.per_feature())], 1
        )

    def sparse_parameters(self):
        return list(self.bags.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.parameters())

    def training_bytes(self, optimizer: str = "adagrad") -> int:
        """The tables with the embedding optimizer's state, the projections with Adam's."""
        tables = sum(p.numel() * 4 for p in self.bags.parameters())
        projections = (1 + ADAM_STATE_FLOATS) * (self.weight_bytes() - tables)
        return table_training_bytes(self.bags.parameters(), optimizer) + projections


class FiitedEmbeddings(nn.Module):
    """The store behind the DLRM: one table per feature, all in one store.

    With ``project``, each feature's pooled row goes through a learned D x D matrix
    (a dense parameter, trained with the rest of the model), as Mixed-Dimension
    embeddings map each table's rows to D: rows that keep only a few dimensions then
    reach every coordinate of the interaction, not only their own."""

    def __init__(
        self,
        feature_names: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        store_config: StoreConfig,
        chunks: int,
        optimizer: str,
        learning_rate: float,
        init_scale: float | None = None,
        path=None,
        process_group=None,
        min_chunks: int = 0,
        floor_dim: int = 0,
        project: bool = False,
    ):
        super().__init__()
        self.num_features, self.dim = len(feature_names), dim
        tables = [
            TableConfig(
                f,
                dim=dim,
                chunks=chunks,
                num_embeddings=int(n),
                optimizer=optimizer,
                learning_rate=learning_rate,
                init_scale=init_scale,
                min_chunks=min_chunks,
                floor_dim=floor_dim,
            )
            for f, n in zip(feature_names, cardinalities)
        ]
        # the map per feature is the collection's own (project=True), as a user's model would have it
        self.collection = FiitedEmbeddingBagCollection(
            tables, store_config=store_config, output="concat", path=path, process_group=process_group, project=project
        )

    @property
    def store(self):
        return self.collection.store

    @property
    def projection(self):
        """The learned D x D map per feature, float32[F, D, D], or None."""
        return self.collection.projection

    def forward(self, batch) -> torch.Tensor:
        return self.collection(batch.features())

    def sparse_parameters(self):
        return []

    def average_kept_dim(self, stats: dict) -> float:
        """Dimensions a row holds, on average over the rows of every feature (a floor and
        the chunks above it are two tables of the store, and one row of the feature)."""
        kept = sum(t["average_kept_dim"] * t["entries"] for t in stats["tables"].values())
        rows = sum(stats["tables"][t.name]["entries"] for t in self.collection.tables)
        return kept / rows if rows else 0.0

    def weight_bytes(self) -> int:
        """The pool's bytes (every shard's, for a sharded store: then a collective), and the
        projection's (as Mixed-Dimension embeddings count theirs)."""
        extra = self.collection.projection_bytes()
        if hasattr(self.store, "shard"):
            return int(self.store.stats()["total"]["bytes"]["pool_vectors"]) + extra
        return sum(p.vector_bytes for p in self.store.pools) + extra

    def training_bytes(self, stats: dict | None = None) -> int:
        """The store's whole memory (pool, optimizer state, entry index) and the projection
        with Adam's state."""
        stats = self.store.stats() if stats is None else stats
        return (
            int(stats["total"]["bytes"]["memory_total"]) + (1 + ADAM_STATE_FLOATS) * self.collection.projection_bytes()
        )


def build_embeddings(
    method: str,
    feature_names: Sequence[str],
    cardinalities: Sequence[int],
    dim: int,
    ratio: float,
    chunks: int,
    learning_rate: float,
    counts: Sequence[np.ndarray] | None = None,
    prune_period: int = 100,
    gamma: float = 0.99,
    sample_size: int = 100_000,
    seed: int = 0,
    steepness: float = 1.0,
    utility: str = "gradient",
    optimizer: str = "adagrad",
    mode: str = "prune",
    path=None,
    table_normalization: str = "none",
    small_table_rows: int = 0,
    process_group=None,
    readmission: str = "first",
    on_evict: str | None = None,
    min_chunks: int = 0,
    floor_dim: int = 0,
    project: bool = False,
    shared_floor: float = 0.1,
) -> nn.Module:
    """The embedding module of one method at one pruning ratio (fraction of the dense size removed);
    with ``process_group``, FIITED's store is sharded over its ranks."""
    if method == "dense":
        return DenseEmbeddings(cardinalities, dim)
    if method == "small-dim":  # every row gets D x (1 - ratio) dimensions, projected to D
        return MixedDimEmbeddings(cardinalities, [max(1, round(dim * (1.0 - ratio)))] * len(cardinalities), dim)
    if method == "hashing":
        return HashedEmbeddings(cardinalities, dim, ratio)
    if method == "qr":
        return QREmbeddings(cardinalities, dim, ratio)
    if method == "md":
        if counts is None:
            raise ValueError("Mixed-Dimension embeddings need access counts")
        return MixedDimEmbeddings(cardinalities, md_dims(counts, cardinalities, dim, 1.0 - ratio), dim)
    floor_dim, project = method_layout(method, dim, floor_dim, project)
    if method == "adaembed":
        chunks, pruning = 1, DynamicRatio(ratio)
    elif method in ("fiited-manual", "fiited-floor") and floor_dim:
        # the library's default policy: the floor, and the manual ratios above it (the tables
        # carry the floor too, so that a K that divides D - f but not D is accepted)
        pruning = FloorRatios(ratio, floor_dim, steepness, shared_floor)
    elif method == "fiited-manual":
        pruning = ManualRatios.linear(ratio, chunks, steepness)
    elif method == "fiited-dynamic":
        # with a floor, one ratio for the D - f dimensions that compete for the rest of the budget
        pruning = DynamicRatio(floor_budget_ratio(ratio, dim, floor_dim) if floor_dim else ratio)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cfg = StoreConfig(
        pruning=pruning,
        budget_fraction=max(1.0 - ratio, 1e-6),
        prune_period=prune_period,
        gamma=gamma,
        sample_size=sample_size,
        seed=seed,
        utility=utility,
        mode=mode,
        table_normalization=table_normalization,
        small_table_rows=small_table_rows,
        readmission=readmission,
        on_evict=on_evict,
    )
    return FiitedEmbeddings(
        feature_names,
        cardinalities,
        dim,
        cfg,
        chunks,
        optimizer,
        learning_rate,
        path=path,
        process_group=process_group,
        min_chunks=min_chunks if method != "adaembed" else 0,
        floor_dim=floor_dim,
        project=project,
    )

"""What a training run is, without importing torch: the CLI builds its parser from this module.

``fiited-store --help`` must answer at once, so the choices and defaults of
``train`` and ``sweep`` live here, apart from the model and the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from ..config import (
    EVICT_POLICIES,
    READMISSIONS,
    TABLE_NORMALIZATIONS,
    UTILITY_MODES,
    EvictPolicy,
    Readmission,
    TableNormalization,
    UtilityMode,
    default_floor_dim,
)
from ..errors import ConfigError

Dataset = Literal["synthetic", "mixed", "movielens", "criteo"]
#: small-dim: dense embeddings of dimension D x (1 - ratio) for every row (the uniform baseline);
#: fiited-floor: the paper's manual ratios on the chunks above a floor that every row keeps,
#: each feature's pooled row mapped through a learned D x D matrix;
#: hashing / qr: full-width rows shared between ids (the hashing trick, quotient-remainder)
Method = Literal[
    "dense", "small-dim", "md", "hashing", "qr", "adaembed", "fiited-manual", "fiited-dynamic", "fiited-floor"
]
#: the embeddings' optimizer, for every method: Adagrad element-wise (torch's) or row-wise
#: (FBGEMM's, one accumulator per row; per chunk in the store)
EmbeddingOptimizer = Literal["adagrad", "rowwise_adagrad"]
DATASETS = get_args(Dataset)
EMBEDDING_OPTIMIZERS = get_args(EmbeddingOptimizer)
METHODS = get_args(Method)
NORMALIZATIONS = TABLE_NORMALIZATIONS
ON_EVICT = EVICT_POLICIES
UTILITIES = UTILITY_MODES
__all__ = [
    "DATASETS",
    "EMBEDDING_OPTIMIZERS",
    "METHODS",
    "NORMALIZATIONS",
    "ON_EVICT",
    "READMISSIONS",
    "SWEEP_RATIOS",
    "UTILITIES",
    "TrainConfig",
    "default_floor_dim",
    "method_layout",
]
SWEEP_RATIOS = (0.5, 0.625, 0.75, 0.8125, 0.875, 0.9375)


def method_layout(method: str, dim: int, floor_dim: int, project: bool) -> tuple[int, bool]:
    """(the floor every row keeps, whether each feature's row goes through a learned D x D
    map) of a method: fiited-floor always maps, with ``floor_dim`` or its default floor;
    the other FIITED methods take both as given, AdaEmbed (whole rows) only the map."""
    if method == "fiited-floor":
        return floor_dim or default_floor_dim(dim), True
    fiited = method.startswith("fiited")
    return (floor_dim if fiited else 0), bool(project and (fiited or method == "adaembed"))


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults train the built-in synthetic click stream in well under a minute.

    D = 32 and K = 2 are the paper's settings on public data: the bookkeeping of a
    chunk (an int32 address and a 16-bit utility) is small against 16 floats. The
    default method, fiited-floor, keeps D / 16 dimensions of every row and the
    paper's manual ratios for the K chunks above them, and maps each feature's row
    through a learned matrix: on ML-100K and both built-in streams it is at or above
    the better of a uniformly smaller dimension and Mixed-Dimension embeddings at
    every ratio measured, where the paper's rule falls up to 0.032 AUC short on
    ML-100K (docs/quality.md).
    Every value is checked here, before any data is read or any model is built.
    """

    dataset: Dataset = "synthetic"
    path: str | None = None
    method: Method = "fiited-floor"
    ratio: float = 0.75
    chunks: int = 2
    dim: int = 32
    batch_size: int = 512
    epochs: int = 3
    steps: int = 300  # synthetic stream: training steps
    synthetic_cap: int = 20_000  # synthetic stream: rows per table at most
    eval_samples: int = 50_000  # synthetic stream: held-out samples
    lr_embedding: float = 0.05
    optimizer: EmbeddingOptimizer = "adagrad"  # every method's embeddings, the store's too
    lr_dense: float = 1e-3
    prune_period: int = 50
    gamma: float = 0.9
    steepness: float = 1.0
    utility: UtilityMode = "gradient"
    criteo_limit: int | None = 1_000_000
    seed: int = 0
    table_normalization: TableNormalization = "none"  # FIITED: "none" is the paper's rule
    small_table_rows: int = 0  # FIITED: tables of at most this many rows keep every chunk
    min_chunks: int = 0  # FIITED: every row of every table keeps its first min_chunks chunks
    floor_dim: int = 0  # FIITED: every row keeps its first floor_dim dimensions (one chunk of that width)
    shared_floor: float = 0.1  # FIITED: share of the budget the floor takes where a floor per row does not fit
    project: bool = False  # FIITED: a learned D x D map per feature on the store's output
    readmission: Readmission = "first"  # FIITED: a chunk winning its slot back starts at its first values
    on_evict: EvictPolicy = "discard"  # FIITED: "spill" keeps pruned chunks in the disk tier (the paper discards)

    def __post_init__(self) -> None:
        def check(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        check(
            self.optimizer in EMBEDDING_OPTIMIZERS,
            f"optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {self.optimizer!r}",
        )
        check(self.utility in UTILITIES, f"utility must be one of {UTILITIES}, got {self.utility!r}")
        check(0.0 <= self.ratio < 1.0, f"ratio must lie in [0, 1), got {self.ratio!r}")
        for name in ("chunks", "dim", "batch_size", "epochs", "steps", "synthetic_cap", "eval_samples"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        check(self.eval_samples >= 2, f"eval_samples must be at least 2, got {self.eval_samples!r}")
        check(
            self.effective_floor_dim
            or self.dim % self.chunks == 0
            or self.method in ("dense", "small-dim", "md", "hashing", "qr"),
            f"dim {self.dim} is not divisible by chunks {self.chunks}",
        )
        check(
            isinstance(self.prune_period, int) and self.prune_period >= 0,
            f"prune_period must be an int >= 0 (0: never prune), got {self.prune_period!r}",
        )
        check(
            self.criteo_limit is None or (isinstance(self.criteo_limit, int) and self.criteo_limit > 0),
            f"criteo_limit must be a positive int or None, got {self.criteo_limit!r}",
        )
        for name in ("lr_embedding", "lr_dense"):
            v = getattr(self, name)
            check(math.isfinite(v) and v > 0, f"{name} must be a finite number > 0, got {v!r}")
        check(0.0 < self.gamma < 1.0, f"gamma must lie in (0, 1), got {self.gamma!r}")
        check(0.0 <= self.steepness <= 1.0, f"steepness must lie in [0, 1], got {self.steepness!r}")
        check(self.dataset in ("synthetic", "mixed") or self.path is not None, f"dataset {self.dataset!r} needs --path")
        check(self.on_evict in ON_EVICT, f"on_evict must be one of {ON_EVICT}, got {self.on_evict!r}")
        check(self.readmission in READMISSIONS, f"readmission must be one of {READMISSIONS}, got {self.readmission!r}")
        check(
            self.table_normalization in NORMALIZATIONS,
            f"table_normalization must be one of {NORMALIZATIONS}, got {self.table_normalization!r}",
        )
        check(
            isinstance(self.min_chunks, int) and 0 <= self.min_chunks <= self.chunks,
            f"min_chunks must be an int in [0, chunks = {self.chunks}], got {self.min_chunks!r}",
        )
        check(
            self.min_chunks / self.chunks <= 1.0 - self.ratio + 1e-9 or not self.method.startswith("fiited"),
            f"min_chunks {self.min_chunks} of {self.chunks} chunks per row is {self.min_chunks / self.chunks:.4g} of "
            f"the dense size, more than the budget at ratio {self.ratio:g} ({1.0 - self.ratio:.4g})",
        )
        check(
            isinstance(self.floor_dim, int) and 0 <= self.floor_dim < self.dim,
            f"floor_dim must be an int in [0, dim = {self.dim}), got {self.floor_dim!r}",
        )
        f = self.effective_floor_dim
        check(not (f and self.min_chunks), f"give floor_dim or min_chunks, not both (got {f} and {self.min_chunks})")
        check(
            f == 0 or (self.dim - f) % self.chunks == 0,
            f"the {self.dim - f} dimensions above floor_dim = {f} do not split into {self.chunks} equal chunks "
            f"(--chunks {', '.join(str(k) for k in range(1, min(self.dim - f, 64) + 1) if (self.dim - f) % k == 0)} "
            f"would)",
        )
        check(
            # FloorRatios (fiited-floor, fiited-manual with a floor) shares a floor that does not fit
            f <= (1.0 - self.ratio) * self.dim + 1e-9 or self.method != "fiited-dynamic",
            f"floor_dim {f} of {self.dim} is more than the budget at ratio {self.ratio:g} "
            f"({(1.0 - self.ratio) * self.dim:.4g} dimensions per row); fiited-dynamic gives every row its floor",
        )
        check(0.0 < self.shared_floor <= 1.0, f"shared_floor must lie in (0, 1], got {self.shared_floor!r}")
        check(
            isinstance(self.small_table_rows, int) and self.small_table_rows >= 0,
            f"small_table_rows must be an int >= 0, got {self.small_table_rows!r}",
        )

    @property
    def effective_floor_dim(self) -> int:
        """The floor the run gives every row: ``floor_dim``, or fiited-floor's default."""
        return method_layout(self.method, self.dim, self.floor_dim, self.project)[0]

    @property
    def effective_project(self) -> bool:
        """Whether the FIITED model maps each feature's pooled row through a learned D x D
        matrix (fiited-floor always does, as Mixed-Dimension embeddings map each table)."""
        return method_layout(self.method, self.dim, self.floor_dim, self.project)[1]

    @property
    def pruned(self) -> bool:
        """Whether the method prunes at all (``dense`` ignores the ratio)."""
        return self.method != "dense"

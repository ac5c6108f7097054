"""Configuration: frozen dataclasses, validated once at construction.

A :class:`TableConfig` describes one logical table; a :class:`StoreConfig`
describes the store around them (budget, pruning policy, utility, tiers).
:func:`plan_pools` combines both into the fixed memory layout of a store.

Example::

    >>> from fiited_store import TableConfig, StoreConfig, DynamicRatio
    >>> t = TableConfig("user", dim=64, chunks=4, num_embeddings=1_000)
    >>> t.chunk_width
    16
    >>> cfg = StoreConfig(pruning=DynamicRatio(0.75))
    >>> plan_pools([t], cfg)[0].slots   # 25% of 1000 rows x 4 chunks
    1000
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import ConfigError, CorruptStoreError

# every option string as a type (for checkers and readers) and its values (for the checks below)
Optimizer = Literal["sgd", "adagrad", "rowwise_adagrad"]
Initializer = Literal["uniform", "normal", "zeros"]
UtilityMode = Literal["gradient", "access", "shared"]
StoreMode = Literal["prune", "cache"]
EvictPolicy = Literal["discard", "spill"]
Device = Literal["cpu", "cuda"]
IndexKind = Literal["auto", "direct", "hashed"]
TableNormalization = Literal["none", "mean"]
Readmission = Literal["first", "zero", "fresh"]
PoolingMode = Literal["sum", "mean"]
OPTIMIZERS = get_args(Optimizer)
INITIALIZERS = get_args(Initializer)
UTILITY_MODES = get_args(UtilityMode)
MODES = get_args(StoreMode)
EVICT_POLICIES = get_args(EvictPolicy)
DEVICES = get_args(Device)
INDEX_KINDS = get_args(IndexKind)
TABLE_NORMALIZATIONS = get_args(TableNormalization)
READMISSIONS = get_args(Readmission)
POOLING_MODES = get_args(PoolingMode)

#: bytes of one stored float (pool vectors and optimizer state are float32)
FLOAT_BYTES = 4


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TableConfig:
    """One logical embedding table.

    Args:
        name: unique name; requests address the table by it.
        dim: embedding dimension D.
        chunks: K, the number of chunks each row is split into; D % K == 0.
        num_embeddings: declared cardinality. Optional (ids are arbitrary int64
            and there is no dense id space); needed for a budget given as a
            fraction of the dense size and for the dense-size statistics.
        initializer: "uniform" (in [-init_scale, init_scale]), "normal"
            (std init_scale) or "zeros". Values are a pure function of
            (seed, table, id, chunk), so a chunk re-initialised after pruning, or
            initialised on another backend, gets the same values.
        init_scale: defaults to 1 / sqrt(dim).
        optimizer: "sgd", "adagrad" (element-wise, as ``torch.optim.Adagrad``) or
            "rowwise_adagrad" (one accumulator per chunk, as FBGEMM's row-wise
            Adagrad applied per chunk).
        learning_rate: step size of the fused optimizer.
        eps: Adagrad's epsilon.
        index: how an id finds its entry. "direct" (the paper's VHPI): the entry
            of id i is row i, ids must lie in ``[0, num_embeddings)``, and no key or
            probe is stored; "hashed": ids are arbitrary int64 values, found by
            probing a hash table that stores them; "auto" (default): direct when
            ``num_embeddings`` is declared, hashed otherwise.
        min_chunks: a floor: every row of this table that holds an entry keeps at
            least its first ``min_chunks`` chunks, whatever the thresholds (they are
            taken from the budget first). 0 (default) is the paper's rule.
        floor_dim: a floor of its own width: every declared row keeps its first
            ``floor_dim`` dimensions, and the other ``dim - floor_dim`` are split into
            ``chunks`` chunks that utility decides. Served by
            :class:`~fiited_store.adapters.FiitedEmbeddingBagCollection`, which holds
            the table as two tables of the store (:mod:`fiited_store.adapters.floors`).
            0 (default) is the paper's layout.
        floor_rows: the rows of that floor. None (default): one for every declared
            row. Fewer: ids share floor rows through a fixed hash of the id (the
            hashing trick, on the floor alone), so that a floor fits budgets smaller
            than ``floor_dim`` dimensions a row; :class:`FloorRatios` sets it there.
    """

    name: str
    dim: int
    chunks: int = 4
    num_embeddings: int | None = None
    initializer: Initializer = "uniform"
    init_scale: float | None = None
    optimizer: Optimizer = "rowwise_adagrad"
    learning_rate: float = 0.01
    eps: float = 1e-8
    index: IndexKind = "auto"
    min_chunks: int = 0
    floor_dim: int = 0
    floor_rows: int | None = None

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and self.name != "", f"table name must be a non-empty string, got {self.name!r}"
        )
        _check(_is_int(self.dim) and self.dim > 0, f"table {self.name!r}: dim must be a positive int, got {self.dim!r}")
        _check(
            _is_int(self.chunks) and self.chunks > 0,
            f"table {self.name!r}: chunks must be a positive int, got {self.chunks!r}",
        )
        _check(
            _is_int(self.floor_dim) and 0 <= self.floor_dim < self.dim,
            f"table {self.name!r}: floor_dim must be an int in [0, dim={self.dim}), got {self.floor_dim!r}",
        )
        _check(
            (self.dim - self.floor_dim) % self.chunks == 0,
            f"table {self.name!r}: dim {self.dim} is not divisible by chunks {self.chunks}"
            if not self.floor_dim
            else f"table {self.name!r}: the {self.dim - self.floor_dim} dimensions above floor_dim={self.floor_dim} do "
            f"not split into chunks={self.chunks} equal chunks",
        )
        _check(self.chunks <= 64, f"table {self.name!r}: at most 64 chunks per row, got {self.chunks}")
        _check(
            self.num_embeddings is None or (_is_int(self.num_embeddings) and self.num_embeddings > 0),
            f"table {self.name!r}: num_embeddings must be a positive int or None, got {self.num_embeddings!r}",
        )
        _check(
            self.initializer in INITIALIZERS,
            f"table {self.name!r}: initializer must be one of {INITIALIZERS}, got {self.initializer!r}",
        )
        _check(
            self.init_scale is None or (math.isfinite(self.init_scale) and self.init_scale >= 0),
            f"table {self.name!r}: init_scale must be a finite number >= 0, got {self.init_scale!r}",
        )
        _check(
            self.optimizer in OPTIMIZERS,
            f"table {self.name!r}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
        )
        _check(
            math.isfinite(self.learning_rate) and self.learning_rate >= 0,
            f"table {self.name!r}: learning_rate must be a finite number >= 0, got {self.learning_rate!r}",
        )
        _check(
            math.isfinite(self.eps) and self.eps > 0,
            f"table {self.name!r}: eps must be a finite number > 0, got {self.eps!r}",
        )
        _check(
            self.index in INDEX_KINDS, f"table {self.name!r}: index must be one of {INDEX_KINDS}, got {self.index!r}"
        )
        _check(
            _is_int(self.min_chunks) and 0 <= self.min_chunks <= self.chunks,
            f"table {self.name!r}: min_chunks must be an int in [0, chunks={self.chunks}], got {self.min_chunks!r}",
        )
        _check(
            not (self.floor_dim and self.min_chunks),
            f"table {self.name!r}: give floor_dim or min_chunks, not both (got {self.floor_dim} and {self.min_chunks})",
        )
        _check(
            not self.floor_dim or self.num_embeddings is not None,
            f"table {self.name!r}: floor_dim={self.floor_dim} needs num_embeddings (the floor is paid for every "
            f"declared row)",
        )
        _check(
            self.floor_rows is None
            or (
                bool(self.floor_dim) and _is_int(self.floor_rows) and 1 <= self.floor_rows <= (self.num_embeddings or 0)
            ),
            f"table {self.name!r}: floor_rows must be None or an int in [1, num_embeddings={self.num_embeddings}] "
            f"with a floor_dim (got floor_rows={self.floor_rows!r}, floor_dim={self.floor_dim})",
        )
        _check(
            not (self.index == "direct" and self.num_embeddings is None),
            f"table {self.name!r}: index='direct' needs num_embeddings (the rows of the table)",
        )

    @property
    def direct(self) -> bool:
        """True when ids address rows directly (index "direct", or "auto" with a declared size)."""
        return self.index == "direct" or (self.index == "auto" and self.num_embeddings is not None)

    @property
    def chunk_width(self) -> int:
        """c = (D - floor_dim) / K, the number of floats in one chunk."""
        return (self.dim - self.floor_dim) // self.chunks

    @property
    def scale(self) -> float:
        """The initialiser's bound (uniform) or standard deviation (normal)."""
        return 1.0 / math.sqrt(self.dim) if self.init_scale is None else float(self.init_scale)

    @property
    def state_width(self) -> int:
        """Optimizer floats kept beside each resident chunk."""
        return {"sgd": 0, "rowwise_adagrad": 1, "adagrad": self.chunk_width}[self.optimizer]

    @property
    def dense_bytes(self) -> int | None:
        """Bytes of the equivalent dense float32 table, when the size is declared."""
        return None if self.num_embeddings is None else self.num_embeddings * self.dim * FLOAT_BYTES


@dataclass(frozen=True)
class ManualRatios:
    """Manual per-chunk pruning ratios p_0 .. p_{K-1} (paper, section 4.2.1).

    Chunk k of a row is kept when its utility is above the p_k-quantile of the
    sampled chunk-k utilities. Ratios that rise with k prune the trailing
    chunks first, which is what keeps the kept dimensions contiguous.
    """

    per_chunk: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_chunk", tuple(float(p) for p in self.per_chunk))
        _check(len(self.per_chunk) > 0, "ManualRatios needs at least one ratio")
        for k, p in enumerate(self.per_chunk):
            _check(0.0 <= p <= 1.0, f"pruning ratio p_{k} must lie in [0, 1], got {p!r}")

    @property
    def average(self) -> float:
        return sum(self.per_chunk) / len(self.per_chunk)

    @classmethod
    def linear(cls, average: float, chunks: int, steepness: float = 1.0) -> ManualRatios:
        """Ratios linear in the chunk index with the given average (paper, section 5.1).

        ``steepness`` in [0, 1] scales the slope between flat (0: every chunk
        pruned at ``average``) and the steepest line that stays inside [0, 1].

        >>> ManualRatios.linear(0.75, 4).per_chunk
        (0.5, 0.6666666666666666, 0.8333333333333333, 1.0)
        """
        _check(0.0 <= average <= 1.0, f"average pruning ratio must lie in [0, 1], got {average!r}")
        _check(_is_int(chunks) and chunks > 0, f"chunks must be a positive int, got {chunks!r}")
        _check(0.0 <= steepness <= 1.0, f"steepness must lie in [0, 1], got {steepness!r}")
        if chunks == 1:
            return cls((average,))
        half_span = min(average, 1.0 - average) * steepness
        ratios = [average - half_span + 2.0 * half_span * k / (chunks - 1) for k in range(chunks)]
        return cls(tuple(min(1.0, max(0.0, p)) for p in ratios))


@dataclass(frozen=True)
class DynamicRatio:
    """One global pruning ratio p: all chunk utilities compete for one threshold."""

    ratio: float

    def __post_init__(self) -> None:
        _check(0.0 <= float(self.ratio) <= 1.0, f"dynamic pruning ratio must lie in [0, 1], got {self.ratio!r}")
        object.__setattr__(self, "ratio", float(self.ratio))

    @property
    def average(self) -> float:
        return self.ratio


def floor_budget_ratio(ratio: float, dim: int, floor_dim: int) -> float:
    """The pruning ratio of the ``dim - floor_dim`` dimensions above a floor, when the whole row
    is pruned at ``ratio``: the floor takes ``floor_dim`` of the ``(1 - ratio) * dim`` dimensions
    per row that the budget allows, and the chunks above it share the rest.

    >>> floor_budget_ratio(0.75, 32, 2)   # 8 dimensions a row: 2 of floor, 6 of the 30 above it
    0.8
    """
    return 1.0 - max((1.0 - ratio) * dim - floor_dim, 0.0) / (dim - floor_dim)


#: the floor of :class:`FloorRatios` when none is given: D / 16 dimensions (2 of 32), at least one
def default_floor_dim(dim: int) -> int:
    return max(1, dim // 16)


@dataclass(frozen=True)
class FloorRatios:
    """The default policy: a floor for every row, the paper's manual ratios above it.

    Every declared row keeps its first ``floor_dim`` dimensions (``D // 16`` when None,
    at least one): a chunk of its own width, paid from the budget first. The other
    ``D - floor_dim`` dimensions are split into the table's K chunks, pruned with the
    paper's manual ratios (:meth:`ManualRatios.linear`, ``steepness``) at the ratio that
    leaves the rest of the budget (:func:`floor_budget_ratio`). ``ratio`` is the
    fraction of the dense size removed, floors included, so the pool holds
    ``1 - ratio`` of the dense weights as with the other policies.

    Past the ratio where a floor for every row fits (``1 - floor_dim / D``: 93.75% at
    the default floor), the floor is shared: it takes ``shared_floor`` of the budget,
    in fewer rows than ids (``TableConfig.floor_rows``), and an id finds its floor row
    through a fixed hash, as the hashing trick does for a whole row. The chunks above
    it share the rest of the budget, by utility, as below that ratio. The default share,
    0.1, was the best of 0.05, 0.1, 0.25 and 0.5 at 96.875%, 99% and 99.75% on the
    synthetic stream over three seeds, and beat the paper's rule at each seed there.

    On ML-100K and both built-in streams this is at or above the better of a uniformly
    smaller dimension and Mixed-Dimension embeddings at every ratio measured from 50% to
    93.75% (docs/quality.md), where the paper's rule alone falls up to 0.032 AUC short;
    the sweeps used D = 32, K = 2 and a learned D x D map per feature on the output
    (``project=True`` on the PyTorch modules).

    A floor is held as a table of its own beside the chunks above it, which the PyTorch
    modules do (:class:`~fiited_store.adapters.FiitedEmbeddingBagCollection`,
    :class:`~fiited_store.adapters.FiitedEmbeddingBag`); :meth:`resolve` gives the
    tables and config they build the store from.

    >>> tables, cfg = FloorRatios(0.75).resolve([TableConfig("item", 32, chunks=2, num_embeddings=1000)],
    ...                                         StoreConfig())
    >>> tables[0].floor_dim, tables[0].floor_rows, cfg.pruning, cfg.budget_fraction
    (2, None, ManualRatios(per_chunk=(0.6000000000000001, 1.0)), 0.25)
    >>> tables, cfg = FloorRatios(0.99).resolve([TableConfig("item", 32, chunks=2, num_embeddings=1000)],
    ...                                         StoreConfig())
    >>> tables[0].floor_rows   # 0.32 dimensions a row: a tenth of them to a floor of 16 rows
    16
    """

    ratio: float
    floor_dim: int | None = None
    steepness: float = 1.0
    shared_floor: float = 0.1

    def __post_init__(self) -> None:
        _check(
            not isinstance(self.ratio, bool) and isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0,
            f"FloorRatios: ratio must lie in [0, 1), got {self.ratio!r}",
        )
        object.__setattr__(self, "ratio", float(self.ratio))
        _check(
            self.floor_dim is None or (_is_int(self.floor_dim) and self.floor_dim >= 1),
            f"FloorRatios: floor_dim must be a positive int or None (D // 16), got {self.floor_dim!r}",
        )
        _check(0.0 <= self.steepness <= 1.0, f"FloorRatios: steepness must lie in [0, 1], got {self.steepness!r}")
        _check(
            not isinstance(self.shared_floor, bool)
            and isinstance(self.shared_floor, (int, float))
            and 0.0 < self.shared_floor <= 1.0,
            f"FloorRatios: shared_floor must lie in (0, 1], got {self.shared_floor!r}",
        )
        object.__setattr__(self, "shared_floor", float(self.shared_floor))

    @property
    def average(self) -> float:
        return self.ratio

    def floor_of(self, t: TableConfig) -> int:
        """The floor table ``t`` gets: its own ``floor_dim`` when it sets one, else this policy's."""
        if t.floor_dim:
            return t.floor_dim
        return self.floor_dim if self.floor_dim is not None else default_floor_dim(t.dim)

    def resolve(
        self, tables: Sequence[TableConfig], config: StoreConfig
    ) -> tuple[tuple[TableConfig, ...], StoreConfig]:
        """(the tables with their floors, the config with the manual ratios above them and a pool
        of ``1 - ratio`` of the dense size unless a budget was given). A budget given as a
        fraction stays a fraction of the tables given, whose dense size a shared floor makes
        larger than the store's."""
        _check(config.mode == "prune", "FloorRatios prunes; cache mode prunes nothing (give it a budget instead)")
        undeclared = [t.name for t in tables if t.num_embeddings is None]
        _check(
            not undeclared,
            f"FloorRatios gives every declared row a floor, so every table must declare num_embeddings; "
            f"undeclared: {undeclared} (use ManualRatios or DynamicRatio for hashed tables)",
        )
        out = []
        for t in tables:
            f = self.floor_of(t)
            _check(f < t.dim, f"table {t.name!r}: a floor of {f} dimensions leaves none of its {t.dim} above it")
            out.append(dataclasses.replace(t, floor_dim=f, min_chunks=0))  # TableConfig checks that the rest splits
        ks = sorted({t.chunks for t in out})
        _check(
            len(ks) == 1, f"FloorRatios applies one set of manual ratios: every table needs the same chunks, got {ks}"
        )
        rows = [t.num_embeddings for t in out]
        dense = sum(n * t.dim for n, t in zip(rows, out))
        floors = sum(n * t.floor_dim for n, t in zip(rows, out))
        keep = (1.0 - self.ratio) * dense
        shared = floors > keep + 1e-9 * dense
        if shared:  # past the ratio where every row's floor fits: each table's floor in fewer rows
            out = [
                dataclasses.replace(
                    t, floor_rows=max(1, min(n, int(self.shared_floor * (1.0 - self.ratio) * n * t.dim / t.floor_dim)))
                )
                for n, t in zip(rows, out)
            ]
            floors = sum(t.floor_rows * t.floor_dim for t in out)
        layouts = {(t.dim, t.floor_dim) for t in out}
        if len(layouts) == 1 and not shared:  # one layout: the closed form, exactly as the sweeps computed it
            ((d, f),) = layouts
            wide = floor_budget_ratio(self.ratio, d, f)
        else:  # the floors' bytes first, the rest shared by what competes, store-wide
            above = sum(n * (t.dim - t.floor_dim) for n, t in zip(rows, out))
            wide = 1.0 - max(keep - floors, 0.0) / above
        changes: dict[str, Any] = {"pruning": ManualRatios.linear(min(max(wide, 0.0), 1.0), ks[0], self.steepness)}
        budgets = (
            config.budget_bytes,
            config.budget_fraction,
            config.pool_budget_bytes,
            config.memory_budget_bytes,
            config.memory_budget_fraction,
        )
        # the store's tables: each floor (its own rows) and the dimensions above it (every row)
        store_dense = floors + sum(n * (t.dim - t.floor_dim) for n, t in zip(rows, out))
        if all(b is None for b in budgets):
            kept = (1.0 - self.ratio) * (dense / store_dense if shared else 1.0)
            changes["budget_fraction"] = min(max(kept, 1e-6), 1.0)
        elif shared:
            for name in ("budget_fraction", "memory_budget_fraction"):
                b = getattr(config, name)
                if b is not None:
                    changes[name] = min(b * dense / store_dense, 1.0)
        return tuple(out), dataclasses.replace(config, **changes)


PruningPolicy = ManualRatios | DynamicRatio | FloorRatios


def table_floors(tables, config: StoreConfig) -> list[int]:
    """The chunks every row of each table keeps whatever the thresholds (its floor)."""
    out = []
    for t in tables:
        small = config.small_table_rows and t.num_embeddings is not None and t.num_embeddings <= config.small_table_rows
        out.append(t.chunks if small else t.min_chunks)
    return out


@dataclass(frozen=True)
class StoreConfig:
    """The store around the tables.

    Args:
        pruning: :class:`ManualRatios` or :class:`DynamicRatio`. Ignored in cache
            mode, where nothing is pruned.
        budget_bytes: bytes of resident chunk vectors (the pool: the paper's budget), or
        budget_fraction: the same as a fraction of the dense size of the declared
            tables. With neither, the budget is ``1 - pruning.average`` of the dense
            size (the paper's setting), unless a memory budget is given.
        pool_budget_bytes: instead of either, the bytes of each pool's chunk vectors,
            one per distinct chunk width in ascending order (a budget of one pool is
            otherwise its tables' share of the whole, by dense size). A sharded
            store gives each shard its share this way.
        memory_budget_bytes: the whole store's memory (pool vectors, optimizer
            state, address manager and entry index), or
        memory_budget_fraction: the same as a fraction of the dense weights.
            Checked at construction and whenever the hashed index would grow
            (:class:`MemoryBudgetError`); without a pool budget the pool gets what
            the index leaves. Tiers on disk are not counted.
        gamma: utility decay, u = gamma * u + a * g, in (0, 1).
        prune_period: T; a prune pass runs every T calls of ``step()``; 0 disables it.
        sample_size: m, utilities sampled to estimate the thresholds.
        utility: "gradient" (a * ||g_k|| per chunk), "access" (a, one value per row)
            or "shared" (a * ||g_row||, one value per row: a fixed pruning order).
        seed: seeds sampling and initialisation.
        mode: "prune" (the budget is the model size) or "cache" (the budget is the
            fast tier; every chunk lives in the pool or on disk; nothing is pruned).
        on_evict: "discard" or "spill" (keep evicted chunks in the disk tier).
            Defaults to "discard" in prune mode; cache mode always spills.
        drop_floor: at a prune, entries whose chunks are all absent and whose
            utility fell below this are dropped (prune mode only).
        max_load: load factor of the entry table that triggers a rehash.
        initial_capacity: slots of the hashed index allocated up front (tables with
            a direct index need none); it grows by doubling as live keys need.
        device: "cpu" (numba njit) or "cuda" (numba.cuda).
        host_cache_bytes: host memory in front of the disk tier (a write-back cache,
            page-locked for a GPU store): chunks leaving the pool land there first and
            reach the disk only when it fills. None: four times the pool on a GPU,
            none on the CPU (there the pool already is host memory).
        table_normalization: how utilities of different tables compare at a prune.
            "none" (the paper's rule): raw utilities against shared thresholds.
            "mean": each table's utilities are divided by the mean of its own sampled
            utilities before the thresholds are found, so a row competes by how much
            it matters within its table (feature-aware pruning, paper section 4.2.2).
        small_table_rows: tables that declare at most this many rows keep every
            chunk of every row (a floor of K; they cost little and are often the
            most predictive features). 0 disables it; a table's ``min_chunks`` is
            the floor otherwise.
        readmission: the values a chunk starts with when it wins a slot at a prune
            pass without a copy to restore (it was discarded, or never held one):
            "first" (default: exactly the values it was first initialised with, a
            function of seed, table, id and chunk), "zero", or "fresh" (drawn anew,
            from the seed and the prune round). New keys always start at their
            first values.
        prefetch_depth: how many batches ahead a caller prefetches (``prefetch_async``
            of batch i + n before the lookup of batch i): the store keeps that many
            batches' background reads and spares their entries from eviction.
        tier_max_garbage: the share of a disk tier's written slots that may be dead
            before the store moves the live rows of its emptiest segments elsewhere and
            drops them (after a step, and before a checkpoint): what bounds the disk the
            tier takes beyond its live rows.
        tier_segment_slots: slots per segment of the disk tier (None: about 64 MiB of
            rows); a checkpoint keeps sealed segments by hard links.
        tier_page_cache_bytes: how much of the page cache the disk tiers may use, in
            whole segments (split between pools as their rows are): segments within it
            are read and written through the page cache, the rest around it
            (O_DIRECT). A model whose tier fits is then served from memory after its
            first read; one that does not still takes no more than this. None: a
            quarter of the machine's memory; 0: never the page cache.
    """

    pruning: PruningPolicy = field(default_factory=lambda: DynamicRatio(0.75))
    budget_bytes: int | None = None
    budget_fraction: float | None = None
    pool_budget_bytes: tuple[int, ...] | None = None
    memory_budget_bytes: int | None = None
    memory_budget_fraction: float | None = None
    gamma: float = 0.99
    prune_period: int = 1000
    sample_size: int = 100_000
    utility: UtilityMode = "gradient"
    seed: int = 0
    mode: StoreMode = "prune"
    on_evict: EvictPolicy | None = None
    drop_floor: float = 1e-6
    max_load: float = 0.75
    initial_capacity: int = 64
    device: Device = "cpu"
    host_cache_bytes: int | None = None
    table_normalization: TableNormalization = "none"
    small_table_rows: int = 0
    readmission: Readmission = "first"
    prefetch_depth: int = 1
    tier_max_garbage: float = 0.15
    tier_segment_slots: int | None = None
    tier_page_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        _check(
            isinstance(self.pruning, (ManualRatios, DynamicRatio, FloorRatios)),
            f"pruning must be ManualRatios, DynamicRatio or FloorRatios, got {self.pruning!r}",
        )
        _check(
            self.budget_bytes is None or self.budget_fraction is None,
            f"give budget_bytes or budget_fraction, not both (got {self.budget_bytes!r} and {self.budget_fraction!r})",
        )
        _check(
            self.budget_bytes is None or (_is_int(self.budget_bytes) and self.budget_bytes > 0),
            f"budget_bytes must be a positive int, got {self.budget_bytes!r}",
        )
        _check(
            self.budget_fraction is None or (0.0 < float(self.budget_fraction) <= 1.0),
            f"budget_fraction must lie in (0, 1], got {self.budget_fraction!r}",
        )
        if self.pool_budget_bytes is not None:
            _check(
                isinstance(self.pool_budget_bytes, (tuple, list))
                and len(self.pool_budget_bytes) > 0
                and all(_is_int(b) and b > 0 for b in self.pool_budget_bytes),
                f"pool_budget_bytes must be a non-empty tuple of positive ints, got {self.pool_budget_bytes!r}",
            )
            object.__setattr__(self, "pool_budget_bytes", tuple(self.pool_budget_bytes))
            _check(
                self.budget_bytes is None and self.budget_fraction is None,
                f"give pool_budget_bytes or budget_bytes / budget_fraction, not both (got {self.pool_budget_bytes!r} "
                f"and {self.budget_bytes!r} / {self.budget_fraction!r})",
            )
        _check(
            self.memory_budget_bytes is None or self.memory_budget_fraction is None,
            f"give memory_budget_bytes or memory_budget_fraction, not both "
            f"(got {self.memory_budget_bytes!r} and {self.memory_budget_fraction!r})",
        )
        _check(
            self.memory_budget_bytes is None or (_is_int(self.memory_budget_bytes) and self.memory_budget_bytes > 0),
            f"memory_budget_bytes must be a positive int, got {self.memory_budget_bytes!r}",
        )
        _check(
            self.memory_budget_fraction is None or (0.0 < float(self.memory_budget_fraction) <= 64.0),
            f"memory_budget_fraction must lie in (0, 64], got {self.memory_budget_fraction!r}",
        )
        _check(0.0 < self.gamma < 1.0, f"gamma must lie in (0, 1), got {self.gamma!r}")
        _check(
            _is_int(self.prune_period) and self.prune_period >= 0,
            f"prune_period must be an int >= 0, got {self.prune_period!r}",
        )
        _check(
            _is_int(self.sample_size) and self.sample_size >= 1,
            f"sample_size must be an int >= 1, got {self.sample_size!r}",
        )
        _check(self.utility in UTILITY_MODES, f"utility must be one of {UTILITY_MODES}, got {self.utility!r}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be an int in [0, 2**63), got {self.seed!r}")
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        on_evict = self.on_evict if self.on_evict is not None else ("spill" if self.mode == "cache" else "discard")
        _check(on_evict in EVICT_POLICIES, f"on_evict must be one of {EVICT_POLICIES}, got {self.on_evict!r}")
        _check(
            not (self.mode == "cache" and on_evict == "discard"),
            "cache mode keeps every chunk: on_evict='discard' is not allowed there",
        )
        object.__setattr__(self, "on_evict", on_evict)
        _check(
            math.isfinite(self.drop_floor) and self.drop_floor >= 0,
            f"drop_floor must be a finite number >= 0, got {self.drop_floor!r}",
        )
        _check(0.1 <= self.max_load <= 0.95, f"max_load must lie in [0.1, 0.95], got {self.max_load!r}")
        _check(
            _is_int(self.initial_capacity) and self.initial_capacity >= 1,
            f"initial_capacity must be a positive int, got {self.initial_capacity!r}",
        )
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(
            self.table_normalization in TABLE_NORMALIZATIONS,
            f"table_normalization must be one of {TABLE_NORMALIZATIONS}, got {self.table_normalization!r}",
        )
        _check(self.readmission in READMISSIONS, f"readmission must be one of {READMISSIONS}, got {self.readmission!r}")
        _check(
            _is_int(self.small_table_rows) and self.small_table_rows >= 0,
            f"small_table_rows must be an int >= 0, got {self.small_table_rows!r}",
        )
        _check(
            _is_int(self.prefetch_depth) and 1 <= self.prefetch_depth <= 64,
            f"prefetch_depth must be an int in [1, 64], got {self.prefetch_depth!r}",
        )
        _check(
            not isinstance(self.tier_max_garbage, bool)
            and isinstance(self.tier_max_garbage, (int, float))
            and 0.0 < self.tier_max_garbage < 1.0,
            f"tier_max_garbage must lie in (0, 1), got {self.tier_max_garbage!r}",
        )
        _check(
            self.tier_segment_slots is None or (_is_int(self.tier_segment_slots) and self.tier_segment_slots >= 1),
            f"tier_segment_slots must be a positive int or None, got {self.tier_segment_slots!r}",
        )
        _check(
            self.tier_page_cache_bytes is None
            or (_is_int(self.tier_page_cache_bytes) and self.tier_page_cache_bytes >= 0),
            f"tier_page_cache_bytes must be an int >= 0 or None, got {self.tier_page_cache_bytes!r}",
        )
        _check(
            self.host_cache_bytes is None or (_is_int(self.host_cache_bytes) and self.host_cache_bytes >= 0),
            f"host_cache_bytes must be an int >= 0 or None, got {self.host_cache_bytes!r}",
        )

    @property
    def spills(self) -> bool:
        return self.on_evict == "spill"


def config_to_json(tables: Sequence[TableConfig], config: StoreConfig) -> dict[str, Any]:
    """The tables and the store's config as JSON-ready values (checkpoints, state dicts, manifests)."""
    cfg = dataclasses.asdict(config)
    p = config.pruning
    if isinstance(p, ManualRatios):
        cfg["pruning"] = {"kind": "manual", "per_chunk": list(p.per_chunk)}
    elif isinstance(p, FloorRatios):
        cfg["pruning"] = {
            "kind": "floor",
            "ratio": p.ratio,
            "floor_dim": p.floor_dim,
            "steepness": p.steepness,
            "shared_floor": p.shared_floor,
        }
    else:
        cfg["pruning"] = {"kind": "dynamic", "ratio": p.ratio}
    return {"tables": [dataclasses.asdict(t) for t in tables], "store": cfg}


def config_from_json(doc: dict[str, Any], hashed_only: bool = False) -> tuple[list[TableConfig], StoreConfig]:
    """The configs :func:`config_to_json` wrote (``hashed_only``: every table on the hashed
    index, as stores of format 1 hold them); what does not validate is a CorruptStoreError."""
    try:
        tables = [TableConfig(**({**t, "index": "hashed"} if hashed_only else t)) for t in doc["tables"]]
        cfg = dict(doc["store"])
        p = cfg.pop("pruning")
        if p["kind"] == "manual":
            pruning: PruningPolicy = ManualRatios(tuple(p["per_chunk"]))
        elif p["kind"] == "dynamic":
            pruning = DynamicRatio(p["ratio"])
        elif p["kind"] == "floor":
            # saved before floors could be shared: the default share, which such a store never used
            pruning = FloorRatios(p["ratio"], p["floor_dim"], p["steepness"], p.get("shared_floor", 0.1))
        else:
            raise ConfigError(f"pruning kind {p['kind']!r} is none of 'manual', 'dynamic', 'floor'")
        return tables, StoreConfig(pruning=pruning, **cfg)
    except (KeyError, TypeError, ConfigError) as exc:
        raise CorruptStoreError(f"the saved configuration is not valid: {exc!r}") from exc


def optimizer_dense_bytes(t: TableConfig) -> int | None:
    """Bytes of the optimizer state a dense table of t would keep (row-wise Adagrad: one float per row)."""
    if t.num_embeddings is None:
        return None
    per_row = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": t.dim}[t.optimizer]
    return t.num_embeddings * per_row * FLOAT_BYTES


def memory_budget(tables: Sequence[TableConfig], config: StoreConfig) -> int | None:
    """The whole-store budget in bytes, or None when none was given."""
    if config.memory_budget_bytes is not None:
        return config.memory_budget_bytes
    if config.memory_budget_fraction is None:
        return None
    total_dense = dense_bytes(tables)
    _check(
        total_dense is not None,
        "a memory budget given as a fraction needs num_embeddings on every table; undeclared: "
        f"{[t.name for t in tables if t.num_embeddings is None]}",
    )
    return int(config.memory_budget_fraction * total_dense)  # type: ignore[operator]


def slot_bytes(chunk_width: int, state_width: int) -> int:
    """Memory of one pool slot: its vector, its optimizer state, its owner and its free-stack cell."""
    return (chunk_width + state_width) * FLOAT_BYTES + 8


@dataclass(frozen=True)
class PoolPlan:
    """The fixed layout of one pool: all tables that share a chunk width."""

    group: int
    chunk_width: int
    state_width: int
    slots: int
    tables: tuple[int, ...]

    @property
    def vector_bytes(self) -> int:
        return self.slots * self.chunk_width * FLOAT_BYTES


def planned_bytes(tables: Sequence[TableConfig], plans: Sequence[PoolPlan], config: StoreConfig) -> int:
    """About what a new store allocates up front: pools (vectors, optimizer state, owners) and entry arrays."""
    kmax = max(t.chunks for t in tables)
    util_width = kmax if config.utility == "gradient" else 1
    per_entry = 4 * kmax + 2 * util_width  # int32 address and 16-bit utility per chunk
    direct = sum(t.num_embeddings for t in tables if t.direct)
    hashed = config.initial_capacity if any(not t.direct for t in tables) else 0
    entries = direct * per_entry + direct // 8 + hashed * (per_entry + 8 + 2)
    pools = sum(p.slots * (4 * p.chunk_width + 4 * p.state_width + 8) for p in plans)
    return int(entries + pools)


def dense_bytes(tables: Sequence[TableConfig]) -> int | None:
    """Bytes of the dense float32 tables, or None if any size is undeclared."""
    sizes = [t.dense_bytes for t in tables]
    return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]


def validate_tables(tables: Sequence[TableConfig], config: StoreConfig) -> None:
    """Checks that only make sense with both configs in hand."""
    _check(len(tables) > 0, "a store needs at least one table")
    _check(len(tables) < 32767, f"at most 32766 tables per store, got {len(tables)}")
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"table names must be unique, repeated: {dup}")
    _check(
        not isinstance(config.pruning, FloorRatios),
        f"pruning={config.pruning!r} gives each row a floor of its own width, which is held as a table of its "
        f"own beside the chunks above it: build the store with FiitedEmbeddingBagCollection or "
        f"FiitedEmbeddingBag (fiited_store.adapters), or from FloorRatios.resolve(tables, config) and "
        f"fiited_store.adapters.floors.split_floors",
    )
    for t in tables:
        _check(
            not t.floor_dim,
            f"table {t.name!r}: floor_dim={t.floor_dim} is held as two tables of the store; build "
            f"the store from fiited_store.adapters.floors.split_floors(tables) (as "
            f"FiitedEmbeddingBagCollection does)",
        )
    if isinstance(config.pruning, ManualRatios) and config.mode == "prune":
        # a table whose every chunk is a floor has no chunk the ratios apply to
        for t, floor in zip(tables, table_floors(tables, config)):
            if floor == t.chunks:
                continue
            _check(
                len(config.pruning.per_chunk) == t.chunks,
                f"table {t.name!r} has {t.chunks} chunks but {len(config.pruning.per_chunk)} manual ratios were given",
            )


def plan_pools(tables: Sequence[TableConfig], config: StoreConfig) -> list[PoolPlan]:
    """Split the budget into one pool per distinct chunk width.

    The floors of the declared rows (``min_chunks``, ``small_table_rows``) are paid
    first, each from its own pool; the rest of the budget goes to each pool in
    proportion to the dense size of its tables outside the floors (or, with
    undeclared sizes, to the sum of their dimensions). A pool that would get no
    slot is a configuration error: the budget is smaller than one slot; but when
    the floors take the whole budget, every pool of chunks that compete keeps one
    slot beyond it (a floor of D/16 dimensions at 93.75% pruning is the budget).
    """
    validate_tables(tables, config)
    total_dense = dense_bytes(tables)
    cap = memory_budget(tables, config)
    index = index_bytes(tables, config)
    if cap is not None:
        _check(index < cap, f"memory budget of {cap} bytes is smaller than the entry index alone ({index} bytes)")
    by_memory = (
        cap is not None
        and config.budget_bytes is None
        and config.budget_fraction is None
        and config.pool_budget_bytes is None
    )
    if config.pool_budget_bytes is not None:
        budget = sum(config.pool_budget_bytes)
    elif config.budget_bytes is not None:
        budget = config.budget_bytes
    elif by_memory:
        budget = cap - index  # type: ignore[operator]
    else:
        fraction = config.budget_fraction
        if fraction is None:
            fraction = 1.0 - config.pruning.average if config.mode == "prune" else None
        _check(fraction is not None, "cache mode needs budget_bytes or budget_fraction")
        _check(
            total_dense is not None,
            "a budget given as a fraction needs num_embeddings on every table; undeclared: "
            f"{[t.name for t in tables if t.num_embeddings is None]}",
        )
        budget = int(fraction * total_dense)  # type: ignore[operator]

    widths: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        widths.setdefault(t.chunk_width, []).append(i)

    # floor chunks (min_chunks, small tables) of declared rows are paid first, each in
    # its own pool: a pool of floors alone (a table whose every chunk is a floor) then
    # holds every row it must, and the rest of the budget is shared by what competes
    floors = table_floors(tables, config)
    states = {c: max(tables[i].state_width for i in ids) for c, ids in widths.items()}
    # a memory budget pays for everything a slot brings along; a pool budget for its vector
    unit = {c: slot_bytes(c, states[c]) if by_memory else c * FLOAT_BYTES for c in widths}
    floor_of = {c: sum((tables[i].num_embeddings or 0) * floors[i] for i in ids) * unit[c] for c, ids in widths.items()}
    floor_total = sum(floor_of.values())
    free = max(budget - floor_total, 0)
    pool_overhead = 8 if by_memory else 0  # a memory budget also pays each pool's free-stack count

    def weight(ids: list[int]) -> float:
        if total_dense is not None:  # what competes: the dense bytes outside the floors
            return float(sum(tables[i].dense_bytes * (1.0 - floors[i] / tables[i].chunks) for i in ids))  # type: ignore[operator]
        return float(sum(tables[i].dim for i in ids))

    total_weight = sum(weight(ids) for ids in widths.values())
    if config.pool_budget_bytes is not None:
        _check(
            len(config.pool_budget_bytes) == len(widths),
            f"pool_budget_bytes gives {len(config.pool_budget_bytes)} budgets for {len(widths)} pools "
            f"(chunk widths {sorted(widths)})",
        )
    plans = []
    for g, (c, ids) in enumerate(sorted(widths.items())):
        if config.pool_budget_bytes is not None:
            share = config.pool_budget_bytes[g]
        elif floor_total:  # floors beyond the budget share it (and then rank above every utility)
            share = (
                floor_of[c] * min(1.0, budget / floor_total)
                + (pool_overhead if floor_of[c] else 0)
                + (free * weight(ids) / total_weight if total_weight > 0 else 0.0)
            )
        else:
            share = budget * weight(ids) / total_weight
        state_width, per_slot = states[c], unit[c]
        if floor_total and share < per_slot + pool_overhead and weight(ids) > 0:
            share = per_slot + pool_overhead  # floors that take the whole budget leave the rest one slot
        slots = int(max(share - pool_overhead, 0) // per_slot)
        _check(
            slots >= 1,
            f"budget of {budget} bytes leaves {int(share)} bytes for the pool of chunk width {c} "
            f"(tables {[tables[i].name for i in ids]}); one slot needs {per_slot} bytes",
        )
        plans.append(PoolPlan(group=g, chunk_width=c, state_width=state_width, slots=slots, tables=tuple(ids)))
    if cap is not None:
        total = index + sum(p.slots * slot_bytes(p.chunk_width, p.state_width) + 8 for p in plans)
        _check(
            total <= cap,
            f"the store needs {total} bytes (entry index {index}, pools {total - index}) "
            f"but the memory budget is {cap} bytes",
        )
    return plans


def index_bytes(tables: Sequence[TableConfig], config: StoreConfig) -> int:
    """Bytes of the entry index as constructed: the direct rows, and the hashed slots at their initial capacity."""
    kmax = max(t.chunks for t in tables)
    U = kmax if config.utility == "gradient" else 1
    direct = sum(t.num_embeddings for t in tables if t.direct)  # type: ignore[misc]
    cap = hashed_capacity(config.initial_capacity) if any(not t.direct for t in tables) else 0
    per_entry = kmax * 4 + U * 2  # int32 addresses, bfloat16 utilities
    return (direct + cap) * per_entry + cap * (8 + 2) + max((direct + 31) // 32, 1) * 4 + (len(tables) + 1) * 8


def hashed_capacity(requested: int) -> int:
    """Slots of a hashed index asked for ``requested``: a power of two, at least 8."""
    p = 8
    while p < requested:
        p *= 2
    return p

"""The store: one Python front over the entry table, the pools, the tiers and the kernels.

Example::

    >>> import numpy as np
    >>> from fiited_store import EmbeddingStore, TableConfig, StoreConfig, DynamicRatio
    >>> store = EmbeddingStore([TableConfig("item", dim=8, chunks=2, num_embeddings=100)],
    ...                        StoreConfig(pruning=DynamicRatio(0.5), prune_period=0))
    >>> ids = np.array([7, 42, 7], dtype=np.int64)
    >>> batch = store.pooled_lookup("item", ids, offsets=np.array([0, 2, 3]), train=True)
    >>> batch.output.shape                      # [bags, D]
    (2, 8)
    >>> store.backward(batch, np.ones((2, 8), np.float32))
    >>> store.step()
    >>> store.stats()["total"]["entries"]
    2

All verbs are batched; none loops over keys in Python. Nothing here is thread-safe:
one thread drives a store (a background thread only reads the disk tier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import compaction, placement, refusals, residency, state_dict, tiering
from .backend import get_backend
from .buffers import OutputBuffers
from .config import (
    PoolingMode,
    PoolPlan,
    StoreConfig,
    TableConfig,
    memory_budget,
    plan_pools,
    planned_bytes,
)
from .entry_table import EntryTable
from .errors import (
    ConfigError,
    InputDTypeError,
    InputShapeError,
    MemoryBudgetError,
    NonFiniteGradientError,
    PoolCapacityError,
    StaleBatchError,
    StorageError,
    UnknownTableError,
)
from .inputs import as_ids, as_offsets, own_array, request_arrays
from .kernels import cpu as host_kernels
from .kernels.layout import INIT_CODES, OPTIMIZER_CODES, UTILITY_CODES, util_to_float
from .pool import ChunkPool
from .stats import store_stats
from .storage.increments import SaveHistory

#: utilities are stored scaled by gamma**-steps; fold the scale back in before it nears float32's range
_MAX_GROWTH = 1e18


class Grouping(NamedTuple):
    """Occurrences of a batch grouped by entry (see ``group_occurrences``)."""

    uniq: Any  # int64[U] distinct entries, first occurrence first
    counts: Any  # int64[U] occurrences of each
    which: Any  # int64[nnz] the distinct entry of each occurrence, -1 for unknown keys


@dataclass
class PooledBatch:
    """One forward pass: its output and what its backward pass needs.

    ``output`` is float32[bags, sum of the features' dims] and shares memory with
    the store's output buffer (the buffer is reused only once nothing refers to it).
    """

    output: Any
    ids: Any
    offsets: Any
    weights: Any
    mean: bool
    bags_per_feature: int
    feature_tables: Any
    feature_col: Any
    q_tables: Any
    bag_of_occ: Any
    entries: Any
    grouping: Grouping | None
    generation: int
    store_id: int
    consumed: bool = False


@dataclass
class StepClock:
    """Where training stands (saved with every checkpoint and state export)."""

    step_count: int = 0  # step() calls so far
    scale_origin: int = 0  # the step that stored utilities are scaled from: true = stored * gamma ** (step - origin)
    prune_round: int = 0  # prune passes so far (each pass's sample is drawn from it)

    def as_tuple(self) -> tuple[int, int, int]:
        return self.step_count, self.scale_origin, self.prune_round


@dataclass
class StoreCounters:
    steps: int = 0
    prunes: int = 0
    rehashes: int = 0
    evicted_chunks: int = 0
    spilled_chunks: int = 0
    restored_chunks: int = 0
    initialised_chunks: int = 0
    sync_fetched_chunks: int = 0
    prefetched_chunks: int = 0
    dropped_entries: int = 0
    #: training lookups that took a prefetched batch's entries and grouping (no second find)
    resolved_lookups: int = 0
    #: live chunks a segment tier moved out of mostly dead segments (compaction)
    compacted_chunks: int = 0


class FeaturePlan(NamedTuple):
    """What a request's list of features decides, worked out once per list."""

    feature_tables: np.ndarray  # int32[F], host: each feature's table
    width: int  # the output's row length (sum of dims)
    feature_tables_d: Any  # int32[F] on the backend
    feature_col_d: Any  # int64[F] on the backend: each feature's first output column
    chunks_in_pool_d: dict  # pool group -> int64[F]: K of the feature's table, 0 in other pools
    feature_rows_d: Any  # int64[F, 2] (first entry, rows) when every table is direct, else None


class EmbeddingStore:
    """Embedding tables stored as FIITED chunks, inside a fixed memory budget.

    Args:
        tables: the logical tables (:class:`TableConfig`).
        config: the store (:class:`StoreConfig`).
        path: a directory for the disk tier and checkpoints. Without one, a store
            that needs a disk tier (``on_evict="spill"`` or cache mode) makes a
            temporary directory that :meth:`close` removes.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        config: StoreConfig | None = None,
        *,
        path: str | Path | None = None,
        _restore: Any = None,
    ):
        config = config if config is not None else StoreConfig()
        if not isinstance(config, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, got {type(config).__name__}")
        tables = tuple(tables)
        for t in tables:
            if not isinstance(t, TableConfig):
                raise ConfigError(f"tables must be TableConfig instances, got {type(t).__name__}")
        self.plans: list[PoolPlan] = plan_pools(tables, config)
        self.memory_budget_bytes = memory_budget(tables, config)
        self.tables = tables
        self.config = config
        self.backend = get_backend(config.device)
        self.k = self.backend.k
        self._table_index = {t.name: i for i, t in enumerate(tables)}
        self.kmax = max(t.chunks for t in tables)
        self.util_width = self.kmax if config.utility == "gradient" else 1
        self._util_code = UTILITY_CODES[config.utility]
        group_of = np.zeros(len(tables), np.int32)
        for plan in self.plans:
            group_of[list(plan.tables)] = plan.group
        meta = dict(
            table_chunks=np.array([t.chunks for t in tables], np.int32),
            table_dim=np.array([t.dim for t in tables], np.int64),
            table_group=group_of,
            table_opt=np.array([OPTIMIZER_CODES[t.optimizer] for t in tables], np.int8),
            table_lr=np.array([t.learning_rate for t in tables], np.float32),
            table_eps=np.array([t.eps for t in tables], np.float32),
            table_init_kind=np.array([INIT_CODES[t.initializer] for t in tables], np.int8),
            table_init_scale=np.array([t.scale for t in tables], np.float64),
        )
        self.host_meta = meta
        self.meta = {k: self.backend.from_host(v) for k, v in meta.items()}
        self._no_rows = self.backend.from_host(np.zeros((1, 2), np.int64))
        self._no_rows_entries = self.backend.empty(0, np.int64)
        self._plans: dict = {}
        self.counters = StoreCounters()
        #: set by a sharded store (:mod:`fiited_store.distributed`): sums counts and gathers
        #: sampled utilities across shards, so that this shard prunes as part of one store
        self.collective = None
        self.clock = StepClock()
        self._generation = 0
        self._closed = False
        self._buffers = OutputBuffers(self.backend)
        import numba

        self._threads = numba.get_num_threads()
        self._grad_buf = None
        #: cache mode's state between calls: background reads, the prefetched batches
        self.residency = residency.Residency(len(self.plans), len(tables), config.prefetch_depth)
        #: the segment each disk tier is emptying, a slice after each step
        self.compactor = compaction.Compactor(len(self.plans))
        self.path = Path(path) if path is not None else None
        self._lock = None
        self._pin = None  # a read-only handle's shared lock on the checkpoint it reads
        #: the checkpoint this handle was opened from, or last saved to its own directory
        self.checkpoint: str | None = None
        #: the arrays of that checkpoint, hashed block by block: a save writes what changed
        self.save_history = SaveHistory()
        #: directories this handle saved to (a save refuses to replace any other store)
        self.saved_to: set[Path] = set()
        self.read_only = False
        #: each pool's disk tier (None until the pool's first spill)
        self.tiers = tiering.Tiers(len(self.plans))
        if _restore is not None:
            _restore(self)
            return
        need = planned_bytes(tables, self.plans, config)
        available = self.backend.memory_bytes()
        if need > available:
            raise ConfigError(
                f"this configuration needs about {need:,} bytes ({need / 2**30:.1f} GiB) for its entry "
                f"arrays and pool, more than the {available:,} bytes of {config.device} memory; declare "
                f"fewer rows, use the hashed index (index='hashed'), or lower the budget"
            )
        try:
            self.entries = EntryTable(
                self.backend,
                [t.num_embeddings if t.direct else 0 for t in tables],
                [t.name for t in tables],
                self.kmax,
                self.util_width,
                config.initial_capacity,
                config.max_load,
            )
            self.pools = [ChunkPool(self.backend, plan) for plan in self.plans]
        except (MemoryError, OSError) as exc:  # the allocator said no (overcommit limits, a full device)
            raise ConfigError(
                f"could not allocate the about {need:,} bytes ({need / 2**30:.1f} GiB) this configuration needs: {exc}"
            ) from None
        if self.path is not None:
            from .storage.checkpoint import MANIFEST, acquire_lock

            if (self.path / MANIFEST).exists():
                raise ConfigError(
                    f"{self.path} already holds a store; open it with EmbeddingStore.open({str(self.path)!r}, 'r+')"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = acquire_lock(self.path)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the write lock, stop background reads and remove temporary files."""
        if self._closed:
            return
        self._closed = True
        self.residency.cancel_reads(self.tiers)
        self.tiers.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._pin is not None:
            self._pin.release()
            self._pin = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def hold(self, lock: Any = None, pin: Any = None) -> None:
        """Keep a checkpoint's write lock or read pin (:mod:`.storage.checkpoint`) until :meth:`close`."""
        self._lock = lock if lock is not None else self._lock
        self._pin = pin if pin is not None else self._pin

    # ------------------------------------------------------------------ state others read
    @property
    def step_count(self) -> int:
        """Training steps so far."""
        return self.clock.step_count

    @property
    def generation(self) -> int:
        """Bumped whenever entries may have moved (a rehash, an erase, a state import): a batch
        resolved at another generation finds its keys again."""
        return self._generation

    def entries_moved(self) -> None:
        """Entries moved or went: batches and plans resolved before must not be trusted."""
        self._generation += 1

    def replace_entries(self, entries: EntryTable) -> None:
        """Install another entry table (a state import): every cached feature plan holds the old one's rows."""
        self.entries = entries
        self._plans.clear()
        self.entries_moved()

    def gradient_rows(self, rows: int):
        """A scratch float32[>= rows, widest dim] for summed gradients, its first ``rows`` rows zeroed."""
        dmax = int(self.host_meta["table_dim"].max())
        if self._grad_buf is None or self._grad_buf.shape[0] < rows:
            self._grad_buf = self.backend.empty((max(rows, 1024) * 5 // 4, dmax), np.float32)
        self.k.zero_rows(self._grad_buf, rows)
        return self._grad_buf

    # ------------------------------------------------------------------ helpers
    def table_index(self, name: str) -> int:
        try:
            return self._table_index[name]
        except (KeyError, TypeError):
            raise UnknownTableError(name, list(self._table_index)) from None

    def _feature_plan(self, features: str | Sequence[str]) -> FeaturePlan:
        """What a request's feature list decides (tables, column layout, per-pool chunk
        counts, the direct rows), worked out once per list: a lookup of 26 features
        spent a tenth of its time on it."""
        key = (
            features if isinstance(features, str) else tuple(features) if isinstance(features, (list, tuple)) else None
        )
        plan = self._plans.get(key) if key is not None else None
        if plan is not None:
            return plan
        ft = self.feature_indices(features)
        b, meta = self.backend, self.host_meta
        dims = meta["table_dim"][ft]
        rows = self.entries.table_rows[ft]
        plan = FeaturePlan(
            feature_tables=ft,
            width=int(dims.sum()),
            feature_tables_d=b.from_host(ft),
            feature_col_d=b.from_host(np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(np.int64)),
            chunks_in_pool_d={
                p.plan.group: b.from_host(
                    np.where(meta["table_group"][ft] == p.plan.group, meta["table_chunks"][ft], 0).astype(np.int64)
                )
                for p in self.pools
            },
            feature_rows_d=b.from_host(rows) if rows[:, 1].all() else None,
        )
        if key is not None and len(self._plans) < 64:
            self._plans[key] = plan
        return plan

    def feature_indices(self, features: str | Sequence[str]) -> np.ndarray:
        if isinstance(features, str):
            features = [features]
        if not isinstance(features, (list, tuple, np.ndarray)):
            raise UnknownTableError(features, list(self._table_index))
        if len(features) == 0:
            raise InputShapeError("at least one feature (table name) is needed")
        return np.array([self.table_index(f) for f in features], np.int32)

    def check_writable(self) -> None:
        if self._closed:
            raise StaleBatchError("the store is closed")
        if self.read_only:
            from .errors import StoreReadOnlyError

            raise StoreReadOnlyError(f"store at {self.path} is open read-only")

    # ------------------------------------------------------------------ resolution
    def rehash(self, capacity: int) -> None:
        old_to_new = self.entries.rehash(capacity)
        for pool in self.pools:
            self.k.remap_owner(pool.arrays.owner, old_to_new)
        host_map = None
        for tier in self.tiers:
            if tier is not None and tier.keeps_owners:
                # tier back-pointers live on the host whatever the device
                if host_map is None:
                    host_map = self.backend.to_host(old_to_new)
                host_kernels.remap_owner(tier.owner, host_map)
        self.entries_moved()
        self.counters.rehashes += 1

    def resolve(self, q_tables, ids, insert: bool, new_out: list | None = None, limits: Sequence[int] | None = None):
        """Entries of the keys; training inserts the unseen ones, first occurrence
        first, and gives their chunks free slots (at most ``limits[g]`` in pool g)."""
        entries, n_missing, n_hashed = self.entries.find_counted(q_tables, ids)
        if not insert or n_missing == 0:
            return entries
        if self.entries.needs_rehash(n_hashed):
            capacity = self.entries.rehash_capacity(n_hashed)
            self.check_memory_budget(capacity)
            self.rehash(capacity)
            entries, n_missing, n_hashed = self.entries.find_counted(q_tables, ids)
        new = self.entries.insert_missing(q_tables, ids, entries)
        if new_out is not None:
            new_out.append(new)
        if self.config.mode == "prune" and new.shape[0]:
            m = self.meta
            for pool in self.pools:
                a = pool.arrays
                ea = self.entries.arrays
                n = self.k.admit_new_chunks(
                    new,
                    ea.row_base,
                    ea.seen,
                    ea.keys,
                    ea.table_ids,
                    ea.addr,
                    m["table_chunks"],
                    m["table_group"],
                    pool.plan.group,
                    a.vectors,
                    a.opt_state,
                    a.owner,
                    a.free_stack,
                    a.n_free,
                    self.config.seed,
                    m["table_init_kind"],
                    m["table_init_scale"],
                    self.kmax,
                    pool.slots if limits is None else int(limits[pool.plan.group]),
                )
                self.counters.initialised_chunks += int(n)
        return entries

    def check_memory_budget(self, capacity: int) -> None:
        """Refuse to grow the hashed index to ``capacity`` slots past the memory budget."""
        if self.memory_budget_bytes is None:
            return
        grown = self.memory_bytes() + (capacity - self.entries.capacity) * self.entries.hashed_slot_bytes
        if grown > self.memory_budget_bytes:
            raise MemoryBudgetError(
                f"inserting these keys needs the hashed index grown to {capacity} slots, {grown} bytes in all, "
                f"over the memory budget of {self.memory_budget_bytes} bytes; nothing was inserted "
                f"({self.entries.n_hashed} live hashed keys; lower drop_floor's reach or raise the budget)"
            )

    def memory_bytes(self) -> int:
        """The store's memory now: pool vectors, optimizer state, address manager and entry index."""
        return sum(p.vector_bytes + p.state_bytes + p.manager_bytes for p in self.pools) + self.entries.nbytes

    def group_occurrences(self, entries, q_tables) -> Grouping:
        n = entries.shape[0]
        uniq = self.backend.empty(n, np.int64)
        counts = self.backend.empty(n, np.int64)
        which = self.backend.empty(n, np.int64)
        u = int(self.k.group_occurrences(entries, q_tables, len(self.tables), uniq, counts, which))
        return Grouping(uniq[:u], counts[:u], which)

    # ------------------------------------------------------------------ lookups
    def pooled_lookup(
        self,
        features: str | Sequence[str],
        ids: Any,
        offsets: Any,
        per_sample_weights: Any = None,
        mode: PoolingMode = "sum",
        *,
        train: bool = False,
    ) -> PooledBatch:
        """Pooled lookup of one or many features (TorchRec's jagged layout).

        Args:
            features: a table name, or one table name per feature (a table may serve
                several features).
            ids: int64[nnz], the ids of every bag, feature by feature.
            offsets: int64[F * B + 1], bag boundaries into ``ids``; feature f's bag b
                is ``ids[offsets[f * B + b] : offsets[f * B + b + 1]]``.
            per_sample_weights: float32[nnz] or None (``mode="sum"`` only).
            mode: "sum" or "mean".
            train: insert unseen keys (their chunks take free slots, or start absent
                when the pool is full) and keep what :meth:`backward` needs. Without
                it, unseen keys read as zero vectors and nothing is inserted.

        Returns:
            a :class:`PooledBatch` whose ``output`` is float32[B, sum of dims], the
            features' pooled vectors side by side.
        """
        if self._closed:
            raise StaleBatchError("the store is closed")
        if mode not in ("sum", "mean"):
            raise InputShapeError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if train:
            self.check_writable()
        plan = self._feature_plan(features)
        feature_tables, ft_d, fc_d = plan.feature_tables, plan.feature_tables_d, plan.feature_col_d
        F = feature_tables.shape[0]
        b = self.backend
        # a batch kept for backward (or for weight gradients) owns its inputs; one that
        # may be a prefetched batch takes the prefetch's copies if it is, so copies later
        own = train or per_sample_weights is not None
        may_be_resolved = train and per_sample_weights is None and self.residency.has_resolved() and b.name == "cpu"
        ids_d, offsets_d, weights_d = request_arrays(
            b, ids, offsets, per_sample_weights, F, mode, own=own and not may_be_resolved
        )
        nnz = ids_d.shape[0]
        B = (offsets_d.shape[0] - 1) // F
        if not train and weights_d.shape[0] == 0 and mode == "sum" and self.config.mode == "prune":
            # nothing will be trained: the rows are found inside the gather (no find
            # pass, no per-occurrence tables): the ids are the rows of direct tables,
            # and the address pass probes the hashed index for the others
            out = self._buffers.get((B, plan.width))
            none = self._no_rows_entries
            for pool in self.pools:
                if plan.feature_rows_d is not None:
                    n_bad = self._sum_forward(pool, plan, none, ids_d, plan.feature_rows_d, offsets_d, B, out)
                else:
                    n_bad = self._probed_sum_forward(pool, plan, ids_d, offsets_d, B, out)
                if n_bad:
                    q_tables = b.empty(nnz, np.int16)
                    self.k.expand_bags(offsets_d, B, ft_d, none, q_tables)
                    self.entries.find(q_tables, ids_d)  # raises IdOutOfRangeError naming the first
            return PooledBatch(
                output=out,
                ids=ids_d,
                offsets=offsets_d,
                weights=weights_d,
                mean=False,
                bags_per_feature=B,
                feature_tables=ft_d,
                feature_col=fc_d,
                q_tables=None,
                bag_of_occ=None,
                entries=None,
                grouping=None,
                generation=self._generation,
                store_id=id(self),
                consumed=True,
            )
        # bags of occurrences are only needed to train (or to differentiate the weights)
        new: list = []
        resolved = residency.take_resolved(self, feature_tables, ids_d, offsets_d) if may_be_resolved else None
        if resolved is not None:
            # prefetched: its keys were all found then, and none has moved since
            keys = resolved.keys
            ids_d, offsets_d, q_tables, bag_of_occ = keys.ids, keys.offsets, keys.q_tables, keys.bag_of_occ
            entries, grouping, missing = resolved.entries, resolved.grouping, resolved.missing
        else:
            if may_be_resolved:
                ids_d, offsets_d = (own_array(a, src) for a, src in ((ids_d, ids), (offsets_d, offsets)))
            missing = None
            bag_of_occ = b.empty(nnz if train or weights_d.shape[0] else 0, np.int64)
            q_tables = b.empty(nnz, np.int16)
            self.k.expand_bags(offsets_d, B, ft_d, bag_of_occ, q_tables)
            if train and self.config.mode == "cache":
                residency.check_batch_fits(self, q_tables, ids_d)
                # room first, then the new keys: a refusal adds none
                entries, grouping = residency.resolve_resident(self, q_tables, ids_d, new)
            else:
                entries, grouping = self.resolve(q_tables, ids_d, insert=train, new_out=new), None
            if train and grouping is None:
                grouping = self.group_occurrences(entries, q_tables)
        if self.config.mode == "cache" and train:
            if resolved is not None:
                residency.make_resident(self, grouping.uniq, missing)
            self.counters.resolved_lookups += resolved is not None
        out = self._buffers.get((B, plan.width))
        m = self.meta
        for pool in self.pools:
            if self.config.mode == "cache" and not train:
                sp_slots, sp_vectors = residency.read_through(self, pool, entries, q_tables)
            else:
                sp_slots, sp_vectors = b.empty(0, np.int64), b.empty((0, pool.plan.chunk_width), np.float32)
            if weights_d.shape[0] == 0 and mode == "sum" and sp_slots.shape[0] == 0:
                self._sum_forward(pool, plan, entries, ids_d, self._no_rows, offsets_d, B, out)
                continue
            self.k.pooled_forward(
                entries,
                offsets_d,
                weights_d,
                mode == "mean",
                B,
                ft_d,
                fc_d,
                self.entries.arrays.addr,
                pool.arrays.vectors,
                m["table_chunks"],
                m["table_group"],
                pool.plan.group,
                sp_slots,
                sp_vectors,
                out,
            )
        return PooledBatch(
            output=out,
            ids=ids_d,
            offsets=offsets_d,
            weights=weights_d,
            mean=mode == "mean",
            bags_per_feature=B,
            feature_tables=ft_d,
            feature_col=fc_d,
            q_tables=q_tables,
            bag_of_occ=bag_of_occ,
            entries=entries,
            grouping=grouping,
            generation=self._generation,
            store_id=id(self),
            consumed=not train,
        )

    def _sum_forward(self, pool: ChunkPool, plan: FeaturePlan, entries, ids, feature_rows, offsets, B, out):
        """The lean pooled sum over one pool; returns how many ids were out of range (direct rows)."""
        return int(
            self.k.pooled_sum_forward(
                entries,
                ids,
                feature_rows,
                offsets,
                B,
                plan.chunks_in_pool_d[pool.plan.group],
                plan.feature_col_d,
                self.entries.arrays.addr.reshape(-1),
                self.kmax,
                pool.arrays.vectors.reshape(-1),
                pool.plan.chunk_width,
                out.reshape(-1),
                out.shape[1],
            )
        )

    def _probed_sum_forward(self, pool: ChunkPool, plan: FeaturePlan, ids, offsets, B, out):
        """The lean pooled sum over one pool, finding hashed keys as it goes."""
        ea = self.entries.arrays
        return int(
            self.k.pooled_sum_forward_probed(
                ids,
                plan.feature_tables_d,
                ea.row_base,
                ea.seen,
                ea.keys,
                ea.table_ids,
                offsets,
                B,
                plan.chunks_in_pool_d[pool.plan.group],
                plan.feature_col_d,
                ea.addr.reshape(-1),
                self.kmax,
                pool.arrays.vectors.reshape(-1),
                pool.plan.chunk_width,
                out.reshape(-1),
                out.shape[1],
            )
        )

    def lookup(self, table: str, ids: Any, *, train: bool = False):
        """Rows of ``ids`` as float32[n, D], zero-padded where chunks are absent."""
        if ids is None or np.ndim(ids) == 0:
            as_ids(ids)  # the named error, with the value
        n = np.asarray(ids).shape[0] if np.ndim(ids) == 1 else -1
        offsets = np.arange(max(n, 0) + 1, dtype=np.int64)
        return self.pooled_lookup(table, ids, offsets, train=train).output

    def find(self, table: str, ids: Any):
        """(rows float32[n, D], found bool[n]); unknown keys read as zeros and are not inserted."""
        ids = as_ids(ids)
        batch = self.pooled_lookup(table, ids, np.arange(ids.shape[0] + 1), train=False)
        return batch.output, self.contains(table, ids)

    def find_or_insert(self, table: str, ids: Any):
        """Rows of ``ids``, inserting unseen keys (they take free slots while any remain)."""
        self.check_writable()
        return self.lookup(table, ids, train=True)

    def insert(self, table: str, ids: Any) -> int:
        """Give entries to keys that have none, as a training forward pass would (their
        chunks take free slots while any remain, in prune mode). Returns how many were new."""
        self.check_writable()
        t = self.table_index(table)
        ids = as_ids(ids)
        q = self.backend.from_host(np.full(ids.shape[0], t, np.int16))
        before = self.entries.n_live
        self.resolve(q, self.backend.from_host(ids), insert=True)
        return self.entries.n_live - before

    def contains(self, table: str, ids: Any) -> np.ndarray:
        t = self.table_index(table)
        ids = as_ids(ids)
        q = self.backend.from_host(np.full(ids.shape[0], t, np.int16))
        entries, _ = self.entries.find(q, self.backend.from_host(ids))
        return self.backend.to_host(entries) >= 0

    # ------------------------------------------------------------------ backward
    def backward(self, batch: PooledBatch, grad_out: Any) -> None:
        """Utilities and the fused optimizer step from ``grad_out`` (float32[B, sum of dims]).

        Each chunk's utility gets ``a * ||g||`` (accesses in the batch times the L2 norm
        of its summed gradient); resident chunks take one optimizer step. A NaN or inf
        anywhere in ``grad_out`` raises :class:`NonFiniteGradientError` before anything
        changes.
        """
        self.check_writable()
        if not isinstance(batch, PooledBatch):
            raise InputDTypeError(
                f"backward takes the PooledBatch that pooled_lookup(..., train=True) returned, got "
                f"{type(batch).__name__}"
            )
        if batch.store_id != id(self):
            raise StaleBatchError("this batch was produced by another store")
        if batch.consumed:
            raise StaleBatchError("this batch was not produced with train=True, or its backward already ran")
        g = self._as_grad(grad_out, batch.output.shape)
        entries, grouping = batch.entries, batch.grouping
        if batch.generation != self._generation:
            # a rehash or an erase moved entries since the forward; find the keys again
            entries, _ = self.entries.find(batch.q_tables, batch.ids)
            grouping = None
        if grouping is None:
            grouping = self.group_occurrences(entries, batch.q_tables)
        U = grouping.uniq.shape[0]
        m = self.meta
        # phase 1 sums every gradient row an id uses and checks the sums; nothing changes yet
        grad_buf = self.gradient_rows(U)
        split = max(1, self._threads // max(len(self.tables), 1))
        for pool in self.pools:
            self.k.accumulate_gradients(
                grouping.which,
                batch.offsets,
                batch.weights,
                batch.mean,
                batch.bags_per_feature,
                batch.feature_tables,
                batch.feature_col,
                g,
                m["table_chunks"],
                m["table_group"],
                pool.plan.group,
                pool.plan.chunk_width,
                len(self.tables),
                split,
                grad_buf,
            )
        n_bad = int(self.k.count_nonfinite_rows(grad_buf, U))
        n_bad += int(
            self.k.nonfinite_in_empty_bags(
                batch.offsets, batch.bags_per_feature, batch.feature_col, batch.feature_tables, m["table_dim"], g
            )
        )
        if n_bad:
            bad = int(self.k.first_nonfinite(g))
            if bad < 0:  # finite, but an id's summed gradient squares past float32
                host = np.abs(self.backend.to_host(g))
                i, j = np.unravel_index(int(np.argmax(host)), host.shape)
                raise NonFiniteGradientError(
                    f"grad_out[{i}, {j}] = {self.backend.to_host(g[i : i + 1, j])[0]}: the gradients summed per id "
                    f"overflow float32 when squared (the optimizer state and utilities would become inf); "
                    f"nothing was updated"
                )
            i, j = divmod(bad, g.shape[1])
            raise NonFiniteGradientError(
                f"grad_out[{i}, {j}] = {self.backend.to_host(g[i : i + 1, j])[0]} is not finite; nothing was updated"
            )
        # phase 2: utilities and the fused optimizer step
        self.apply_summed_gradients(grouping.uniq, grouping.counts, grad_buf)
        batch.consumed = True

    def apply_summed_gradients(self, uniq, counts, grad_buf) -> None:
        """Utilities and the fused optimizer step of distinct entries ``uniq`` (int64[U]),
        accessed ``counts`` times (int64[U]), from their summed, checked gradients
        ``grad_buf[:U]``: the second phase of :meth:`backward` (and of a sharded one)."""
        m = self.meta
        ea = self.entries.arrays
        growth = self._growth()
        # rounding bits for the 16-bit utilities: fresh each step, the same on every backend
        salt = np.uint64(
            host_kernels.mix64(
                np.uint64(self.config.seed) ^ np.uint64(host_kernels.mix64(np.uint64(self.step_count + 1)))
            )
        )
        for pool in self.pools:
            a = pool.arrays
            self.k.apply_gradients(
                uniq,
                counts,
                grad_buf,
                ea.row_base,
                ea.seen,
                ea.keys,
                ea.table_ids,
                ea.addr,
                ea.util,
                a.vectors,
                a.opt_state,
                m["table_chunks"],
                m["table_group"],
                pool.plan.group,
                m["table_opt"],
                m["table_lr"],
                m["table_eps"],
                self._util_code,
                growth,
                salt,
            )

    def per_sample_weight_grads(self, batch: PooledBatch, grad_out: Any):
        """d loss / d per_sample_weights, float32[nnz]; call before :meth:`backward`."""
        g = self._as_grad(grad_out, batch.output.shape)
        out = self.backend.full(batch.ids.shape[0], 0.0, np.float32)
        m = self.meta
        ea = self.entries.arrays
        for pool in self.pools:
            self.k.per_sample_weight_grads(
                batch.entries,
                batch.bag_of_occ,
                batch.bags_per_feature,
                batch.feature_col,
                g,
                ea.row_base,
                ea.seen,
                ea.table_ids,
                ea.addr,
                pool.arrays.vectors,
                m["table_chunks"],
                m["table_group"],
                pool.plan.group,
                out,
            )
        return out

    def _as_grad(self, grad_out: Any, shape: tuple[int, ...]):
        a = self.backend.as_input(grad_out) if hasattr(self.backend, "as_input") else np.asarray(grad_out)
        if a.dtype != np.float32:
            raise InputDTypeError(f"grad_out must be float32, got dtype {a.dtype}")
        if tuple(a.shape) != tuple(shape):
            raise InputShapeError(f"grad_out must have the output's shape {tuple(shape)}, got {tuple(a.shape)}")
        return self.backend.from_host(a) if isinstance(a, np.ndarray) else a

    # ------------------------------------------------------------------ utilities and steps
    def _growth(self) -> float:
        growth = self.config.gamma ** -(self.step_count - self.clock.scale_origin)
        if growth > _MAX_GROWTH:
            self.fold_utility_scale()
            growth = 1.0
        return growth

    def fold_utility_scale(self) -> None:
        steps = self.step_count - self.clock.scale_origin
        if steps:
            self.k.scale_utilities(self.entries.arrays.util, self.config.gamma**steps)
            self.clock.scale_origin = self.step_count

    def utilities(self, table: str, ids: Any) -> np.ndarray:
        """True utilities, float32[n, K] (NaN for unknown keys); per-row modes repeat the row's value."""
        t = self.table_index(table)
        ids = as_ids(ids)
        q = self.backend.from_host(np.full(ids.shape[0], t, np.int16))
        entries, _ = self.entries.find(q, self.backend.from_host(ids))
        e = self.backend.to_host(entries)
        util = util_to_float(self.backend.to_host(self.entries.arrays.util))
        K = self.tables[t].chunks
        out = np.full((ids.shape[0], K), np.nan, np.float32)
        hit = e >= 0
        rows = util[e[hit]]
        rows = rows[:, :K] if rows.shape[1] > 1 else np.repeat(rows, K, axis=1)
        out[hit] = rows * np.float32(self.config.gamma ** (self.step_count - self.clock.scale_origin))
        return out

    def step(self) -> None:
        """End a training step: utilities decay by gamma; every T steps a prune pass runs.

        A prune pass refused before it moved a chunk (a full device, a corrupt tier file)
        leaves the store as it was, this step uncounted (:mod:`.refusals`)."""
        self.check_writable()
        T = self.config.prune_period
        due = bool(T) and (self.step_count + 1) % T == 0
        # only a pass that moves chunks to or from a tier can be refused part-way
        undo = refusals.StepUndo(self, with_utilities=True) if due and self.config.spills else None
        self.clock.step_count += 1
        self.counters.steps += 1
        if due:
            try:
                self.prune()
            except (StorageError, PoolCapacityError) as exc:
                if undo is None or not undo.restore(self):
                    exc.add_note("the prune pass had moved chunks before this; the store is sound, the step counted")
                raise
        compaction.after_step(self)

    # ------------------------------------------------------------------ prune
    def prune(self) -> dict[str, Any]:
        """One pass of Algorithm 1 over every pool; returns what it did.

        Thresholds come from m utilities sampled by key hash; chunks below their
        threshold lose their slot (discarded or spilled), chunks above it that have
        none get one (re-initialised, or restored if spilled); when more chunks
        qualify than there are slots, the highest utilities win. In cache mode it
        only rebalances: the most useful chunks move into the pool, the rest to disk.
        """
        self.check_writable()
        self.fold_utility_scale()
        self.clock.prune_round += 1
        self.counters.prunes += 1
        entries_per_table = self.entries.entries_per_table(len(self.tables))
        if self.collective is not None:
            # every shard takes part, with or without entries: the thresholds are global
            entries_per_table = self.collective.sum_counts(entries_per_table)
        report: dict[str, Any] = {"pools": placement.prune_pools(self, entries_per_table)}
        if self.config.mode == "prune":
            report["dropped_entries"] = self.drop_dead_entries()
        return report

    def drop_dead_entries(self) -> int:
        """Erase entries with no resident chunk whose every utility fell below ``drop_floor``."""
        return placement.drop_dead_entries(self)

    def erase(self, table: str, ids: Any) -> int:
        """Remove keys (their chunks' memory is freed everywhere); returns how many existed."""
        self.check_writable()
        t = self.table_index(table)
        ids = as_ids(ids)
        q = self.backend.from_host(np.full(ids.shape[0], t, np.int16))
        entries, _ = self.entries.find(q, self.backend.from_host(ids))
        e = self.backend.to_host(entries)
        e = np.unique(e[e >= 0])
        return placement.erase_entries(self, self.backend.from_host(e)) if e.size else 0

    # ------------------------------------------------------------------ writes
    def insert_or_assign(self, table: str, ids: Any, values: Any) -> None:
        """Set whole rows: values float32[n, D]; a repeated id takes its last row.

        Every chunk of the given keys becomes resident with the given values and a
        fresh optimizer state. In prune mode, if the pool lacks the free slots this
        needs, :class:`PoolCapacityError` is raised and nothing changes.
        """
        self.check_writable()
        t = self.table_index(table)
        ids = as_ids(ids)
        D = self.tables[t].dim
        v = np.asarray(values)
        if v.dtype != np.float32:
            raise InputDTypeError(f"values must be float32, got dtype {v.dtype}")
        if v.shape != (ids.shape[0], D):
            raise InputShapeError(f"values must have shape ({ids.shape[0]}, {D}) for table {table!r}, got {v.shape}")
        if not np.all(np.isfinite(v)):
            bad = np.argwhere(~np.isfinite(v))[0]
            raise NonFiniteGradientError(f"values[{bad[0]}, {bad[1]}] = {v[tuple(bad)]} is not finite")
        # keep the last occurrence of each id
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.shape[0] - 1 - last)
        ids, v = ids[keep], np.ascontiguousarray(v[keep])
        b = self.backend
        q = b.from_host(np.full(ids.shape[0], t, np.int16))
        ids_d = b.from_host(ids)
        g = int(self.host_meta["table_group"][t])
        pool = self.pools[g]
        if self.config.mode == "prune":
            found, n_missing = self.entries.find(q, ids_d)
            found_h = b.to_host(found)
            existing = b.from_host(found_h[found_h >= 0])
            n_exist_missing = int(placement.missing_chunks(self, existing, g)[0].shape[0])
            needed = n_exist_missing + n_missing * self.tables[t].chunks
            if needed > pool.n_free:
                raise PoolCapacityError(
                    f"insert_or_assign into {table!r} needs {needed} free slots of width {pool.chunk_width}, "
                    f"the pool has {pool.n_free} free of {pool.slots}; nothing was changed"
                )
        if self.config.mode == "cache":
            residency.check_batch_fits(self, q, ids_d)
            entries, _ = residency.resolve_resident(self, q, ids_d)
        else:
            entries = self.resolve(q, ids_d, insert=True)
            placement.allocate(self, pool, *placement.missing_chunks(self, entries, g))
        ea = self.entries.arrays
        self.k.assign_rows(
            entries,
            b.from_host(v),
            ea.row_base,
            ea.seen,
            ea.table_ids,
            ea.addr,
            self.meta["table_chunks"],
            self.meta["table_group"],
            g,
            pool.arrays.vectors,
            pool.arrays.opt_state,
        )

    # ------------------------------------------------------------------ cache mode
    def prefetch(self, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
        """Cache mode: make every chunk of these keys resident now (see :func:`residency.prefetch`)."""
        return residency.prefetch(self, features, ids, offsets)

    def prefetch_async(self, features: str | Sequence[str], ids: Any, offsets: Any = None) -> int:
        """Cache mode: read the spilled chunks of these keys on a background thread
        (see :func:`residency.prefetch_async`); returns the chunks being read."""
        return residency.prefetch_async(self, features, ids, offsets)

    def flat_keys(self, features, ids, offsets=None) -> residency.FlatKeys:
        """The keys of a request for one table, or for features laid out as in pooled_lookup
        (then with the bag of each occurrence)."""
        feats = self.feature_indices(features)
        ids = as_ids(ids)
        b = self.backend
        if offsets is None:
            if feats.shape[0] != 1:
                raise InputShapeError("several features need offsets, laid out as for pooled_lookup")
            return residency.FlatKeys(
                feats, b.from_host(np.full(ids.shape[0], feats[0], np.int16)), b.from_host(ids), None, None
            )
        offsets = as_offsets(offsets, ids.shape[0], feats.shape[0])
        bag_of_occ = b.empty(ids.shape[0], np.int64)
        q_tables = b.empty(ids.shape[0], np.int16)
        self.k.expand_bags(
            b.from_host(offsets), (offsets.shape[0] - 1) // feats.shape[0], b.from_host(feats), bag_of_occ, q_tables
        )
        return residency.FlatKeys(feats, q_tables, b.from_host(ids), offsets, bag_of_occ)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Entries, chunk residency, kept dimensions and bytes, per table and in total
        (see :func:`stats.store_stats`)."""
        return store_stats(self)

    # ------------------------------------------------------------------ state as arrays
    def export_state(self) -> dict[str, np.ndarray]:
        """Every array of the store, host copies, tier rows included (for ``state_dict``)."""
        return state_dict.export_state(self)

    def import_state(self, arrays: dict[str, Any]) -> None:
        """Replace this store's contents with an :meth:`export_state` of a store of the same configuration."""
        self.residency.forget_resolved()
        state_dict.import_state(self, arrays)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (see :mod:`fiited_store.storage.checkpoint`); returns its directory."""
        from .storage.checkpoint import save_store

        ckpt = save_store(self, Path(path) if path is not None else self.path)
        if path is None or (self.path is not None and Path(path).resolve() == self.path.resolve()):
            self.checkpoint = ckpt.name
        return ckpt

    @classmethod
    def open(
        cls,
        path: str | Path,
        mode: str = "r",
        device: str | None = None,
        *,
        checkpoint: str | None = None,
        check_listed_files: bool = True,
    ) -> EmbeddingStore:
        """Open a saved store: mode "r" (read-only) or "r+" (takes the write lock).

        ``checkpoint`` opens that checkpoint of the directory instead of the one its
        manifest names (for writing, the manifest is pointed back at it);
        ``check_listed_files=False`` goes past missing or resized files (``verify``
        opens a damaged store that way, to report everything wrong with it)."""
        from .storage.checkpoint import open_store

        return open_store(
            cls, Path(path), mode=mode, device=device, checkpoint=checkpoint, check_listed_files=check_listed_files
        )

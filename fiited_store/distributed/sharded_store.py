"""A store sharded over the ranks of a ``torch.distributed`` process group.

Each rank holds one shard, an ordinary :class:`EmbeddingStore` with the rows whose
keys route to it (:mod:`.routing`), and serves lookups of every rank:

- **forward**: the requester deduplicates its (table, id) keys, sends each to its
  owner (one ``all_to_all_single`` of ids and tables with their counts in a header:
  :class:`.exchange.KeyExchange`), the
  owners return the rows at each table's width, and the requester pools its own
  bags (so ``mean`` divides by the whole bag);
- **backward**: per distinct key, the summed gradient and the access count go back
  to the owner (or, with ``exact=True``, one gradient row per occurrence, which the
  owner sums in the order a single store fed the global batch would); a non-finite
  gradient on any rank raises :class:`NonFiniteGradientError` on every rank before
  anything changes;
- **prune**: the shards' entry counts are summed and their sampled utilities
  gathered, so every rank computes the same thresholds as one store would;
- **the pool as one**: the cutoff of an over-subscribed prune and the free slots
  that new keys take are decided for the whole store (:mod:`.global_pools`), so a
  full budget is shared as one store shares it, not 1/W per shard.

Every verb is a collective: every rank calls it, in the same order, with its own
batch (possibly empty). Errors in one rank's input are agreed on in the exchanges
that follow, so a bad batch raises on every rank instead of hanging the others.

Example (one process, no process group: a world of one)::

    >>> import numpy as np
    >>> from fiited_store import TableConfig, StoreConfig, DynamicRatio
    >>> from fiited_store.distributed import ShardedEmbeddingStore
    >>> store = ShardedEmbeddingStore([TableConfig("item", dim=8, chunks=2, num_embeddings=100)],
    ...                               StoreConfig(pruning=DynamicRatio(0.5), prune_period=0))
    >>> batch = store.pooled_lookup("item", np.array([7, 42, 7]), np.array([0, 2, 3]), train=True)
    >>> batch.output.shape
    (2, 8)
    >>> store.backward(batch, np.ones((2, 8), np.float32))
    >>> store.step()
    >>> store.stats()["total"]["entries"]
    2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..buffers import OutputBuffers
from ..config import StoreConfig, TableConfig, plan_pools
from ..errors import (
    ConfigError,
    FiitedError,
    IdOutOfRangeError,
    InputDTypeError,
    InputShapeError,
    NonFiniteGradientError,
    PeerRankError,
    StaleBatchError,
)
from ..inputs import request_arrays
from ..kernels import cpu as host_kernels
from ..store import PooledBatch
from . import owner
from .exchange import KeyExchange, exchange_for, segment_sums, starts_of
from .global_pools import MAX_FEATURES, POOL_SLACK, GlobalPools, pack_key_places, places_of, tables_of
from .layout import shard_config
from .routing import RowWiseRouting, TableWiseRouting

# what a rank reports in the flag exchange of a backward pass
_OK, _NONFINITE, _OVERFLOW, _REFUSED = 0, 1, 2, 3


@dataclass
class ShardedBatch:
    """One sharded forward pass: the pooled ``output`` (float32[B, sum of dims], shared
    with the store's buffer) and what its backward pass needs on both sides."""

    output: Any
    offsets: np.ndarray
    weights: np.ndarray
    mean: bool
    bags_per_feature: int
    feature_tables: np.ndarray
    feature_dim: np.ndarray
    feature_col: np.ndarray
    key_of_occ: np.ndarray  # int64[nnz]: the distinct key of each occurrence
    key_row: np.ndarray  # int64[U]: where each distinct key's row sits in ``rows``
    rows: np.ndarray  # float32: the rows the owners returned, in send order
    send_order: np.ndarray  # int64[U]: distinct keys in the order they were sent (by owner)
    send_counts: np.ndarray  # int64[W]: keys sent to each rank
    key_dims: np.ndarray  # int64[U]: each distinct key's width
    occ_owner: np.ndarray  # int64[nnz]: the owner of each occurrence's key
    # the owner's side: the keys received from every rank and their entries here
    recv_counts: np.ndarray
    recv_tables: np.ndarray
    recv_ids: np.ndarray
    recv_entries: np.ndarray
    generation: int
    train: bool
    store_id: int
    consumed: bool = False


class ShardedEmbeddingStore:
    """Embedding tables sharded over a process group (row-wise or table-wise), pruned as one store.

    Args:
        tables: the logical tables, the same on every rank.
        config: the store as a whole (its budget is split evenly over the ranks).
        process_group: the ``torch.distributed`` group of the embeddings (the default
            group when None; without ``torch.distributed`` initialised, a world of one).
        routing: "row" (default: :class:`RowWiseRouting`, rows spread by a salted hash
            over virtual buckets) or "table" (:class:`TableWiseRouting`: every row
            of a table on one rank, tables placed by size).
        exact: send one gradient row per occurrence, so that the owner sums them in a
            single store's order (bit-identical results, more bytes sent); otherwise
            one summed row per distinct key (float tolerance).
        path: a directory for the shards (``shard-00000`` ...), their tiers and
            checkpoints; the same path on every rank.
        pool_slack: each shard's pools hold this fraction more than their share of
            the budget (default 1/16), so that a shard whose rows run hotter than
            1/W can take the slots the store-wide decisions give it
            (:mod:`.global_pools`); past it, that shard's own pool binds and the
            store differs from one store there (a prune reports ``shard_bound``).
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        config: StoreConfig | None = None,
        *,
        process_group: Any = None,
        routing: RowWiseRouting | None = None,
        exact: bool = False,
        path: str | Path | None = None,
        pool_slack: float = POOL_SLACK,
        _shard: Any = None,
        _exchange: Any = None,
    ):
        from ..store import EmbeddingStore

        self.config = config if config is not None else StoreConfig()
        self.tables = tuple(tables)
        self.exchange = _exchange if _exchange is not None else exchange_for(process_group)
        self.rank, self.world = self.exchange.rank, self.exchange.world
        if routing is None or routing == "row":
            routing = RowWiseRouting()
        elif routing == "table":
            routing = TableWiseRouting.for_tables(self.tables)
        elif not isinstance(routing, (RowWiseRouting, TableWiseRouting)):
            raise ConfigError(f"routing must be 'row', 'table', RowWiseRouting or TableWiseRouting, got {routing!r}")
        self.routing = routing
        self.routing.check_world(self.world)
        self.exact = bool(exact)
        if (
            isinstance(pool_slack, bool)
            or not isinstance(pool_slack, (int, float))
            or not (math.isfinite(pool_slack) and pool_slack >= 0)
        ):
            raise ConfigError(f"pool_slack must be a finite number >= 0, got {pool_slack!r}")
        self.pool_slack = float(pool_slack)
        self.path = Path(path) if path is not None else None
        if _shard is not None:
            self.shard = _shard
        else:
            shard_tables, shard_cfg = shard_config(
                self.tables, self.config, self.world, self.routing, self.rank, self.pool_slack
            )
            from .checkpoint import is_sharded, shard_dir_name

            if self.path is not None and is_sharded(self.path):
                raise ConfigError(
                    f"{self.path} already holds a sharded store; open it with "
                    f"ShardedEmbeddingStore.open({str(self.path)!r}, 'r+')"
                )
            self.shard = EmbeddingStore(
                shard_tables,
                shard_cfg,
                path=None if self.path is None else self.path / shard_dir_name(self.world, self.rank),
            )
        # the shards' pools act as the one pool of a single store (cutoff, admission)
        self.pools = GlobalPools(self.exchange, [p.slots for p in plan_pools(self.tables, self.config)])
        self.shard.collective = self.pools
        self._dims = np.array([t.dim for t in self.tables], np.int64)
        # ids of a declared table must lie in [0, num_embeddings), as a single store's direct index checks
        self._id_limit = np.array(
            [t.num_embeddings if t.direct else np.iinfo(np.int64).max for t in self.tables], np.int64
        )
        self._id_floor = np.array([0 if t.direct else np.iinfo(np.int64).min for t in self.tables], np.int64)
        self._buffers = OutputBuffers(self.shard.backend)
        self._keys = KeyExchange()  # its capacity is agreed by every rank at every lookup
        self.checkpoint: str | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ShardedEmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close this rank's shard (not a collective)."""
        self.shard.close()

    @property
    def step_count(self) -> int:
        return self.shard.step_count

    def table_index(self, name: str) -> int:
        return self.shard.table_index(name)  # every shard holds every table, in the store's order

    def feature_indices(self, features: str | Sequence[str]) -> np.ndarray:
        return self.shard.feature_indices(features)

    def _refused_by_peer(self, ranks: np.ndarray, what: str) -> PeerRankError:
        return PeerRankError(
            f"rank(s) {ranks.tolist()} refused {what}; nothing was changed on any rank (this is rank {self.rank})"
        )

    # ------------------------------------------------------------------ forward
    def pooled_lookup(
        self,
        features: str | Sequence[str],
        ids: Any,
        offsets: Any,
        per_sample_weights: Any = None,
        mode: str = "sum",
        *,
        train: bool = False,
    ) -> ShardedBatch | PooledBatch:
        """Pooled lookup of this rank's batch, laid out as :meth:`EmbeddingStore.pooled_lookup`
        (in a world of one, exactly that: the batch is the one shard's ``PooledBatch``).

        A collective: every rank calls it with the same ``features``, ``mode`` and
        ``train``, each with its own ids and offsets (a rank may have no bags)."""
        if self.world == 1:  # the one shard is the whole store: nothing to exchange
            return self.shard.pooled_lookup(features, ids, offsets, per_sample_weights, mode, train=train)
        local_error: FiitedError | None = None
        try:
            if mode not in ("sum", "mean"):
                raise InputShapeError(f"mode must be 'sum' or 'mean', got {mode!r}")
            if train:
                self.shard.check_writable()
            feature_tables = self.feature_indices(features)
            F = feature_tables.shape[0]
            if F > MAX_FEATURES:  # a key's first feature travels in 16 bits (global_pools)
                raise InputShapeError(f"a sharded lookup takes at most {MAX_FEATURES} features, got {F}")
            ids_h, offsets_h, weights_h = request_arrays(
                self.shard.backend,
                ids,
                offsets,
                per_sample_weights,
                F,
                mode,
                own=train or per_sample_weights is not None,
            )
            nnz = ids_h.shape[0]
            B = (offsets_h.shape[0] - 1) // F
            q_tables = np.empty(nnz, np.int16)
            host_kernels.expand_bags(offsets_h, B, feature_tables, np.empty(0, np.int64), q_tables)
            bad = np.flatnonzero((ids_h < self._id_floor[q_tables]) | (ids_h >= self._id_limit[q_tables]))
            if bad.size:
                t = int(q_tables[bad[0]])
                raise IdOutOfRangeError(self.tables[t].name, int(ids_h[bad[0]]), int(self._id_limit[t]), int(bad[0]))
        except FiitedError as exc:
            local_error = exc
        W = self.world
        if local_error is None:
            first = np.empty(nnz, np.int64)
            key_of_occ = np.empty(nnz, np.int64)
            U = int(host_kernels.dedupe_keys(q_tables, ids_h, first, key_of_occ))
            key_tables, key_ids = q_tables[first[:U]], ids_h[first[:U]]
            key_owner = self.routing.owners(key_tables, key_ids, W)
            send_order = np.argsort(key_owner, kind="stable")
            send_counts = np.bincount(key_owner, minlength=W).astype(np.int64)
            # each key's table travels with its place in this rank's batch, which the
            # owner needs to admit new keys in one store's order
            key_features = np.searchsorted(offsets_h[::B] if B else np.zeros(1, np.int64), first[:U], side="right") - 1
            places = pack_key_places(key_tables, key_features)
            keys = np.stack([places[send_order], key_ids[send_order]], axis=1)
        else:
            send_counts, keys = np.zeros(W, np.int64), np.empty((0, 2), np.int64)
        # the refusal rides in the keys' header, so every owner learns of it
        recv, recv_counts, refused_by = self._keys.exchange(self.exchange, keys, send_counts, local_error is not None)
        if local_error is not None:
            raise local_error
        if refused_by.size:
            raise self._refused_by_peer(refused_by, "its batch")
        src = np.repeat(np.arange(W), recv_counts)
        recv_packed = np.ascontiguousarray(recv[:, 0])
        recv_tables = tables_of(recv_packed)
        recv_ids = np.ascontiguousarray(recv[:, 1])
        # the owner's half, written straight into what it sends back: per requesting rank
        # a status float (its failure: a full index, a pool too small in cache mode),
        # then the rows of that rank's keys
        recv_dims = self._dims[recv_tables]
        seg_rows = segment_sums(recv_dims, recv_counts)
        seg_start = starts_of(seg_rows + 1)
        row_start = starts_of(recv_dims) + (seg_start + 1 - starts_of(seg_rows))[src]
        back = np.empty(int(seg_rows.sum()) + W, np.float32)
        back[seg_start] = 0.0
        # a collective on every rank alike (train is agreed), so outside the try below
        order, limits = (
            self.pools.admission(
                self.shard, recv_tables, recv_ids, lambda: places_of(recv_packed, src), self._keys.most
            )
            if train
            else (None, None)
        )
        try:
            got = owner.owner_rows(self.shard, recv_tables, recv_ids, train, back, row_start, order, limits)
        except FiitedError as exc:
            local_error, got = exc, None
            back[seg_start] = 1.0
        key_dims = self._dims[key_tables]
        sent_dims = key_dims[send_order]
        sent_rows = segment_sums(sent_dims, send_counts)
        want = sent_rows + 1
        rows = self.exchange.all_to_all(back, seg_rows + 1, want)
        statuses = rows[starts_of(want)]
        if (statuses != 0).any():
            self.pools.free = None  # every rank is here: count the free slots again
            if got is not None:
                owner.forget(self.shard, got.new)
            if local_error is not None:
                raise local_error
            raise self._refused_by_peer(np.flatnonzero(statuses != 0), "the keys of this batch")
        # each sent key's row, past its owner's status float
        dest = np.repeat(np.arange(W), send_counts)
        key_row = np.empty(U, np.int64)
        key_row[send_order] = starts_of(sent_dims) + (starts_of(want) + 1 - starts_of(sent_rows))[dest]
        dims = self._dims[feature_tables]
        feature_col = starts_of(dims)
        out = self._buffers.get((B, int(dims.sum())))
        host_kernels.pool_key_rows(
            key_of_occ, offsets_h, weights_h, mode == "mean", B, dims, feature_col, rows, key_row, out
        )
        occ_owner = key_owner[key_of_occ] if train else np.empty(0, np.int64)
        return ShardedBatch(
            output=out,
            offsets=offsets_h,
            weights=weights_h,
            mean=mode == "mean",
            bags_per_feature=B,
            feature_tables=feature_tables,
            feature_dim=dims,
            feature_col=feature_col,
            key_of_occ=key_of_occ,
            key_row=key_row,
            rows=rows,
            send_order=send_order,
            send_counts=send_counts,
            key_dims=key_dims,
            occ_owner=occ_owner,
            recv_counts=recv_counts,
            recv_tables=recv_tables,
            recv_ids=recv_ids,
            recv_entries=got.entries,
            generation=self.shard.generation,
            train=train,
            store_id=id(self),
            consumed=not train,
        )

    def lookup(self, table: str, ids: Any, *, train: bool = False):
        """Rows of ``ids`` (float32[n, D]); a collective."""
        n = np.asarray(ids).shape[0] if np.ndim(ids) == 1 else 0
        return self.pooled_lookup(table, ids, np.arange(n + 1, dtype=np.int64), train=train).output

    # ------------------------------------------------------------------ backward
    def backward(self, batch: ShardedBatch, grad_out: Any) -> None:
        """Utilities and the fused optimizer step from this rank's ``grad_out``
        (float32[B, sum of dims]); a collective, every rank with its own batch."""
        if self.world == 1:
            return self.shard.backward(batch, grad_out)
        status, local_error = _OK, None
        try:
            if batch.store_id != id(self):
                raise StaleBatchError("this batch was produced by another store")
            if batch.consumed:
                raise StaleBatchError("this batch was not produced with train=True, or its backward already ran")
            self.shard.check_writable()
            g = np.asarray(grad_out)
            if g.dtype != np.float32:
                raise InputDTypeError(f"grad_out must be float32, got dtype {g.dtype}")
            if g.shape != batch.output.shape:
                raise InputShapeError(f"grad_out must have the output's shape {batch.output.shape}, got {g.shape}")
            g = np.ascontiguousarray(g)
            if not np.isfinite(g).all():
                bad = int(host_kernels.first_nonfinite(g))
                i, j = divmod(bad, g.shape[1])
                local_error = NonFiniteGradientError(
                    f"grad_out[{i}, {j}] = {g[i, j]} is not finite (rank {self.rank}); nothing was updated on any rank"
                )
                status = _NONFINITE
        except FiitedError as exc:
            local_error, status = exc, _REFUSED
        if status == _REFUSED:
            g = np.zeros(batch.output.shape, np.float32)  # still sent: the peers wait for these exchanges
        W = self.world
        U = int(batch.key_dims.shape[0])
        recv_key_start = np.concatenate([[0], np.cumsum(batch.recv_counts)]).astype(np.int64)
        n_recv = int(recv_key_start[-1])
        recv_dims = self._dims[batch.recv_tables]
        if not self.exact:
            # one row per distinct key: its summed gradient, then its access count
            sums = np.zeros(int(batch.key_dims.sum()) + U, np.float32)
            slot = np.empty(U, np.int64)
            sent_dims = batch.key_dims[batch.send_order] + 1
            slot[batch.send_order] = starts_of(sent_dims)
            host_kernels.sum_key_gradients(
                batch.key_of_occ,
                batch.offsets,
                batch.weights,
                batch.mean,
                batch.bags_per_feature,
                batch.feature_dim,
                batch.feature_col,
                g,
                slot,
                sums,
            )
            counts = np.bincount(batch.key_of_occ, minlength=U)[:U].astype(np.float32)
            sums[slot + batch.key_dims] = counts
            seg_send = segment_sums(sent_dims, batch.send_counts)
            seg_recv = segment_sums(recv_dims + 1, batch.recv_counts)
            got = self.exchange.all_to_all(sums, seg_send, seg_recv)
            row_start = starts_of(recv_dims + 1)
            row_key = np.arange(n_recv, dtype=np.int64)
            row_dim = recv_dims
            row_count = got[row_start + recv_dims].astype(np.int64) if n_recv else np.empty(0, np.int64)
            order = row_key
            rows = got
        else:
            # one row per occurrence, tagged (feature, key index at its owner), so that the
            # owner adds them in the single-store order: feature, rank, bag, position
            F = batch.feature_tables.shape[0]
            feature_of_occ = (
                np.repeat(np.arange(F), np.diff(batch.offsets[:: batch.bags_per_feature]))
                if batch.bags_per_feature
                else np.empty(0, np.int64)
            )
            occ_dims = batch.feature_dim[feature_of_occ]
            occ_order = np.argsort(batch.occ_owner, kind="stable")
            # each occurrence's row is written where it goes in the send buffer (owner by owner)
            occ_start = np.empty(occ_dims.shape[0], np.int64)
            occ_start[occ_order] = starts_of(occ_dims[occ_order])
            packed = np.empty(int(occ_dims.sum()), np.float32)
            host_kernels.occurrence_gradients(
                batch.offsets,
                batch.weights,
                batch.mean,
                batch.bags_per_feature,
                batch.feature_dim,
                batch.feature_col,
                g,
                occ_start,
                packed,
            )
            occ_counts = np.bincount(batch.occ_owner, minlength=W).astype(np.int64)
            pos_in_send = np.empty(U, np.int64)
            pos_in_send[batch.send_order] = np.arange(U)
            key_send_start = np.concatenate([[0], np.cumsum(batch.send_counts)]).astype(np.int64)
            key_idx = pos_in_send[batch.key_of_occ] - key_send_start[batch.occ_owner]
            meta = np.stack([feature_of_occ[occ_order], key_idx[occ_order]], axis=1).astype(np.int64)
            recv_occ = self.exchange.counts(occ_counts)
            meta_in = self.exchange.all_to_all(meta, occ_counts, recv_occ)
            seg_send = np.bincount(batch.occ_owner, weights=occ_dims, minlength=W).astype(np.int64)
            src = np.repeat(np.arange(W), recv_occ)
            row_key = recv_key_start[src] + meta_in[:, 1] if meta_in.shape[0] else np.empty(0, np.int64)
            row_dim = recv_dims[row_key] if row_key.size else np.empty(0, np.int64)
            seg_recv = np.bincount(src, weights=row_dim, minlength=W).astype(np.int64)
            rows = self.exchange.all_to_all(packed, seg_send, seg_recv)
            row_start = starts_of(row_dim)
            row_count = np.ones(row_key.shape[0], np.int64)
            order = np.argsort(meta_in[:, 0], kind="stable") if meta_in.shape[0] else np.empty(0, np.int64)
        grads = None
        if status != _REFUSED:
            entries = owner.current_entries(
                self.shard, batch.recv_entries, batch.generation, batch.recv_tables, batch.recv_ids
            )
            grads = owner.sum_gradients(
                self.shard, entries, batch.recv_tables, order, row_key, row_start, row_dim, rows, row_count
            )
            if grads.n_bad and status == _OK:
                status = _OVERFLOW
        flags = np.zeros(W, np.int64)
        flags[self.rank] = status
        flags = self.exchange.max(flags)
        if local_error is not None:
            raise local_error
        if (flags == _REFUSED).any():
            raise self._refused_by_peer(np.flatnonzero(flags == _REFUSED), "its backward pass")
        if (flags == _NONFINITE).any():
            raise NonFiniteGradientError(
                f"the gradients of rank(s) {np.flatnonzero(flags == _NONFINITE).tolist()} "
                f"hold NaN or inf; nothing was updated on any rank (this is rank {self.rank})"
            )
        if (flags == _OVERFLOW).any():
            raise NonFiniteGradientError(
                f"the gradients summed per id on rank(s) {np.flatnonzero(flags == _OVERFLOW).tolist()} overflow "
                f"float32 when squared; nothing was updated on any rank (this is rank {self.rank})"
            )
        owner.apply_gradients(self.shard, grads)
        batch.consumed = True

    def per_sample_weight_grads(self, batch: ShardedBatch, grad_out: Any) -> np.ndarray:
        """d loss / d per_sample_weights, float32[nnz], from the rows this rank received (local)."""
        if self.world == 1:
            return self.shard.per_sample_weight_grads(batch, grad_out)
        g = np.asarray(grad_out, np.float32)
        out = np.zeros(batch.key_of_occ.shape[0], np.float32)
        B = batch.bags_per_feature
        for f in range(batch.feature_tables.shape[0]):  # one vectorised pass per feature
            lo, hi = int(batch.offsets[f * B]), int(batch.offsets[(f + 1) * B])
            if hi == lo:
                continue
            D, col = int(batch.feature_dim[f]), int(batch.feature_col[f])
            bag = np.repeat(np.arange(B), np.diff(batch.offsets[f * B : (f + 1) * B + 1]))
            rows = batch.rows[batch.key_row[batch.key_of_occ[lo:hi]][:, None] + np.arange(D)]
            out[lo:hi] = (rows * g[bag, col : col + D]).sum(axis=1, dtype=np.float32)
        return out

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """End a training step on every rank; every T steps the shards prune together."""
        self.shard.step()

    def prune(self) -> dict[str, Any]:
        """One global prune pass (a collective); returns this shard's report."""
        return self.shard.prune()

    # ------------------------------------------------------------------ state as arrays
    def export_state(self) -> dict[str, np.ndarray]:
        """This rank's shard as arrays (a module's ``state_dict`` on this rank), tagged with
        its rank and world size. :meth:`save` writes the whole store."""
        out = self.shard.export_state()
        out["meta.shard"] = np.array([self.rank, self.world, self.routing.n_buckets], np.int64)
        return out

    def import_state(self, arrays: dict[str, Any]) -> None:
        """Replace this rank's shard with an :meth:`export_state` of the same rank and world."""
        tag = np.asarray(arrays.get("meta.shard", [-1, -1, -1])).tolist()
        if tag != [self.rank, self.world, self.routing.n_buckets]:
            raise ConfigError(
                f"this state is shard {tag[0]} of {tag[1]} ranks ({tag[2]} buckets); this store is "
                f"shard {self.rank} of {self.world} ({self.routing.n_buckets} buckets): reshard "
                f"through save() and open() instead"
            )
        self.shard.import_state({k: v for k, v in arrays.items() if k != "meta.shard"})
        self.pools.free = None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path | None = None) -> Path:
        """Save every shard and commit the global manifest, two-phase (a collective; see
        :mod:`fiited_store.distributed.checkpoint`). Returns the store's directory."""
        from .checkpoint import save_sharded

        return save_sharded(self, path)

    @classmethod
    def open(
        cls, path: str | Path, mode: str = "r", *, process_group: Any = None, exact: bool = False
    ) -> ShardedEmbeddingStore:
        """Open a saved sharded store on this process group (a collective): "r" or "r+".
        A world of another size than the saved one reshards by bucket ranges."""
        from .checkpoint import open_shard

        exchange = exchange_for(process_group)
        tables, config, routing, slack, shard = open_shard(path, mode, exchange)
        return cls(
            tables, config, routing=routing, exact=exact, path=path, pool_slack=slack, _shard=shard, _exchange=exchange
        )

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Every shard's :meth:`EmbeddingStore.stats` merged (a collective): per table and in
        total, the sums over shards; ``shards`` holds each shard's own totals."""
        mine = self.shard.stats()
        every = self.exchange.all_gather_object(mine)
        return merge_stats(self.tables, every, self.config)


def merge_stats(tables: Sequence[TableConfig], shard_stats: list[dict], config: StoreConfig) -> dict[str, Any]:
    """One store's stats from its shards' (entries, chunks and bytes add up)."""
    from ..config import dense_bytes, optimizer_dense_bytes

    per_table = {}
    for t in tables:
        rows = [s["tables"][t.name] for s in shard_stats]
        n = sum(r["entries"] for r in rows)
        res = np.sum([r["resident_per_chunk"] for r in rows], axis=0)
        per_table[t.name] = {
            "entries": n,
            "dim": t.dim,
            "chunks": t.chunks,
            "resident_per_chunk": res.tolist(),
            "spilled_per_chunk": np.sum([r["spilled_per_chunk"] for r in rows], axis=0).tolist(),
            "absent_per_chunk": np.sum([r["absent_per_chunk"] for r in rows], axis=0).tolist(),
            "average_kept_dim": float(res.sum() * t.chunk_width / n) if n else 0.0,
            "dense_bytes": t.dense_bytes,
        }
    byte_keys = shard_stats[0]["total"]["bytes"].keys()
    total_bytes = {k: sum(s["total"]["bytes"][k] for s in shard_stats) for k in byte_keys}
    dense = dense_bytes(tables)
    dense_opt = dense + sum(optimizer_dense_bytes(t) for t in tables) if dense else None
    n_entries = sum(p["entries"] for p in per_table.values())
    kept = sum(np.sum(p["resident_per_chunk"]) * t.chunk_width for p, t in zip(per_table.values(), tables))
    mem = total_bytes["memory_total"]
    total = {
        "entries": n_entries,
        "resident_chunks": sum(s["total"]["resident_chunks"] for s in shard_stats),
        "spilled_chunks": sum(s["total"]["spilled_chunks"] for s in shard_stats),
        "average_kept_dim": float(kept / n_entries) if n_entries else 0.0,
        "bytes": total_bytes,
        "budget_bytes": sum(s["total"]["budget_bytes"] for s in shard_stats),
        "dense_bytes": dense,
        "dense_with_optimizer_bytes": dense_opt,
        "memory_vs_dense": mem / dense if dense else None,
        "memory_vs_dense_with_optimizer": mem / dense_opt if dense_opt else None,
        "step": shard_stats[0]["total"]["step"],
        "world_size": len(shard_stats),
    }
    return {
        "tables": per_table,
        "total": total,
        "shards": [
            {
                "entries": s["total"]["entries"],
                "memory_total": s["total"]["bytes"]["memory_total"],
                "resident_chunks": s["total"]["resident_chunks"],
            }
            for s in shard_stats
        ],
    }

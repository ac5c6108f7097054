"""PyTorch modules over an :class:`~fiited_store.EmbeddingStore` (imported as ``fiited_store.adapters``).

The forward pass returns a tensor that *is* the store's output buffer (shared
through DLPack, no copy); the backward pass hands ``grad_out`` to the store's
fused optimizer. The embeddings are therefore never parameters of a torch
optimizer: train the rest of the model with any optimizer, and the store updates
itself. One forward and one backward make a training step; by default the module
then calls ``store.step()`` itself (``auto_step=True``), which also runs the prune
pass every T steps. With gradient accumulation, or several forwards per step, pass
``auto_step=False`` and call :meth:`step` after the optimizer step.

The lookup and the update are PyTorch custom operators (:mod:`.ops`), so a model
holding these modules runs under ``torch.compile`` (the store inside the graph, or
behind a graph break) with the same outputs and updates as in eager mode.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..config import FloorRatios, IndexKind, Initializer, Optimizer, PoolingMode, StoreConfig, TableConfig
from ..errors import ConfigError, InputDTypeError, InputShapeError, StoreCopyError, UnknownTableError
from ..store import EmbeddingStore
from . import ops
from .floors import hash_ids, part_ids, repeat_keys, split_floors
from .keyed import INDEX_DTYPES, JaggedFeatures, KeyedTensor, keyed_tensor_class
from .ops import from_numpy, share_output, to_numpy  # noqa: F401 - the adapter's public bridges

__all__ = [
    "FiitedEmbeddingBag",
    "FiitedEmbeddingBagCollection",
    "JaggedFeatures",
    "KeyedTensor",
    "from_numpy",
    "share_output",
    "to_numpy",
]

#: what a collection returns: TorchRec's KeyedTensor, one tensor, or a dict by feature
CollectionOutput = Literal["keyed", "concat", "dict"]


class _StoreModule(torch.nn.Module):
    """What the two modules share: the store, the step schedule, the operators' handle and the state dict."""

    def __init__(self, store: EmbeddingStore, auto_step: bool):
        super().__init__()
        self.store = store
        self.auto_step = auto_step
        # autograd calls an operator's backward only if an input requires grad; the
        # embeddings are not torch parameters, so a zero-size tensor stands in
        self._anchor = torch.empty(0, requires_grad=True)
        # held so that the anchor's gradient accumulator stays the node autograd uses:
        # the backward operator asks whether this backward pass will execute it
        self._anchor_node = torch.autograd.graph.get_gradient_edge(self._anchor).node
        # training batches whose backward has not run, by the token their forward returned
        self._pending: dict[int, Any] = {}
        self._handle = ops.register(self)
        # what the store's update multiplies grad_out by (1/W for a sharded collection that divides)
        self._grad_scale = 1.0

    def __deepcopy__(self, memo):
        raise StoreCopyError(
            f"{type(self).__name__} cannot be deep-copied: it holds a store (its pool, its disk tier's files "
            "and, with a path, the directory's write lock), which one module owns. Build a second module with "
            "the same tables and load_state_dict(module.state_dict()) into it"
        )

    def _init_projection(self, features: int, dims: Sequence[int], project: bool) -> None:
        """``project``: one learned D x D map per feature on the store's output, a dense parameter
        (torch.nn.Linear's initial range) that the model's own optimizer trains. Features of one
        width share one float32[F, D, D] parameter, ``projection``; otherwise each has its own."""
        self.projection: torch.nn.Parameter | None = None
        self.projections: torch.nn.ParameterList | None = None
        if not project:
            return
        if len(set(dims)) == 1:
            D = dims[0]
            bound = 1.0 / float(np.sqrt(D))
            self.projection = torch.nn.Parameter(torch.empty(features, D, D).uniform_(-bound, bound))
        else:
            self.projections = torch.nn.ParameterList(
                torch.nn.Parameter(torch.empty(d, d).uniform_(-1.0 / float(np.sqrt(d)), 1.0 / float(np.sqrt(d))))
                for d in dims
            )

    def _project(self, out: torch.Tensor, positions: list[int], dims: list[int]) -> torch.Tensor:
        """The store's output, float32[B, sum of dims] (features at ``positions`` side by side),
        through each feature's map: row x of feature f becomes x @ P_f^T."""
        B = out.shape[0]
        if self.projection is not None:
            P = self.projection if positions == list(range(self.projection.shape[0])) else self.projection[positions]
            return torch.einsum("bfd,fed->bfe", out.view(B, len(positions), dims[0]), P).reshape(B, -1)
        parts = torch.split(out, dims, dim=1)
        return torch.cat([x @ self.projections[f].T for x, f in zip(parts, positions)], dim=1)

    def projection_bytes(self) -> int:
        """Bytes of the learned maps (0 without ``project``)."""
        params = [self.projection] if self.projection is not None else list(self.projections or [])
        return sum(p.numel() * p.element_size() for p in params)

    # what the operators (:mod:`.ops`) ask of the module
    def hold_batch(self, key: int, batch: Any, token: torch.Tensor) -> None:
        """Keep a training batch for its backward pass, until its token is collected."""
        self._pending[key] = batch
        weakref.finalize(token, self._pending.pop, key, None)

    def held_batch(self, key: int) -> Any:
        """The training batch of a forward's token, or None when its update already ran."""
        return self._pending.get(key)

    @property
    def gradient_scale(self) -> float:
        """What the store's update multiplies ``grad_out`` by (1/W for a sharded collection that divides)."""
        return self._grad_scale

    @property
    def pending_batches(self) -> int:
        """Training batches whose backward pass has not run yet."""
        return len(self._pending)

    def backward_updates_embeddings(self) -> bool:
        """Whether the running backward pass accumulates into leaves (``.backward()``), not
        ``autograd.grad``: only the former updates the store."""
        if torch._C._current_graph_task_id() == -1:
            return True  # the operator was called directly, outside autograd
        try:
            return bool(torch._C._will_engine_execute_node(self._anchor_node))
        except RuntimeError:  # autograd.grad was asked for the anchor itself: a query, not a step
            return False

    def apply_update(self, key: int, batch: Any, grad_out: Any) -> None:
        """The store's update of one batch (once), then the step when ``auto_step``."""
        scale = self._grad_scale
        self.store.backward(batch, grad_out if scale == 1.0 else grad_out * np.float32(scale))
        self._pending.pop(key, None)
        if self.auto_step:
            self.store.step()

    def step(self) -> None:
        """End a training step (decay utilities; prune every T steps). Only with ``auto_step=False``."""
        self.store.step()

    def prune(self) -> dict:
        return self.store.prune()

    def _lookup(self, tables: list[int], ids, offsets, weights, mode):
        _check_index(ids, "input")
        _check_index(offsets, "offsets")
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or not torch.is_floating_point(weights):
                raise InputDTypeError(
                    "per_sample_weights must be a floating-point tensor, got "
                    f"{getattr(weights, 'dtype', type(weights))}"
                )
            weights = weights.float()
        anchor = self._anchor
        train = self.training and torch.is_grad_enabled()
        if not train:  # nothing to differentiate: the output is a plain tensor
            anchor = anchor.detach()
            weights = None if weights is None else weights.detach()
        out, _token = torch.ops.fiited_store.pooled_lookup(
            anchor, self._handle, tables, ids, offsets, weights, mode, train
        )
        return out

    def _store_summary(self) -> str:
        c = self.store.config
        shard = getattr(self.store, "shard", None)  # a sharded store: its pools are per rank
        pools = shard.pools if shard is not None else self.store.pools
        pool = sum(p.vector_bytes for p in pools) * (self.store.world if shard is not None else 1)
        dense = sum(t.num_embeddings * t.dim * 4 for t in self.store.tables if t.num_embeddings is not None)
        share = f" = {pool / dense:.3g} x dense" if dense and all(t.num_embeddings for t in self.store.tables) else ""
        return (
            f"budget {_mib(pool)} of chunk vectors{share}, store_mode={c.mode!r}, pruning={c.pruning!r}, "
            f"device={c.device!r}"
            + (f", sharded row-wise over {self.store.world} ranks (this is rank {self.store.rank})" if shard else "")
            + "; embeddings in .store, not parameters (state_dict keys 'store.*')"
        )

    @staticmethod
    def _table_summary(t: TableConfig) -> str:
        rows = "any int64 id" if t.num_embeddings is None else f"{t.num_embeddings:,} rows"
        floor = f" above a floor of {t.floor_dim} dims" if t.floor_dim else ""
        return f"{t.name}: {rows} x {t.dim}, chunks={t.chunks}{floor}, index={t.index}, optimizer={t.optimizer}"

    # state dict: the store's arrays, so that torch.save / torch.load carry the embeddings
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.store.export_state().items():
            destination[prefix + "store." + k] = torch.from_numpy(v)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        mine = {k[len(prefix) + 6 :]: v for k, v in state_dict.items() if k.startswith(prefix + "store.")}
        if not mine:
            missing_keys.append(prefix + "store.meta.config")
        else:
            try:
                self.store.import_state({k: v.numpy() for k, v in mine.items()})
            except Exception as exc:  # reported the torch way, with the module's prefix
                error_msgs.append(f"{prefix}store: {exc}")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "store.")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _check_index(t: Any, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputDTypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise InputDTypeError(f"{what} must be int64 or int32 (as torch.nn.EmbeddingBag requires), got {t.dtype}")


def _store_config_on(store_config: StoreConfig | None, device: Any) -> StoreConfig | None:
    """``device`` (torch's argument) folded into the store's config; a conflict is refused."""
    if device is None:
        return store_config
    kind = torch.device(device).type
    if store_config is None:
        return StoreConfig(device=kind)
    if store_config.device != kind:
        raise ConfigError(f"device={device!r} disagrees with store_config.device={store_config.device!r}")
    return store_config


class FiitedEmbeddingBag(_StoreModule):
    """A drop-in ``torch.nn.EmbeddingBag`` whose table is a FIITED store.

    The arguments ``torch.nn.EmbeddingBag`` has come first, in its order and with
    its defaults; FIITED's own options are keyword-only.

    Args:
        num_embeddings: declared rows (ids must lie in ``[0, num_embeddings)``, as
            in torch); ``None`` for a hashed table of arbitrary int64 ids.
        embedding_dim: D.
        max_norm, norm_type, scale_grad_by_freq: refused unless left at torch's
            defaults (a row's chunks are updated by the store's fused optimizer,
            which neither renormalises nor rescales by frequency).
        mode: "sum" or "mean" (torch's default); "max" is refused.
        sparse: accepted and without effect: the store's update is sparse anyway.
        _weight: float32[num_embeddings, D] initial rows (as torch's ``_weight``);
            the pool must be able to hold them all.
        include_last_offset, padding_idx: as in ``torch.nn.EmbeddingBag``.
        device: "cpu" or "cuda": where the store lives (``store_config.device``).
        dtype: float32 only.
        chunks: K, D % K == 0.
        optimizer, learning_rate, eps, initializer, init_scale, index: see :class:`TableConfig`.
        store_config: the :class:`StoreConfig` (budget, pruning, utility ...).
        path: directory for the disk tier and checkpoints.
        auto_step: call ``store.step()`` after every backward pass.
        project: pass the pooled row through a learned D x D matrix (``self.projection``,
            a dense parameter for the model's optimizer), so that a row that keeps few
            dimensions still reaches every output coordinate. With
            ``store_config=StoreConfig(pruning=FloorRatios(r))`` this is the store's
            recommended default (every row keeps a floor, see :class:`FloorRatios`).

    The embeddings live in ``self.store`` and are not torch parameters: ``state_dict()``
    carries every array of the store (keys ``store.*``), and :attr:`weight` gives the
    table as a dense copy.

    Example::

        >>> import torch
        >>> from fiited_store import StoreConfig, DynamicRatio
        >>> from fiited_store.adapters import FiitedEmbeddingBag
        >>> bag = FiitedEmbeddingBag(1000, 16, mode="sum", chunks=4,
        ...                          store_config=StoreConfig(pruning=DynamicRatio(0.75)))
        >>> out = bag(torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2]))  # two bags
        >>> out.shape
        torch.Size([2, 16])
        >>> out.sum().backward()   # fused optimizer step inside the store
        >>> bag.store.step_count
        1
    """

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: PoolingMode = "mean",
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        chunks: int = 4,
        optimizer: Optimizer = "rowwise_adagrad",
        learning_rate: float = 0.01,
        eps: float = 1e-8,
        initializer: Initializer = "uniform",
        init_scale: float | None = None,
        index: IndexKind = "auto",
        store_config: StoreConfig | None = None,
        path: Any = None,
        auto_step: bool = True,
        name: str = "table",
        project: bool = False,
    ):
        if max_norm is not None:
            raise ConfigError(
                f"max_norm={max_norm!r} is not supported: a FIITED row is updated chunk by chunk by the "
                f"store's fused optimizer, which does not renormalise rows; leave max_norm=None"
            )
        if scale_grad_by_freq:
            raise ConfigError(
                "scale_grad_by_freq=True is not supported: the store's optimizer sums a batch's gradients "
                "per id without rescaling by frequency"
            )
        if mode not in ("sum", "mean"):
            raise ConfigError(f"mode must be 'sum' or 'mean' (torch's 'max' is not supported), got {mode!r}")
        if dtype is not None and dtype != torch.float32:
            raise ConfigError(f"dtype must be torch.float32 (the store keeps float32 chunks), got {dtype}")
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
                raise ConfigError(f"padding_idx must be an int or None, got {padding_idx!r}")
            if num_embeddings is None:
                if padding_idx < 0:
                    raise ConfigError(f"padding_idx={padding_idx} is negative and the table declares no num_embeddings")
            elif not -num_embeddings <= padding_idx < num_embeddings:
                raise ConfigError(
                    f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
                )
            elif padding_idx < 0:
                padding_idx += num_embeddings
        table = TableConfig(
            name,
            dim=embedding_dim,
            chunks=chunks,
            num_embeddings=num_embeddings,
            optimizer=optimizer,
            learning_rate=learning_rate,
            eps=eps,
            initializer=initializer,
            init_scale=init_scale,
            index=index,
        )
        cfg = _store_config_on(store_config, device)
        if cfg is not None and isinstance(cfg.pruning, FloorRatios):  # the floor: a store table of its own
            (table,), cfg = cfg.pruning.resolve([table], cfg)
        store_tables, parts = split_floors([table])
        super().__init__(EmbeddingStore(store_tables, cfg, path=path), auto_step)
        self.table = table
        self._parts = parts[0]
        self._copies = part_ids(table)  # what repeat_keys gives each part
        self._init_projection(1, [embedding_dim], project)
        self.mode = mode
        self.sparse = sparse
        self.include_last_offset = include_last_offset
        self.padding_idx = padding_idx
        if _weight is not None:
            if not isinstance(_weight, torch.Tensor) or _weight.dtype != torch.float32:
                raise InputDTypeError(
                    f"_weight must be a float32 tensor, got {getattr(_weight, 'dtype', type(_weight))}"
                )
            if num_embeddings is None or tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise InputShapeError(
                    f"_weight must have shape ({num_embeddings}, {embedding_dim}), got {tuple(_weight.shape)}"
                )
            rows, col = _weight.detach().cpu().numpy(), 0
            ids = torch.arange(num_embeddings)
            for i, m in zip(self._parts, part_ids(table)):  # the floor's columns first, then the chunks above it
                t = self.store.tables[i]
                part = np.ascontiguousarray(rows[:, col : col + t.dim])
                if m:  # a shared floor row starts as the mean of the rows that share it
                    shared = hash_ids(ids, m).numpy()
                    sums = np.zeros((m, t.dim), np.float64)
                    np.add.at(sums, shared, part)
                    counts = np.bincount(shared, minlength=m)
                    held = np.flatnonzero(counts)
                    part = (sums[held] / counts[held, None]).astype(np.float32)
                    self.store.insert_or_assign(t.name, held, part)
                else:
                    self.store.insert_or_assign(t.name, ids.numpy(), part)
                col += t.dim

    @property
    def num_embeddings(self) -> int | None:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.dim

    @property
    def weight(self) -> torch.Tensor:
        """The table as a dense float32[num_embeddings, D] copy (zeros where chunks are pruned).

        Not a parameter and not a view: it costs num_embeddings x D x 4 bytes, and
        writing to it changes nothing (use ``store.insert_or_assign``).
        """
        if self.table.num_embeddings is None:
            raise ConfigError(
                f"table {self.table.name!r} declares no num_embeddings, so it has no dense weight; "
                f"read rows with store.find"
            )
        ids = torch.arange(self.table.num_embeddings, dtype=torch.int64)
        parts = [
            np.array(
                self.store.backend.to_host(
                    self.store.lookup(self.store.tables[i].name, (hash_ids(ids, m) if m else ids).numpy())
                )
            )
            for i, m in zip(self._parts, self._copies)
        ]
        return torch.from_numpy(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])

    def extra_repr(self) -> str:
        t = self.table
        rows = "None" if t.num_embeddings is None else str(t.num_embeddings)
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{rows}, {t.dim}, mode={self.mode!r}{pad}, chunks={t.chunks}, index={t.index!r}, "
            f"optimizer={t.optimizer!r}, {self._store_summary()}"
        )

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input: int[nnz] with offsets int[B] (or int[B + 1] with include_last_offset), or int[B, L] bags
        of equal length."""
        if not isinstance(input, torch.Tensor):
            raise InputDTypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() == 2:
            if offsets is not None:
                raise InputShapeError("offsets must be None when input is 2-D (bags of equal length)")
            B, L = input.shape
            offsets = torch.arange(0, B * L + 1, L, dtype=torch.int64, device=input.device)
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise InputShapeError("offsets are required when input is 1-D")
            if not isinstance(offsets, torch.Tensor):
                raise InputDTypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
            if offsets.dim() != 1:
                raise InputShapeError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
            if offsets.dtype not in INDEX_DTYPES:
                raise InputDTypeError(f"offsets must be int64 or int32, got {offsets.dtype}")
            if not self.include_last_offset:
                offsets = torch.cat([offsets.to(torch.int64), offsets.new_tensor([input.shape[0]], dtype=torch.int64)])
        else:
            raise InputShapeError(f"input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        if self.padding_idx is not None:
            input, offsets, per_sample_weights = _drop_padding(input, offsets, per_sample_weights, self.padding_idx)
        if len(self._parts) > 1:  # a floor: the ids go to both of the table's parts
            input, offsets, per_sample_weights = repeat_keys(
                input, offsets.to(torch.int64), per_sample_weights, [self._copies]
            )
        out = self._lookup(self._parts, input, offsets, per_sample_weights, self.mode)
        return out if self.projection is None else self._project(out, [0], [self.table.dim])


def _drop_padding(ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, padding_idx: int):
    """The bags without their ``padding_idx`` entries: they add nothing, count for no mean, get no
    gradient (torch's rule)."""
    keep = ids != padding_idx
    offsets = offsets.to(torch.int64)
    lengths = torch.diff(offsets)
    bag = torch.repeat_interleave(torch.arange(lengths.shape[0], device=ids.device), lengths)
    kept = torch.zeros(lengths.shape[0], dtype=torch.int64, device=ids.device).index_add_(0, bag, keep.to(torch.int64))
    offsets = torch.cat([offsets[:1], offsets[:1] + torch.cumsum(kept, 0)])
    return ids[keep], offsets, (None if weights is None else weights[keep])


class FiitedEmbeddingBagCollection(_StoreModule):
    """Many tables in one store, read like TorchRec's ``EmbeddingBagCollection``.

    Args:
        tables: :class:`TableConfig` objects, or TorchRec ``EmbeddingBagConfig``
            objects (their ``feature_names``, ``pooling``, ``num_embeddings`` and
            ``embedding_dim`` are used; ``chunks`` gives K). A ``TableConfig`` with
            ``floor_dim=f`` is held as two tables of the store, ``"<name>:floor"``
            (f dimensions every declared row keeps) and ``"<name>"`` (the other
            D - f in K chunks), and its feature still comes out as D columns.
        is_weighted: the features carry per-sample weights (TorchRec's argument).
        device: "cpu" or "cuda": where the store lives.
        store_config: the :class:`StoreConfig`.
        feature_to_table: feature name -> table name; by default each
            :class:`TableConfig` serves the feature of its own name, and each
            TorchRec config its ``feature_names``.
        mode: "sum" or "mean" pooling; by default the TorchRec configs' pooling, or "sum".
        output: "keyed" (TorchRec's ``KeyedTensor`` when torchrec is installed, else
            :class:`KeyedTensor` with the same methods; keys in the tables' order, as
            TorchRec orders them), "concat" (float32[B, sum of dims], features in the
            order of the input's keys) or "dict" ({feature: float32[B, D]}).
        chunks: K for TorchRec configs (an int, or {table name: K}).
        process_group: a ``torch.distributed`` process group: the tables are sharded
            row-wise over its ranks (:class:`~fiited_store.distributed.ShardedEmbeddingStore`).
            Every rank then calls the module together (forward and backward are
            collectives); give the embeddings a group of their own and train the
            dense part under DDP.
        gradient_division: with ``process_group``, divide the gradients by the world
            size before they update the store (the default, as DDP does for the dense
            part and TorchRec for its embeddings), so that W ranks that each take the
            mean loss of their B samples update a row as one process with the mean loss
            of all W * B would. Off, the gradients of one row from several ranks add
            up, W times those of one process.
        exact: with ``process_group``, send one gradient row per occurrence so that
            the result equals one store fed the global batch, bit for bit.
        project: pass each feature's pooled row through a learned D x D matrix of its own
            (``self.projection``, float32[features, D, D] when every feature has one width;
            a dense parameter for the model's optimizer), as Mixed-Dimension embeddings
            map each table. The output is then a new tensor, not the store's buffer.

    The store's recommended default is ``store_config=StoreConfig(pruning=FloorRatios(r))``
    with ``project=True``: every declared row keeps a floor of D / 16 dimensions, the
    paper's manual ratios decide the K chunks above it, and the map lets rows that keep
    few dimensions reach every coordinate (:class:`~fiited_store.FloorRatios`).

    ``output="concat"`` and a "keyed" output whose input keys are already in the
    tables' order share memory with the store's output buffer; a "keyed" output that
    must reorder columns is a copy.

    Example::

        >>> import torch
        >>> from fiited_store import TableConfig, StoreConfig
        >>> from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures
        >>> ebc = FiitedEmbeddingBagCollection(
        ...     [TableConfig("user", 16, chunks=4, num_embeddings=100),
        ...      TableConfig("item", 8, chunks=2, num_embeddings=50)],
        ...     store_config=StoreConfig(budget_fraction=0.5))
        >>> kjt = JaggedFeatures(["user", "item"], torch.tensor([1, 2, 7, 3]), torch.tensor([1, 1, 2, 0]))
        >>> pooled = ebc(kjt)
        >>> pooled.values().shape     # 2 samples, 16 + 8 columns
        torch.Size([2, 24])
        >>> pooled["item"].shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        tables: Sequence[Any],
        is_weighted: bool = False,
        device: Any = None,
        *,
        store_config: StoreConfig | None = None,
        feature_to_table: Mapping[str, str] | None = None,
        mode: PoolingMode | None = None,
        output: CollectionOutput = "keyed",
        chunks: int | Mapping[str, int] = 4,
        path: Any = None,
        auto_step: bool = True,
        process_group: Any = None,
        exact: bool = False,
        gradient_division: bool = True,
        project: bool = False,
    ):
        if isinstance(is_weighted, StoreConfig):
            raise ConfigError(
                "the second positional argument is is_weighted (TorchRec's order); "
                "pass the StoreConfig as store_config=..."
            )
        configs, features, poolings = [], {}, set()
        for t in tables:
            if isinstance(t, TableConfig):
                configs.append(t)
                if features.get(t.name, t.name) != t.name:
                    raise ConfigError(
                        f"feature {t.name!r} is named by table {features[t.name]!r} and is table {t.name!r}; "
                        "each feature reads one table"
                    )
                features[t.name] = t.name
            else:
                cfg, feats, pooling = _from_torchrec(t, chunks)
                configs.append(cfg)
                for f in feats:
                    if f in features:
                        raise ConfigError(
                            f"feature {f!r} is named by table {features[f]!r} and by table {cfg.name!r}; "
                            "each feature reads one table"
                        )
                    features[f] = cfg.name
                poolings.add(pooling)
        if len(poolings) > 1:
            raise ConfigError(f"the tables ask for different poolings {sorted(poolings)}; one collection pools one way")
        if mode is None:
            mode = poolings.pop() if poolings else "sum"
        if mode not in ("sum", "mean"):
            raise ConfigError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if output not in ("keyed", "concat", "dict"):
            raise ConfigError(f"output must be 'keyed', 'concat' or 'dict', got {output!r}")
        cfg = _store_config_on(store_config, device)
        if cfg is not None and isinstance(cfg.pruning, FloorRatios):  # every table gets its floor
            configs, cfg = cfg.pruning.resolve(configs, cfg)
            configs = list(configs)
        # a table with floor_dim is two tables of the store (:mod:`.floors`)
        store_tables, self._parts = split_floors(configs)
        self._copies = [part_ids(t) for t in configs]  # per table: what repeat_keys gives each part
        if process_group is not None:
            from ..distributed import ShardedEmbeddingStore

            store = ShardedEmbeddingStore(store_tables, cfg, process_group=process_group, exact=exact, path=path)
        else:
            store = EmbeddingStore(store_tables, cfg, path=path)
        super().__init__(store, auto_step)
        if process_group is not None and gradient_division:
            self._grad_scale = 1.0 / store.world
        self.tables = configs
        self.is_weighted = bool(is_weighted)
        self.mode = mode
        self.output = output
        self.feature_to_table = dict(feature_to_table) if feature_to_table is not None else features
        self._table_index = {t.name: i for i, t in enumerate(configs)}
        for t in self.feature_to_table.values():
            self.store.table_index(t)  # unknown table: a clear error now, not at the first batch
        self._dims = {f: configs[self._table_index[t]].dim for f, t in self.feature_to_table.items()}
        # TorchRec's output order: table after table, each table's features in order
        self._embedding_names = sorted(self.feature_to_table, key=lambda f: self._table_index[self.feature_to_table[f]])
        self._feature_position = {f: i for i, f in enumerate(self.feature_to_table)}
        self._init_projection(len(self._dims), [self._dims[f] for f in self.feature_to_table], project)

    def embedding_names(self) -> list[str]:
        """The features, in the order a keyed output lists them."""
        return list(self._embedding_names)

    def extra_repr(self) -> str:
        tables = "; ".join(self._table_summary(t) for t in self.tables)
        return (
            f"tables=[{tables}], features={self.feature_to_table}, mode={self.mode!r}, output={self.output!r}, "
            f"is_weighted={self.is_weighted}, {self._store_summary()}"
        )

    def forward(self, features: Any) -> Any:
        """features: a ``JaggedFeatures``, a TorchRec ``KeyedJaggedTensor``, or {feature: (ids, offsets)}."""
        if isinstance(features, Mapping):
            features = JaggedFeatures.from_dict(features)
        keys = list(features.keys())
        if len(set(keys)) != len(keys):
            twice = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise InputShapeError(f"feature {twice!r} appears {keys.count(twice)} times in one batch; each key once")
        unknown = [k for k in keys if k not in self.feature_to_table]
        if unknown:
            raise UnknownTableError(unknown[0], list(self.feature_to_table))
        weights = features.weights_or_none()
        if self.is_weighted and weights is None:
            raise InputShapeError("the collection was built with is_weighted=True but the features carry no weights")
        if not self.is_weighted and weights is not None:
            raise InputShapeError("the features carry weights but the collection was built with is_weighted=False")
        parts = [self._parts[self._table_index[self.feature_to_table[k]]] for k in keys]
        values, offsets = features.values(), features.offsets()
        if any(len(p) > 1 for p in parts):  # tables with a floor: their ids go to both parts
            copies = [self._copies[self._table_index[self.feature_to_table[k]]] for k in keys]
            values, offsets, weights = repeat_keys(values, offsets, weights, copies)
        out = self._lookup([i for p in parts for i in p], values, offsets, weights, self.mode)
        dims = [self._dims[k] for k in keys]
        if self.projection is not None or self.projections is not None:
            out = self._project(out, [self._feature_position[k] for k in keys], dims)
        if self.output == "concat":
            return out
        if self.output == "dict":
            return dict(zip(keys, torch.split(out, dims, dim=1)))
        order = [k for k in self._embedding_names if k in keys]
        if order != keys:
            start = dict(zip(keys, np.concatenate([[0], np.cumsum(dims)[:-1]]).tolist()))
            cols = torch.cat([torch.arange(start[k], start[k] + self._dims[k]) for k in order]).to(out.device)
            out = out.index_select(1, cols)
        return keyed_tensor_class()(keys=order, length_per_key=[self._dims[k] for k in order], values=out)


def _from_torchrec(t: Any, chunks: int | Mapping[str, int]) -> tuple[TableConfig, list[str], str]:
    """(TableConfig, feature names, pooling) of a TorchRec ``EmbeddingBagConfig``-like object."""
    for attr in ("name", "embedding_dim", "num_embeddings", "feature_names"):
        if not hasattr(t, attr):
            raise ConfigError(
                f"tables must be TableConfig or TorchRec EmbeddingBagConfig objects; {t!r} has no {attr!r}"
            )
    pooling = str(getattr(getattr(t, "pooling", "sum"), "name", getattr(t, "pooling", "sum"))).lower()
    if pooling not in ("sum", "mean"):
        raise ConfigError(f"table {t.name!r}: pooling {pooling!r} is not supported (SUM or MEAN)")
    data_type = str(getattr(getattr(t, "data_type", "FP32"), "name", getattr(t, "data_type", "FP32")))
    if data_type.upper() not in ("FP32", "FLOAT32"):
        raise ConfigError(f"table {t.name!r}: data_type {data_type} is not supported (FP32 only)")
    lo, hi = getattr(t, "weight_init_min", None), getattr(t, "weight_init_max", None)
    fn = getattr(t, "init_fn", None)
    if fn is not None:
        # TorchRec fills in init_fn = partial(uniform_, a=min, b=max); a symmetric uniform is the store's own
        if isinstance(fn, functools.partial) and fn.func is torch.nn.init.uniform_ and set(fn.keywords) == {"a", "b"}:
            lo, hi = fn.keywords["a"], fn.keywords["b"]
        else:
            raise ConfigError(
                f"table {t.name!r}: init_fn {fn!r} is not supported; the store initialises chunks "
                f"itself (a symmetric uniform, TableConfig's init_scale)"
            )
    scale = None
    if lo is not None or hi is not None:
        if lo is None or hi is None or lo != -hi:
            raise ConfigError(f"table {t.name!r}: the initial range must be symmetric (-s, s), got ({lo}, {hi})")
        scale = float(hi)
    k = chunks.get(t.name, 4) if isinstance(chunks, Mapping) else chunks
    cfg = TableConfig(
        t.name, dim=int(t.embedding_dim), chunks=k, num_embeddings=int(t.num_embeddings), init_scale=scale
    )
    feats = list(t.feature_names) or [t.name]
    return cfg, feats, pooling

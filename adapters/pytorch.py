"""PyTorch modules over an :class:`~fiited_store.EmbeddingStore` (imported as ``fiited_store.adapters``).

The forward pass returns a tensor that *is* the store's output buffer (shared
through DLPack, no copy); the backward pass hands ``grad_out`` to the store's
fused optimizer. The embeddings are therefore never parameters of a torch
optimizer: train the rest of the model with any optimizer, and the store updates
itself. One forward and one backward make a training step; by default the module
then calls ``store.step()`` itself (``auto_step=True``), which also runs the prune
pass every T steps. With gradient accumulation, or several forwards per step, pass
``auto_step=False`` and call :meth:`step` after the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import StoreConfig, TableConfig
from ..errors import InputDTypeError, InputShapeError
from ..store import EmbeddingStore, PooledBatch

_INDEX_DTYPES = (torch.int64, torch.int32)


def share_output(a) -> torch.Tensor:
    """A tensor over the store's output buffer, without a copy.

    Host arrays cross through DLPack (after the checks DLPack needs); device arrays
    through ``__cuda_array_interface__``; the CUDA simulator's arrays, which are numpy
    underneath, through DLPack again.
    """
    if isinstance(a, np.ndarray):
        return from_numpy(a)
    if hasattr(a, "__cuda_array_interface__"):
        return torch.as_tensor(a, device="cuda")
    return torch.from_dlpack(a)


def to_numpy(t: torch.Tensor, what: str) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (a copy only when it is not contiguous)."""
    if t.device.type != "cpu":
        raise InputShapeError(f"{what} is on {t.device}; this store runs on the CPU")
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return np.from_dlpack(t)


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor over a numpy array, sharing memory; refuses arrays DLPack would mishandle."""
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        raise InputShapeError("refusing to share a read-only or negative-stride array through DLPack")
    return torch.from_dlpack(a)


class _PooledLookup(torch.autograd.Function):
    """Forward: the store's pooled lookup. Backward: the store's fused update."""

    @staticmethod
    def forward(ctx, anchor, module, features, ids, offsets, weights, mode, train):
        # grad mode is off in here: whether this is a training step was decided by the caller
        on_gpu = module.store.config.device == "cuda"
        w = None if weights is None else (weights.detach() if on_gpu else to_numpy(weights, "per_sample_weights"))
        batch = module.store.pooled_lookup(features, ids, offsets, w, mode, train=train)
        ctx.batch = batch
        ctx.module = module
        ctx.weights_need_grad = weights is not None and weights.requires_grad
        out = share_output(batch.output)
        if not train:
            ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        batch: PooledBatch = ctx.batch
        module = ctx.module
        if grad_out.dtype != torch.float32:
            raise InputDTypeError(f"grad_out must be float32, got {grad_out.dtype}")
        # the CPU store takes numpy over the tensor's memory; the CUDA store takes the
        # CUDA tensor itself (numba views it through __cuda_array_interface__)
        g = grad_out.contiguous() if module.store.config.device == "cuda" else to_numpy(grad_out, "grad_out")
        weight_grad = None
        if ctx.weights_need_grad:
            wg = module.store.per_sample_weight_grads(batch, g)
            weight_grad = torch.from_numpy(np.array(module.store.backend.to_host(wg)))
        module.store.backward(batch, g)
        module._after_backward()
        return None, None, None, None, None, weight_grad, None, None


class _StoreModule(torch.nn.Module):
    """What the two modules share: the store, the step schedule and the state dict."""

    def __init__(self, store: EmbeddingStore, auto_step: bool):
        super().__init__()
        self.store = store
        self.auto_step = auto_step
        # autograd calls a Function's backward only if an input requires grad; the
        # embeddings are not torch parameters, so a zero-size tensor stands in
        self._anchor = torch.empty(0, requires_grad=True)

    def _after_backward(self) -> None:
        if self.auto_step:
            self.store.step()

    def step(self) -> None:
        """End a training step (decay utilities; prune every T steps). Only with ``auto_step=False``."""
        self.store.step()

    def prune(self) -> dict:
        return self.store.prune()

    def _lookup(self, features, ids, offsets, weights, mode):
        host = self.store.config.device != "cuda"
        ids_np = _check_index(ids, "input", host)
        off_np = _check_index(offsets, "offsets", host)
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or not torch.is_floating_point(weights):
                raise InputDTypeError(f"per_sample_weights must be a floating-point tensor, got {getattr(weights, 'dtype', type(weights))}")
            weights = weights.float()
        train = self.training and torch.is_grad_enabled()
        return _PooledLookup.apply(self._anchor, self, features, ids_np, off_np, weights, mode, train)

    # state dict: the store's arrays, so that torch.save / torch.load carry the embeddings
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.store.export_state().items():
            destination[prefix + "store." + k] = torch.from_numpy(v)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        mine = {k[len(prefix) + 6:]: v for k, v in state_dict.items() if k.startswith(prefix + "store.")}
        if not mine:
            missing_keys.append(prefix + "store.meta.config")
        else:
            try:
                self.store.import_state({k: v.numpy() for k, v in mine.items()})
            except Exception as exc:  # reported the torch way, with the module's prefix
                error_msgs.append(f"{prefix}store: {exc}")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "store.")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _check_index(t: Any, what: str, host: bool = True):
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype not in _INDEX_DTYPES:
        raise InputDTypeError(f"{what} must be int64 or int32 (as torch.nn.EmbeddingBag requires), got {t.dtype}")
    return to_numpy(t, what) if host else t.detach()


class FiitedEmbeddingBag(_StoreModule):
    """A drop-in ``torch.nn.EmbeddingBag`` whose table is a FIITED store.

    Args:
        num_embeddings: declared rows (ids may still be any int64).
        embedding_dim: D.
        chunks: K, D % K == 0.
        mode: "sum" or "mean" (``torch.nn.EmbeddingBag``'s default is "mean").
        include_last_offset: as in ``torch.nn.EmbeddingBag``.
        optimizer, learning_rate, eps, initializer, init_scale: see :class:`TableConfig`.
        store_config: the :class:`StoreConfig` (budget, pruning, utility ...).
        path: directory for the disk tier and checkpoints.
        auto_step: call ``store.step()`` after every backward pass.

    Example::

        >>> import torch
        >>> from fiited_store import StoreConfig, DynamicRatio
        >>> from fiited_store.adapters import FiitedEmbeddingBag
        >>> bag = FiitedEmbeddingBag(1000, 16, chunks=4, mode="sum",
        ...                          store_config=StoreConfig(pruning=DynamicRatio(0.75)))
        >>> out = bag(torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2]))  # two bags
        >>> out.shape
        torch.Size([2, 16])
        >>> out.sum().backward()   # fused optimizer step inside the store
    """

    def __init__(self, num_embeddings: int | None, embedding_dim: int, chunks: int = 4, mode: str = "mean", *,
                 include_last_offset: bool = False, optimizer: str = "rowwise_adagrad", learning_rate: float = 0.01,
                 eps: float = 1e-8, initializer: str = "uniform", init_scale: float | None = None,
                 store_config: StoreConfig | None = None, path: Any = None, auto_step: bool = True,
                 name: str = "table"):
        table = TableConfig(name, dim=embedding_dim, chunks=chunks, num_embeddings=num_embeddings, optimizer=optimizer,
                            learning_rate=learning_rate, eps=eps, initializer=initializer, init_scale=init_scale)
        super().__init__(EmbeddingStore([table], store_config, path=path), auto_step)
        if mode not in ("sum", "mean"):
            raise InputShapeError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.table = table
        self.mode = mode
        self.include_last_offset = include_last_offset

    @property
    def embedding_dim(self) -> int:
        return self.table.dim

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """input: int[nnz] with offsets int[B] (or int[B + 1] with include_last_offset), or int[B, L] bags of equal length."""
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
            if offsets.dim() != 1:
                raise InputShapeError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
            if offsets.dtype not in _INDEX_DTYPES:
                raise InputDTypeError(f"offsets must be int64 or int32, got {offsets.dtype}")
            if not self.include_last_offset:
                offsets = torch.cat([offsets.to(torch.int64), offsets.new_tensor([input.shape[0]], dtype=torch.int64)])
        else:
            raise InputShapeError(f"input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        return self._lookup(self.table.name, input, offsets, per_sample_weights, self.mode)


@dataclass
class JaggedFeatures:
    """A minimal ``KeyedJaggedTensor``: per key, B bags, stored key after key.

    ``values`` int64[nnz]; ``lengths`` int[F * B] (bag sizes, key-major);
    ``weights`` float32[nnz] or None. TorchRec's ``KeyedJaggedTensor`` has the same
    methods, so either can be passed to :class:`FiitedEmbeddingBagCollection`.
    """

    keys_: Sequence[str]
    values_: torch.Tensor
    lengths_: torch.Tensor
    weights_: torch.Tensor | None = None

    def __init__(self, keys: Sequence[str], values: torch.Tensor, lengths: torch.Tensor,
                 weights: torch.Tensor | None = None):
        self.keys_, self.values_, self.lengths_, self.weights_ = list(keys), values, lengths, weights

    def keys(self) -> list[str]:
        return list(self.keys_)

    def values(self) -> torch.Tensor:
        return self.values_

    def lengths(self) -> torch.Tensor:
        return self.lengths_

    def offsets(self) -> torch.Tensor:
        lengths = self.lengths_.to(torch.int64)
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])

    def weights_or_none(self) -> torch.Tensor | None:
        return self.weights_

    @staticmethod
    def per_feature_of(features) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(ids, offsets int64[B + 1])] per key of any KeyedJaggedTensor-like object."""
        keys = list(features.keys())
        offsets = features.offsets().to(torch.int64)
        values = features.values()
        B = (offsets.numel() - 1) // len(keys)
        out = []
        for f in range(len(keys)):
            o = offsets[f * B:(f + 1) * B + 1]
            out.append((values[int(o[0]):int(o[-1])], o - o[0]))
        return out

    @classmethod
    def from_dict(cls, features: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> "JaggedFeatures":
        """{feature: (ids int[n], offsets int[B] or int[B + 1])} -> one jagged batch."""
        keys, values, lengths = [], [], []
        B = None
        for k, (ids, offs) in features.items():
            offs = offs.to(torch.int64)
            if offs.numel() == 0 or offs[-1] != ids.numel():
                offs = torch.cat([offs, torch.tensor([ids.numel()])])
            if B is not None and offs.numel() - 1 != B:
                raise InputShapeError(f"feature {k!r} has {offs.numel() - 1} bags, the others {B}")
            B = offs.numel() - 1
            keys.append(k)
            values.append(ids.to(torch.int64))
            lengths.append(torch.diff(offs))
        return cls(keys, torch.cat(values), torch.cat(lengths))


class FiitedEmbeddingBagCollection(_StoreModule):
    """Many tables in one store, read like TorchRec's ``EmbeddingBagCollection``.

    Args:
        tables: the :class:`TableConfig` of every table.
        store_config: the :class:`StoreConfig`.
        feature_to_table: feature name -> table name; by default each table serves
            the feature of the same name.
        mode: "sum" or "mean" pooling.
        output: "concat" (float32[B, sum of dims], features side by side in the
            order of the input's keys) or "dict" ({feature: float32[B, D]}).

    Example::

        >>> import torch
        >>> from fiited_store import TableConfig, StoreConfig
        >>> from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures
        >>> ebc = FiitedEmbeddingBagCollection(
        ...     [TableConfig("user", 16, chunks=4, num_embeddings=100), TableConfig("item", 8, chunks=2, num_embeddings=50)],
        ...     StoreConfig(budget_fraction=0.5))
        >>> kjt = JaggedFeatures(["user", "item"], torch.tensor([1, 2, 7, 3]), torch.tensor([1, 1, 2, 0]))
        >>> ebc(kjt).shape            # 2 samples, 16 + 8 columns
        torch.Size([2, 24])
    """

    def __init__(self, tables: Sequence[TableConfig], store_config: StoreConfig | None = None, *,
                 feature_to_table: Mapping[str, str] | None = None, mode: str = "sum", output: str = "concat",
                 path: Any = None, auto_step: bool = True):
        super().__init__(EmbeddingStore(tables, store_config, path=path), auto_step)
        if mode not in ("sum", "mean"):
            raise InputShapeError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if output not in ("concat", "dict"):
            raise InputShapeError(f"output must be 'concat' or 'dict', got {output!r}")
        self.tables = list(tables)
        self.mode = mode
        self.output = output
        self.feature_to_table = dict(feature_to_table) if feature_to_table is not None else {t.name: t.name for t in tables}
        for f, t in self.feature_to_table.items():
            self.store.table_index(t)  # unknown table: a clear error now, not at the first batch
        self._dims = {t.name: t.dim for t in tables}

    def forward(self, features: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """features: a ``JaggedFeatures``, a TorchRec ``KeyedJaggedTensor``, or {feature: (ids, offsets)}."""
        if isinstance(features, Mapping):
            features = JaggedFeatures.from_dict(features)
        keys = list(features.keys())
        unknown = [k for k in keys if k not in self.feature_to_table]
        if unknown:
            from ..errors import UnknownTableError

            raise UnknownTableError(unknown[0], list(self.feature_to_table))
        tables = [self.feature_to_table[k] for k in keys]
        out = self._lookup(tables, features.values(), features.offsets(), features.weights_or_none(), self.mode)
        if self.output == "concat":
            return out
        dims = [self._dims[t] for t in tables]
        return dict(zip(keys, torch.split(out, dims, dim=1)))

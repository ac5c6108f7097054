"""The store's lookup and update as PyTorch custom operators (``torch.library``).

Two operators, namespace ``fiited_store``::

    pooled_lookup(anchor, handle, tables, ids, offsets, weights, mode, train) -> (output, token)
    pooled_backward(handle, token, grad_out, weights) -> (anchor_grad, weight_grad)

Why operators and not an ``autograd.Function``: ``torch.compile`` traces a model with
fake tensors, and the store can only work on real memory. As operators with fake
implementations (shapes only) and a registered autograd formula, the lookup and the
update run inside a compiled graph as opaque kernels, and eager mode calls the very
same operators, so a compiled model and an eager one update the store identically.

The store itself cannot be an operator argument, so each module registers under an
integer ``handle``. A training forward keeps its :class:`PooledBatch` under the
``token`` it returns (an int64[1] tensor saved for backward); the batch is forgotten
when its backward has run or when autograd frees the token, whichever comes first.

Autograd semantics (see docs/user-guide.md):

- the store updates itself only from a backward pass that would also accumulate into
  leaves (``loss.backward()``); ``torch.autograd.grad(loss, [per_sample_weights])``
  returns the weights' gradient and changes nothing, and a later ``.backward()`` on
  the same graph still makes the one update;
- ``create_graph=True`` (double backward) raises :class:`UnsupportedAutogradError`
  before anything changes.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputDTypeError, InputShapeError, StaleBatchError, UnsupportedAutogradError

_modules: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_handles = itertools.count(1)
_tokens = itertools.count(1)


def register(module: torch.nn.Module) -> int:
    """A handle under which the operators find ``module`` (and its ``store``)."""
    handle = next(_handles)
    _modules[handle] = module
    return handle


def _module(handle: int) -> torch.nn.Module:
    try:
        return _modules[handle]
    except KeyError:
        raise StaleBatchError(f"no live FIITED module has handle {handle}") from None


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


def _store_arg(store, t: torch.Tensor, what: str):
    # the CPU store takes numpy over the tensor's memory; the CUDA store takes the
    # tensor itself (numba views CUDA tensors through __cuda_array_interface__)
    return t.detach() if store.config.device == "cuda" else to_numpy(t, what)


@torch.library.custom_op("fiited_store::pooled_lookup", mutates_args=())
def pooled_lookup(
    anchor: torch.Tensor,
    handle: int,
    tables: Sequence[int],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    mode: str,
    train: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32[B, sum of dims] over the store's output buffer, int64[1] token of the batch)."""
    module = _module(handle)
    store = module.store
    names = [store.tables[t].name for t in tables]
    w = None if weights is None else _store_arg(store, weights, "per_sample_weights")
    batch = store.pooled_lookup(
        names, _store_arg(store, ids, "input"), _store_arg(store, offsets, "offsets"), w, mode, train=train
    )
    key = next(_tokens)
    token = torch.tensor([key], dtype=torch.int64)
    if train:
        module.hold_batch(key, batch, token)
    return share_output(batch.output), token


@pooled_lookup.register_fake
def _(anchor, handle, tables, ids, offsets, weights, mode, train):
    store = _module(handle).store
    width = sum(store.tables[t].dim for t in tables)
    bags = (offsets.shape[0] - 1) // len(tables)
    device = "cuda" if store.config.device == "cuda" else "cpu"
    return offsets.new_empty((bags, width), dtype=torch.float32, device=device), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("fiited_store::pooled_backward", mutates_args=())
def pooled_backward(
    handle: int, token: torch.Tensor, grad_out: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor_grad float32[0], d loss / d weights float32[nnz] or float32[0]); updates the store."""
    module = _module(handle)
    store = module.store
    key = int(token[0])
    batch = module.held_batch(key)
    if batch is None:
        raise StaleBatchError(
            "this forward's batch was already applied by an earlier backward pass "
            "(one update per training batch), or its module was replaced"
        )
    if grad_out.dtype != torch.float32:
        raise InputDTypeError(f"grad_out must be float32, got {grad_out.dtype}")
    g = _store_arg(store, grad_out.contiguous(), "grad_out")
    weight_grad = grad_out.new_empty(0)
    if weights is not None:
        wg = store.per_sample_weight_grads(batch, g)
        weight_grad = share_output(wg).clone() if store.config.device == "cuda" else torch.from_numpy(np.asarray(wg))
    if module.backward_updates_embeddings():
        module.apply_update(key, batch, g)
    return torch.zeros(0), weight_grad


@pooled_backward.register_fake
def _(handle, token, grad_out, weights):
    return torch.empty(0), (torch.empty_like(weights) if weights is not None else grad_out.new_empty(0))


# the update is a side effect: a compiled backward must call it even when no gradient it returns is used
torch.fx.node.has_side_effect(torch.ops.fiited_store.pooled_backward.default)


def _setup_context(ctx, inputs, output):
    anchor, handle, tables, ids, offsets, weights, mode, train = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.handle = handle
    ctx.weights_need_grad = weights is not None and weights.requires_grad
    ctx.save_for_backward(output[1], weights if ctx.weights_need_grad else None)


def _backward(ctx, grad_out, _grad_token):
    if torch.is_grad_enabled():
        raise UnsupportedAutogradError(
            "a FIITED lookup cannot be differentiated twice (create_graph=True): the store applies its update "
            "in the backward pass; nothing was updated"
        )
    token, weights = ctx.saved_tensors
    anchor_grad, weight_grad = torch.ops.fiited_store.pooled_backward(ctx.handle, token, grad_out, weights)
    return anchor_grad, None, None, None, None, (weight_grad if ctx.weights_need_grad else None), None, None


pooled_lookup.register_autograd(_backward, setup_context=_setup_context)

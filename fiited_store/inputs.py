"""Validation of a request's arrays before anything changes.

Each function returns a contiguous array of the dtype the kernels take, or raises a
named error that carries the offending value. Host arrays are checked on the host;
a CUDA store fed arrays already on its GPU checks them there (:func:`request_arrays`),
so that only a few status integers cross, never the ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputDTypeError, InputShapeError, NonFiniteGradientError
from .kernels import cpu as host_kernels


def as_host(x: Any) -> np.ndarray:
    """Inputs are validated on the host: torch tensors (any device) and device arrays too."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    return np.asarray(x)


def _integer(dtype: np.dtype) -> bool:
    """Signed or unsigned integers only: numpy counts bool, and timedelta64 among its
    integer subtypes, and neither is an id."""
    return np.dtype(dtype).kind in "iu"


def _check_ids_meta(dtype: np.dtype, shape: tuple, what: str) -> None:
    if not _integer(dtype):
        raise InputDTypeError(f"{what} must be an integer array (int64 or int32), got dtype {dtype}")
    if len(shape) != 1:
        raise InputShapeError(f"{what} must be 1-D, got shape {tuple(shape)}")


def _check_offsets_meta(dtype: np.dtype, shape: tuple, n_features: int) -> None:
    if not _integer(dtype):
        raise InputDTypeError(f"offsets must be an integer array, got dtype {dtype}")
    if len(shape) != 1 or shape[0] < 1:
        raise InputShapeError(f"offsets must be 1-D with at least one element, got shape {tuple(shape)}")
    if (shape[0] - 1) % n_features != 0:
        raise InputShapeError(
            f"offsets has {shape[0]} elements: expected features x bags + 1 with {n_features} features"
        )


def _check_offsets_values(first: int, last: int, nnz: int, decrease_at: int, pair) -> None:
    """pair(i) gives (offsets[i], offsets[i + 1]); called only to word an error."""
    if first != 0:
        raise InputShapeError(f"offsets must start at 0, got offsets[0] = {first}")
    if last != nnz:
        raise InputShapeError(f"offsets must end at the number of ids ({nnz}), got offsets[-1] = {last}")
    if decrease_at >= 0:
        a, b = pair(decrease_at)
        raise InputShapeError(
            f"offsets must not decrease: offsets[{decrease_at}] = {a} > offsets[{decrease_at + 1}] = {b}"
        )


def _check_weights_meta(dtype: np.dtype, shape: tuple, nnz: int, mode: str) -> None:
    if mode != "sum":
        raise InputShapeError(f"per_sample_weights are only supported with mode='sum', got mode={mode!r}")
    if not np.issubdtype(dtype, np.floating):
        raise InputDTypeError(f"per_sample_weights must be floating point, got dtype {dtype}")
    if tuple(shape) != (nnz,):
        raise InputShapeError(f"per_sample_weights must have shape ({nnz},) like the ids, got {tuple(shape)}")


def _nonfinite_weight(i: int, value: float) -> NonFiniteGradientError:
    return NonFiniteGradientError(f"per_sample_weights[{i}] = {value} is not finite")


def as_ids(ids: Any, what: str = "ids") -> np.ndarray:
    if ids is None:
        raise InputDTypeError(f"{what} must be an integer array (int64 or int32), got None")
    a = as_host(ids)
    if a.ndim == 0 and a.dtype != object:
        raise InputShapeError(f"{what} must be 1-D, got the scalar {a.item()!r} (pass [{a.item()!r}] for one id)")
    _check_ids_meta(a.dtype, a.shape, what)
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputDTypeError(f"{what}: uint64 value {int(a.max())} does not fit int64")
    return np.ascontiguousarray(a, np.int64)


def as_offsets(offsets: Any, nnz: int, n_features: int) -> np.ndarray:
    a = as_host(offsets)
    _check_offsets_meta(a.dtype, a.shape, n_features)
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        i = int(np.argmax(a > np.iinfo(np.int64).max))
        raise InputShapeError(f"offsets[{i}] = {int(a[i])} (uint64) is past any number of ids")
    a = np.ascontiguousarray(a, np.int64)
    _check_offsets_values(
        int(a[0]), int(a[-1]), nnz, int(host_kernels.first_decrease(a)), lambda i: (int(a[i]), int(a[i + 1]))
    )
    return a


def as_weights(weights: Any, nnz: int, mode: str) -> np.ndarray:
    if weights is None:
        return np.empty(0, np.float32)
    a = as_host(weights)
    _check_weights_meta(a.dtype, a.shape, nnz, mode)
    a = np.ascontiguousarray(a, np.float32)
    if not np.all(np.isfinite(a)):
        i = int(np.argmax(~np.isfinite(a)))
        raise _nonfinite_weight(i, a[i])
    return a


def request_arrays(
    backend: Any, ids: Any, offsets: Any, weights: Any, n_features: int, mode: str, *, own: bool = False
):
    """(ids int64[nnz], offsets int64[F * B + 1], weights float32[nnz] or [0]) on the backend.

    When the backend is a GPU and every given array already lives on it, the checks
    run there: dtypes and shapes from the arrays' metadata, values in one kernel
    (ranges, monotone offsets, finite weights) that reports the first bad position.
    Otherwise the arrays are checked on the host and copied to the backend.

    With ``own``, no returned array shares memory with the caller's: a batch kept
    for its backward must not change when the caller refills a reused input buffer.
    """
    view = getattr(backend, "device_view", None)
    if view is not None:
        d_ids, d_off = view(ids), view(offsets)
        d_w = None if weights is None else view(weights)
        if d_ids is not None and d_off is not None and (weights is None or d_w is not None):
            out = _device_request(backend, d_ids, d_off, d_w, n_features, mode)
            if own:
                # a widened array is fresh already; a view of the caller's tensor is not
                out = tuple(backend.copy(o) if o is v else o for o, v in zip(out, (d_ids, d_off, d_w)))
            return out
    h_ids = as_ids(ids)
    h_off = as_offsets(offsets, h_ids.shape[0], n_features)
    h_w = as_weights(weights, h_ids.shape[0], mode)
    if own and backend.name == "cpu":  # another backend copies them to the device anyway
        h_ids, h_off, h_w = (own_array(a, src) for a, src in ((h_ids, ids), (h_off, offsets), (h_w, weights)))
    return backend.from_host(h_ids), backend.from_host(h_off), backend.from_host(h_w)


def own_array(a: np.ndarray, src: Any) -> np.ndarray:
    """a (a checked host array made from the caller's src), or a copy of it when it may
    share memory with src."""
    if hasattr(src, "detach") and hasattr(src, "cpu"):
        shared = src.device.type == "cpu"  # .numpy() of a CPU tensor is a view
    else:
        shared = isinstance(src, np.ndarray) and np.may_share_memory(a, src)
    return a.copy() if shared else a


def _device_request(backend: Any, ids: Any, offsets: Any, weights: Any, n_features: int, mode: str):
    k = backend.k
    _check_ids_meta(np.dtype(ids.dtype), ids.shape, "ids")
    nnz = ids.shape[0]
    _check_offsets_meta(np.dtype(offsets.dtype), offsets.shape, n_features)
    if weights is not None:
        _check_weights_meta(np.dtype(weights.dtype), weights.shape, nnz, mode)
    unsigned64 = np.dtype(ids.dtype) == np.uint64
    ids64 = ids if np.dtype(ids.dtype) == np.int64 else k.widen(ids, np.int64)
    off64 = offsets if np.dtype(offsets.dtype) == np.int64 else k.widen(offsets, np.int64)
    if weights is None:
        w32 = backend.empty(0, np.float32)
    else:
        w32 = weights if np.dtype(weights.dtype) == np.float32 else k.widen(weights, np.float32)
    status = k.check_request(ids64, unsigned64, off64, w32)
    if status[k.REQ_UINT64_OVER] < nnz:
        i = int(status[k.REQ_UINT64_OVER])
        value = int(backend.to_host(ids64[i : i + 1]).view(np.uint64)[0])
        raise InputDTypeError(f"ids: uint64 value {value} does not fit int64")
    decrease = int(status[k.REQ_DECREASE])
    _check_offsets_values(
        int(status[k.REQ_FIRST]),
        int(status[k.REQ_LAST]),
        nnz,
        decrease if decrease < off64.shape[0] else -1,
        lambda i: tuple(int(v) for v in backend.to_host(off64[i : i + 2])),
    )
    if status[k.REQ_NONFINITE] < w32.shape[0]:
        i = int(status[k.REQ_NONFINITE])
        raise _nonfinite_weight(i, float(backend.to_host(w32[i : i + 1])[0]))
    return ids64, off64, w32

"""Validation of a request's arrays, on the host, before anything changes.

Each function returns a contiguous array of the dtype the kernels take, or raises a
named error that carries the offending value.
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

def as_ids(ids: Any, what: str = "ids") -> np.ndarray:
    a = as_host(ids)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise InputDTypeError(f"{what} must be an integer array (int64 or int32), got dtype {a.dtype}")
    if a.ndim != 1:
        raise InputShapeError(f"{what} must be 1-D, got shape {a.shape}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputDTypeError(f"{what}: uint64 value {int(a.max())} does not fit int64")
    return np.ascontiguousarray(a, np.int64)

def as_offsets(offsets: Any, nnz: int, n_features: int) -> np.ndarray:
    a = as_host(offsets)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise InputDTypeError(f"offsets must be an integer array, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] < 1:
        raise InputShapeError(f"offsets must be 1-D with at least one element, got shape {a.shape}")
    a = np.ascontiguousarray(a, np.int64)
    if (a.shape[0] - 1) % n_features != 0:
        raise InputShapeError(
            f"offsets has {a.shape[0]} elements: expected features x bags + 1 with {n_features} features"
        )
    if a[0] != 0:
        raise InputShapeError(f"offsets must start at 0, got offsets[0] = {int(a[0])}")
    if a[-1] != nnz:
        raise InputShapeError(f"offsets must end at the number of ids ({nnz}), got offsets[-1] = {int(a[-1])}")
    i = int(host_kernels.first_decrease(a))
    if i >= 0:
        raise InputShapeError(f"offsets must not decrease: offsets[{i}] = {int(a[i])} > offsets[{i + 1}] = {int(a[i + 1])}")
    return a

def as_weights(weights: Any, nnz: int, mode: str) -> np.ndarray:
    if weights is None:
        return np.empty(0, np.float32)
    if mode != "sum":
        raise InputShapeError(f"per_sample_weights are only supported with mode='sum', got mode={mode!r}")
    a = as_host(weights)
    if not np.issubdtype(a.dtype, np.floating):
        raise InputDTypeError(f"per_sample_weights must be floating point, got dtype {a.dtype}")
    if a.shape != (nnz,):
        raise InputShapeError(f"per_sample_weights must have shape ({nnz},) like the ids, got {a.shape}")
    a = np.ascontiguousarray(a, np.float32)
    if not np.all(np.isfinite(a)):
        i = int(np.argmax(~np.isfinite(a)))
        raise NonFiniteGradientError(f"per_sample_weights[{i}] = {a[i]} is not finite")
    return a

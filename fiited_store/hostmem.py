"""Host memory for the store's large arrays: anonymous maps on huge pages, and how much there is.

Apart from :mod:`.backend` so that the kernels, which allocate scratch of their own,
depend on it without depending on the backend that imports them.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np

#: arrays at least this large are backed by transparent huge pages
HUGE_PAGE_BYTES = 4 << 20


def huge_empty(shape: Any, dtype: Any) -> np.ndarray:
    """An array on anonymous memory advised to use 2 MiB pages (zero-filled).

    The pool and the entry table are read at random: with 4 KiB pages almost every
    lookup also misses the TLB. Where the kernel does not offer transparent huge
    pages the advice is ignored and this is an ordinary zeroed array.
    """
    dtype = np.dtype(dtype)
    shape = tuple(np.atleast_1d(shape).tolist()) if not isinstance(shape, tuple) else shape
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no up-front check
        return 1 << 62

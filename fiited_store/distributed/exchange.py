"""The collectives a sharded store needs, over numpy arrays, on one process group.

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU); nothing
here opens a socket of its own. Arrays travel as contiguous tensors of the dtypes
gloo accepts (int64, float32: never int16 or uint64). :class:`LocalExchange` is the
same interface for one process without ``torch.distributed``.

Every method is a collective: every rank calls it, in the same order, whatever
its data (a rank with nothing to send still takes part with empty arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def segment_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64[W]: the sums of consecutive segments of ``values`` holding ``counts[r]`` items each."""
    c = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    ends = np.cumsum(counts, dtype=np.int64)
    return c[ends] - c[ends - np.asarray(counts, np.int64)]


def starts_of(sizes: np.ndarray) -> np.ndarray:
    """int64[n]: where each of n consecutive pieces of these sizes starts."""
    out = np.zeros(len(sizes), np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], out=out[1:])
    return out


class LocalExchange:
    """One process, no process group: every collective is the identity."""

    rank = 0
    world = 1

    def all_to_all(self, send: np.ndarray, send_counts: np.ndarray, recv_counts: np.ndarray) -> np.ndarray:
        return send

    def counts(self, send_counts: np.ndarray) -> np.ndarray:
        return np.asarray(send_counts, np.int64)

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def max(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def all_gather_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    # the prune hook of EmbeddingStore (store.collective)
    def sum_counts(self, counts: np.ndarray) -> np.ndarray:
        return np.asarray(counts, np.int64)

    def gather_samples(self, samples: np.ndarray, tables: np.ndarray):
        return samples, tables


class TorchExchange(LocalExchange):
    """Collectives of one ``torch.distributed`` process group (the default group when None)."""

    def __init__(self, group: Any = None):
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self.group = torch, dist, group
        # all_gather_into_tensor's new name in recent torch releases
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def _t(self, a: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(a))

    def all_to_all(self, send: np.ndarray, send_counts: np.ndarray, recv_counts: np.ndarray) -> np.ndarray:
        """Rows ``send[sum(send_counts[:r]) : ...]`` go to rank r; returns the rows received, rank by rank."""
        out = np.empty((int(np.sum(recv_counts)),) + send.shape[1:], send.dtype)
        self._dist.all_to_all_single(self._t(out), self._t(send), output_split_sizes=[int(c) for c in recv_counts],
                                     input_split_sizes=[int(c) for c in send_counts], group=self.group)
        return out

    def counts(self, send_counts: np.ndarray) -> np.ndarray:
        """What each rank will send here, from what this rank sends to each (int64[W] both)."""
        out = np.empty(self.world, np.int64)
        self._dist.all_to_all_single(self._t(out), self._t(np.asarray(send_counts, np.int64)), group=self.group)
        return out

    def _reduce(self, values: np.ndarray, op) -> np.ndarray:
        a = np.array(values, copy=True)
        self._dist.all_reduce(self._t(a), op=op, group=self.group)
        return a

    def sum(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self._dist.ReduceOp.SUM)

    def max(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self._dist.ReduceOp.MAX)

    def all_gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows (float32[n_r, w]), concatenated in rank order."""
        sizes = np.empty(self.world, np.int64)
        self._gather(self._t(sizes), self._t(np.array([rows.shape[0]], np.int64)), group=self.group)
        n = int(sizes.max())
        padded = np.full((n,) + rows.shape[1:], np.nan, rows.dtype)
        padded[:rows.shape[0]] = rows
        out = np.empty((self.world * n,) + rows.shape[1:], rows.dtype)
        self._gather(self._t(out), self._t(padded), group=self.group)
        return np.concatenate([out[r * n:r * n + sizes[r]] for r in range(self.world)])

    def all_gather_object(self, obj: Any) -> list:
        out: list = [None] * self.world
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def sum_counts(self, counts: np.ndarray) -> np.ndarray:
        return self.sum(np.asarray(counts, np.int64))

    def gather_samples(self, samples: np.ndarray, tables: np.ndarray):
        """The union of every shard's sampled utilities (float32[n, kmax]) and their tables.

        Table ids ride along as one more float32 column (exact below 2**24), so one
        gather carries both."""
        rows = np.concatenate([samples.astype(np.float32), tables.astype(np.float32)[:, None]], axis=1)
        allrows = self.all_gather_rows(rows)
        return np.ascontiguousarray(allrows[:, :-1]), allrows[:, -1].astype(np.int32)


def exchange_for(process_group: Any = None) -> LocalExchange:
    """The exchange of ``process_group``; one process without torch.distributed gets the local one."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return LocalExchange()
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalExchange()
    return TorchExchange(process_group)

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
        self._dist.all_to_all_single(
            self._t(out),
            self._t(send),
            output_split_sizes=[int(c) for c in recv_counts],
            input_split_sizes=[int(c) for c in send_counts],
            group=self.group,
        )
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
        """Every rank's rows (float32 or int64 [n_r, w]), concatenated in rank order."""
        sizes = np.empty(self.world, np.int64)
        self._gather(self._t(sizes), self._t(np.array([rows.shape[0]], np.int64)), group=self.group)
        n = int(sizes.max())
        padded = np.zeros((n,) + rows.shape[1:], rows.dtype)
        padded[: rows.shape[0]] = rows
        out = np.empty((self.world * n,) + rows.shape[1:], rows.dtype)
        self._gather(self._t(out), self._t(padded), group=self.group)
        return np.concatenate([out[r * n : r * n + sizes[r]] for r in range(self.world)])

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


#: int64 header of a key message: keys sent to this rank, the most sent to any rank, refused (1) or not (0)
KEY_HEADER = 3


class KeyExchange:
    """The forward pass's keys, sent to their owners in one collective when they fit.

    Every rank sends every rank a message of one agreed size: a header (how many
    keys, the most this sender sends any rank, whether it refuses the batch) and
    the first ``capacity`` keys. Only when some rank sends some rank more keys
    than that does a second exchange carry the rest, sized by the headers. Every
    rank reads every sender's "most", so all of them agree, without another
    collective, on whether the second exchange happens and on the next capacity
    (the largest load of this step and an eighth more). A steady batch thus costs
    one collective, not a count exchange and then the keys: one latency fewer per
    step, which is what an exchange of small messages waits on. Padding costs a few
    bytes per key (the rows sent back dwarf them).
    """

    def __init__(self) -> None:
        self.capacity = 0  # keys per rank in the fixed message; 0: the header alone
        self.most = 0  # the most keys any rank sent any rank in the last exchange

    def exchange(self, exchange: LocalExchange, keys: np.ndarray, send_counts: np.ndarray, refused: bool):
        """Send ``keys`` (int64[U, 2], grouped by destination rank, ``send_counts[r]`` for
        rank r). Returns (keys received, rank by rank; int64[W]: how many from each rank;
        the ranks that refused their batch). When any rank refused, no keys are returned
        and every rank knows it (the caller raises on every rank)."""
        W, cap = exchange.world, self.capacity
        width = KEY_HEADER + 2 * cap
        first = np.minimum(send_counts, cap)
        starts = starts_of(send_counts)
        msg = np.zeros((W, width), np.int64)
        msg[:, 0] = send_counts
        msg[:, 1] = send_counts.max()
        msg[:, 2] = int(refused)
        for r in range(W):  # one slice per rank, not per key
            msg[r, KEY_HEADER : KEY_HEADER + 2 * first[r]] = keys[starts[r] : starts[r] + first[r]].ravel()
        ones = np.ones(W, np.int64)
        got = exchange.all_to_all(msg, ones, ones)
        recv_counts = np.ascontiguousarray(got[:, 0])
        most = int(got[:, 1].max())
        self.most = most
        refused_by = np.flatnonzero(got[:, 2])
        self.capacity = most + most // 8
        if refused_by.size:
            return np.empty((0, 2), np.int64), recv_counts, refused_by
        recv_first = np.minimum(recv_counts, cap)
        parts = [got[r, KEY_HEADER : KEY_HEADER + 2 * recv_first[r]].reshape(-1, 2) for r in range(W)]
        if most > cap:  # every rank sees the same "most": all take this exchange, or none
            rest = np.concatenate([keys[starts[r] + first[r] : starts[r] + send_counts[r]] for r in range(W)])
            more = exchange.all_to_all(rest.reshape(-1, 2), send_counts - first, recv_counts - recv_first)
            more_starts = starts_of(recv_counts - recv_first)
            parts = [
                np.concatenate([parts[r], more[more_starts[r] : more_starts[r] + recv_counts[r] - recv_first[r]]])
                for r in range(W)
            ]
        return np.concatenate(parts), recv_counts, refused_by


def exchange_for(process_group: Any = None) -> LocalExchange:
    """The exchange of ``process_group``; one process without torch.distributed gets the local one."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return LocalExchange()
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalExchange()
    return TorchExchange(process_group)

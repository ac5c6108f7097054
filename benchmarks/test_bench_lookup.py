"""Pooled lookup of 4096 x 26 one-id bags, D = 64: the store against its peers."""

import numpy as np
import torch

from fiited_store.experiments.bench.cpu import dense_gather

from .conftest import cycle


def test_store_pooled_lookup(benchmark, store, workload):
    batch = cycle(workload.ids)
    benchmark(lambda: store.pooled_lookup(workload.names, batch(), workload.offsets))


def test_torch_embedding_bag(benchmark, dense_weight, workload):
    rows = cycle([torch.from_numpy(r) for r in workload.rows])
    offsets = torch.from_numpy(workload.offsets[:-1])
    benchmark(lambda: torch.nn.functional.embedding_bag(rows(), dense_weight, offsets, mode="sum"))


def test_raw_njit_gather(benchmark, dense_weight, workload):
    rows = cycle(workload.rows)
    out = np.empty((workload.rows[0].shape[0], dense_weight.shape[1]), np.float32)
    table = dense_weight.numpy()
    benchmark(lambda: dense_gather(table, rows(), out))

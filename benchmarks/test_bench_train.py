"""A training step of the embeddings (lookup, backward, optimizer, utilities) against the peers."""

import importlib.util

import pytest
import torch

from .conftest import cycle


def test_store_training_step(benchmark, store, workload):
    batch = cycle(workload.ids)
    grads = cycle(workload.grads)

    def step():
        b = store.pooled_lookup(workload.names, batch(), workload.offsets, train=True)
        store.backward(b, grads())
        store.step()

    benchmark(step)


def test_torch_sparse_embedding_bag_sgd_step(benchmark, dense_weight, workload, cfg):
    bag = torch.nn.EmbeddingBag(workload.total_rows, cfg.dim, mode="sum", sparse=True, _weight=dense_weight)
    opt = torch.optim.SGD(bag.parameters(), lr=0.01)
    rows = cycle([torch.from_numpy(r) for r in workload.rows])
    offsets = torch.from_numpy(workload.offsets[:-1])
    grads = cycle([torch.from_numpy(g.reshape(-1, cfg.dim)) for g in workload.grads])

    def step():
        opt.zero_grad(set_to_none=True)
        bag(rows(), offsets).backward(grads())
        opt.step()

    benchmark(step)


PEERS = ["fbgemm"] if importlib.util.find_spec("fbgemm_gpu") else []


@pytest.mark.parametrize("peer", PEERS)
def test_fbgemm_rowwise_adagrad_step(benchmark, workload, cfg, peer):
    """Collected only where fbgemm-gpu-cpu is installed (pip install 'fiited-store[bench]')."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        OptimType,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, cfg.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in workload.cards],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
    )
    ids = cycle([torch.from_numpy(i) for i in workload.ids])
    offsets = torch.arange(0, len(workload.cards) * cfg.batch_size + 1)
    grads = cycle([torch.from_numpy(g) for g in workload.grads])
    benchmark(lambda: tbe(ids(), offsets).backward(grads()))

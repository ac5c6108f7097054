"""Train a small click model with its embeddings sharded over the ranks of torchrun.

One machine, two processes::

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py

Several machines (run on each, with its own --node_rank; the checkpoint path must be
on storage every machine sees)::

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 examples/train_distributed.py --save /shared/ckpt

The embeddings live in a FIITED store sharded row-wise over the ranks, on a
process group of their own; the dense part trains under DDP. Each rank reads its
own stream of batches, of uneven length on purpose: ``while_every_rank_has``
stops every rank at the same step, so none waits forever in an exchange.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist

from fiited_store import DynamicRatio, StoreConfig, TableConfig
from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures
from fiited_store.distributed.batches import while_every_rank_has

USERS, ITEMS, DIM = 20_000, 50_000, 16


def batches(rank: int, count: int, batch_size: int):
    """(features, labels): a user and two to four items per sample; clicks follow a planted affinity."""
    rng = np.random.default_rng(rank)
    affinity = np.random.default_rng(0).normal(size=ITEMS) * 0.5  # the same on every rank
    taste = np.random.default_rng(1).normal(size=USERS) * 0.5
    for _ in range(count):
        users = rng.zipf(1.2, batch_size) % USERS
        lengths = rng.integers(2, 5, batch_size)
        items = rng.zipf(1.1, int(lengths.sum())) % ITEMS
        bag = np.repeat(np.arange(batch_size), lengths)
        logit = taste[users] + np.bincount(bag, affinity[items], batch_size) / lengths
        labels = (rng.random(batch_size) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        features = JaggedFeatures(
            ["user", "item"],
            torch.from_numpy(np.concatenate([users, items]).astype(np.int64)),
            torch.from_numpy(np.concatenate([np.ones(batch_size, np.int64), lengths])),
        )
        yield features, torch.from_numpy(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="batches per rank (rank r holds steps + r)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--save", default=None, help="a directory to save the sharded store to at the end")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    embedding_group = dist.new_group(backend="gloo")
    tables = [
        TableConfig("user", DIM, chunks=4, num_embeddings=USERS, optimizer="adagrad", learning_rate=0.05),
        TableConfig("item", DIM, chunks=4, num_embeddings=ITEMS, optimizer="adagrad", learning_rate=0.05),
    ]
    ebc = FiitedEmbeddingBagCollection(
        tables,
        store_config=StoreConfig(pruning=DynamicRatio(0.75), prune_period=50),
        mode="mean",
        output="concat",
        process_group=embedding_group,
    )
    dense = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(2 * DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    )
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for step, (features, labels) in enumerate(
        while_every_rank_has(batches(rank, args.steps + rank, args.batch_size), embedding_group)
    ):
        opt.zero_grad()
        loss = loss_fn(dense(ebc(features)).squeeze(1), labels)
        loss.backward()  # the store's exchange and fused optimizer run inside this call
        opt.step()
        losses.append(loss.item())
        if rank == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {np.mean(losses[-50:]):.4f}", flush=True)
    stats = ebc.store.stats()  # a collective: every rank calls it
    if args.save:
        ebc.store.save(args.save)  # two-phase: every shard, then the global manifest
    if rank == 0:
        t = stats["total"]
        print(
            f"{len(losses)} steps on each of {world} ranks; {t['entries']} entries, average kept dimension "
            f"{t['average_kept_dim']:.1f} of {DIM}; store memory {t['memory_vs_dense']:.3f} x dense weights; "
            f"entries per shard {[s['entries'] for s in stats['shards']]}"
        )
    ebc.store.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Training and evaluation of a DLRM with each embedding method (``fiited-store train`` / ``sweep``)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import Batch, TabularDataset
from .metrics import accuracy, auc, log_loss
from .models.dlrm import DLRM, FiitedEmbeddings, build_embeddings
from .models.optim import sparse_optimizer


def load_dataset(cfg: TrainConfig):
    """(stream or train set, validation set, test set, feature names, cardinalities, access counts)."""
    if cfg.dataset in ("synthetic", "mixed"):
        from .data.synthetic import SyntheticClickStream, mixed_stream, scaled_cardinalities

        stream = (
            mixed_stream(cfg.seed)
            if cfg.dataset == "mixed"
            else SyntheticClickStream(scaled_cardinalities(cap=cfg.synthetic_cap), seed=cfg.seed)
        )
        val = stream.dataset(cfg.eval_samples // 2, stream_seed=1)
        test = stream.dataset(cfg.eval_samples // 2, stream_seed=2)
        counts = stream.dataset(20_000, stream_seed=3).access_counts()
        return stream, val, test, stream.feature_names, stream.cardinalities, counts
    if cfg.dataset == "movielens":
        from .data.movielens import load_movielens

        full = load_movielens(cfg.path)
    else:
        from .data.criteo import load_criteo_tsv

        full = load_criteo_tsv(cfg.path, limit=cfg.criteo_limit)
    train, val, test = full.split(cfg.seed)
    return train, val, test, full.feature_names, full.cardinalities, train.access_counts()


class Distributed(NamedTuple):
    """This process's place under ``torchrun``, and the embeddings' own process group."""

    rank: int
    world: int
    group: Any


def distributed_context() -> Distributed | None:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the default gloo group, and give the
    embeddings a group of their own (the dense part's DDP all-reduces use the default
    one, so the two never wait on each other's collectives). Otherwise None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo"))


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous share of a global batch's samples."""
    B = batch.size
    lo, hi = rank * B // world, (rank + 1) * B // world
    F = len(batch.keys)
    lengths = batch.lengths.view(F, B)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(batch.lengths, 0)]).view(-1)
    pieces = [batch.values[starts[f * B + lo] : starts[f * B + hi]] for f in range(F)]  # F slices, not one per key
    return Batch(
        dense=batch.dense[lo:hi],
        keys=batch.keys,
        values=torch.cat(pieces),
        lengths=lengths[:, lo:hi].reshape(-1).contiguous(),
        labels=batch.labels[lo:hi],
    )


def evaluate(
    model: DLRM, data: TabularDataset, batch_size: int = 4096, dist_ctx: Distributed | None = None
) -> dict[str, float]:
    """Quality on ``data``. Sharded, every rank scores an equal share (the last padded, so
    that every rank makes the same number of collective lookups) and all see every score."""
    model.eval()
    probs = []
    part = data
    if dist_ctx is not None:
        per = -(-len(data) // dist_ctx.world)
        rows = np.arange(dist_ctx.rank * per, (dist_ctx.rank + 1) * per)
        part = data.subset(np.where(rows < len(data), rows, 0), data.name)
    with torch.no_grad():
        for batch in part.batches(batch_size):
            probs.append(torch.sigmoid(model(batch)))
    model.train()
    p = torch.cat(probs)
    if dist_ctx is not None:
        import torch.distributed as dist

        every = [torch.empty_like(p) for _ in range(dist_ctx.world)]
        dist.all_gather(every, p)
        p = torch.cat(every)[: len(data)]
    p = p.numpy()
    return {"auc": auc(data.labels, p), "logloss": log_loss(data.labels, p), "accuracy": accuracy(data.labels, p)}


def embeddings_of(cfg: TrainConfig, names, cards, counts, process_group=None) -> torch.nn.Module:
    """The embedding module of ``cfg``'s method over the dataset's features."""
    return build_embeddings(
        cfg.method,
        names,
        cards,
        cfg.dim,
        cfg.ratio,
        cfg.chunks,
        cfg.lr_embedding,
        counts=counts,
        prune_period=cfg.prune_period,
        gamma=cfg.gamma,
        seed=cfg.seed,
        steepness=cfg.steepness,
        utility=cfg.utility,
        table_normalization=cfg.table_normalization,
        small_table_rows=cfg.small_table_rows,
        readmission=cfg.readmission,
        on_evict=cfg.on_evict,
        min_chunks=cfg.min_chunks,
        optimizer=cfg.optimizer,
        floor_dim=cfg.effective_floor_dim,
        project=cfg.effective_project,
        shared_floor=cfg.shared_floor,
        process_group=process_group,
    )


def run(
    cfg: TrainConfig, progress: bool = True, out=sys.stderr, before_training: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Train one model; returns quality on the test set, memory and speed.

    ``before_training`` runs once the model is built, before the first timed step (the CLI
    finishes compiling the store's kernels there)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    # torch's sparse Adagrad warns on every step about invariant checks it skips
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    dist_ctx = distributed_context()
    if dist_ctx is not None and not cfg.method.startswith("fiited") and cfg.method != "adaembed":
        from ..errors import ConfigError

        raise ConfigError(
            f"under torchrun only FIITED's store is sharded; method {cfg.method!r} would train a separate copy per rank"
        )
    progress = progress and (dist_ctx is None or dist_ctx.rank == 0)
    train, val, test, names, cards, counts = load_dataset(cfg)
    synthetic = cfg.dataset in ("synthetic", "mixed")
    emb = embeddings_of(cfg, names, cards, counts, None if dist_ctx is None else dist_ctx.group)
    num_dense = test.num_dense
    model = DLRM(emb, len(names), cfg.dim, num_dense)
    # the dense part trains data-parallel: DDP averages its gradients over the ranks
    step_model = model if dist_ctx is None else torch.nn.parallel.DistributedDataParallel(model)
    sparse = set(map(id, emb.sparse_parameters()))
    dense_params = [p for p in model.parameters() if id(p) not in sparse]
    dense_opt = torch.optim.Adam(dense_params, lr=cfg.lr_dense)
    sparse_opt = sparse_optimizer(cfg.optimizer, emb.sparse_parameters(), cfg.lr_embedding) if sparse else None
    loss_fn = torch.nn.BCEWithLogitsLoss()

    if synthetic:
        schedule = [range(cfg.steps)]
        total = cfg.steps
    else:
        schedule = [None] * cfg.epochs
        total = cfg.epochs * train.num_batches(cfg.batch_size)
    if before_training is not None:
        before_training()
    bar = tqdm(
        total=total,
        disable=not progress,
        file=out,
        desc=f"{cfg.method} p={cfg.ratio:g}",
        unit="step",
        dynamic_ncols=True,
    )
    best = {"val_auc": -math.inf}
    step_time = 0.0
    steps = 0
    losses = []

    def global_batches(epoch):
        if synthetic:
            for s in schedule[0]:
                yield train.batch(cfg.batch_size, s)
        else:
            yield from train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)

    def batches(epoch):
        # sharded, every rank takes its share of the same global batch (a last batch
        # too small to give every rank a sample is skipped on all of them)
        for batch in global_batches(epoch):
            if dist_ctx is None:
                yield batch
            elif batch.size >= dist_ctx.world:
                yield rank_slice(batch, dist_ctx.rank, dist_ctx.world)

    for epoch in range(len(schedule)):
        for batch in batches(epoch):
            t0 = time.perf_counter()
            dense_opt.zero_grad(set_to_none=True)
            if sparse_opt is not None:
                sparse_opt.zero_grad(set_to_none=True)
            loss = loss_fn(step_model(batch), batch.labels)
            loss.backward()  # the store's fused optimizer runs inside this call
            dense_opt.step()
            if sparse_opt is not None:
                sparse_opt.step()
            step_time += time.perf_counter() - t0
            steps += 1
            losses.append(loss.item())
            bar.update(1)
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        v = evaluate(model, val, dist_ctx=dist_ctx)
        if v["auc"] > best["val_auc"]:
            best = {
                "val_auc": v["auc"],
                "epoch": epoch,
                **{f"test_{k}": x for k, x in evaluate(model, test, dist_ctx=dist_ctx).items()},
            }
    bar.close()

    dense_bytes = int(sum(cards) * cfg.dim * 4)
    result: dict[str, Any] = {
        **asdict(cfg),
        "auc": best["test_auc"],
        "logloss": best["test_logloss"],
        "accuracy": best["test_accuracy"],
        "val_auc": best["val_auc"],
        "best_epoch": best["epoch"],
        "embedding_bytes": emb.weight_bytes(),
        "dense_embedding_bytes": dense_bytes,
        "bytes_vs_dense": emb.weight_bytes() / dense_bytes,
        # every method's whole training memory (weights, optimizer state, index, maps)
        # against dense weights with element-wise Adagrad's state, whatever the run's
        # optimizer: one yardstick, what a torch EmbeddingBag trained with Adagrad holds
        "dense_training_bytes": 2 * dense_bytes,
        "step_ms": 1000.0 * step_time / max(steps, 1),
        "steps": steps,
        "train_loss_last": float(np.mean(losses[-50:])) if losses else float("nan"),
    }
    if synthetic:
        bayes = 1 / (1 + np.exp(-test.meta["bayes_logits"]))
        result["bayes_auc"] = auc(test.labels, bayes)
    stats = emb.store.stats() if isinstance(emb, FiitedEmbeddings) else None
    result["training_bytes"] = emb.training_bytes(stats) if stats is not None else emb.training_bytes(cfg.optimizer)
    result["training_vs_dense"] = result["training_bytes"] / result["dense_training_bytes"]
    if hasattr(emb, "meets_ratio"):  # quotient-remainder: two tables cannot go below 2 sqrt(n) rows
        result["ratio_met"] = bool(all(emb.meets_ratio))
    if isinstance(emb, FiitedEmbeddings):
        st = stats["total"]
        result.update(
            store_memory_bytes=st["bytes"]["memory_total"],
            average_kept_dim=emb.average_kept_dim(stats),
            entries=st["entries"],
            store_vs_dense=st["memory_vs_dense"],
            store_vs_dense_with_optimizer=st["memory_vs_dense_with_optimizer"],
            spilled_chunks=st["spilled_chunks"],
        )
        if emb.projection is not None:  # a dense parameter beside the store, trained by the dense optimizer
            result["projection_bytes"] = emb.projection.numel() * 4
        emb.store.close()
    if dist_ctx is not None:
        result["world_size"] = dist_ctx.world
    return result


def format_result(r: dict[str, Any]) -> str:
    lines = [
        f"method {r['method']}  "
        + ("no pruning" if r["method"] == "dense" else f"pruning ratio {r['ratio']:g}  chunks {r['chunks']}")
        + f"  dim {r['dim']}  dataset {r['dataset']}",
        f"quality   AUC {r['auc']:.4f}   log loss {r['logloss']:.4f}   accuracy {r['accuracy']:.4f}"
        + (f"   (Bayes-optimal AUC {r['bayes_auc']:.4f})" if "bayes_auc" in r else ""),
        f"memory    embedding weights {r['embedding_bytes'] / 2**20:.2f} MiB = {r['bytes_vs_dense']:.3f} x dense "
        f"({r['dense_embedding_bytes'] / 2**20:.2f} MiB)",
        f"          training memory (weights, optimizer state, index, maps) {r['training_bytes'] / 2**20:.2f} MiB"
        f" = {r['training_vs_dense']:.4f} x dense weights + Adagrad's state",
    ]
    if r.get("ratio_met") is False:
        lines.append(
            "          the ratio is out of reach for some tables: quotient and remainder tables take at least "
            "2 sqrt(rows) rows, which those tables keep"
        )
    if "store_memory_bytes" in r:
        lines.append(
            "          training memory of the store (pool, optimizer state, entry index) "
            f"{r['store_memory_bytes'] / 2**20:.2f} MiB"
            f" = {r['store_vs_dense']:.3f} x dense weights, {r['store_vs_dense_with_optimizer']:.3f} x dense weights"
            f" + the same optimizer's state; average kept dimension {r['average_kept_dim']:.1f} of {r['dim']}"
        )
        if r.get("projection_bytes"):
            lines.append(
                f"          embedding weights include the learned D x D map per feature, "
                f"{r['projection_bytes'] / 2**10:.1f} KiB (a dense parameter beside the store)"
            )
        if r.get("on_evict") == "spill":
            lines.append(f"          disk tier: {r['spilled_chunks']:,} pruned chunks kept with their trained values")
    lines.append(
        f"speed     {r['step_ms']:.2f} ms per training step ({r['steps']} steps of {r['batch_size']}"
        + (f" shared by {r['world_size']} ranks)" if r.get("world_size", 1) > 1 else ")")
    )
    return "\n".join(lines)

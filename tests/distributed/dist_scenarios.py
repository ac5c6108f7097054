"""Scenarios run on every rank of a gloo world (see dist_harness); each asserts.

The reference is one EmbeddingStore fed the global batch: feature by feature, the
bags of rank 0, then rank 1, and so on. Every rank builds it (it is deterministic)
and compares its own part of every result with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fiited_store import DynamicRatio, EmbeddingStore, StoreConfig, TableConfig
from fiited_store.distributed import ShardedEmbeddingStore
from fiited_store.distributed.batches import while_every_rank_has
from fiited_store.errors import IdOutOfRangeError, NonFiniteGradientError, PeerRankError

TABLES = [
    TableConfig("user", dim=8, chunks=2, num_embeddings=40, optimizer="adagrad", learning_rate=0.05),
    TableConfig("item", dim=16, chunks=4, num_embeddings=300, learning_rate=0.1),
    TableConfig("tag", dim=16, chunks=4, optimizer="sgd", learning_rate=0.1),  # undeclared: arbitrary int64 ids
]
FEATURES = ["user", "item", "item", "tag"]  # "item" serves two features
DIMS = np.array([8, 16, 16, 16])
TAG_IDS = np.random.default_rng(99).integers(-(2**62), 2**62, size=150)


def config(**kw) -> StoreConfig:
    base = dict(pruning=DynamicRatio(0.5), budget_bytes=400_000, prune_period=3, gamma=0.9, sample_size=60, seed=7)
    base.update(kw)
    return StoreConfig(**base)


def rank_batch(step: int, rank: int, bags: int, seed: int = 0):
    """(lengths int64[F, B], ids, weights float32, grad float32[B, sum dims]) of one rank at one step."""
    rng = np.random.default_rng([seed, step, rank])
    lengths = rng.integers(0, 4, size=(len(FEATURES), bags))
    ids = []
    for f, name in enumerate(FEATURES):
        n = int(lengths[f].sum())
        if name == "user":
            ids.append(rng.integers(0, 40, n))
        elif name == "item":
            # both features of "item" draw often from its first 20 rows: one id summed from
            # two features and several ranks, where the order of the sum shows
            ids.append(rng.integers(0, 300 if (f == 1 and step % 2) else 20, n))
        else:
            ids.append(TAG_IDS[rng.integers(0, TAG_IDS.size, n)])
    ids = np.concatenate(ids).astype(np.int64)
    weights = rng.uniform(0.5, 2.0, ids.size).astype(np.float32)
    grad = rng.normal(0, 1, (bags, int(DIMS.sum()))).astype(np.float32)
    return lengths, ids, weights, grad


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths.reshape(-1))]).astype(np.int64)


def global_batch(parts):
    """The single-store batch of every rank's parts: per feature, rank 0's bags first."""
    F = len(FEATURES)
    lengths = np.concatenate([p[0] for p in parts], axis=1)
    ids, weights = [], []
    for f in range(F):
        for lens, pid, pw, _ in parts:
            start = int(lens[:f].sum())
            n = int(lens[f].sum())
            ids.append(pid[start : start + n])
            weights.append(pw[start : start + n])
    grad = np.concatenate([p[3] for p in parts], axis=0)
    return lengths, np.concatenate(ids), np.concatenate(weights), grad


def bags_of(step: int, rank: int) -> int:
    if step == 4 and rank == 1:
        return 0  # an empty batch on one rank
    return 3 + rank + step % 2


def all_keys():
    return {"user": np.arange(40), "item": np.arange(300), "tag": TAG_IDS}


def check_same(a, b, exact: bool, what: str):
    if exact:
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=what)


def _train_and_compare(
    rank,
    world,
    exact: bool,
    steps: int = 8,
    routing: str = "row",
    cfg: StoreConfig | None = None,
    on_step=None,
    pool_slack: float | None = None,
):
    cfg = cfg if cfg is not None else config()
    single = EmbeddingStore(TABLES, cfg)
    slack = {} if pool_slack is None else {"pool_slack": pool_slack}
    sharded = ShardedEmbeddingStore(TABLES, cfg, exact=exact, routing=routing, **slack)
    assert (sharded.rank, sharded.world) == (rank, world)
    for step in range(steps):
        parts = [rank_batch(step, r, bags_of(step, r)) for r in range(world)]
        lengths, ids, weights, grad = parts[rank]
        g_len, g_ids, g_w, g_grad = global_batch(parts)
        kind = ("sum", "weighted", "mean")[step % 3]
        mode = "mean" if kind == "mean" else "sum"
        w_local = weights if kind == "weighted" else None
        w_global = g_w if kind == "weighted" else None
        if on_step is not None:
            on_step(single, sharded, "before")
        mine = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), w_local, mode, train=True)
        ref = single.pooled_lookup(FEATURES, g_ids, offsets_of(g_len), w_global, mode, train=True)
        start = sum(bags_of(step, r) for r in range(rank))
        check_same(mine.output, ref.output[start : start + lengths.shape[1]], exact, f"forward, step {step}")
        if kind == "weighted":
            wg_mine = sharded.per_sample_weight_grads(mine, grad)
            wg_ref = single.per_sample_weight_grads(ref, g_grad)
            # this rank's occurrences sit, feature by feature, after the earlier ranks' ones
            pos = np.concatenate(
                [
                    int(g_len[f, :start].sum()) + int(g_len[:f].sum()) + np.arange(int(lengths[f].sum()))
                    for f in range(len(FEATURES))
                ]
            ).astype(np.int64)
            np.testing.assert_allclose(wg_mine, wg_ref[pos], rtol=1e-5, atol=1e-6)
        sharded.backward(mine, grad)
        single.backward(ref, g_grad)
        if on_step is not None:
            on_step(single, sharded, "after")
        sharded.step()
        single.step()
    return single, sharded


def _compare_state(single, sharded, rank, world, exact):
    keys = all_keys()
    for name, ids in keys.items():
        check_same(sharded.lookup(name, ids), single.lookup(name, ids), exact, f"rows of {name}")
        mine = sharded.routing.owners(np.full(ids.size, sharded.table_index(name), np.int16), ids, world) == rank
        check_same(
            sharded.shard.utilities(name, ids[mine]), single.utilities(name, ids[mine]), exact, f"utilities of {name}"
        )
    s_stats, r_stats = sharded.stats(), single.stats()
    for name in keys:
        for field in ("entries", "resident_per_chunk", "spilled_per_chunk"):
            assert s_stats["tables"][name][field] == r_stats["tables"][name][field], (name, field)
    assert s_stats["total"]["world_size"] == world
    thr_s = sharded.prune()["pools"][0]["thresholds"]
    thr_r = single.prune()["pools"][0]["thresholds"]
    if exact:
        assert thr_s == thr_r, (thr_s, thr_r)
    else:
        for name in thr_r:
            np.testing.assert_allclose(thr_s[name], thr_r[name], rtol=1e-3)


def scenario_exact_equals_single_store(rank, world, scratch: Path):
    single, sharded = _train_and_compare(rank, world, exact=True)
    assert single.counters.prunes == sharded.shard.counters.prunes == 2
    _compare_state(single, sharded, rank, world, exact=True)


def scenario_table_wise_exact_equals_single_store(rank, world, scratch: Path):
    # every row of a table on one rank, which keeps the table's direct index
    single, sharded = _train_and_compare(rank, world, exact=True, routing="table")
    owned = sharded.routing.owns_tables(rank, world) if world > 1 else [0, 1, 2]
    assert sharded.shard.entries.is_direct(1) == (1 in owned)  # "item" declares its rows
    held = sharded.shard.stats()["tables"]
    assert all((held[t.name]["entries"] > 0) == (i in owned) for i, t in enumerate(TABLES))
    _compare_state(single, sharded, rank, world, exact=True)


def scenario_tight_pool_exact_equals_single_store(rank, world, scratch: Path):
    """A pool of 180 slots for 1,880 chunks: new keys take the last free slots in the
    global batch's order, and the late prunes are over-subscribed. The shards decide
    both as one store does (global_pools), so they still equal it bit for bit; left
    to their own 1/W of the slots, they would not. Rows this few hash unevenly (one
    shard of two wanted 104 of the 180 slots), so the shards get half their share
    as slack here; the default 1/16 is for pools of thousands of slots and more."""
    cfg = config(budget_bytes=180 * 4 * 4, prune_period=2)
    free = {"before": 0, "cuts": 0}

    def on_step(single, sharded, when):
        n_free = single.pools[0].n_free
        if when == "before":
            free["before"] = n_free
        elif free["before"] and n_free == 0:  # this batch's new keys took the last free slots
            free["cuts"] += 1

    single, sharded = _train_and_compare(rank, world, exact=True, steps=12, cfg=cfg, on_step=on_step, pool_slack=0.5)
    _compare_state(single, sharded, rank, world, exact=True)
    for _ in range(2):  # prunes on their own, with no lookups between them
        s_rep, r_rep = sharded.prune()["pools"][0], single.prune()["pools"][0]
        assert r_rep["oversubscribed"], r_rep
        assert not s_rep.get("shard_bound", False), s_rep
    assert free["cuts"] >= 2, free
    for name, ids in all_keys().items():
        check_same(sharded.lookup(name, ids), single.lookup(name, ids), True, f"rows of {name} after the prunes")


def scenario_tight_pool_without_slack_stays_in_budget(rank, world, scratch: Path):
    """With no slack a hot shard's own pool binds: the store then differs from one
    store, says so (``shard_bound``), and still never holds more than the budget."""
    sharded = ShardedEmbeddingStore(TABLES, config(budget_bytes=180 * 4 * 4, prune_period=0), pool_slack=0.0)
    bound = 0
    for step in range(12):
        lengths, ids, _, grad = rank_batch(step, rank, bags_of(step, rank))
        batch = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
        sharded.backward(batch, grad)
        sharded.step()
        if step % 2:
            bound += int(sharded.prune()["pools"][0].get("shard_bound", False))
        used = sharded.shard.pools[0].slots - sharded.shard.pools[0].n_free
        assert int(sharded.exchange.sum(np.array([used]))[0]) <= 180, step
    bound = int(sharded.exchange.sum(np.array([bound]))[0])
    assert (bound > 0) == (world > 1), bound


def scenario_collection_divides_gradients_as_ddp(rank, world, scratch: Path):
    """Each rank takes the mean loss of its own samples, as under DDP; the sharded
    collection divides the gradients by W, so rows train as in one process that
    takes the mean loss of the global batch (bit for bit when W is a power of two)."""
    import torch

    from fiited_store.adapters import FiitedEmbeddingBagCollection, JaggedFeatures

    tables = TABLES[:2]
    keys = ["user", "item"]

    def make(group):
        return FiitedEmbeddingBagCollection(
            tables, store_config=config(), output="concat", process_group=group, exact=True
        )

    sharded, single = make(torch.distributed.group.WORLD), make(None)
    w = torch.linspace(-1, 1, 24)
    per = 4
    for step in range(6):
        rng = np.random.default_rng([5, step])
        lengths = rng.integers(1, 3, size=(2, per * world))
        ids = [rng.integers(0, 40 if f == 0 else 300, int(lengths[f].sum())) for f in range(2)]

        def features(lo, hi, ids=ids, lengths=lengths):
            vals = [ids[f][int(lengths[f, :lo].sum()) : int(lengths[f, :hi].sum())] for f in range(2)]
            return JaggedFeatures(
                keys, torch.from_numpy(np.concatenate(vals)), torch.from_numpy(lengths[:, lo:hi].reshape(-1).copy())
            )

        ((sharded(features(rank * per, (rank + 1) * per)) * w).sum(1) ** 2).mean().backward()
        ((single(features(0, per * world)) * w).sum(1) ** 2).mean().backward()
    for name, n in (("user", 40), ("item", 300)):
        got, want = sharded.store.lookup(name, np.arange(n)), single.store.lookup(name, np.arange(n))
        if world & (world - 1) == 0:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # 1/3 rounds
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert sharded.gradient_scale == 1.0 / world


def scenario_deduplicated_matches_single_store(rank, world, scratch: Path):
    # one summed row per key: exact in a world of one, float tolerance beyond
    single, sharded = _train_and_compare(rank, world, exact=False)
    _compare_state(single, sharded, rank, world, exact=world == 1)


def scenario_nan_on_one_rank_raises_everywhere(rank, world, scratch: Path):
    sharded = ShardedEmbeddingStore(TABLES, config())
    for step in range(2):
        lengths, ids, _, grad = rank_batch(step, rank, 4)
        b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
        sharded.backward(b, grad)
        sharded.step()
    lengths, ids, _, grad = rank_batch(5, rank, 4)
    b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
    before = {n: sharded.lookup(n, ids) for n, ids in all_keys().items()}
    util_before = sharded.shard.utilities("item", np.arange(300))
    if rank == world - 1:
        grad[1, 3] = np.nan
    try:
        sharded.backward(b, grad)
    except NonFiniteGradientError as exc:
        assert f"rank(s) [{world - 1}]" in str(exc) or "nan" in str(exc), str(exc)
    else:
        raise AssertionError("a NaN on one rank must raise NonFiniteGradientError on every rank")
    for n, ids in all_keys().items():
        np.testing.assert_array_equal(sharded.lookup(n, ids), before[n])
    np.testing.assert_array_equal(sharded.shard.utilities("item", np.arange(300)), util_before)
    # the batch is still pending and the world still works: a finite gradient applies it
    grad[1, 3] = 0.0
    sharded.backward(b, grad)
    sharded.step()


def scenario_bad_input_on_one_rank_raises_everywhere(rank, world, scratch: Path):
    sharded = ShardedEmbeddingStore(TABLES, config())
    lengths, ids, _, grad = rank_batch(0, rank, 4)
    b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
    sharded.backward(b, grad)
    before = sharded.stats()["total"]["entries"]
    bad = ids.copy()
    if rank == 0:
        bad[int(lengths[0].sum()) - 1 if lengths[0].sum() else 0] = 40  # user declares 40 rows
    try:
        sharded.pooled_lookup(FEATURES, bad, offsets_of(lengths), train=True)
    except IdOutOfRangeError as exc:
        assert rank == 0 and exc.id == 40
    except PeerRankError as exc:
        assert rank != 0 and "[0]" in str(exc)
    else:
        raise AssertionError("an id out of range on rank 0 must raise on every rank")
    assert sharded.stats()["total"]["entries"] == before
    # a backward with the wrong shape on the last rank: every rank raises, nothing changes
    b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
    rows = sharded.lookup("item", np.arange(300))
    try:
        sharded.backward(b, grad[:, :5] if rank == world - 1 else grad)
    except (PeerRankError, Exception) as exc:
        assert (type(exc).__name__ == "InputShapeError") == (rank == world - 1), repr(exc)
    else:
        raise AssertionError("a bad gradient on one rank must raise on every rank")
    np.testing.assert_array_equal(sharded.lookup("item", np.arange(300)), rows)
    sharded.backward(b, grad)


def scenario_shard_without_entries_prunes(rank, world, scratch: Path):
    cfg = config(prune_period=0)
    sharded = ShardedEmbeddingStore(TABLES, cfg, exact=True)
    single = EmbeddingStore(TABLES, cfg)
    items = np.arange(300)
    owned_by_0 = items[sharded.routing.owners(np.full(300, 1, np.int16), items, world) == 0][:20]
    for step in range(2):
        ids = owned_by_0 if rank == 0 else np.empty(0, np.int64)
        g = np.random.default_rng(step).normal(size=(owned_by_0.size, 16)).astype(np.float32)
        b = sharded.pooled_lookup("item", ids, np.arange(ids.size + 1), train=True)
        sharded.backward(b, g[: ids.size])
        r = single.pooled_lookup("item", owned_by_0, np.arange(owned_by_0.size + 1), train=True)
        single.backward(r, g)
        sharded.step()
        single.step()
    assert (sharded.shard.stats()["total"]["entries"] == 0) == (rank != 0)
    assert sharded.prune()["pools"][0]["thresholds"] == single.prune()["pools"][0]["thresholds"]
    np.testing.assert_array_equal(sharded.lookup("item", items), single.lookup("item", items))


def scenario_cache_mode_spills_per_shard(rank, world, scratch: Path):
    """Cache mode: each shard keeps a pool a fraction of the rows' size and its own disk
    tier; nothing is pruned, so every row equals a single cache-mode store's."""
    cfg = config(mode="cache", budget_bytes=2_400 * world, prune_period=4)
    single = EmbeddingStore(TABLES, cfg, path=scratch / f"single-{rank}")
    sharded = ShardedEmbeddingStore(TABLES, cfg, exact=True, path=scratch / "sharded")
    for step in range(8):
        parts = [rank_batch(step, r, bags_of(step, r)) for r in range(world)]
        lengths, ids, _, grad = parts[rank]
        g_len, g_ids, _, g_grad = global_batch(parts)
        mine = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
        ref = single.pooled_lookup(FEATURES, g_ids, offsets_of(g_len), train=True)
        start = sum(bags_of(step, r) for r in range(rank))
        np.testing.assert_array_equal(mine.output, ref.output[start : start + lengths.shape[1]])
        sharded.backward(mine, grad)
        single.backward(ref, g_grad)
        sharded.step()
        single.step()
    assert sharded.shard.tiers[0] is not None and sharded.shard.stats()["total"]["spilled_chunks"] > 0
    assert str(sharded.shard.tiers[0].root).startswith(str(scratch / "sharded"))
    for name, ids in all_keys().items():
        np.testing.assert_array_equal(sharded.lookup(name, ids), single.lookup(name, ids), err_msg=name)
    single.close()
    sharded.close()


def scenario_uneven_batch_counts_stop_together(rank, world, scratch: Path):
    sharded = ShardedEmbeddingStore(TABLES, config())
    mine = [rank_batch(s, rank, 3) for s in range(2 + rank)]  # rank r holds 2 + r batches
    steps = 0
    for lengths, ids, _, grad in while_every_rank_has(mine, exchange=sharded.exchange):
        b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
        sharded.backward(b, grad)
        sharded.step()
        steps += 1
    assert steps == 2
    assert sharded.step_count == 2


# ---------------------------------------------------------------------- checkpoints
# (run by their own tests: a world of 2 saves, worlds of 1, 2 and 3 reopen)
SAVED_STEPS = 10


def store_path(scratch: Path) -> Path:
    """The store every checkpoint scenario of one test shares (beside the worlds' work dirs)."""
    return scratch.parent.parent / "sharded-store"


def replay_single(steps: int, world: int, single: EmbeddingStore | None = None, first: int = 0) -> EmbeddingStore:
    """One EmbeddingStore fed the global batches a world of ``world`` ranks trained on."""
    single = single if single is not None else EmbeddingStore(TABLES, config())
    for step in range(first, first + steps):
        parts = [rank_batch(step, r, bags_of(step, r)) for r in range(world)]
        g_len, g_ids, _, g_grad = global_batch(parts)
        b = single.pooled_lookup(FEATURES, g_ids, offsets_of(g_len), train=True)
        single.backward(b, g_grad)
        single.step()
    return single


def _train(sharded, rank, steps, first=0):
    for step in range(first, first + steps):
        lengths, ids, _, grad = rank_batch(step, rank, bags_of(step, rank))
        b = sharded.pooled_lookup(FEATURES, ids, offsets_of(lengths), train=True)
        sharded.backward(b, grad)
        sharded.step()


def scenario_train_and_save(rank, world, scratch: Path, routing: str = "row"):
    path = store_path(scratch)
    with ShardedEmbeddingStore(TABLES, config(), exact=True, path=path, routing=routing) as sharded:
        _train(sharded, rank, SAVED_STEPS - 2)
        sharded.save()
        _train(sharded, rank, 2, first=SAVED_STEPS - 2)
        sharded.save()  # replaces the first global checkpoint, which then goes
    shard_dir = path / f"w{world:04d}-shard-{rank:05d}"
    assert sorted(p.name for p in shard_dir.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-00000002"]


def scenario_train_and_save_table_wise(rank, world, scratch: Path):
    scenario_train_and_save(rank, world, scratch, routing="table")


def scenario_reopen_and_train(rank, world, scratch: Path):
    saved_world = 2
    single = replay_single(SAVED_STEPS, saved_world)
    sharded = ShardedEmbeddingStore.open(store_path(scratch), "r+", exact=True)
    assert sharded.world == world and sharded.step_count == SAVED_STEPS
    _compare_state_without_prune(single, sharded, rank, world)
    # training goes on as if nothing happened: optimizer state and utilities moved too
    _train(sharded, rank, 4, first=SAVED_STEPS)
    replay_single(4, world, single, first=SAVED_STEPS)
    _compare_state_without_prune(single, sharded, rank, world)
    sharded.close()


def _compare_state_without_prune(single, sharded, rank, world):
    for name, ids in all_keys().items():
        np.testing.assert_array_equal(sharded.lookup(name, ids), single.lookup(name, ids), err_msg=name)
        mine = sharded.routing.owners(np.full(ids.size, sharded.table_index(name), np.int16), ids, world) == rank
        np.testing.assert_array_equal(sharded.shard.utilities(name, ids[mine]), single.utilities(name, ids[mine]))
    s_stats, r_stats = sharded.stats(), single.stats()
    for name in TABLES:
        for field in ("entries", "resident_per_chunk"):
            assert s_stats["tables"][name.name][field] == r_stats["tables"][name.name][field], (name.name, field)


def scenario_killed_before_manifest_commit(rank, world, scratch: Path):
    """Rank 1 dies after saving its shard, before the global manifest names it."""
    import os

    from fiited_store.distributed import checkpoint

    path = store_path(scratch)
    sharded = ShardedEmbeddingStore(TABLES, config(), exact=True, path=path)
    _train(sharded, rank, 4)
    sharded.save()
    _train(sharded, rank, 2, first=4)

    def die(point, r):
        if point == "shard-saved" and r == 1:
            os._exit(3)

    checkpoint._save_hook = die
    sharded.save()  # rank 1 never returns; rank 0 fails in the exchange that follows


#: what the worlds of test_scenario run; the checkpoint scenarios have tests of their own
SCENARIOS = [
    name
    for name in dir()
    if name.startswith("scenario_")
    and name
    not in (
        "scenario_train_and_save",
        "scenario_train_and_save_table_wise",
        "scenario_reopen_and_train",
        "scenario_killed_before_manifest_commit",
    )
]

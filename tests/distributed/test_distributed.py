"""The sharded store in worlds of 1, 2 and 3 gloo processes against one EmbeddingStore."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.distributed import dist_scenarios
from tests.distributed.dist_harness import run_world

WORLDS = (1, 2, 3)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_world(
        world, dist_scenarios.SCENARIOS, "tests.distributed.dist_scenarios", tmp_path_factory.mktemp(f"w{world}")
    )


@pytest.mark.parametrize("scenario", dist_scenarios.SCENARIOS)
def test_scenario(world_results, scenario):
    world, results = world_results
    if results[scenario] is not None:
        pytest.fail(f"{scenario} failed in a world of {world}:\n{results[scenario]}")


@pytest.mark.parametrize(
    "save", ["scenario_train_and_save", "scenario_train_and_save_table_wise"], ids=["row-wise", "table-wise"]
)
def test_save_at_two_ranks_reopen_at_one_two_three(tmp_path, save):
    """A sharded store saved by 2 ranks reopens at 1, 2 and 3 ranks (resharding by bucket
    ranges, or by table placement) with every row, utility and optimizer state in
    place: training goes on bit for bit as one store fed the same global batches."""
    saved = run_world(2, [save], "tests.distributed.dist_scenarios", _workdir(tmp_path, "save"))
    assert saved[save] is None, saved[save]
    for world in (1, 2, 3):
        got = run_world(
            world, ["scenario_reopen_and_train"], "tests.distributed.dist_scenarios", _workdir(tmp_path, f"open{world}")
        )
        assert got["scenario_reopen_and_train"] is None, f"world {world}:\n{got['scenario_reopen_and_train']}"


def test_rank_killed_before_manifest_commit_leaves_previous_checkpoint(tmp_path):
    from fiited_store.distributed import ShardedEmbeddingStore

    run_world(
        2,
        ["scenario_killed_before_manifest_commit"],
        "tests.distributed.dist_scenarios",
        _workdir(tmp_path, "kill"),
        collective_timeout=20,
    )
    path = tmp_path / "sharded-store"
    # rank 1 saved its shard's second checkpoint; the global manifest still names the first
    assert (path / "w0002-shard-00001" / "ckpt-00000002").is_dir()
    single = dist_scenarios.replay_single(4, 2)
    with ShardedEmbeddingStore.open(path, "r") as reopened:  # this process: a world of one
        assert reopened.step_count == 4
        for name, ids in dist_scenarios.all_keys().items():
            np.testing.assert_array_equal(reopened.lookup(name, ids), single.lookup(name, ids), err_msg=name)


def _workdir(root, name):
    d = root / name
    d.mkdir()
    return d


def test_example_trains_under_torchrun(tmp_path):
    """The README's torchrun command: 2 ranks with uneven batch counts stop together and
    save one sharded store, which this process (a world of one) opens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fiited_store.distributed import ShardedEmbeddingStore

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(repo / "examples" / "train_distributed.py"),
        "--steps",
        "12",
        "--batch-size",
        "64",
        "--save",
        str(tmp_path / "store"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 steps on each of 2 ranks" in done.stdout, done.stdout
    with ShardedEmbeddingStore.open(tmp_path / "store") as store:
        stats = store.stats()
        assert stats["total"]["step"] == 12
        assert stats["tables"]["user"]["entries"] > 0 and stats["tables"]["item"]["entries"] > 0


def _saved_world_of_one(path):
    """A sharded store trained and saved by one process (a world of one, no process group)."""
    from fiited_store.distributed import ShardedEmbeddingStore

    with ShardedEmbeddingStore(dist_scenarios.TABLES, dist_scenarios.config(), path=path) as store:
        dist_scenarios._train(store, 0, 7)
        store.save()
        return {n: store.lookup(n, ids).copy() for n, ids in dist_scenarios.all_keys().items()}, store.stats()


def test_cli_reshard_inspect_verify_compact(tmp_path, capsys):
    from fiited_store.cli import main
    from fiited_store.distributed import ShardedEmbeddingStore

    path = tmp_path / "store"
    rows, stats = _saved_world_of_one(path)
    assert main(["reshard", str(path), "3", "--no-progress"]) == 0
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == [f"w0003-shard-0000{r}" for r in range(3)]
    assert main(["verify", str(path), "--no-progress"]) == 0
    assert "every invariant holds" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["world_size"] == 3 and len(info["shards"]) == 3
    assert info["total"]["entries"] == stats["total"]["entries"] == sum(s["entries"] for s in info["shards"])
    for name, t in info["tables"].items():
        assert t["resident_per_chunk"] == stats["tables"][name]["resident_per_chunk"]
        assert sum(t["kept_dim_histogram"].values()) == t["entries"]
    assert main(["inspect", str(path)]) == 0
    assert "sharded row-wise over 3 shards" in capsys.readouterr().out
    assert main(["compact", str(path), "--no-progress"]) == 0
    with ShardedEmbeddingStore.open(path) as store:  # back to a world of one: every row where it was
        for name, ids in dist_scenarios.all_keys().items():
            np.testing.assert_array_equal(store.lookup(name, ids), rows[name])


def test_verify_names_keys_in_the_wrong_shard(tmp_path, capsys):
    from fiited_store.cli import main

    path = tmp_path / "store"
    _saved_world_of_one(path)
    assert main(["reshard", str(path), "2", "--no-progress"]) == 0
    a, b = path / "w0002-shard-00000", path / "w0002-shard-00001"
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)  # each shard now holds the other's keys (and checkpoint names)
    manifest = json.loads((path / "fiited-sharded.json").read_text())
    names = [s["checkpoint"] for s in manifest["shards"]]
    for s, name in zip(manifest["shards"], reversed(names)):
        s["checkpoint"] = name
    (path / "fiited-sharded.json").write_text(json.dumps(manifest))
    assert main(["verify", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "w0002-shard-00000" in out and "route to buckets outside its range [0, 2048)" in out


@pytest.mark.parametrize("slack", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_a_bad_pool_slack_is_refused_by_name(slack):
    from fiited_store.distributed import ShardedEmbeddingStore
    from fiited_store.errors import ConfigError

    with pytest.raises(ConfigError, match="pool_slack must be a finite number >= 0, got"):
        ShardedEmbeddingStore(dist_scenarios.TABLES, dist_scenarios.config(), pool_slack=slack)


def test_the_manifest_keeps_the_pool_slack_and_refuses_a_corrupt_one(tmp_path):
    """Reopening at another world size builds shards with the slack the store was
    made with; a manifest without one (written before it existed) means none."""
    from fiited_store.distributed import ShardedEmbeddingStore
    from fiited_store.distributed.checkpoint import read_sharded_manifest
    from fiited_store.errors import CorruptStoreError

    path = tmp_path / "store"
    with ShardedEmbeddingStore(dist_scenarios.TABLES, dist_scenarios.config(), path=path, pool_slack=0.25) as store:
        store.save()
    manifest_file = path / "fiited-sharded.json"
    assert json.loads(manifest_file.read_text())["pool_slack"] == 0.25
    with ShardedEmbeddingStore.open(path) as reopened:
        assert reopened.pool_slack == 0.25
    doc = json.loads(manifest_file.read_text())
    del doc["pool_slack"]
    manifest_file.write_text(json.dumps(doc))
    assert read_sharded_manifest(path)["pool_slack"] == 0.0
    for bad in ("a lot", -1, None):
        manifest_file.write_text(json.dumps(dict(doc, pool_slack=bad)))
        with pytest.raises(CorruptStoreError, match=f"pool_slack {bad!r}"):
            ShardedEmbeddingStore.open(path)

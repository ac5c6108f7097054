"""The larger-than-memory bench at a tiny size: what it counts adds up, and it cleans up."""

from __future__ import annotations

import pytest

from fiited_store.errors import ConfigError
from fiited_store.experiments.bench.larger_than_memory import (
    LargerThanMemoryConfig,
    format_larger_than_memory_report,
    run_larger_than_memory_bench,
)

TINY = dict(
    scale=0.002,
    dim=16,
    chunks=4,
    budget_fraction=0.2,
    batch_size=64,
    steps=3,
    warmup=1,
    peer_steps=1,
    device_seconds=0.05,
    probe_bytes=4 << 20,
)


def test_a_tiny_run_reports_consistent_counts_and_leaves_nothing_behind(tmp_path):
    out = run_larger_than_memory_bench(LargerThanMemoryConfig(**TINY, directory=str(tmp_path)), progress=False)
    assert list(tmp_path.iterdir()) == []  # the store, the peer's maps and the probes are gone
    per = out["per_step"]
    assert per["read_requests"] > 0 and per["slots_read"] > 0  # the pool is a fifth of the model
    if out["device"]["direct"]:  # O_DIRECT reads whole blocks, at least one per request
        assert per["bytes_read"] >= 4096 * per["read_requests"]
    assert per["sync_fetched_chunks"] == 0  # every batch was prefetched
    assert 0.0 <= out["hit_rate"] <= 1.0
    assert out["disk"]["vs_live_tier_rows"] >= 1.0
    assert out["disk"]["tier_live_bytes"] > 0
    assert out["memory"]["in_memory_arrays"] > 0
    assert len(out["step_s"]["all"]) == TINY["steps"] and len(out["peer_step_s"]["all"]) == TINY["peer_steps"]
    report = format_larger_than_memory_report(out)
    assert "IO floor" in report and "memmap peer" in report


def test_a_pool_too_small_for_the_batches_in_flight_is_refused_before_any_work(tmp_path):
    cfg = LargerThanMemoryConfig(**(TINY | {"budget_fraction": 0.01}), directory=str(tmp_path))
    with pytest.raises(ConfigError, match="cannot hold 3 batches of 64 x 26 ids"):
        run_larger_than_memory_bench(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []

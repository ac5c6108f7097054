"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np


def snapshot(store) -> dict:
    """Copies of every array and counter of a store, to prove an error changed nothing."""
    b = store.backend
    snap = {f"entries.{k}": np.array(b.to_host(v)) for k, v in store.entries.arrays._asdict().items()}
    for p in store.pools:
        for k, v in p.arrays._asdict().items():
            snap[f"pool{p.plan.group}.{k}"] = np.array(b.to_host(v))
    for g, t in enumerate(store.tiers):
        if t is not None and t.keeps_owners:
            snap[f"tier{g}.owner"] = t.owner.copy()
            vec, st = t.read(np.arange(t.capacity))
            snap[f"tier{g}.vectors"], snap[f"tier{g}.states"] = vec, st
        elif t is not None:  # a segment tier: its live slots, read off the addresses
            from fiited_store import tiering

            # what is stored, not where: a save may seal and compact segments, moving slots
            entries, chunks, slots = tiering.spilled_chunks(store, g)
            snap[f"tier{g}.spilled"] = np.stack([entries, chunks])
            snap[f"tier{g}.vectors"], snap[f"tier{g}.states"] = t.read(slots)
            addr = snap["entries.addr"]
            addr[addr <= -2] = -2
    snap["counters"] = dict(vars(store.counters))
    snap["step"] = store.step_count
    snap["n_live"] = store.entries.n_live
    return snap


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        if isinstance(before[k], np.ndarray):
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
        else:
            assert before[k] == after[k], k


def train_steps(store, tables, steps: int, rng, batch: int = 32, id_range: int = 100, prune_every: int = 0) -> None:
    """A few training steps over every table with random ids and gradients."""
    names = [t.name for t in tables]
    for i in range(steps):
        ids = rng.integers(0, id_range, batch * len(names))
        offsets = np.arange(batch * len(names) + 1)
        b = store.pooled_lookup(names, ids, offsets, train=True)
        store.backward(b, rng.standard_normal(b.output.shape).astype(np.float32))
        store.step()
        if prune_every and (i + 1) % prune_every == 0:
            store.prune()


def reseal(path) -> None:
    """Recompute the digests of ``path``'s current checkpoint and its manifest, as if the
    store had been written this way (a writer's bug rather than an edit afterwards), so
    that a test reaches the checks behind the digests."""
    import json
    from pathlib import Path

    from fiited_store.storage import checkpoint, digests

    path = Path(path)
    doc = json.loads((path / checkpoint.MANIFEST).read_text())
    ckpt = path / doc["checkpoint"]
    sha = digests.write_digests(ckpt)
    (path / checkpoint.MANIFEST).write_bytes(checkpoint.manifest_bytes(doc["checkpoint"], doc["format_version"], sha))

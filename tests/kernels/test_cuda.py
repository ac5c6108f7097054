"""The CUDA backend: same results as the CPU backend on the same inputs.

On a machine without a GPU these run under numba's CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM=1 unless it is set already), which is slow, so the inputs are
tiny. benchmarks/gpu_check.sh runs this file on a real GPU with the simulator off.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fiited_store import (
    DynamicRatio,
    EmbeddingStore,
    InputDTypeError,
    InputShapeError,
    ManualRatios,
    NonFiniteGradientError,
    StoreConfig,
    TableConfig,
)
from fiited_store.verify import check_store
from tests.helpers import assert_unchanged, snapshot

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

TABLES = [
    TableConfig("a", dim=8, chunks=2, num_embeddings=24, optimizer="adagrad", learning_rate=0.1),
    TableConfig("b", dim=4, chunks=1, num_embeddings=24, optimizer="rowwise_adagrad", learning_rate=0.1),
    TableConfig("c", dim=8, chunks=4, num_embeddings=24, optimizer="sgd", learning_rate=0.1),
]

# bitwise on a real GPU but for the fused multiply-adds the compiler may form; the
# simulator emulates fma in two roundings
TOL = dict(rtol=1e-5, atol=1e-6)
TWO_CHUNKS = [TABLES[0], TableConfig("d", dim=4, chunks=2, num_embeddings=24, optimizer="sgd", learning_rate=0.1)]


def with_index(tables, index):
    return [dataclasses.replace(t, index=index) for t in tables]


def pair(config: StoreConfig, tables=TABLES, index="auto"):
    tables = with_index(tables, index)
    cpu = EmbeddingStore(tables, config)
    gpu = EmbeddingStore(tables, StoreConfig(**{**config.__dict__, "device": "cuda"}))
    return cpu, gpu


def same_stream(stores, steps, seed=0, id_range=24, batch=6, prune_at=()):
    names = [t.name for t in stores[0].tables]
    for s in stores:
        rng = np.random.default_rng(seed)
        for step in range(steps):
            lengths = rng.integers(0, 3, len(names) * batch)
            ids = rng.integers(0, id_range, int(lengths.sum()))
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            b = s.pooled_lookup(names, ids, offsets, train=True)
            s.backward(b, rng.standard_normal(b.output.shape).astype(np.float32))
            s.step()
            if step in prune_at:
                s.prune()


def assert_same(cpu, gpu, residency=True):
    for t in cpu.tables:
        ids = np.arange(24)
        np.testing.assert_allclose(gpu.backend.to_host(gpu.lookup(t.name, ids)), cpu.lookup(t.name, ids), **TOL)
        np.testing.assert_allclose(gpu.utilities(t.name, ids), cpu.utilities(t.name, ids), **TOL)
        if residency:
            ec, _ = cpu.entries.find(np.full(24, cpu.table_index(t.name), np.int16), ids)
            eg, _ = gpu.entries.find(
                gpu.backend.from_host(np.full(24, gpu.table_index(t.name), np.int16)), gpu.backend.from_host(ids)
            )
            eg = gpu.backend.to_host(eg)
            np.testing.assert_array_equal(ec >= 0, eg >= 0)
            ac = cpu.entries.arrays.addr[ec[ec >= 0]] >= 0
            ag = gpu.backend.to_host(gpu.entries.arrays.addr)[eg[eg >= 0]] >= 0
            np.testing.assert_array_equal(ac, ag)
    assert cpu.stats()["total"]["entries"] == gpu.stats()["total"]["entries"]
    assert check_store(gpu) == []


@pytest.mark.parametrize("index", ["direct", "hashed"])
@pytest.mark.parametrize(
    "name, config",
    [
        (
            "prune-discard",
            StoreConfig(pruning=DynamicRatio(0.6), prune_period=3, sample_size=1000, initial_capacity=16),
        ),
        (
            "prune-manual-spill",
            StoreConfig(
                pruning=ManualRatios((0.3, 0.9)),
                budget_fraction=0.4,
                prune_period=2,
                sample_size=1000,
                on_evict="spill",
                utility="shared",
                initial_capacity=16,
            ),
        ),
        (
            "prune-fresh-readmission",
            StoreConfig(
                pruning=DynamicRatio(0.6), prune_period=2, sample_size=1000, initial_capacity=16, readmission="fresh"
            ),
        ),
    ],
)
def test_prune_mode_matches_the_cpu(name, config, index):
    tables = TWO_CHUNKS if "manual" in name else TABLES
    cpu, gpu = pair(config, tables, index)
    same_stream([cpu, gpu], 6, prune_at=(4,))
    assert_same(cpu, gpu)
    assert gpu.counters.evicted_chunks > 0
    assert gpu.counters.rehashes >= 1 if index == "hashed" else gpu.counters.rehashes == 0
    cpu.close(), gpu.close()


@pytest.mark.parametrize("index", ["direct", "hashed"])
def test_cache_mode_matches_the_cpu(index):
    cpu, gpu = pair(StoreConfig(mode="cache", budget_fraction=0.5, prune_period=3, initial_capacity=64), index=index)
    same_stream([cpu, gpu], 5, batch=4)
    assert gpu.counters.spilled_chunks > 0
    assert_same(cpu, gpu, residency=False)
    cpu.close(), gpu.close()


def test_insert_dedupes_and_survives_one_bucket():
    from tests.test_entry_table import home_buckets

    cand = np.arange(200_000, dtype=np.int64)
    same = cand[home_buckets(0, cand, 64) == 5][:40]
    ids = np.concatenate([same, same[::-1], same[:7]])  # every key in one bucket, each three times
    cfg = StoreConfig(budget_bytes=16 * 1024, prune_period=0, initial_capacity=64)
    cpu, gpu = pair(cfg, [TableConfig("t", dim=4, chunks=1)])
    a = cpu.find_or_insert("t", ids)
    b = gpu.backend.to_host(gpu.find_or_insert("t", ids))
    np.testing.assert_array_equal(a, b)  # same initial values: a function of the key only
    assert gpu.entries.n_live == cpu.entries.n_live == 40
    assert check_store(gpu) == []


@pytest.mark.parametrize("index", ["direct", "hashed"])
def test_erase_weights_and_dead_entries_match_the_cpu(index):
    cfg = StoreConfig(
        pruning=DynamicRatio(0.8), budget_bytes=64, prune_period=0, gamma=0.5, drop_floor=0.2, initial_capacity=64
    )
    cpu, gpu = pair(cfg, TABLES[:1], index)
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 1])
    w = np.linspace(0.5, 2.0, 8).astype(np.float32)
    for s in (cpu, gpu):
        b = s.pooled_lookup("a", ids, np.array([0, 3, 8]), per_sample_weights=w, train=True)
        g = np.ones((2, 8), np.float32)
        wg = s.backend.to_host(s.per_sample_weight_grads(b, g))
        s.backward(b, g)
        s.step()
        s.erase("a", np.array([2, 3]))
        for _ in range(4):
            s.step()  # utilities decay below the floor
        s.prune()  # evicts, then drops entries with nothing left
        s.__dict__.setdefault("_wg", wg)
    np.testing.assert_allclose(gpu._wg, cpu._wg, **TOL)
    assert gpu.counters.dropped_entries == cpu.counters.dropped_entries > 0
    assert_same(cpu, gpu)


def test_out_of_range_ids_raise_on_the_gpu_and_change_nothing():
    from fiited_store import IdOutOfRangeError

    gpu = EmbeddingStore(TABLES, StoreConfig(budget_fraction=0.5, prune_period=0, device="cuda"))
    same_stream([gpu], 1)
    before = snapshot(gpu)
    with pytest.raises(IdOutOfRangeError, match=r"id 24 \(at position 2\) is out of range for table 'b'"):
        gpu.pooled_lookup(["a", "b"], np.array([3, 5, 24, -1]), np.array([0, 1, 2, 3, 4]), train=True)
    assert_unchanged(before, snapshot(gpu))


def test_non_finite_gradient_changes_nothing_on_the_gpu():
    gpu = EmbeddingStore(TABLES, StoreConfig(budget_fraction=0.5, prune_period=0, device="cuda", initial_capacity=64))
    same_stream([gpu], 1)
    b = gpu.pooled_lookup("a", np.array([1, 2]), np.array([0, 1, 2]), train=True)
    grad = np.ones((2, 8), np.float32)
    grad[1, 3] = np.nan
    before = snapshot(gpu)
    with pytest.raises(NonFiniteGradientError, match=r"grad_out\[1, 3\] = nan"):
        gpu.backward(b, grad)
    assert_unchanged(before, snapshot(gpu))


def test_a_gradient_whose_square_overflows_changes_nothing_on_the_gpu():
    gpu = EmbeddingStore(TABLES, StoreConfig(budget_fraction=0.5, prune_period=0, device="cuda", initial_capacity=64))
    same_stream([gpu], 1)
    b = gpu.pooled_lookup("a", np.array([1, 2]), np.array([0, 1, 2]), train=True)
    grad = np.ones((2, 8), np.float32)
    grad[1, 3] = 3e38
    before = snapshot(gpu)
    with pytest.raises(NonFiniteGradientError, match=r"grad_out\[1, 3\] = .*overflow float32 when squared"):
        gpu.backward(b, grad)
    assert_unchanged(before, snapshot(gpu))


def test_a_checkpoint_written_on_the_gpu_opens_on_the_cpu(tmp_path):
    gpu = EmbeddingStore(
        TABLES,
        StoreConfig(pruning=DynamicRatio(0.5), prune_period=3, device="cuda", on_evict="spill", initial_capacity=64),
        path=tmp_path / "s",
    )
    same_stream([gpu], 4, prune_at=(2,))
    expect = {t.name: gpu.backend.to_host(gpu.lookup(t.name, np.arange(24))) for t in TABLES}
    gpu.save()
    gpu.close()
    with EmbeddingStore.open(tmp_path / "s", "r", device="cpu") as cpu:
        for name, rows in expect.items():
            np.testing.assert_array_equal(cpu.lookup(name, np.arange(24)), rows)
        assert check_store(cpu) == []


def test_adapter_on_the_cuda_backend_matches_the_cpu_module():
    from fiited_store.adapters import FiitedEmbeddingBag

    mods = [
        FiitedEmbeddingBag(
            24,
            8,
            chunks=2,
            mode="sum",
            optimizer="sgd",
            learning_rate=0.1,
            store_config=StoreConfig(budget_fraction=1.0, prune_period=0, device=dev, initial_capacity=64),
        )
        for dev in ("cpu", "cuda")
    ]
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = torch.from_numpy(rng.integers(0, 24, 10))
        offsets = torch.tensor([0, 4, 7])
        target = torch.randn(3, 8)
        outs = []
        for m in mods:
            out = m(ids, offsets)
            (out * target).sum().backward()
            outs.append(out.detach().cpu())
        torch.testing.assert_close(outs[1], outs[0], **TOL)
    final = [m.store.backend.to_host(m.store.lookup("table", np.arange(24))) for m in mods]
    np.testing.assert_allclose(final[1], final[0], **TOL)


# ------------------------------------------------------------------ requests checked on the device


def _device_kinds():
    from fiited_store.kernels.cuda import SIMULATED

    # torch CUDA tensors exist only on a real GPU; numba device arrays exist on both
    return ["numba"] if SIMULATED else ["numba", "torch"]


def to_device(a, kind):
    from numba import cuda

    return (
        cuda.to_device(np.ascontiguousarray(a)) if kind == "numba" else torch.from_numpy(np.ascontiguousarray(a)).cuda()
    )


@pytest.fixture
def no_host_copies(monkeypatch):
    """Fail any request check that would bring a device array to the host."""
    import fiited_store.inputs as inputs

    def refuse(x):
        if isinstance(x, np.ndarray):
            return x
        raise AssertionError(f"{type(x).__name__} was copied to the host for checking")

    monkeypatch.setattr(inputs, "as_host", refuse)


@pytest.mark.parametrize("kind", _device_kinds())
def test_device_inputs_are_checked_on_the_device_and_train_like_host_inputs(kind, no_host_copies):
    cfg = StoreConfig(pruning=DynamicRatio(0.5), prune_period=2, device="cuda", initial_capacity=64)
    fed_host, fed_device = (EmbeddingStore(TABLES, cfg) for _ in range(2))
    names = [t.name for t in TABLES]
    rng = np.random.default_rng(3)
    for _step in range(4):
        lengths = rng.integers(0, 3, len(names) * 4)
        ids = rng.integers(0, 24, int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        weights = rng.random(ids.shape[0])
        grad = rng.standard_normal((4, 20)).astype(np.float32)
        a = fed_host.pooled_lookup(names, ids, offsets, weights.astype(np.float32), train=True)
        # int32 ids and int32 offsets and float64 weights: widened on the device
        b = fed_device.pooled_lookup(
            names,
            to_device(ids.astype(np.int32), kind),
            to_device(offsets.astype(np.int32), kind),
            to_device(weights, kind),
            train=True,
        )
        np.testing.assert_array_equal(fed_device.backend.to_host(b.output), fed_host.backend.to_host(a.output))
        fed_host.backward(a, grad)
        fed_device.backward(b, grad)
        fed_host.step()
        fed_device.step()
        # the direct-index fast path (no training, plain sum) takes device ids too
        np.testing.assert_array_equal(
            fed_device.backend.to_host(
                fed_device.pooled_lookup(names, to_device(ids, kind), to_device(offsets, kind)).output
            ),
            fed_host.backend.to_host(fed_host.pooled_lookup(names, ids, offsets).output),
        )
    for t in TABLES:
        np.testing.assert_array_equal(
            fed_device.backend.to_host(fed_device.lookup(t.name, np.arange(24))),
            fed_host.backend.to_host(fed_host.lookup(t.name, np.arange(24))),
        )


BAD_REQUESTS = {
    "offsets not from 0": (np.array([1, 2, 3]), np.array([1, 2, 3, 3]), None),
    "offsets not to nnz": (np.array([1, 2, 3]), np.array([0, 1, 2, 2]), None),
    "offsets decrease": (np.array([1, 2, 3]), np.array([0, 2, 1, 3]), None),
    "nan weight": (np.array([1, 2, 3]), np.array([0, 1, 2, 3]), np.array([0.5, np.nan, 1.0], np.float32)),
    "inf weight, float64": (np.array([1, 2, 3]), np.array([0, 1, 2, 3]), np.array([0.5, 1.0, -np.inf])),
    "float ids": (np.array([1.0, 2.0, 3.0]), np.array([0, 1, 2, 3]), None),
    "2-D ids": (np.array([[1, 2, 3]]), np.array([0, 1, 2, 3]), None),
    "bool offsets": (np.array([1, 2, 3]), np.array([False, True, True, True]), None),
    "weights of another length": (np.array([1, 2, 3]), np.array([0, 1, 2, 3]), np.ones(2, np.float32)),
    "offsets of another feature count": (np.array([1, 2, 3]), np.array([0, 1, 3]), None),
    "uint64 id past int64": (np.array([1, 2**63 + 5, 3], np.uint64), np.array([0, 1, 2, 3]), None),
}


@pytest.mark.parametrize(
    "case, kind",
    [
        (c, k)
        for c in sorted(BAD_REQUESTS)
        for k in _device_kinds()
        if not (k == "torch" and BAD_REQUESTS[c][0].dtype == np.uint64)
    ],
)
def test_bad_device_requests_raise_the_host_error_and_change_nothing(case, kind, no_host_copies):
    ids, offsets, weights = BAD_REQUESTS[case]
    gpu = EmbeddingStore(TABLES, StoreConfig(budget_fraction=0.5, prune_period=0, device="cuda", initial_capacity=64))
    names = ["a", "b", "c"]
    same_stream([gpu], 1)
    before = snapshot(gpu)
    with pytest.raises(Exception) as host_err:
        gpu.pooled_lookup(names, ids, offsets, weights, train=True)
    dev = [to_device(a, kind) if a is not None else None for a in (ids, offsets, weights)]
    assert isinstance(host_err.value, (InputDTypeError, InputShapeError, NonFiniteGradientError))
    with pytest.raises(type(host_err.value)) as dev_err:
        gpu.pooled_lookup(names, *dev, train=True)
    assert str(dev_err.value) == str(host_err.value)
    assert_unchanged(before, snapshot(gpu))


def test_victims_with_pins_in_any_order_and_free_slot_order_match_the_cpu():
    """pick_victims takes its pinned entries unsorted, with repeats (a batch and the next
    one's, concatenated); evicted slots come back in eviction order. Both backends agree."""
    from fiited_store.backend import get_backend

    rng = np.random.default_rng(5)
    S, E, K = 64, 20, 4
    owner = np.full(S, -1, np.int64)
    addr = np.full((E, K), -1, np.int32)
    slots = rng.permutation(S)[: E * K // 2]
    for i, s in enumerate(slots):  # 40 resident chunks over 10 entries
        e, k = divmod(i, K)
        owner[s], addr[e, k] = e, s
    util = np.array([0x0000, 0x4000, 0x4100], np.uint16)[rng.integers(0, 3, (E, K))]  # bfloat16 0, 2, 8: ties
    pinned = np.array([7, 3, 3, 9, 7, 0], np.int64)
    results = []
    for name in ("cpu", "cuda"):
        b = get_backend(name)
        d_owner, d_addr = b.from_host(owner.copy()), b.from_host(addr.copy())
        out_e, out_k = b.empty(12, np.int64), b.empty(12, np.int64)
        n, nxt = b.k.pick_victims(
            d_owner, d_addr, b.from_host(util), b.from_host(pinned), np.float32(3.0), 5, out_e, out_k
        )
        ev_e, ev_k = b.to_host(out_e)[:n], b.to_host(out_k)[:n]
        stack, n_free = b.from_host(np.zeros(S, np.int64)), b.from_host(np.zeros(1, np.int64))
        b.k.commit_evictions(
            b.from_host(ev_e), b.from_host(ev_k), b.empty(0, np.int64), d_addr, d_owner, stack, n_free, K
        )
        results.append((int(n), int(nxt), ev_e, ev_k, b.to_host(stack)[: int(b.to_host(n_free)[0])]))
    (n, nxt, ev_e, ev_k, stack), gpu = results
    assert n > 0 and not np.isin(ev_e, pinned).any()
    assert (n, nxt) == gpu[:2]
    for a, g in zip((ev_e, ev_k, stack), gpu[2:]):
        np.testing.assert_array_equal(a, g)
    # the stack's top is the first victim's slot: the next allocation takes it first
    assert stack[-1] == addr[ev_e[0], ev_k[0]] and stack[0] == addr[ev_e[-1], ev_k[-1]]


def test_prune_lists_and_allocation_ranks_match_the_cpu():
    from fiited_store.backend import get_backend
    from fiited_store.kernels import cpu
    from tests.test_prune import _prune_inputs

    s, thr = _prune_inputs()
    ea, m = s.entries.arrays, s.meta
    host = cpu.prune_lists(
        ea.row_base,
        ea.seen,
        ea.table_ids,
        ea.addr,
        ea.util,
        m["table_chunks"],
        m["table_group"],
        0,
        thr,
        np.empty((cpu.SCAN_BLOCKS, 3), np.int64),
    )
    g = get_backend("cuda")
    d = {k: g.from_host(np.asarray(v)) for k, v in ea._asdict().items()}
    tc, tg, dthr = g.from_host(m["table_chunks"]), g.from_host(m["table_group"]), g.from_host(thr)
    dev = g.k.prune_lists(
        d["row_base"],
        d["seen"],
        d["table_ids"],
        d["addr"],
        d["util"],
        tc,
        tg,
        0,
        dthr,
        g.empty((cpu.SCAN_BLOCKS, 3), np.int64),
    )
    assert dev[:3] == host[:3]
    # the GPU lists in any order: compare as sets of (entry, chunk)
    for (he, hk), (de, dk) in (((host[3], host[4]), dev[3:5]), ((host[5], host[6]), dev[5:7])):
        de, dk = g.to_host(de), g.to_host(dk)
        assert sorted(zip(he.tolist(), hk.tolist())) == sorted(zip(de.tolist(), dk.tolist()))
    al_e, al_k = host[5], host[6]
    want = np.empty(al_e.shape[0], np.uint64)
    cpu.allocation_ranks(ea.row_base, ea.seen, ea.keys, ea.table_ids, ea.util, thr, al_e, al_k, want)
    out = g.empty(al_e.shape[0], np.uint64)
    g.k.allocation_ranks(
        d["row_base"], d["seen"], d["keys"], d["table_ids"], d["util"], dthr, g.from_host(al_e), g.from_host(al_k), out
    )
    np.testing.assert_array_equal(g.to_host(out), want)
    s.close()

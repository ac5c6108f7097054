"""A slow, obviously-correct model of the store: a dict of rows, plain Python loops.

It follows the semantics written in docs/design.md and the docstrings, with the same
float32 arithmetic in the same order as the kernels (gradient sums in batch order,
fused multiply-adds where torch's optimizers use them, utilities kept on the same
gamma**-steps scale), so the two can be compared for exact equality. It shares no
code with the kernels; it reuses only the configuration objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fiited_store.config import DynamicRatio, StoreConfig, TableConfig, plan_pools

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB
C3 = 0xD6E8FEB86659FD93
f32 = np.float32


def mix64(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * C1) & MASK
    z = ((z ^ (z >> 27)) * C2) & MASK
    return z ^ (z >> 31)


def key_hash(t: int, key: int) -> int:
    return mix64((key & MASK) ^ (((t + 1) * GOLDEN) & MASK))


def chunk_hash31(t: int, key: int, k: int) -> int:
    return mix64((key_hash(t, key) + k * C3) & MASK) >> 33


def unit(h: int) -> float:
    return (h >> 11) * (1.0 / 9007199254740992.0)


def init_value(seed: int, t: int, key: int, k: int, j: int, kind: str, scale: float) -> np.float32:
    h = mix64(key_hash(t, key) ^ mix64((seed + (((k * 65536 + j) * C3) & MASK)) & MASK))
    if kind == "uniform":
        return f32(scale * (2.0 * unit(h) - 1.0))
    if kind == "normal":
        u1 = 1.0 - unit(h)
        u2 = unit(mix64(h ^ GOLDEN))
        return f32(scale * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return f32(0.0)


def bf16_round(x, r16: int) -> np.float32:
    """x >= 0 to bfloat16 (kept as a float32), rounded up with probability (dropped bits) / 2**16."""
    b = int(np.float32(x).view(np.uint32))
    return np.array([((b + r16) >> 16) << 16], np.uint32).view(np.float32)[0]


def bf16_nearest(x) -> np.float32:
    b = int(np.float32(x).view(np.uint32))
    return np.array([((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16], np.uint32).view(np.float32)[0]


def rand16(kh: int, k: int, salt: int) -> int:
    return mix64(kh ^ salt ^ (((k + 1) * C3) & MASK)) >> 48


def fma(a, b, c) -> np.float32:
    """float32 fused multiply-add, rounded once.

    The product of two float32 is exact in float64, the sum is not: rounding it to
    float64 and then to float32 rounds twice. That can only go wrong when the float64
    sum lands exactly halfway between two float32 (every such midpoint is a float64,
    so the first rounding can reach one but never cross it); there the exact sum
    decides which neighbour is nearest."""
    x = float(a) * float(b) + float(c)
    r = f32(x)
    if not np.isfinite(r) or float(r) == x:
        return r
    other = np.nextafter(r, f32(np.inf) if x > float(r) else f32(-np.inf))
    if abs(float(other) - x) != abs(float(r) - x):
        return r
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == Fraction(x):
        return r  # a true tie: round half to even, as f32() did
    up, down = (other, r) if float(other) > x else (r, other)
    return up if exact > Fraction(x) else down


@dataclass
class Row:
    table: int
    key: int
    vec: list  # per chunk: float32[c] when resident, else None
    state: list  # per chunk: optimizer state float32[w] when resident
    spilled: list  # per chunk: (vec, state) kept on disk, or None
    util: np.ndarray  # float32[U], on the store's scale


@dataclass
class RefBatch:
    feats: list
    ids: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None
    mean: bool
    B: int
    output: np.ndarray


class ReferenceStore:
    def __init__(self, tables: list[TableConfig], config: StoreConfig):
        self.tables = tables
        self.config = config
        self.plans = plan_pools(tables, config)
        self.group_of = {t: p.group for p in self.plans for t in p.tables}
        self.free = {p.group: p.slots for p in self.plans}
        self.rows: dict[tuple[int, int], Row] = {}
        self.kmax = max(t.chunks for t in tables)
        self.U = self.kmax if config.utility == "gradient" else 1
        self.step_count = 0
        self.origin = 0
        self.round = 0
        self.cache = config.mode == "cache"

    # --------------------------------------------------------------- helpers
    def _new_chunk(self, r: Row, k: int, readmit: bool = False) -> None:
        t = self.tables[r.table]
        c = t.chunk_width
        seed, kind = self.config.seed, t.initializer
        if readmit and self.config.readmission == "zero":
            kind = "zeros"
        elif readmit and self.config.readmission == "fresh":
            seed = mix64(self.config.seed ^ mix64(self.round + GOLDEN)) >> 1
        r.vec[k] = np.array([init_value(seed, r.table, r.key, k, j, kind, t.scale) for j in range(c)], f32)
        r.state[k] = np.zeros(self.plans[self.group_of[r.table]].state_width, f32)

    def _util(self, r: Row, k: int) -> np.float32:
        return r.util[k] if self.U > 1 else r.util[0]

    def row_values(self, t: int, key: int) -> np.ndarray:
        tc = self.tables[t]
        out = np.zeros(tc.dim, f32)
        r = self.rows.get((t, key))
        if r is None:
            return out
        for k in range(tc.chunks):
            v = r.vec[k]
            if v is None and self.cache and r.spilled[k] is not None:
                v = r.spilled[k][0]
            if v is not None:
                out[k * tc.chunk_width : (k + 1) * tc.chunk_width] = v
        return out

    # --------------------------------------------------------------- forward
    def pooled_lookup(self, feats, ids, offsets, weights=None, mode="sum", train=False) -> RefBatch:
        F = len(feats)
        B = (len(offsets) - 1) // F
        if train:
            new = []
            for bag in range(F * B):
                t = feats[bag // B]
                for i in range(offsets[bag], offsets[bag + 1]):
                    key = int(ids[i])
                    if (t, key) not in self.rows:
                        K = self.tables[t].chunks
                        self.rows[(t, key)] = Row(t, key, [None] * K, [None] * K, [None] * K, np.zeros(self.U, f32))
                        new.append((t, key))
            if self.cache:
                for tk in new:
                    r = self.rows[tk]
                    for k in range(len(r.vec)):
                        self._new_chunk(r, k)
            else:
                for tk in new:
                    r = self.rows[tk]
                    g = self.group_of[r.table]
                    for k in range(len(r.vec)):
                        if self.free[g] == 0:
                            break
                        self.free[g] -= 1
                        self._new_chunk(r, k)
        dims = [self.tables[t].dim for t in feats]
        cols = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(int)
        out = np.zeros((B, sum(dims)), f32)
        for bag in range(F * B):
            f, b = divmod(bag, B)
            t = feats[f]
            tc = self.tables[t]
            c = tc.chunk_width
            acc = np.zeros(tc.dim, f32)
            for i in range(offsets[bag], offsets[bag + 1]):
                r = self.rows.get((t, int(ids[i])))
                if r is None:
                    continue
                for k in range(tc.chunks):
                    v = r.vec[k]
                    if v is None and self.cache and r.spilled[k] is not None:
                        v = r.spilled[k][0]
                    if v is None:
                        continue
                    for j in range(c):
                        if weights is not None:
                            acc[k * c + j] = fma(v[j], weights[i], acc[k * c + j])
                        else:
                            acc[k * c + j] = f32(acc[k * c + j] + v[j])
            n = offsets[bag + 1] - offsets[bag]
            if mode == "mean" and n > 0:
                acc = (acc / f32(n)).astype(f32)
            out[b, cols[f] : cols[f] + tc.dim] = acc
        return RefBatch(list(feats), np.array(ids), np.array(offsets), weights, mode == "mean", B, out)

    # --------------------------------------------------------------- backward
    def growth(self) -> float:
        g = self.config.gamma ** -(self.step_count - self.origin)
        if g > 1e18:
            self.fold()
            g = 1.0
        return g

    def fold(self) -> None:
        steps = self.step_count - self.origin
        if steps:
            factor = self.config.gamma**steps
            for r in self.rows.values():
                r.util = np.array([bf16_nearest(f32(float(u) * factor)) for u in r.util], f32)
            self.origin = self.step_count

    def backward(self, batch: RefBatch, grad: np.ndarray) -> None:
        F, B = len(batch.feats), batch.B
        dims = [self.tables[t].dim for t in batch.feats]
        cols = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(int)
        occ: dict[tuple[int, int], list[int]] = {}
        bag_of = {}
        for bag in range(F * B):
            t = batch.feats[bag // B]
            for i in range(batch.offsets[bag], batch.offsets[bag + 1]):
                key = (t, int(batch.ids[i]))
                if key in self.rows:
                    occ.setdefault(key, []).append(i)
                    bag_of[i] = bag
        growth = self.growth()
        for key, occs in occ.items():
            r = self.rows[key]
            tc = self.tables[r.table]
            c, D = tc.chunk_width, tc.dim
            g = np.zeros(D, f32)
            for i in occs:
                bag = bag_of[i]
                f, b = divmod(bag, B)
                row = grad[b, cols[f] : cols[f] + D]
                if batch.weights is not None:
                    g = (g + f32(batch.weights[i]) * row).astype(f32)
                elif batch.mean:
                    w = f32(1.0) / f32(batch.offsets[bag + 1] - batch.offsets[bag])
                    g = (g + row * w).astype(f32)
                else:
                    g = (g + row).astype(f32)
            a = float(len(occs))
            mode = self.config.utility
            # utilities are bfloat16, rounded stochastically with bits from (key, chunk, step)
            kh = key_hash(r.table, r.key)
            salt = mix64(self.config.seed ^ mix64(self.step_count + 1))
            if mode == "gradient":
                for k in range(tc.chunks):
                    sq = sum(float(x) * float(x) for x in g[k * c : (k + 1) * c])
                    r.util[k] = bf16_round(f32(r.util[k] + f32(a * math.sqrt(sq) * growth)), rand16(kh, k, salt))
            elif mode == "access":
                r.util[0] = bf16_round(f32(r.util[0] + f32(a * growth)), rand16(kh, 0, salt))
            else:
                sq = sum(float(x) * float(x) for x in g)
                r.util[0] = bf16_round(f32(r.util[0] + f32(a * math.sqrt(sq) * growth)), rand16(kh, 0, salt))
            lr, eps = f32(-tc.learning_rate), f32(tc.eps)
            for k in range(tc.chunks):
                v = r.vec[k]
                if v is None:
                    continue
                gk = g[k * c : (k + 1) * c]
                st = r.state[k]
                if tc.optimizer == "sgd":
                    r.vec[k] = np.array([fma(lr, gk[j], v[j]) for j in range(c)], f32)
                elif tc.optimizer == "adagrad":
                    new_v = np.empty(c, f32)
                    for j in range(c):
                        st[j] = f32(st[j] + f32(gk[j] * gk[j]))
                        new_v[j] = fma(lr, f32(gk[j] / f32(f32(np.sqrt(st[j])) + eps)), v[j])
                    r.vec[k] = new_v
                else:
                    sq32 = f32(0.0)
                    for j in range(c):
                        sq32 = f32(sq32 + f32(gk[j] * gk[j]))
                    st[0] = f32(st[0] + f32(sq32 / f32(c)))
                    mult = f32(lr / f32(f32(np.sqrt(st[0])) + eps))
                    r.vec[k] = np.array([fma(mult, gk[j], v[j]) for j in range(c)], f32)

    def step(self) -> None:
        self.step_count += 1
        T = self.config.prune_period
        if T and self.step_count % T == 0:
            self.prune()

    # --------------------------------------------------------------- prune
    def floors(self) -> list[int]:
        small = self.config.small_table_rows
        return [
            t.chunks if small and t.num_embeddings is not None and t.num_embeddings <= small else t.min_chunks
            for t in self.tables
        ]

    def thresholds(self, plan) -> np.ndarray:
        """float32[tables, kmax]: -inf for a table's floor chunks; per-table scales under "mean"."""
        cfg = self.config
        kmax, T = self.kmax, len(self.tables)
        rows = [r for r in self.rows.values() if self.group_of[r.table] == plan.group]
        n = len(rows)
        if n <= cfg.sample_size:
            accept = MASK
        else:
            accept = int(cfg.sample_size / n * 2.0**64)
        salt = mix64(cfg.seed ^ mix64(self.round + GOLDEN))
        sample = [r for r in rows if mix64(key_hash(r.table, r.key) ^ salt) < accept]
        K = [self.tables[t].chunks if t in plan.tables else 0 for t in range(T)]
        held = [sum(1 for r in rows if r.table == t) for t in range(T)]
        undeclared = any(self.tables[t].num_embeddings is None for t in plan.tables)
        pop = [
            held[t] if undeclared or t not in plan.tables else max(held[t], self.tables[t].num_embeddings)
            for t in range(T)
        ]
        floors = [min(f, K[t]) for t, f in enumerate(self.floors())]
        scale = [1.0] * T
        if cfg.table_normalization == "mean":
            for t in range(T):
                v = [self._util(r, k) for r in sample if r.table == t for k in range(len(r.vec))]
                m = math.fsum(float(x) for x in v) / len(v) if v else 0.0
                scale[t] = m if m > 0 else 1.0
        thr = np.zeros((T, kmax), f32)
        for t in range(T):
            thr[t, : floors[t]] = -np.inf

        def value(r, k):
            u = self._util(r, k)
            return u / f32(scale[r.table]) if cfg.table_normalization == "mean" else u

        def cut(values, budget, contenders):
            if len(values) == 0 or contenders <= 0:
                return 0.0
            keep = budget / contenders
            if keep <= 0:
                return np.inf
            if keep >= 1:
                return 0.0
            return float(np.quantile(np.array(values, f32), 1.0 - keep))

        def put(t, k, q):
            thr[t, k] = f32(q * scale[t]) if cfg.table_normalization == "mean" else f32(q)

        p = cfg.pruning
        if isinstance(p, DynamicRatio):
            budget = (1.0 - p.ratio) * sum(pop[t] * K[t] for t in range(T)) - sum(held[t] * floors[t] for t in range(T))
            contenders = sum(held[t] * (K[t] - floors[t]) for t in range(T))
            values = [value(r, k) for r in sample for k in range(floors[r.table], len(r.vec))]
            q = cut(values, budget, contenders)
            for t in range(T):
                for k in range(floors[t], K[t]):
                    put(t, k, q)
            return thr
        for k in range(kmax):
            if not any(k < K[t] for t in range(T)):
                continue
            budget = (1.0 - p.per_chunk[k]) * sum(pop[t] for t in range(T) if k < K[t]) - sum(
                held[t] for t in range(T) if k < floors[t]
            )
            contenders = sum(held[t] for t in range(T) if floors[t] <= k < K[t])
            values = [value(r, k) for r in sample if floors[r.table] <= k < len(r.vec)]
            q = cut(values, budget, contenders)
            for t in range(T):
                if floors[t] <= k < K[t]:
                    put(t, k, q)
        return thr

    def prune(self) -> None:
        self.fold()
        self.round += 1
        if self.cache:
            return  # cache mode moves chunks between tiers; no value changes
        for plan in self.plans:
            g = plan.group
            rows = [r for r in self.rows.values() if self.group_of[r.table] == g]
            if not rows:
                continue
            thr = self.thresholds(plan)
            qualify = []
            for r in rows:
                for k in range(len(r.vec)):
                    u = self._util(r, k)
                    resident = r.vec[k] is not None
                    t_k = thr[r.table, k]
                    if t_k == -np.inf or ((u >= t_k) if resident else (u > t_k)):
                        # a floor chunk ranks above every utility
                        ubits = 0xFFFFFFFF if t_k == -np.inf else int(np.array([u], f32).view(np.uint32)[0])
                        rank = (ubits << 32) | (int(resident) << 31) | chunk_hash31(r.table, r.key, k)
                        qualify.append((rank, r, k))
            qualify.sort(key=lambda x: x[0], reverse=True)
            kept = qualify[: plan.slots]
            kept_set = {(id(r), k) for _, r, k in kept}
            for r in rows:
                for k in range(len(r.vec)):
                    if r.vec[k] is not None and (id(r), k) not in kept_set:
                        if self.config.spills:
                            r.spilled[k] = (r.vec[k], r.state[k])
                        r.vec[k] = None
                        r.state[k] = None
                        self.free[g] += 1
            for _, r, k in kept:
                if r.vec[k] is not None:
                    continue
                if self.free[g] == 0:
                    break
                self.free[g] -= 1
                if r.spilled[k] is not None:
                    r.vec[k], r.state[k] = r.spilled[k]
                    r.spilled[k] = None
                else:
                    self._new_chunk(r, k, readmit=True)
        floor = f32(self.config.drop_floor)
        for key in [
            key for key, r in self.rows.items() if all(v is None for v in r.vec) and all(u < floor for u in r.util)
        ]:
            del self.rows[key]

    def erase(self, t: int, keys) -> None:
        for key in keys:
            r = self.rows.pop((t, int(key)), None)
            if r is not None:
                self.free[self.group_of[t]] += sum(v is not None for v in r.vec)

    def resident_mask(self, t: int, key: int) -> list[bool]:
        r = self.rows.get((t, key))
        return [] if r is None else [v is not None for v in r.vec]

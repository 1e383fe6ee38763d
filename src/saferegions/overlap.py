"""Overlap of identified regions (stage `overlap`, docs/methods.md §3.3-3.5): pairwise, multi-way, chance,
refinement, cross-method and cross-size (the prompt bootstrap is in methods/resample.py, the dataset bootstrap
in dataset_bootstrap.py).

Every count comes from one streaming pass per set of regions (`count`): the analyses *plan* the intersections
and unions they need, then one pass popcounts all of them on packed bits, one tensor at a time (cache-resident,
so the hundreds of queries of a 10-dataset analysis cost one read of the regions). Per-tensor counts are kept,
so global and per-matrix scopes and per-layer/component profiles need no second pass. `iou`, `multiway_iou` and
`refined_iou` are the one-query forms of the same count.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import regions
from .arch import component, layer_index
from .regions import PackedRegion, Region

SCOPES = ("global", "per_matrix")


# ---------------------------------------------------------------- counts of intersections and unions

# A query: (op, frozenset of names, name to subtract or None); op "and" = |∩ S \\ U|, "or" = |∪ S \\ U|.
Query = tuple


def inter_q(names, minus=None) -> Query:
    return ("and", frozenset(names), minus)


def union_q(names, minus=None) -> Query:
    return ("or", frozenset(names), minus)


@dataclass
class Counts:
    """Per-tensor popcounts of the queried intersections and unions of a set of named regions."""

    names: list[str]
    tensors: list[str]
    numel: np.ndarray                  # (T,) entries per tensor
    table: dict                        # Query -> (T,) int64

    def get(self, q: Query) -> np.ndarray:
        if q not in self.table:
            raise KeyError(f"query {q} was not counted; add it to the plan passed to count()")
        return self.table[q]

    def inter(self, names, minus=None) -> np.ndarray:
        return self.get(inter_q(names, minus))

    def union(self, names, minus=None) -> np.ndarray:
        return self.get(union_q(names, minus))

    def sizes(self) -> np.ndarray:
        """(T, n) entries of each region per tensor."""
        return np.stack([self.inter([x]) for x in self.names], 1)

    def densities(self, names=None) -> np.ndarray:
        names = self.names if names is None else list(names)
        return np.stack([self.inter([x]) for x in names], 1) / np.maximum(self.numel, 1)[:, None]

    def multiway(self, names, scope: str = "global", minus=None) -> float:
        """|∩ names \\ minus| / |∪ names \\ minus| (k = 2: pairwise IoU); scope as in `ratio`."""
        return ratio(self.inter(names, minus), self.union(names, minus), scope)

    def refined(self, a, b, u, scope: str = "global") -> float:
        """|(A ∩ B) \\ U| / |(A ∪ B) \\ U| (docs/methods.md §3.5), U one of the counted regions."""
        return self.multiway([a, b], scope, minus=u)

    def pairwise(self, scope: str = "global", names=None, minus=None) -> np.ndarray:
        """n × n IoU matrix over `names` (default all); the diagonal is 1 for a non-empty region."""
        names = list(self.names if names is None else names)
        out = np.full((len(names), len(names)), np.nan)
        for i, j in itertools.combinations(range(len(names)), 2):
            out[i, j] = out[j, i] = self.multiway([names[i], names[j]], scope, minus)
        for i, x in enumerate(names):
            out[i, i] = 1.0 if self.inter([x], minus).sum() else np.nan
        return out

    def groups(self, key) -> dict:
        """{key(tensor name): row indices}, e.g. key = arch.layer_index or arch.component."""
        out: dict = {}
        for t, name in enumerate(self.tensors):
            k = key(name)
            if k is not None:
                out.setdefault(k, []).append(t)
        return out


def ratio(num: np.ndarray, den: np.ndarray, scope: str) -> float:
    """Σ num / Σ den (global) or the mean of per-tensor ratios over tensors with den > 0 (per_matrix); NaN when
    undefined."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        d = den.sum()   # not int(): chance expectations are fractional counts
        return float(num.sum()) / float(d) if d else math.nan
    ok = den > 0
    return float(np.mean(num[ok] / den[ok])) if ok.any() else math.nan


def plan(names, pairs: bool = True, minus=None, orders=None) -> list[Query]:
    """The queries the usual analyses need: sizes, every pair (also with `minus` subtracted, plus each
    region ∩ minus for the refinement terms) and every prefix of the given orderings."""
    names = list(names)
    qs = [inter_q([x]) for x in names]
    if minus is not None:
        qs += [inter_q([minus])] + [inter_q([x, minus]) for x in names]
    if pairs:
        for a, b in itertools.combinations(names, 2):
            qs += [inter_q([a, b]), union_q([a, b])]
            if minus is not None:
                qs += [inter_q([a, b], minus), union_q([a, b], minus), inter_q([a, b, minus])]
    for order in orders or []:
        for k in range(2, len(order) + 1):
            qs += [inter_q(order[:k]), union_q(order[:k])]
    return list(dict.fromkeys(qs))


def _words(bits: np.ndarray) -> np.ndarray:
    """Packed bytes zero-padded to whole uint64 words (so one popcount step reads 64 entries)."""
    pad = (-bits.size) % 8
    if pad:
        bits = np.concatenate([bits, np.zeros(pad, np.uint8)])
    return bits.view(np.uint64)


def _popcount(x: np.ndarray) -> int:
    return int(np.bitwise_count(x).sum(dtype=np.int64))


class _Tensor:
    """Query counts on one tensor's packed words. Set algebra saves most passes:
    |A ∪ B| = |A| + |B| − |A ∩ B|,
    |S \\ U| terms come from |S ∩ U|, an intersection or union reuses the one of its set minus one element
    (an ordering's prefixes cost one op each), and an empty operand or empty partial intersection ends the
    chain without touching memory (most tensors of a layer region, most deep prefixes)."""

    def __init__(self, planes: dict):
        self.size = {x: _popcount(w) for x, w in planes.items()}
        self.plane = {x: (w if self.size[x] else None) for x, w in planes.items()}
        self.arrays: dict = {}
        self.memo: dict = {}

    def _array(self, op: str, s: frozenset):
        """The AND/OR of the planes in s, or None when it is empty."""
        if len(s) == 1:
            return self.plane[next(iter(s))]
        key = (op, s)
        if key not in self.arrays:
            x = next((x for x in sorted(s) if (op, s - {x}) in self.arrays), sorted(s)[-1])
            rest, w = self._array(op, s - {x}), self.plane[x]
            if op == "and":
                out = None if rest is None or w is None else np.bitwise_and(rest, w)
                if out is not None and not _popcount(out):
                    out = None
            else:
                out = rest if w is None else w if rest is None else np.bitwise_or(rest, w)
            self.arrays[key] = out
        return self.arrays[key]

    def value(self, q: Query) -> int:
        if q in self.memo:
            return self.memo[q]
        op, s, minus = q
        if minus is not None:
            if op == "and":     # |∩S \\ U| = |∩S| − |∩S ∩ U|
                v = self.value(("and", s, None)) - self.value(("and", s | {minus}, None))
            elif len(s) == 2:   # |(A ∪ B) \\ U| = |A ∪ B| − |A ∩ U| − |B ∩ U| + |A ∩ B ∩ U|
                a, b = sorted(s)
                v = (self.value(("or", s, None)) - self.value(("and", frozenset([a, minus]), None))
                     - self.value(("and", frozenset([b, minus]), None))
                     + self.value(("and", s | {minus}, None)))
            else:
                arr, u = self._array("or", s), self.plane[minus]
                v = 0 if arr is None else _popcount(arr) if u is None else _popcount(arr & ~u)
        elif len(s) == 1:
            v = self.size[next(iter(s))]
        elif op == "or" and len(s) == 2:
            a, b = sorted(s)
            v = self.size[a] + self.size[b] - self.value(("and", s, None))
        else:
            arr = self._array(op, s)
            v = 0 if arr is None else _popcount(arr)
        self.memo[q] = v
        return v


def count(regs: Sequence[Region | PackedRegion], names: Sequence[str], queries: Sequence[Query]) -> Counts:
    """Popcount every query, one tensor at a time (only that tensor's packed bits of each region exist); see
    `_Tensor` for the set algebra that keeps the passes few."""
    regs, names = list(regs), list(names)
    if not regs or len(names) != len(regs) or len(set(names)) != len(names):
        raise ValueError("count needs >= 1 region and one distinct name per region")
    for op, s, minus in queries:
        unknown = [x for x in [*s, *([minus] if minus is not None else [])] if x not in names]
        if op not in ("and", "or") or not s or unknown:
            raise ValueError(f"bad query {(op, set(s), minus)}: unknown names {unknown}")
    shapes = regions.matching_shapes(regs)
    tensors = list(shapes)
    numel = np.array([math.prod(shapes[t]) for t in tensors], dtype=np.int64)
    table = {q: np.zeros(len(tensors), dtype=np.int64) for q in queries}
    for t, tensor in enumerate(tensors):
        ev = _Tensor({x: _words(regions.bits(r, tensor)) for x, r in zip(names, regs)})
        for q in table:
            table[q][t] = ev.value(q)
    return Counts(names, tensors, numel, table)


# ---------------------------------------------------------------- IoU of a few regions


def multiway_iou(regs: Sequence[Region | PackedRegion], scope: str = "global") -> float:
    """|A1 ∩ … ∩ Ak| / |A1 ∪ … ∪ Ak| over the whole space, or per tensor then averaged (§3.3); NaN if undefined."""
    names = [str(i) for i in range(len(regs))]
    return count(regs, names, [inter_q(names), union_q(names)]).multiway(names, scope)


def iou(a, b, scope: str = "global") -> float:
    """|A ∩ B| / |A ∪ B| (§3.3)."""
    return multiway_iou([a, b], scope)


def refined_iou(a, b, u, scope: str = "global") -> float:
    """|(A ∩ B) \\ U| / |(A ∪ B) \\ U| = IoU(A \\ U, B \\ U) (§3.5)."""
    pair = ["a", "b"]
    return count([a, b, u], [*pair, "u"], [inter_q(pair, "u"), union_q(pair, "u")]).refined("a", "b", "u", scope)


def intersection_size(a, b) -> int:
    return int(count([a, b], ["a", "b"], [inter_q(["a", "b"])]).inter(["a", "b"]).sum())


def union_size(a, b) -> int:
    return int(count([a, b], ["a", "b"], [union_q(["a", "b"])]).union(["a", "b"]).sum())


def chance_iou(f1: float, f2: float | None = None) -> float:
    """Expected IoU of independent uniform subsets of densities f1, f2: f1 f2 / (f1 + f2 - f1 f2)."""
    f2 = f1 if f2 is None else f2
    d = f1 + f2 - f1 * f2
    return f1 * f2 / d if d else 0.0


def chance_multiway(f: float, k: int) -> float:
    """Expected k-way IoU at density f: f^k / (1 - (1 - f)^k)."""
    d = 1.0 - (1.0 - f) ** k
    return f**k / d if d else 0.0


# ---------------------------------------------------------------- chance baselines (§3.4)


def chance_entries(m: Counts, names, scope: str = "global", minus=None, pooled: bool = False) -> float:
    """Expected |∩| / |∪| of independent random regions with each region's per-tensor counts (per-matrix
    matched, as the regions were selected): per tensor E|∩| = N Π f_i and E|∪| = N (1 - Π (1 - f_i)).
    For two regions at one density f this is f / (2 - f).

    `minus` (the utility region U, counted in `m`): refined regions can only lie outside U, so they are drawn
    there, N = numel − |U| per tensor (when U takes most of a matrix, chance is far higher than at density
    size / numel). `pooled`: each region drawn over the whole space at once (selection group 'global')."""
    sizes = np.stack([m.inter([x]) for x in names], 1).astype(float)
    n = m.numel.astype(float) - (m.inter([minus]) if minus is not None else 0)
    if pooled:
        f = np.broadcast_to(sizes.sum(0) / max(n.sum(), 1.0), sizes.shape)
    else:
        f = np.clip(sizes / np.maximum(n, 1.0)[:, None], 0.0, 1.0)
    return ratio(n * f.prod(1), n * (1 - (1 - f).prod(1)), scope)


def layer_numel(shapes: dict[str, tuple[int, ...]]) -> dict[int, int]:
    """Eligible entries per decoder layer."""
    out: dict[int, int] = {}
    for name, s in shapes.items():
        layer = layer_index(name)
        if layer is not None:
            out[layer] = out.get(layer, 0) + math.prod(s)
    return out


def chance_layers(counts: Sequence[int], per_layer: dict[int, int], draws: int, seed: int) -> float:
    """Expected IoU of independent random sets of whole layers with the given layer counts, by simulation
    (layers are the unit of a SafeLayer region, so entry-level chance would understate chance overlap);
    weighted by each layer's entry count. Draws whose union is empty are skipped (IoU undefined)."""
    layers = sorted(per_layer)
    if any(c > len(layers) or c < 0 for c in counts):
        raise ValueError(f"layer counts {list(counts)} outside [0, {len(layers)}]")
    return _chance_layers(tuple(sorted(counts)), tuple(per_layer[x] for x in layers), draws, seed)


@functools.lru_cache(maxsize=4096)
def _chance_layers(counts: tuple, weights: tuple, draws: int, seed: int) -> float:
    w = np.array(weights, dtype=float)
    rng = np.random.default_rng(seed)
    perm = rng.random((draws, len(counts), len(w)), dtype=np.float32).argsort(-1)  # a uniform permutation
    member = perm < np.asarray(counts)[None, :, None]      # so its first c values mark a uniform c-subset
    inter = member.all(1) @ w
    uni = member.any(1) @ w
    ok = uni > 0
    return float((inter[ok] / uni[ok]).mean()) if ok.any() else math.nan


def corrected(observed, chance):
    """Chance-corrected overlap (observed − chance) / (1 − chance): 0 = chance, 1 = identical regions; entrywise
    for arrays (pair matrices), NaN where chance is 1 (no room above it) or either is undefined."""
    o, c = np.asarray(observed, dtype=float), np.asarray(chance, dtype=float)
    out = np.where(c < 1, (o - c) / np.where(c < 1, 1 - c, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------- analyses built on the histogram


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(matrix.shape[0], 1)
    return matrix[i, j]


def orderings(names, n_orders: int, seed: int) -> list[list[str]]:
    """`n_orders` random orderings of `names` (seeded), for the multi-way convergence curve."""
    rng = np.random.default_rng(seed)
    names = list(names)
    return [[names[i] for i in rng.permutation(len(names))] for _ in range(n_orders)]


def convergence(m: Counts, orders, scope: str = "global", chance=None) -> list[dict]:
    """Multi-way IoU_k = |A1 ∩ … ∩ Ak| / |A1 ∪ … ∪ Ak| for k = 2..n along each ordering (§3.3), with
    |A1 ∩ … ∩ Ak| / |A1| (how much of the first region survives) and chance(prefix) when given."""
    rows = []
    for o, order in enumerate(orders):
        first = int(m.inter(order[:1]).sum())
        for k in range(2, len(order) + 1):
            prefix = order[:k]
            row = {"order": o, "k": k, "iou": m.multiway(prefix, scope),
                   "survive": int(m.inter(prefix).sum()) / first if first else math.nan}
            if chance is not None:
                row["chance"] = chance(prefix)
            rows.append(row)
    return rows


def group_iou(m: Counts, names, key) -> dict:
    """{group: mean pairwise IoU over `names`} per layer (key=layer_index) or component (key=component)."""
    pairs = list(itertools.combinations(names, 2))
    out = {}
    for g, rows in m.groups(key).items():
        vals = []
        for a, b in pairs:
            u = m.union([a, b])[rows].sum()
            if u:
                vals.append(m.inter([a, b])[rows].sum() / u)
        out[g] = float(np.mean(vals)) if vals else math.nan
    return out


def group_density(m: Counts, names, key) -> dict:
    """{group: mean density over `names`} per layer or component."""
    sizes = np.stack([m.inter([x]) for x in names], 1)
    return {g: float(sizes[rows].sum(0).mean() / m.numel[rows].sum()) for g, rows in m.groups(key).items()}


def depth_profile(profile: dict[int, float], points: int = 21) -> np.ndarray:
    """A per-layer profile resampled onto relative depth 0..1, so models of different depths compare."""
    layers = sorted(profile)
    if not layers:
        return np.full(points, np.nan)
    x = (np.array(layers) + 0.5) / (max(layers) + 1)
    return np.interp(np.linspace(0, 1, points), x, [profile[k] for k in layers])


def same_space(a, b) -> bool:
    """True when two regions cover the same tensors with the same shapes (direct IoU is defined)."""
    return regions.shapes(a) == regions.shapes(b)


def refinement_terms(m: Counts, a, b, u) -> dict:
    """What docs/methods.md §3.5 reports beside a refined IoU: the raw IoU, the identity's refined IoU
    |(A ∩ B) \\ U| / |(A ∪ B) \\ U|, and the fractions of A ∩ B and of A ∪ B that U removes (refinement lowers
    the IoU exactly when the first fraction exceeds the second). Needs `plan(..., minus=u)`."""
    inter, uni = int(m.inter([a, b]).sum()), int(m.union([a, b]).sum())
    inter_u = int(m.inter([a, b, u]).sum())
    uni_u = int(m.inter([a, u]).sum() + m.inter([b, u]).sum()) - inter_u
    return {"raw_iou": inter / uni if uni else math.nan, "identity_iou": m.refined(a, b, u),
            "u_frac_of_inter": inter_u / inter if inter else math.nan,
            "u_frac_of_union": uni_u / uni if uni else math.nan}


def interval(values, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the defined bootstrap values; None where none is defined."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    lo = (1 - level) / 2
    return (float(np.quantile(v, lo)), float(np.quantile(v, 1 - lo))) if v.size else None


# ---------------------------------------------------------------- one method's whole analysis


def _is_layer_region(r) -> bool:
    return bool(r.units) and "layers" in r.units


def chance_fn(c: Counts, regs: dict, scope: str, draws: int, seed: int, minus=None):
    """chance(names) for regions of one method: layer-unit simulation for SafeLayer regions,
    per-matrix-matched entry-level expectation otherwise (pooled over the space for group 'global'). With
    `minus` (the utility region, for refined regions) the random regions are drawn where refinement leaves
    room: outside U's entries, or outside U's layers. Cached: the convergence curve asks for many prefixes."""
    layer = all(_is_layer_region(regs[x]) for x in c.names if x in regs)
    per_layer = layer_numel(regions.shapes(next(iter(regs.values())))) if layer else None
    if layer and minus is not None:
        removed = set(regs[minus].units["layers"]) if _is_layer_region(regs[minus]) else set()
        per_layer = {k: v for k, v in per_layer.items() if k not in removed}
    pooled = all(regs[x].meta.get("group") == "global" for x in c.names if x in regs and x != minus)
    memo: dict = {}

    def chance(names):
        if layer:
            key = tuple(sorted(len(regs[x].units["layers"]) for x in names))
            if key not in memo:
                memo[key] = chance_layers(key, per_layer, draws, seed)
            return memo[key]
        return chance_entries(c, names, scope, minus, pooled)
    return chance


def analyze(raw: dict, refined: dict, utility, variants, scopes, n_orders: int, seed: int,
            draws: int) -> dict:
    """Everything the notebook shows for one (model, method): one counting pass over the raw and refined
    regions of every dataset ({dataset: PackedRegion}) and the utility region, then pairwise matrices, chance,
    convergence, the refinement identity and per-layer/component profiles.

    Returns {"counts", "datasets", "matrix": {(variant, scope): n×n}, "chance": {(variant, scope): n×n},
    "convergence": rows, "refinement": rows, "by_layer": {variant: {layer: mean IoU}},
    "by_component": {variant: {...}}, "exact": {dataset: refined == raw \\ utility in weight space}}."""
    datasets = list(raw)
    if set(refined) != set(raw):
        raise ValueError(f"raw and refined regions cover different datasets: {sorted(raw)} vs "
                         f"{sorted(refined)}")
    sets = {"raw": raw, "refined": refined}
    regs = {f"{d}.{v}": sets[v][d] for v in variants for d in datasets}
    u = "utility" if utility is not None else None    # refined chance is drawn outside U
    if u is not None:
        regs[u] = utility
    raw_u = u if "raw" in variants else None
    if len(datasets) > 2:
        orders = orderings(datasets, n_orders, seed)
    else:
        orders = [datasets] if len(datasets) == 2 else []
    queries = []
    for v in variants:
        names = [f"{d}.{v}" for d in datasets]
        queries += plan(names, minus=u if v == "raw" else None,
                        orders=[[f"{d}.{v}" for d in o] for o in orders])
    if u is not None:
        queries.append(inter_q([u]))
    if raw_u is not None and "refined" in variants:
        queries += [q for d in datasets for q in (inter_q([f"{d}.raw", f"{d}.refined"]),
                                                  inter_q([f"{d}.refined", u]))]
    c = count(list(regs.values()), list(regs), list(dict.fromkeys(queries)))
    out = {"counts": c, "datasets": datasets, "matrix": {}, "chance": {}, "convergence": [], "refinement": [],
           "by_layer": {}, "by_component": {}, "exact": {}}
    for v in variants:
        names = [f"{d}.{v}" for d in datasets]
        for scope in scopes:
            out["matrix"][v, scope] = c.pairwise(scope, names)
            ch = chance_fn(c, regs, scope, draws, seed, minus=u if v == "refined" else None)
            m = np.full((len(names), len(names)), np.nan)
            for i, j in itertools.combinations(range(len(names)), 2):
                m[i, j] = m[j, i] = ch([names[i], names[j]])
            out["chance"][v, scope] = m
            if len(names) > 1:
                rows = convergence(c, [[f"{d}.{v}" for d in o] for o in orders], scope, ch)
                out["convergence"] += [{"variant": v, "scope": scope, **r} for r in rows]
        out["by_layer"][v] = group_iou(c, names, layer_index)
        out["by_component"][v] = group_iou(c, names, component)
    if raw_u is not None and "refined" in variants:
        out["exact"] = {d: exact_difference(c, f"{d}.raw", f"{d}.refined", u) for d in datasets}
        for a, b in itertools.combinations(datasets, 2):
            t = refinement_terms(c, f"{a}.raw", f"{b}.raw", u)
            t["refined_iou"] = c.multiway([f"{a}.refined", f"{b}.refined"])
            out["refinement"].append({"pair": f"{a}–{b}", **t})
    return out


def exact_difference(c: Counts, raw: str, refined: str, u: str) -> bool:
    """True when the stored refined region is exactly raw \\ U in the weight space (sizes and containment),
    i.e. when the refinement identity must hold for it.
    Needs the queries inter([raw, refined]) and inter([refined, u])."""
    r, f = int(c.inter([raw]).sum()), int(c.inter([refined]).sum())
    return (int(c.inter([raw, refined]).sum()) == f and int(c.inter([refined, u]).sum()) == 0
            and f == r - int(c.inter([raw, u]).sum()))

"""Regions: a region is a set of parameter entries, one bool mask per named tensor (docs/methods.md §3).

Selection (§2.1, §4.3) turns raw non-negative scores into a Region; direction is an explicit argument
and scores are never negated (trap 2.1.T1). Overlap (§3.3-3.5) is computed on packed bits, one tensor at
a time, so comparing 8B-parameter regions never needs all masks as bool tensors at once.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from .hooks import one_thread, zeroed_weights
from .io import atomic_path, canonical_metadata, read_canonical_metadata

__all__ = [
    "Region", "PackedRegion", "top_fraction", "top_k_global", "random_like", "refine",
    "difference", "intersection", "union", "intersect_all", "union_all", "pack", "unpack",
    "iou", "intersection_size", "union_size", "multiway_iou", "refined_iou",
    "chance_iou", "chance_multiway", "save", "load", "load_packed", "region_path",
    "Granularity", "Weights", "granularity", "ablation", "random_control",
]

IDX_MAX_DENSITY = 0.03  # at or below this density, sorted int32 indices are smaller than bits (§3.1)
FORMAT = "saferegions.region/2"
_CHUNK = 1 << 24  # score entries per pass: bounds temporaries on lm_head-sized tensors
_WORDS = 1 << 15  # uint64 words per popcount step: keeps the operands in cache
_WORKERS = min(4, os.cpu_count() or 1)   # matrices selected side by side, one single-threaded select each
_FAST_MIN = 1 << 16  # tensors at least this large take the sampled-threshold path of per-matrix selection
_SAMPLE = 1 << 16   # sample size for that threshold


@dataclass
class Region:
    """Bool mask per tensor (the tensor's shape, CPU) plus JSON-serialisable provenance and native units."""

    masks: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    units: dict | None = None  # method-native units, e.g. {"neurons": {...}} or {"layers": [...]}

    def __post_init__(self):
        for name, m in self.masks.items():
            if m.dtype != torch.bool or m.device.type != "cpu":
                raise ValueError(f"mask {name!r} must be a CPU bool tensor, got {m.dtype} on {m.device}")

    @property
    def size(self) -> int:
        return sum(int(m.count_nonzero()) for m in self.masks.values())

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def density(self) -> float:
        return self.size / self.numel if self.numel else 0.0

    def per_tensor_density(self) -> dict[str, float]:
        return {k: int(m.count_nonzero()) / m.numel() if m.numel() else 0.0 for k, m in self.masks.items()}

    def packed(self, encoding: str = "auto") -> PackedRegion:
        return pack(self, encoding)


@dataclass
class PackedRegion:
    """The compact form: per tensor either packbits uint8 (big bit order) or sorted int32 flat indices.

    The array's dtype is its encoding; overlap functions read it without expanding to bool.
    """

    data: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    meta: dict = field(default_factory=dict)
    units: dict | None = None

    def __post_init__(self):
        if list(self.data) != list(self.shapes):
            raise ValueError("PackedRegion: data and shapes must have the same keys in the same order")
        for name, arr in self.data.items():
            n = math.prod(self.shapes[name])
            if arr.dtype == np.uint8 and arr.shape != ((n + 7) // 8,):
                raise ValueError(f"{name!r}: {arr.shape} bytes of bits for {n} entries")
            if arr.dtype not in (np.uint8, np.int32) or arr.ndim != 1:
                raise ValueError(f"{name!r}: packed array must be 1-D uint8 bits or int32 indices")
            if arr.dtype == np.int32 and arr.size and (
                    arr[0] < 0 or arr[-1] >= n or not (arr[1:] > arr[:-1]).all()):
                raise ValueError(f"{name!r}: indices must be sorted, unique and in [0, {n})")

    def encoding(self, name: str) -> str:
        return "bits" if self.data[name].dtype == np.uint8 else "idx"

    def count(self, name: str) -> int:
        arr = self.data[name]
        return int(np.bitwise_count(arr).sum()) if arr.dtype == np.uint8 else arr.size

    @property
    def size(self) -> int:
        return sum(self.count(k) for k in self.data)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.size / self.numel if self.numel else 0.0

    def unpack(self) -> Region:
        return unpack(self)


# ---------------------------------------------------------------- selection


def _flat32(name: str, s: torch.Tensor) -> torch.Tensor:
    if not s.is_floating_point():
        raise ValueError(f"scores {name!r} must be floating point, got {s.dtype}")
    x = s.detach().to("cpu", torch.float32).contiguous()
    if torch.isnan(x.sum()) and torch.isnan(x).any():  # one pass and no temporary in the usual case
        raise ValueError(f"scores {name!r} contain NaN")
    return x


def _keys(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """int32 keys ordered like the floats (reversed for smallest): exact ties, no float is negated."""
    b = x.view(torch.int32)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return k if largest else ~k


def _walk(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry, and how many entries lie in higher bins."""
    at_or_above = np.cumsum(hist.numpy()[::-1])[::-1]
    b = int(np.flatnonzero(at_or_above >= k)[-1])
    return b, int(at_or_above[b] - hist[b])


def _key_chunks(xs: dict[str, torch.Tensor], largest: bool):
    for name, x in xs.items():
        flat = x.view(-1)
        for a in range(0, flat.numel(), _CHUNK):
            yield name, a, _keys(flat[a:a + _CHUNK], largest)


def _select(xs: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor]:
    """Exact top-k over several tensors by 16+16-bit radix select: two histogram passes, no concat or sort.

    Ties at the threshold go to the earliest entries (tensor order, then flat index), so |result| == k.
    """
    masks = {n: torch.zeros(x.shape, dtype=torch.bool) for n, x in xs.items()}
    if k == 0:
        return masks
    hist = torch.zeros(65536, dtype=torch.int64)
    for _, _, key in _key_chunks(xs, largest):
        hist += torch.bincount((key >> 16) + 32768, minlength=65536)
    hi, above = _walk(hist, k)
    hist.zero_()
    for _, _, key in _key_chunks(xs, largest):
        hist += torch.bincount(key[(key >> 16) == hi - 32768] & 0xFFFF, minlength=65536)
    lo, above_lo = _walk(hist, k - above)
    thr, need = (hi - 32768) * 65536 + lo, k - above - above_lo
    for name, a, key in _key_chunks(xs, largest):
        m = masks[name].view(-1)[a:a + key.numel()]
        torch.gt(key, thr, out=m)
        if need:
            eq = key == thr
            c = int(eq.sum())
            if c <= need:
                m |= eq
                need -= c
            else:
                m[torch.nonzero(eq).view(-1)[:need]] = True
                need = 0
    return masks


def _select_sampled(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor | None:
    """Exact top-k of one large tensor, fast: a threshold from a seeded random sample keeps a few percent of
    the entries as candidates (one vectorised pass), then the exact k-th key among them decides, ties to the
    lowest flat index as in `_select`. Returns None when the sample's margin fell short (caller falls back).
    Compaction uses numpy: torch's single-threaded nonzero is ~6x slower on CPU."""
    flat = x.view(-1)
    n = flat.numel()
    s = min(n, _SAMPLE)
    sample = flat[torch.randint(n, (s,), generator=torch.Generator().manual_seed(0))]
    t = k / n
    keep = min(s, math.ceil(s * (1.1 * t + 8 * math.sqrt(t * (1 - t) / s)) + 8))
    a = flat.numpy()
    # Float order is key order up to -0.0 < +0.0, so the float candidates contain every key candidate.
    if largest:
        cand = np.flatnonzero(a >= float(sample.topk(keep, sorted=False).values.min()))
    else:
        cand = np.flatnonzero(a <= float(sample.topk(keep, largest=False, sorted=False).values.max()))
    if cand.size < k:
        return None
    ck = _keys(torch.from_numpy(a[cand]), largest)
    thr = ck.kthvalue(cand.size - k + 1).values
    gt, eq = ck > thr, ck == thr
    pick = gt | (eq & (eq.cumsum(0) <= k - int(gt.sum())))
    mask = np.zeros(n, dtype=np.bool_)
    mask[cand[pick.numpy()]] = True
    return torch.from_numpy(mask).view(x.shape)


def _select_one(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Top-k of one tensor: the sampled fast path for large tensors and small fractions, else radix select."""
    if k and x.numel() >= _FAST_MIN and k <= x.numel() // 4:
        mask = _select_sampled(x, k, largest)
        if mask is not None:
            return mask
    return _select({"x": x}, k, largest)["x"]


def _select_rows(x: torch.Tensor, frac: float, largest: bool) -> torch.Tensor:
    """int(frac*cols) per row of the last two dims (each [out, in] slice of a 3-D expert tensor)."""
    cols = x.shape[-1] if x.dim() else 1
    kr = int(frac * cols)
    if not kr or not x.numel():
        return torch.zeros(x.shape, dtype=torch.bool)
    rows = x.reshape(-1, cols)
    m = torch.zeros(rows.shape, dtype=torch.bool)
    step = max(1, _CHUNK // cols)
    for r in range(0, rows.shape[0], step):
        key = _keys(rows[r:r + step], largest)
        t = key.kthvalue(cols - kr + 1, dim=1, keepdim=True).values
        gt, eq = key > t, key == t
        need = kr - gt.sum(1, keepdim=True)
        m[r:r + step] = gt | (eq & (eq.cumsum(1) <= need))  # ties: lowest column first
    return m.view(x.shape)


@one_thread
def top_k_global(scores: dict[str, torch.Tensor], k: int, largest: bool = True,
                 meta: dict | None = None) -> Region:
    """Exactly k entries ranked across all tensors together (ESI, §4.3: k = int(ratio * ALL params))."""
    xs = {n: _flat32(n, s) for n, s in scores.items()}
    total = sum(x.numel() for x in xs.values())
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    sel = {"k": int(k), "group": "global", "largest": largest}
    return Region(_select(xs, int(k), largest), {**(meta or {}), "selection": sel})


@one_thread
def top_fraction(scores: dict[str, torch.Tensor], frac: float, group: str = "matrix",
                 largest: bool = True, meta: dict | None = None) -> Region:
    """Top fraction per matrix (k = int(frac*numel)), per row (int(frac*cols)) or globally (int(frac*total)).

    Scores are compared as fp32; ties go to the lowest flat index (global: earliest tensor first).
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac={frac} outside [0, 1]")
    if group == "global":
        total = sum(s.numel() for s in scores.values())
        r = top_k_global(scores, int(frac * total), largest, meta)
        r.meta["selection"]["frac"] = frac
        return r
    if group == "matrix":
        def select(n, s):
            x = _flat32(n, s)
            return _select_one(x, int(frac * x.numel()), largest)
    elif group == "row":
        def select(n, s):
            return _select_rows(_flat32(n, s), frac, largest)
    else:
        raise ValueError(f"group must be 'matrix', 'row' or 'global', got {group!r}")
    masks = dict(zip(scores, per_matrix(select, scores.items())))
    sel = {"frac": frac, "group": group, "largest": largest}
    return Region(masks, {**(meta or {}), "selection": sel})


def per_matrix(fn, items) -> list:
    """[fn(*item) for item in items], on _WORKERS threads: each select is single-threaded numpy/torch work that
    releases the GIL, so two matrices at a time take ~0.54× the time on 2 cores (one OpenMP pool over both
    cores was slower, see hooks.single_thread)."""
    items = list(items)
    if _WORKERS <= 1 or len(items) < 2:
        return [fn(*item) for item in items]
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(lambda item: fn(*item), items))


def _sample(n: int, c: int, g: torch.Generator) -> torch.Tensor:
    """c distinct sorted int64 indices uniform in [0, n), c <= n/2.

    Draws with replacement until c distinct values are seen, then keeps a random c of them; the stopping
    rule looks only at counts, so by symmetry the result is a uniform c-subset. O(c log c), no O(n) perm.
    """
    got = torch.empty(0, dtype=torch.int64)
    while got.numel() < c:
        draw = torch.randint(n, (int(1.25 * (c - got.numel())) + 16,), generator=g)
        got = torch.unique(torch.cat([got, draw]))
    if got.numel() > c:
        got = got[torch.randperm(got.numel(), generator=g)[:c]].sort().values
    return got


def _scatter(n: int, idx: torch.Tensor, flip: bool) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m.logical_not_() if flip else m


@one_thread
def random_like(region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
    """Chance control (§3.4, §4.3), without replacement: same per-tensor counts, or same total uniformly.

    Above half density the complement is drawn instead, so the sampler always draws <= n/2 indices.
    """
    g = torch.Generator().manual_seed(seed)
    names, sizes = list(region.masks), [m.numel() for m in region.masks.values()]
    if mode == "per_matrix_matched":
        flats = []
        for n, m in zip(sizes, region.masks.values()):
            c = int(m.count_nonzero())
            flip = c > n // 2
            flats.append(_scatter(n, _sample(n, n - c if flip else c, g), flip))
    elif mode == "global_uniform":
        total, c = sum(sizes), region.size
        flip = c > total // 2
        idx = _sample(total, total - c if flip else c, g)
        offsets = np.cumsum([0, *sizes]).tolist()
        cuts = torch.searchsorted(idx, torch.tensor(offsets)).tolist()
        flats = [_scatter(n, idx[cuts[j]:cuts[j + 1]] - offsets[j], flip) for j, n in enumerate(sizes)]
    else:
        raise ValueError(f"mode must be 'per_matrix_matched' or 'global_uniform', got {mode!r}")
    masks = {name: f.view(region.masks[name].shape) for name, f in zip(names, flats)}
    return Region(masks, {"method": "random", "mode": mode, "seed": seed, "reference": region.meta})


# ---------------------------------------------------------------- set algebra


def _shapes(r: Region | PackedRegion) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.shape) for n, m in r.masks.items()} if isinstance(r, Region) else dict(r.shapes)


def _check(regions) -> dict[str, tuple[int, ...]]:
    if not regions:
        raise ValueError("need at least one region")
    ref = _shapes(regions[0])
    for r in regions[1:]:
        other = _shapes(r)
        if set(other) != set(ref):
            missing, extra = sorted(set(ref) - set(other))[:3], sorted(set(other) - set(ref))[:3]
            raise ValueError(f"regions cover different tensors: missing {missing}, extra {extra}")
        bad = [n for n in ref if other[n] != ref[n]]
        if bad:
            raise ValueError(f"shape mismatch for {bad[0]!r}: {ref[bad[0]]} vs {other[bad[0]]}")
    return ref


@one_thread
def _combine(op: str, regions: list[Region], fn) -> Region:
    _check(regions)
    masks = {n: functools.reduce(fn, [r.masks[n] for r in regions]) for n in regions[0].masks}
    return Region(masks, {"op": op, "operands": [r.meta for r in regions]})


def difference(a: Region, b: Region) -> Region:
    """a \\ b: entries of a not in b (utility refinement, §3.5)."""
    return _combine("difference", [a, b], lambda x, y: x & ~y)


def intersection(a: Region, b: Region) -> Region:
    return _combine("intersection", [a, b], torch.logical_and)


def union(a: Region, b: Region) -> Region:
    return _combine("union", [a, b], torch.logical_or)


def intersect_all(regions: list[Region]) -> Region:
    return _combine("intersection", list(regions), torch.logical_and)


def union_all(regions: list[Region]) -> Region:
    return _combine("union", list(regions), torch.logical_or)


def refine(safety_scores: dict[str, torch.Tensor], utility_scores: dict[str, torch.Tensor], q: float,
           p: float, group: str = "matrix", largest: bool = True, meta: dict | None = None) -> Region:
    """S(p, q) = Top_q(safety) \\ Top_p(utility), per matrix by default (§2.1)."""
    s = top_fraction(safety_scores, q, group, largest)
    u = top_fraction(utility_scores, p, group, largest)
    r = difference(s, u)
    r.meta = {**(meta or {}), "selection": s.meta["selection"],
              "refinement": {"p": p, "q": q, "utility_selection": u.meta["selection"]}}
    return r


# ---------------------------------------------------------------- packing


def _idx_to_bits(idx: np.ndarray, n: int) -> np.ndarray:
    bits = np.zeros((n + 7) // 8, dtype=np.uint8)
    if idx.size:
        byte = idx >> 3
        val = np.uint8(128) >> (idx & 7).astype(np.uint8)
        start = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        bits[byte[start]] = np.add.reduceat(val, start)  # sorted unique: a sum of distinct bits is their OR
    return bits


def _bits(r: Region | PackedRegion, name: str) -> np.ndarray:
    """One tensor's packed bits, whatever form the region holds."""
    if isinstance(r, Region):
        return np.packbits(r.masks[name].reshape(-1).numpy())
    arr = r.data[name]
    return arr if arr.dtype == np.uint8 else _idx_to_bits(arr, math.prod(r.shapes[name]))


def _use_idx(n: int, count: int, encoding: str) -> bool:
    if encoding not in ("auto", "bits", "idx"):
        raise ValueError(f"encoding must be 'auto', 'bits' or 'idx', got {encoding!r}")
    if encoding == "idx" and n >= 2**31:
        raise ValueError("int32 index encoding needs tensors below 2**31 entries")
    return encoding == "idx" or (encoding == "auto" and n < 2**31 and count <= IDX_MAX_DENSITY * n)


@one_thread
def pack(region: Region | PackedRegion, encoding: str = "auto") -> PackedRegion:
    """Pack (or re-encode) per tensor: 'bits', 'idx', or 'auto' (idx when density <= 3%, §3.1)."""
    data = {}
    if isinstance(region, PackedRegion):
        for n, arr in region.data.items():
            numel = math.prod(region.shapes[n])
            idx = _use_idx(numel, region.count(n), encoding)
            if idx == (arr.dtype == np.int32):
                data[n] = arr
            elif idx:
                data[n] = np.flatnonzero(np.unpackbits(arr, count=numel)).astype(np.int32)
            else:
                data[n] = _idx_to_bits(arr, numel)
        return PackedRegion(data, dict(region.shapes), region.meta, region.units)
    for n, m in region.masks.items():
        flat = m.reshape(-1)
        if _use_idx(flat.numel(), int(flat.count_nonzero()), encoding):
            data[n] = np.flatnonzero(flat.numpy()).astype(np.int32)  # numpy: ~6x faster than torch here
        else:
            data[n] = np.packbits(flat.numpy())
    return PackedRegion(data, _shapes(region), region.meta, region.units)


@one_thread
def unpack(packed: PackedRegion) -> Region:
    masks = {}
    for n, arr in packed.data.items():
        shape, numel = packed.shapes[n], math.prod(packed.shapes[n])
        if arr.dtype == np.uint8:
            m = torch.from_numpy(np.unpackbits(arr, count=numel).view(np.bool_))
        else:
            m = torch.zeros(numel, dtype=torch.bool)
            m[torch.from_numpy(arr.astype(np.int64))] = True
        masks[n] = m.view(shape)
    return Region(masks, packed.meta, packed.units)


# ---------------------------------------------------------------- overlap


def _popcounts(arrays: list[np.ndarray], fns) -> list[int]:
    """popcount(f(*arrays)) for each f, in cache-sized uint64 steps (one read of the operands)."""
    nw = arrays[0].size // 8
    words = [a[:nw * 8].view(np.uint64) for a in arrays]
    totals = [0] * len(fns)
    for s in range(0, nw, _WORDS):
        part = [w[s:s + _WORDS] for w in words]
        for i, f in enumerate(fns):
            totals[i] += int(np.bitwise_count(f(*part)).sum(dtype=np.uint32))  # <= 64 * _WORDS: no overflow
    tails = [a[nw * 8:] for a in arrays]
    for i, f in enumerate(fns):
        totals[i] += int(np.bitwise_count(f(*tails)).sum(dtype=np.uint32))
    return totals


def _per_tensor(regions, fns):
    """Yield (name, counts) per tensor: only one tensor's bits of each region exist at a time."""
    for name in _check(regions):
        yield name, _popcounts([_bits(r, name) for r in regions], fns)


def _ratio(regions, num, den, scope: str) -> float:
    if scope not in ("global", "per_matrix"):
        raise ValueError(f"scope must be 'global' or 'per_matrix', got {scope!r}")
    tn = td = 0
    per = []
    for _, (n, d) in _per_tensor(regions, (num, den)):
        tn, td = tn + n, td + d
        if d:
            per.append(n / d)
    if scope == "global":
        return tn / td if td else math.nan
    return float(np.mean(per)) if per else math.nan  # tensors with an empty union are skipped


def _and(*xs):
    return functools.reduce(np.bitwise_and, xs)


def _or(*xs):
    return functools.reduce(np.bitwise_or, xs)


def iou(a, b, scope: str = "global") -> float:
    """|A ∩ B| / |A ∪ B| over the whole space, or per tensor then averaged (§3.3). NaN if undefined."""
    return _ratio([a, b], _and, _or, scope)


def intersection_size(a, b) -> int:
    return sum(c[0] for _, c in _per_tensor([a, b], (_and,)))


def union_size(a, b) -> int:
    return sum(c[0] for _, c in _per_tensor([a, b], (_or,)))


def multiway_iou(regions, scope: str = "global") -> float:
    """|A1 ∩ … ∩ Ak| / |A1 ∪ … ∪ Ak| (§3.3, convergence)."""
    return _ratio(list(regions), _and, _or, scope)


def refined_iou(a, b, u, scope: str = "global") -> float:
    """|(A ∩ B) \\ U| / |(A ∪ B) \\ U| = IoU(A \\ U, B \\ U) (§3.5)."""
    # ~u sets u's padding bits, but each expression also ANDs a or b, whose padding is zero.
    return _ratio([a, b, u], lambda x, y, z: x & y & ~z, lambda x, y, z: (x | y) & ~z, scope)


def chance_iou(f1: float, f2: float | None = None) -> float:
    """Expected IoU of independent uniform subsets of densities f1, f2: f1 f2 / (f1 + f2 - f1 f2)."""
    f2 = f1 if f2 is None else f2
    d = f1 + f2 - f1 * f2
    return f1 * f2 / d if d else 0.0


def chance_multiway(f: float, k: int) -> float:
    """Expected k-way IoU at density f: f^k / (1 - (1 - f)^k)."""
    d = 1.0 - (1.0 - f) ** k
    return f**k / d if d else 0.0


# ---------------------------------------------------------------- I/O


def save(region: Region | PackedRegion, path: str | Path, encoding: str | None = None) -> None:
    """One safetensors file: packed arrays as tensors; format, meta, units and tensor shapes and encodings in
    one canonical JSON header (byte-identical files for the same region in any process).

    A Region is packed with encoding 'auto' unless told; a PackedRegion keeps its encodings unless told.
    """
    if encoding is None:
        p = region if isinstance(region, PackedRegion) else pack(region)
    else:
        p = pack(region, encoding)
    header = {"format": FORMAT, "meta": p.meta, "units": p.units,
              "tensors": [[n, list(s), p.encoding(n)] for n, s in p.shapes.items()]}   # in tensor order
    with atomic_path(path) as tmp:
        save_file({n: np.ascontiguousarray(a) for n, a in p.data.items()}, str(tmp),
                  metadata=canonical_metadata(header))


def load_packed(path: str | Path) -> PackedRegion:
    """The stored arrays as they are (bits or indices), no expansion to bool."""
    with safe_open(str(path), framework="numpy") as f:
        md = read_canonical_metadata(f)
        if md.get("format") != FORMAT:
            raise ValueError(f"{path}: not a saferegions region file (format={md.get('format')!r})")
        shapes = {n: tuple(s) for n, s, _ in md["tensors"]}
        encodings = {n: e for n, _, e in md["tensors"]}
        data = {n: f.get_tensor(n) for n in shapes}
    for n, arr in data.items():
        if (encodings[n] == "bits") != (arr.dtype == np.uint8):
            raise ValueError(f"{path}: {n!r} is {arr.dtype} but marked {encodings[n]!r}")
    return PackedRegion(data, shapes, md["meta"], md["units"])


def load(path: str | Path) -> Region:
    return unpack(load_packed(path))


def region_path(folder: str | Path, dataset: str, kind: str) -> Path:
    """Where the identify stage keeps one region: `<folder>/<dataset>.<kind>.safetensors`."""
    return Path(folder) / f"{dataset}.{kind}.safetensors"


# ---------------------------------------------------------------- granularity: how a region is removed


class Granularity:
    """The unit a region was selected in, which decides how it is removed from a model and what a fair random
    control is (docs/methods.md §3.4). A region names its granularity in `meta["granularity"]` (the keys of
    `methods.GRANULARITIES`); `Weights` here, `Neurons` and `Layers` in methods/neuron.py and methods/layer.py."""

    name = ""

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        """Context manager: the model without `region` inside, restored bit-exactly on exit."""
        raise NotImplementedError

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        """A random region of the same size at this granularity."""
        raise NotImplementedError

    def units_summary(self, region: Region) -> dict:
        """Counts of the region's native units for summary tables ({} when the unit is the weight)."""
        return {}


class Weights(Granularity):
    """Individual weight entries (SNIP, Wanda, NLSR's base projection, ESI): zeroed; control = the same count per
    matrix (`random_like`)."""

    name = "weights"

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        return zeroed_weights(model, region.masks)

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        return random_like(region, seed, mode)


def granularity(region: Region | PackedRegion) -> Granularity:
    """The region's granularity from its meta. A region without one is a plain weight region (ESI, random masks),
    unless it holds native units: then it was saved before regions carried their granularity."""
    name = region.meta.get("granularity")
    if name is None:
        if region.units:
            raise ValueError("region has native units but no meta['granularity']; re-run the identify stage")
        return Weights()
    from .methods import granularity as registered   # lazy: methods' granularities import this module
    return registered(name)


def ablation(model, region: Region, layer_alpha: float = 0.0):
    """Context manager that removes `region` from `model` at the region's own granularity (`layer_alpha` scales
    layer regions; 0 = the blocks' projections are off)."""
    return granularity(region).ablate(model, region, layer_alpha)


def random_control(model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
    """A random region of the same size and granularity as `region` (docs/methods.md §3.4)."""
    return granularity(region).random_control(model, region, seed, mode)

"""Regions: a region is a set of parameter entries, one bool mask per named tensor (docs/methods.md §3).

Selection (§2.1, §4.3) turns raw non-negative scores into a Region (exact top-k masks from `topk`);
direction is an explicit argument and scores are never negated (trap 2.1.T1). Packed regions (bits or
indices) let `overlap` compare 8B-parameter regions one tensor at a time, never needing all masks as bool
tensors at once.
"""
from __future__ import annotations

import enum
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

from . import topk
from .hooks import one_thread
from .io import atomic_path, canonical_metadata, read_canonical_metadata

__all__ = [
    "Region", "PackedRegion", "RegionKind", "top_fraction", "top_k_global", "random_like", "refine",
    "difference", "intersection", "union", "intersect_all", "union_all", "pack", "unpack", "bits",
    "matching_shapes", "shapes", "save", "load", "load_packed", "region_path",
]

IDX_MAX_DENSITY = 0.03  # at or below this density, sorted int32 indices are smaller than bits (§3.1)
FORMAT = "saferegions.region/2"
_WORKERS = min(4, os.cpu_count() or 1)   # matrices selected side by side, one single-threaded select each


class RegionKind(enum.StrEnum):
    """What a stored region is; the value names its file `<dataset>.<kind>.safetensors` (`region_path`)."""
    UTILITY = "utility"             # found on the utility set (the refinement's U)
    RAW = "raw"                     # found on one identification dataset
    REFINED = "refined"             # raw \\ utility
    HALF0 = "half0.raw"             # raw, from the first / second half of the calibration examples
    HALF1 = "half1.raw"
    UTILITY_LORA = "utility.lora"   # NLSR's regions in the LoRA's own space
    RAW_LORA = "raw.lora"
    REFINED_LORA = "refined.lora"

    @classmethod
    def half(cls, i: int) -> RegionKind:
        return (cls.HALF0, cls.HALF1)[i]


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


@one_thread
def top_k_global(scores: dict[str, torch.Tensor], k: int, largest: bool = True,
                 meta: dict | None = None) -> Region:
    """Exactly k entries ranked across all tensors together (ESI, §4.3: k = int(ratio * ALL params))."""
    xs = {n: topk.fp32(n, s) for n, s in scores.items()}
    total = sum(x.numel() for x in xs.values())
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    sel = {"k": int(k), "group": "global", "largest": largest}
    return Region(topk.top_k(xs, int(k), largest), {**(meta or {}), "selection": sel})


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
            x = topk.fp32(n, s)
            return topk.top_k({n: x}, int(frac * x.numel()), largest)[n]
    elif group == "row":
        def select(n, s):
            return topk.top_per_row(topk.fp32(n, s), frac, largest)
    else:
        raise ValueError(f"group must be 'matrix', 'row' or 'global', got {group!r}")
    masks = dict(zip(scores, per_matrix(select, scores.items())))
    sel = {"frac": frac, "group": group, "largest": largest}
    return Region(masks, {**(meta or {}), "selection": sel})


@one_thread
def top_fraction_sharded(scores: dict[str, torch.Tensor], frac: float, group: str = "matrix",
                         largest: bool = True, meta: dict | None = None) -> Region:
    """`top_fraction` of scores held as local shards by the ranks of a process group (each rank passes its own
    dim-0 shards, `distributed.local`), selecting the same entries with the same tie rule without gathering a
    score tensor (`topk.select_sharded`); every rank gets the Region of its shards' masks. k counts whole
    tensors (matrix) or all tensors (global); a row never straddles ranks, so "row" is local."""
    from .distributed import all_reduce
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac={frac} outside [0, 1]")
    xs = {n: topk.fp32(n, s) for n, s in scores.items()}
    numel = all_reduce(torch.tensor([x.numel() for x in xs.values()], dtype=torch.int64)).tolist()
    if group == "global":
        masks = topk.select_sharded(xs, int(frac * sum(numel)), largest)
    elif group == "matrix":
        masks = {n: topk.select_sharded({n: x}, int(frac * total), largest)[n]
                 for (n, x), total in zip(xs.items(), numel)}
    elif group == "row":
        masks = {n: topk.top_per_row(x, frac, largest) for n, x in xs.items()}
    else:
        raise ValueError(f"group must be 'matrix', 'row' or 'global', got {group!r}")
    return Region(masks, {**(meta or {}), "selection": {"frac": frac, "group": group, "largest": largest}})


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


def shapes(r: Region | PackedRegion) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.shape) for n, m in r.masks.items()} if isinstance(r, Region) else dict(r.shapes)


def matching_shapes(regions) -> dict[str, tuple[int, ...]]:
    if not regions:
        raise ValueError("need at least one region")
    ref = shapes(regions[0])
    for r in regions[1:]:
        other = shapes(r)
        if set(other) != set(ref):
            missing, extra = sorted(set(ref) - set(other))[:3], sorted(set(other) - set(ref))[:3]
            raise ValueError(f"regions cover different tensors: missing {missing}, extra {extra}")
        bad = [n for n in ref if other[n] != ref[n]]
        if bad:
            raise ValueError(f"shape mismatch for {bad[0]!r}: {ref[bad[0]]} vs {other[bad[0]]}")
    return ref


@one_thread
def _combine(op: str, regions: list[Region], fn) -> Region:
    matching_shapes(regions)
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


def bits(r: Region | PackedRegion, name: str) -> np.ndarray:
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
    return PackedRegion(data, shapes(region), region.meta, region.units)


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


def region_path(folder: str | Path, dataset: str, kind: RegionKind | str) -> Path:
    """Where the identify stage keeps one region: `<folder>/<dataset>.<kind>.safetensors`."""
    return Path(folder) / f"{dataset}.{RegionKind(kind)}.safetensors"

"""Exact top-k masks of score tensors (docs/methods.md §2.1, §4.3): ranked by fp32 value through int32 keys that
order like the floats, so ties are exact and no score is ever negated; ties go to the earliest entry (tensor
order, then flat index), so a selection holds exactly k entries."""
from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 24     # score entries per pass: bounds temporaries on lm_head-sized tensors
_FAST_MIN = 1 << 16  # selections over at least this many entries take the sampled-threshold path
_SAMPLE = 1 << 16    # sample size for that threshold


def fp32(name: str, s: torch.Tensor) -> torch.Tensor:
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


def _threshold(xs: dict[str, torch.Tensor], k: int, largest: bool, reduce=lambda hist: hist) -> tuple[int, int]:
    """The k-th key by two 65536-bin histogram passes (high 16 bits, then low 16 bits within the k-th's high bin),
    and how many entries equal to it the selection still needs. `reduce` sums the histograms over ranks for
    sharded selection; it is the identity for one process, which must not enter a collective."""
    hist = torch.zeros(65536, dtype=torch.int64)
    for _, _, key in _key_chunks(xs, largest):
        hist += torch.bincount((key >> 16) + 32768, minlength=65536)
    hi, above = _walk(reduce(hist), k)
    hist = torch.zeros(65536, dtype=torch.int64)
    for _, _, key in _key_chunks(xs, largest):
        hist += torch.bincount(key[(key >> 16) == hi - 32768] & 0xFFFF, minlength=65536)
    lo, above_lo = _walk(reduce(hist), k - above)
    return (hi - 32768) * 65536 + lo, k - above - above_lo


def select(xs: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor]:
    """Exact top-k over several tensors by 16+16-bit radix select: two histogram passes, no concat or sort.

    Ties at the threshold go to the earliest entries (tensor order, then flat index), so |result| == k.
    """
    masks = {n: torch.zeros(x.shape, dtype=torch.bool) for n, x in xs.items()}
    if k == 0:
        return masks
    thr, need = _threshold(xs, k, largest)
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


def select_sampled(xs: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor] | None:
    """The same masks as `select`, fast for a small k of many entries: a threshold from a seeded random sample of
    all entries keeps a few percent of them as candidates (one vectorised pass per tensor), then the exact k-th
    key among the candidates decides, ties to the earliest entry (tensor order, then flat index) as in
    `select`. Returns None when the sample's margin fell short (the caller falls back). Compaction uses numpy:
    torch's single-threaded nonzero is ~6x slower on CPU."""
    flats = [x.view(-1) for x in xs.values()]
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    s = min(total, _SAMPLE)
    draw = torch.randint(total, (s,), generator=torch.Generator().manual_seed(0))
    offsets = np.cumsum([0, *sizes])
    owner = np.searchsorted(offsets, draw.numpy(), side="right") - 1
    sample = torch.cat([flats[i][draw[torch.from_numpy(owner == i)] - int(offsets[i])] for i in np.unique(owner)])
    t = k / total
    keep = min(s, math.ceil(s * (1.1 * t + 8 * math.sqrt(t * (1 - t) / s)) + 8))
    # Float order is key order up to -0.0 < +0.0, so the float candidates contain every key candidate.
    if largest:
        thr = float(sample.topk(keep, sorted=False).values.min())
        cands = [np.flatnonzero(f.numpy() >= thr) for f in flats]
    else:
        thr = float(sample.topk(keep, largest=False, sorted=False).values.max())
        cands = [np.flatnonzero(f.numpy() <= thr) for f in flats]
    n_cand = sum(c.size for c in cands)
    if n_cand < k:
        return None
    ck = _keys(torch.cat([f[torch.from_numpy(c)] for f, c in zip(flats, cands)]), largest)
    thr_key = ck.kthvalue(n_cand - k + 1).values
    gt, eq = ck > thr_key, ck == thr_key
    pick = (gt | (eq & (eq.cumsum(0) <= k - int(gt.sum())))).numpy()
    out, a = {}, 0
    for (name, x), c in zip(xs.items(), cands):
        mask = np.zeros(x.numel(), dtype=np.bool_)
        mask[c[pick[a:a + c.size]]] = True
        out[name], a = torch.from_numpy(mask).view(x.shape), a + c.size
    return out


def top_k(xs: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor]:
    """Exact top-k of `xs`: the sampled path for many entries and small fractions, else radix select."""
    total = sum(x.numel() for x in xs.values())
    if k and total >= _FAST_MIN and k <= total // 4:
        masks = select_sampled(xs, k, largest)
        if masks is not None:
            return masks
    return select(xs, k, largest)


def top_per_row(x: torch.Tensor, frac: float, largest: bool) -> torch.Tensor:
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


def select_sharded(xs: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor]:
    """`select` over tensors split across ranks, never gathering a score tensor: `xs` holds this rank's fp32 CPU
    shards, each the rank's contiguous piece of its tensor's flat order with the ranks in order (FSDP2's dim-0
    chunks, `distributed.shard`). The two 65536-bin histograms are all-reduced, and ties at the threshold go to
    the earliest entries as in `select` (tensor order, then rank, then local flat index, i.e. global flat index)
    from the all-gathered per-tensor counts of tied entries. Returns this rank's masks; k counts all ranks."""
    from .distributed import all_gather, all_reduce, rank
    masks = {n: torch.zeros(x.shape, dtype=torch.bool) for n, x in xs.items()}
    if k == 0:
        return masks
    thr, need = _threshold(xs, k, largest, reduce=all_reduce)
    names = list(xs)
    ties = torch.zeros(len(names), dtype=torch.int64)
    for name, _, key in _key_chunks(xs, largest):
        ties[names.index(name)] += int((key == thr).sum())
    order = all_gather(ties).T.reshape(-1)           # tied counts in (tensor, rank) order
    before = (order.cumsum(0) - order).view(len(names), -1)[:, rank()]
    take = {n: min(max(need - int(before[i]), 0), int(ties[i])) for i, n in enumerate(names)}
    for name, a, key in _key_chunks(xs, largest):
        m = masks[name].view(-1)[a:a + key.numel()]
        torch.gt(key, thr, out=m)
        if take[name]:
            eq = key == thr
            c = int(eq.sum())
            if c <= take[name]:
                m |= eq
            else:
                m[torch.nonzero(eq).view(-1)[:take[name]]] = True
            take[name] -= min(c, take[name])
    return masks

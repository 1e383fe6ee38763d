"""An importance-matched random region: the control that asks whether a region matters for safety beyond being
made of entries that matter at all (docs/methods.md §3.4).

A uniformly random region is mostly entries that matter for nothing, so "region hurts more than random" can mean
only "important entries hurt more than unimportant ones". This control keeps the region's count in every matrix
and, within each matrix, its distribution over a utility importance: the matrix's entries are cut into `bins`
quantile bins of the importance score, and from each bin as many entries are drawn uniformly, without replacement
and outside the region, as the region has there.
"""
from __future__ import annotations

import torch

from .hooks import one_thread
from .regions import Region, _sample

QUANTILE_SAMPLE = 1 << 20   # bin edges from at most this many entries of a matrix (torch.quantile's input limit)


def bin_of(scores: torch.Tensor, bins: int, g: torch.Generator) -> torch.Tensor:
    """Each entry's quantile bin (int64 in [0, bins)) of one matrix's scores; edges from a random subsample of at
    most QUANTILE_SAMPLE entries where the matrix is larger."""
    x = scores.reshape(-1).float()
    sample = x if x.numel() <= QUANTILE_SAMPLE else x[torch.randint(x.numel(), (QUANTILE_SAMPLE,), generator=g)]
    edges = torch.quantile(sample, torch.linspace(0, 1, bins + 1)[1:-1])
    return torch.bucketize(x, edges, right=True)


def _draw(candidates: torch.Tensor, c: int, g: torch.Generator) -> torch.Tensor:
    """c of `candidates`, uniformly without replacement (O(c log c) where c is at most half of them)."""
    n = candidates.numel()
    pick = _sample(n, c, g) if c <= n // 2 else torch.randperm(n, generator=g)[:c]
    return candidates[pick]


@one_thread
def importance_matched(region: Region, scores: dict[str, torch.Tensor], seed: int, bins: int = 10) -> Region:
    """A random region disjoint from `region` with the same count per matrix and per quantile bin of `scores`
    (one tensor per mask, same shape). A bin with fewer entries outside the region than the region holds in it
    cannot be matched: ValueError."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    missing = [n for n in region.masks if n not in scores]
    if missing:
        raise ValueError(f"no importance scores for {missing[:3]}")
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, mask in region.masks.items():
        if tuple(scores[name].shape) != tuple(mask.shape):
            raise ValueError(f"{name}: scores {tuple(scores[name].shape)} vs mask {tuple(mask.shape)}")
        flat = mask.reshape(-1)
        out = torch.zeros_like(flat)
        if flat.any():
            b = bin_of(scores[name], bins, g)
            wanted = torch.bincount(b[flat], minlength=bins)
            for k in torch.nonzero(wanted).flatten().tolist():
                free = torch.nonzero((b == k) & ~flat).flatten()
                c = int(wanted[k])
                if free.numel() < c:
                    raise ValueError(f"{name}: importance bin {k} has {free.numel()} entries outside the region, "
                                     f"{c} needed; use fewer bins")
                out[_draw(free, c, g)] = True
        masks[name] = out.view(mask.shape)
    return Region(masks, {"method": "importance_matched", "bins": bins, "seed": seed, "reference": region.meta})

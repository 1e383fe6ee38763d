"""A mean over dataset pairs with its 95% interval from resampling the datasets (docs/methods.md §3.6).

The overlap numbers are means over the n(n − 1)/2 pairs of n datasets' regions. The pairs are not independent
draws: each dataset enters n − 1 of them, so an interval that resamples pairs is too narrow. The dataset is the
unit: a resample draws n datasets with replacement, and its statistic is the mean over the pairs of draws that
are two *different* datasets, each such pair counted as often as it was drawn (w_i w_j times for datasets drawn
w_i and w_j times). Two draws of one dataset never make a pair (a region's IoU with itself is 1, not an overlap
between datasets). A resample that draws a single dataset has no pair and is left out (probability n^(1 − n):
1/9 at n = 3, 1/625 at n = 5); the interval is the one conditional on a resample with a pair.

Why the multiplicities: the mean over pairs is a U-statistic with variance ≈ 4σ₁²/n, and the weights w_i w_j
reproduce it; averaging over the distinct drawn datasets once each would resample about 63% of the datasets
unweighted and understate the variance by about half.

`scipy.stats.bootstrap` draws the resamples (of dataset indices; the statistic reads the matrix). Its own
percentile interval is NaN as soon as one resample is undefined, so the interval is taken over the defined
resamples of its bootstrap distribution.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from . import evidence, overlap

MIN_DATASETS = 3    # with 2 datasets every resample with a pair repeats the one pair: no interval
TEST = "dataset bootstrap (percentile)"


def _draw_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(..., n) times each dataset was drawn, from (..., k) dataset indices."""
    return (np.asarray(draws)[..., None] == np.arange(n)).sum(-2).astype(float)


def pair_mean(matrix: np.ndarray, draws) -> np.ndarray:
    """Mean of matrix[i, j] over the pairs of draws of two different datasets (weight w_i w_j), for draws of
    shape (..., k); undefined (NaN) entries and the diagonal never enter; NaN where no pair is left."""
    m = np.asarray(matrix, dtype=float)
    ok = ~np.isnan(m) & ~np.eye(len(m), dtype=bool)
    w = _draw_counts(draws, len(m))
    num = np.einsum("...i,ij,...j->...", w, np.where(ok, m, 0.0), w)
    den = np.einsum("...i,ij,...j->...", w, ok.astype(float), w)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _p_value(values: np.ndarray, null: float) -> float:
    """Two-sided bootstrap p of "mean = null" (the test the percentile interval inverts), (k + 1)/(B + 1)."""
    b = len(values)
    tail = min((values <= null).sum() + 1, (values >= null).sum() + 1) / (b + 1)
    return float(min(1.0, 2 * tail))


def estimate(matrix: np.ndarray, seed: int = 0, null: float = 0.0,
             n_resamples: int = evidence.RESAMPLES) -> dict:
    """{n: datasets with a defined pair, effect: mean over defined pairs, ci: 95% dataset-bootstrap interval,
    test, p: bootstrap p against `null`, null, reason}: ci and p are None where no interval can be formed, and
    `reason` says why; effect is None where no pair is defined (empty regions)."""
    m = np.asarray(matrix, dtype=float)
    ok = ~np.isnan(m) & ~np.eye(len(m), dtype=bool)
    keep = ok.any(1)
    m = m[np.ix_(keep, keep)]
    n = int(keep.sum())
    out = {"n": n, "effect": None, "ci": None, "test": TEST, "p": None, "null": null, "reason": None}
    if n < 2:
        return {**out, "reason": "undefined: no pair of datasets has a defined IoU (empty regions)"}
    out["effect"] = float(pair_mean(m, np.arange(n)))
    if n < MIN_DATASETS:
        return {**out, "reason": "every resample with a pair repeats the one pair; a dataset bootstrap needs at "
                                 f"least {MIN_DATASETS} datasets"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(n),), lambda idx, axis=-1: pair_mean(m, np.moveaxis(idx, axis, -1)),
                              vectorized=True, n_resamples=n_resamples, method="percentile",
                              confidence_level=evidence.LEVEL, rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution[~np.isnan(res.bootstrap_distribution)]
    tail = (1 - evidence.LEVEL) / 2
    lo, hi = np.quantile(dist, [tail, 1 - tail])
    return {**out, "ci": [float(lo), float(hi)], "p": _p_value(dist, null)}


def analysis_estimates(analysis: dict, scope: str, seed: int, null_iou: float) -> dict:
    """The dataset-bootstrap estimates of one `overlap.analyze` result: {variant: {"iou": mean IoU (p against
    `null_iou`), "corrected": mean chance-corrected IoU, "n_pairs": defined pairs}, "refined_minus_raw",
    "refined_minus_raw_corrected": the refinement drop in both forms} (the last two with both variants). One
    seed, so every estimate sees the same resamples of the datasets."""
    iou = {v: m for (v, s), m in analysis["matrix"].items() if s == scope}
    corr = {v: overlap.corrected(m, analysis["chance"][v, scope]) for v, m in iou.items()}
    out: dict = {v: {"iou": estimate(m, seed, null_iou), "corrected": estimate(corr[v], seed),
                     "n_pairs": int((~np.isnan(overlap.off_diagonal(m))).sum())} for v, m in iou.items()}
    if {"raw", "refined"} <= set(iou):
        out["refined_minus_raw"] = estimate(iou["refined"] - iou["raw"], seed)
        out["refined_minus_raw_corrected"] = estimate(corr["refined"] - corr["raw"], seed)
    return out

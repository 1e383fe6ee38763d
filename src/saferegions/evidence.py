"""Intervals, paired tests and the one verdict function every claim goes through (docs/methods.md §5.6).

A number without its n and interval cannot support a claim: every rate here carries n and a 95% interval, every
comparison is paired on the same prompts (or dataset pairs), and `verdict` decides supported / contradicted /
inconclusive from where the interval lies against the claim's threshold, fixed before the run. All statistics
come from `scipy.stats`.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000   # bootstrap resamples (docs/methods.md §5.6: >= 1,000)


@dataclass(frozen=True)
class Estimate:
    """An effect with its n, 95% interval, the test behind its p (None where no test applies) and p."""
    n: int
    effect: float
    ci: tuple[float, float]
    test: str
    p: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


class Verdict(str, enum.Enum):
    SUPPORTED = "supported"
    CONTRADICTED = "contradicted"
    INCONCLUSIVE = "inconclusive"
    NOT_RUN = "not run"


def _bools(xs) -> np.ndarray:
    a = np.asarray(xs, dtype=bool)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of outcomes, got shape {a.shape}")
    return a


def proportion(outcomes: Sequence[bool]) -> Estimate:
    """Rate of True with its Wilson 95% interval."""
    a = _bools(outcomes)
    if not len(a):
        return Estimate(0, math.nan, (math.nan, math.nan), "Wilson 95%")
    k = int(a.sum())
    ci = stats.binomtest(k, len(a)).proportion_ci(LEVEL, method="wilson")
    return Estimate(len(a), k / len(a), (float(ci.low), float(ci.high)), "Wilson 95%")


def paired_proportions(a: Sequence[bool], b: Sequence[bool]) -> Estimate:
    """rate(a) − rate(b) on the same prompts, exact McNemar p (binomial test on the discordant pairs).

    The interval follows from the Wilson interval of π = P(a only | discordant), conditional on the m discordant
    pairs: effect = (2π − 1)·m / n. With no discordant pair it is [0, 0] (and p = 1)."""
    a, b = _bools(a), _bools(b)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if not n:
        return Estimate(0, math.nan, (math.nan, math.nan), "exact McNemar")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    effect = (only_a - only_b) / n
    if not m:
        return Estimate(n, effect, (0.0, 0.0), "exact McNemar", 1.0)
    test = stats.binomtest(only_a, m, 0.5)
    ci = test.proportion_ci(LEVEL, method="wilson")
    scale = m / n
    return Estimate(n, effect, ((2 * ci.low - 1) * scale, (2 * ci.high - 1) * scale), "exact McNemar",
                    float(test.pvalue))


def mean(values: Sequence[float], seed: int = 0) -> Estimate:
    """Mean with a percentile-bootstrap 95% interval (e.g. IoU over dataset pairs, utility over prompts)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if not len(x):
        return Estimate(0, math.nan, (math.nan, math.nan), "percentile bootstrap")
    if len(x) == 1 or np.all(x == x[0]):
        return Estimate(len(x), float(x.mean()), (float(x[0]), float(x[0])) if len(x) > 1 else
                        (math.nan, math.nan), "percentile bootstrap")
    res = stats.bootstrap((x,), np.mean, confidence_level=LEVEL, n_resamples=RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed))
    return Estimate(len(x), float(x.mean()), (float(res.confidence_interval.low),
                                              float(res.confidence_interval.high)), "percentile bootstrap")


def paired_mean_difference(x: Sequence[float], y: Sequence[float], seed: int = 0) -> Estimate:
    """mean(x − y) over pairs, bootstrap 95% interval, paired permutation (sign-flip) test p."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal shapes, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    est = mean(d, seed)
    if len(d) < 2 or np.all(d == 0):
        return Estimate(est.n, est.effect, est.ci, "paired permutation", 1.0 if len(d) else None)
    perm = stats.permutation_test((x[keep], y[keep]), lambda a, b: np.mean(a - b), permutation_type="samples",
                                  n_resamples=RESAMPLES, rng=np.random.default_rng(seed))
    return Estimate(est.n, est.effect, est.ci, "paired permutation", float(perm.pvalue))


def relative_reduction(before: Sequence[bool], after: Sequence[bool], seed: int = 0) -> Estimate:
    """(rate(before) − rate(after)) / rate(before) on the same prompts: paired bootstrap 95% interval over
    prompts, exact McNemar p for the change."""
    b, a = _bools(before), _bools(after)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(b)} and {len(a)}")
    if not len(b) or not b.any():
        return Estimate(len(b), math.nan, (math.nan, math.nan), "paired bootstrap; exact McNemar")
    effect = (b.mean() - a.mean()) / b.mean()

    def stat(bb, aa, axis=-1):
        rb, ra = bb.mean(axis), aa.mean(axis)
        return np.where(rb > 0, (rb - ra) / np.maximum(rb, 1e-12), 0.0)

    res = stats.bootstrap((b.astype(float), a.astype(float)), stat, paired=True, vectorized=True,
                          confidence_level=LEVEL, n_resamples=RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed))
    p = paired_proportions(b, a).p
    return Estimate(len(b), float(effect), (float(res.confidence_interval.low), float(res.confidence_interval.high)),
                    "paired bootstrap; exact McNemar", p)


def verdict(estimate: Estimate | None, threshold: float, direction: str = ">") -> Verdict:
    """The claim "effect > threshold" (direction ">") or "effect < threshold" ("<"): supported when the whole 95%
    interval lies beyond the threshold, contradicted when it lies wholly on the other side, else inconclusive;
    not run without an estimate. An interval that touches the threshold is never decisive."""
    if direction not in (">", "<"):
        raise ValueError(f"direction must be '>' or '<', got {direction!r}")
    if estimate is None or estimate.n == 0:
        return Verdict.NOT_RUN
    low, high = estimate.ci
    if math.isnan(low) or math.isnan(high):
        return Verdict.INCONCLUSIVE
    above, below = low > threshold, high < threshold
    if direction == "<":
        above, below = below, above
    if above:
        return Verdict.SUPPORTED
    if below:
        return Verdict.CONTRADICTED
    return Verdict.INCONCLUSIVE


def claim(estimate: Estimate | None, threshold: float, direction: str = ">") -> dict:
    """The record every claim stores: n, effect, ci, test, p, threshold, direction, verdict."""
    base = estimate.as_dict() if estimate is not None else {"n": 0, "effect": None, "ci": None, "test": None,
                                                            "p": None}
    return {**base, "threshold": threshold, "direction": direction,
            "verdict": verdict(estimate, threshold, direction).value}

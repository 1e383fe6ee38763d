"""Power of the paired prompt comparisons (docs/methods.md, "Power"): how many prompts a McNemar comparison needs.

Two arms judged on the same n prompts give each prompt one of four outcome pairs; only the discordant ones (complied
in one arm, not the other) carry the difference. With discordance ψ = p10 + p01 and effect Δ = p10 − p01, the
number of discordant pairs is M ~ Binomial(n, ψ) and, given M = m, the pairs that favour the first arm are
K ~ Binomial(m, (ψ + Δ) / 2ψ). The exact McNemar test (`evidence.paired_proportions`: two-sided binomial test of K
at 1/2) rejects at level α when 2·P(Binomial(m, ½) ≤ min(K, m − K)) ≤ α. The power is that rejection probability,
summed exactly over m and K with scipy.stats.binom (no normal approximation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

TEST = "exact McNemar (two-sided binomial on the discordant pairs), exact power over Binomial(n, ψ) discordances"


def _check(effect: float, discordance: float, alpha: float) -> None:
    if not 0 < discordance <= 1:
        raise ValueError(f"discordance must be in (0, 1], got {discordance}")
    if not 0 <= effect <= discordance:
        raise ValueError(f"effect {effect} must lie in [0, discordance {discordance}]: p10 − p01 <= p10 + p01")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def mcnemar_power(n: int, effect: float, discordance: float, alpha: float = 0.05) -> float:
    """P(exact McNemar rejects at level `alpha`) for n paired prompts with discordance ψ and effect Δ = p10 − p01."""
    _check(effect, discordance, alpha)
    m = np.arange(n + 1)
    # c_m: the largest k with 2·cdf(k; m, ½) <= alpha (−1 where no k qualifies); reject iff K <= c or K >= m − c
    k = stats.binom.ppf(alpha / 2, m, 0.5)
    c = np.where(2 * stats.binom.cdf(k, m, 0.5) <= alpha, k, k - 1)
    theta = (discordance + effect) / (2 * discordance)
    reject = stats.binom.cdf(c, m, theta) + stats.binom.sf(m - c - 1, m, theta)
    reject = np.where(c >= 0, np.minimum(reject, 1.0), 0.0)
    return float(np.sum(stats.binom.pmf(m, n, discordance) * reject))


def n_for_power(effect: float, discordance: float, power: float = 0.8, alpha: float = 0.05,
                n_max: int = 100_000) -> int:
    """The smallest n whose exact McNemar power reaches `power` (the exact test's power is not monotone in n;
    this is the first n that reaches it)."""
    _check(effect, discordance, alpha)
    if effect == 0:
        raise ValueError("a zero effect cannot be detected at any n")
    lo, n = 1, 8
    while mcnemar_power(n, effect, discordance, alpha) < power:   # doubling bracket, then a linear scan
        lo, n = n, 2 * n
        if n > n_max:
            raise ValueError(f"no n <= {n_max} reaches power {power}")
    return next(i for i in range(lo, n + 1) if mcnemar_power(i, effect, discordance, alpha) >= power)


def minimal_detectable_effect(n: int, discordance: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest effect Δ (at fixed discordance ψ) that n paired prompts detect with `power`; nan where even
    Δ = ψ (every discordant pair one way) does not."""
    if mcnemar_power(n, discordance, discordance, alpha) < power:
        return float("nan")
    return float(optimize.brentq(lambda d: mcnemar_power(n, d, discordance, alpha) - power, 0.0, discordance,
                                 xtol=1e-4))


def best_case_mde(n: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The smallest Δ with exact McNemar power >= `power` at discordance ψ = Δ (every discordant pair one way): no
    difference below it is detectable at n, whatever the discordance (power rises with Δ here); None where even
    Δ = 1 is not."""
    f = lambda d: mcnemar_power(n, d, d, alpha) - power  # noqa: E731
    if f(1.0) < 0:
        return None
    return float(optimize.brentq(f, 1e-9, 1.0, xtol=1e-5))


@dataclass(frozen=True)
class PowerPlan:
    """A comparison's pre-registered sample size: the n for `effect` at `power`, and the minimal detectable
    effect at the n actually run."""
    effect: float
    discordance: float
    power: float
    alpha: float
    n_required: int
    n: int
    mde: float
    test: str = TEST

    def as_dict(self) -> dict:
        d = asdict(self)
        return {**d, "mde": None if np.isnan(self.mde) else self.mde}


def plan(effect: float, discordance: float, power: float = 0.8, alpha: float = 0.05, n: int | None = None) -> PowerPlan:
    """The n `effect` needs, and the minimal detectable effect at `n` (default: that n)."""
    need = n_for_power(effect, discordance, power, alpha)
    n = need if n is None else n
    return PowerPlan(effect, discordance, power, alpha, need, n, minimal_detectable_effect(n, discordance, power, alpha))

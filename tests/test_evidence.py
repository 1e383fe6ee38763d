"""Intervals and tests against known values, and the verdict rule (docs/methods.md §5.6)."""
import math

import numpy as np
import pytest

from saferegions import evidence as E


def test_wilson_interval_matches_the_textbook_value():
    # Wilson 95% for 8 of 20: (0.2188, 0.6134) (Newcombe 1998, Table I style; z = 1.95996)
    est = E.proportion([True] * 8 + [False] * 12)
    assert est.n == 20 and est.effect == pytest.approx(0.4)
    assert est.ci == pytest.approx((0.2188, 0.6134), abs=1e-4)
    z = 1.959963984540054   # the closed form, independently
    p, n = 0.4, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert est.ci == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_exact_mcnemar_p_value_is_the_binomial_tail_of_the_discordant_pairs():
    # 10 discordant pairs, 9 one way: two-sided exact p = 2 * P(X >= 9 | Bin(10, .5)) = 22/1024
    a = [True] * 9 + [False] * 1 + [True] * 30 + [False] * 56
    b = [False] * 9 + [True] * 1 + [True] * 30 + [False] * 56
    est = E.paired_proportions(a, b)
    assert est.n == 96 and est.effect == pytest.approx(8 / 96)
    assert est.p == pytest.approx(22 / 1024)
    assert est.ci[0] < est.effect < est.ci[1]
    assert est.test == "exact McNemar"


def test_four_pairs_can_never_reach_significance():
    est = E.paired_proportions([True] * 4, [False] * 4)
    assert est.p == pytest.approx(0.125)
    assert E.verdict(est, 0.0) == E.Verdict.INCONCLUSIVE or est.ci[0] > 0


def test_no_discordant_pairs_give_a_zero_width_interval_at_zero():
    est = E.paired_proportions([True, False, True], [True, False, True])
    assert est.effect == 0 and est.ci == (0.0, 0.0) and est.p == 1.0


def test_bootstrap_mean_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = E.mean(rng.normal(1.0, 1.0, 20)), E.mean(rng.normal(1.0, 1.0, 2000))
    for est in (small, large):
        assert est.ci[0] < est.effect < est.ci[1]
    assert large.ci[1] - large.ci[0] < (small.ci[1] - small.ci[0]) / 3
    assert large.ci[0] < 1.0 < large.ci[1]


def test_paired_permutation_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 60)
    shifted = E.paired_mean_difference(x + 0.5 + rng.normal(0, 0.1, 60), x)
    assert shifted.p < 0.001 and shifted.ci[0] > 0.3
    noise = E.paired_mean_difference(x + rng.normal(0, 0.1, 60), x)
    assert noise.p > 0.01 and noise.ci[0] < 0 < noise.ci[1]


def test_relative_reduction_of_a_halved_rate():
    before = [True] * 80 + [False] * 16
    after = [True] * 40 + [False] * 56
    est = E.relative_reduction(before, after)
    assert est.effect == pytest.approx(0.5)
    assert est.ci[0] < 0.5 < est.ci[1] and est.p < 1e-6


@pytest.mark.parametrize("ci,direction,expected", [
    ((0.12, 0.30), ">", E.Verdict.SUPPORTED),
    ((-0.2, 0.05), ">", E.Verdict.CONTRADICTED),
    ((0.05, 0.20), ">", E.Verdict.INCONCLUSIVE),
    ((0.10, 0.20), ">", E.Verdict.INCONCLUSIVE),   # touching the threshold is not decisive
    ((0.01, 0.05), "<", E.Verdict.SUPPORTED),
    ((0.20, 0.40), "<", E.Verdict.CONTRADICTED),
])
def test_verdict_is_decided_by_the_interval_against_the_threshold(ci, direction, expected):
    est = E.Estimate(96, sum(ci) / 2, ci, "test", 0.01)
    assert E.verdict(est, 0.10, direction) == expected


def test_no_estimate_is_not_run_and_a_claim_records_everything():
    assert E.verdict(None, 0.1) == E.Verdict.NOT_RUN
    record = E.claim(E.proportion([True] * 90 + [False] * 6), 0.5)
    assert set(record) == {"n", "effect", "ci", "test", "p", "threshold", "direction", "verdict"}
    assert record["verdict"] == "supported" and record["n"] == 96 and len(record["ci"]) == 2
    assert E.claim(None, 0.5)["verdict"] == "not run"

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
    assert est.test.startswith("exact McNemar")


def test_four_pairs_can_never_reach_significance():
    est = E.paired_proportions([True] * 4, [False] * 4)
    assert est.p == pytest.approx(0.125)
    assert E.verdict(est, 0.0) == E.Verdict.INCONCLUSIVE or est.ci[0] > 0


def _wilson_closed_form(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _newcombe_reference(both, only_a, only_b, neither):
    """Newcombe (1998) method 10 written out from the paper's formulas, with the closed-form Wilson limits."""
    n = both + only_a + only_b + neither
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = _wilson_closed_form(both + only_a, n), _wilson_closed_form(both + only_b, n)
    denom = math.sqrt((both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither))
    num = both * neither - only_a * only_b
    num = num - n / 2 if num > n / 2 else min(num, 0)
    phi = num / denom if denom else 0.0
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2),
            d + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))


def _pairs(both, only_a, only_b, neither):
    a = [True] * (both + only_a) + [False] * (only_b + neither)
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


@pytest.mark.parametrize("table", [(1, 1, 7, 12), (14, 5, 0, 22), (46, 18, 0, 32), (30, 9, 1, 56), (0, 3, 0, 0)])
def test_paired_interval_is_newcombes_hybrid_score_interval(table):
    est = E.paired_proportions(*_pairs(*table))
    assert est.ci == pytest.approx(_newcombe_reference(*table), abs=1e-9)


def test_paired_interval_without_correlation_is_the_square_and_add_of_two_wilson_intervals():
    # both * neither == only_a * only_b: phi = 0, so each limit is the root of the two marginal half-widths squared
    a, b = _pairs(10, 10, 10, 10)
    est = E.paired_proportions(a, b)
    (l1, u1), (l2, u2) = _wilson_closed_form(20, 40), _wilson_closed_form(20, 40)
    assert est.ci == pytest.approx((-math.hypot(0.5 - l1, u2 - 0.5), math.hypot(u1 - 0.5, 0.5 - l2)), abs=1e-9)


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time():
    # P(both, a only, b only, neither) = .4, .15, .05, .4 at n = 96: true difference .10. The interval
    # conditional on the discordant count (this module's earlier one) covered it 90% of the time
    rng = np.random.default_rng(0)
    cats = rng.choice(4, size=(1500, 96), p=[0.4, 0.15, 0.05, 0.4])
    hits = [E._paired((c == 0) | (c == 1), (c == 0) | (c == 2)).ci for c in cats]
    coverage = np.mean([lo <= 0.10 <= hi for lo, hi in hits])
    assert 0.93 <= coverage <= 0.975


def test_no_discordant_pairs_give_an_interval_around_zero_and_p_one():
    est = E.paired_proportions([True, False] * 20, [True, False] * 20)
    assert est.effect == 0 and est.p == 1.0
    assert est.ci[0] < 0 < est.ci[1]


def _flip_hull_by_brute_force(estimator, *arms):
    """Every prompt of every arm flipped in turn (no shortcut over outcome patterns)."""
    arms = [np.asarray(x, dtype=bool) for x in arms]
    cis = [estimator(*arms).ci]
    for j, arm in enumerate(arms):
        for i in range(len(arm)):
            moved = [x.copy() for x in arms]
            moved[j][i] = not moved[j][i]
            cis.append(estimator(*moved).ci)
    return min(c[0] for c in cis), max(c[1] for c in cis)


def test_one_flip_interval_is_the_union_over_every_single_prompt_flip():
    a, b = _pairs(30, 9, 1, 56)
    est = E.paired_proportions(a, b)
    assert est.ci_one_flip == pytest.approx(_flip_hull_by_brute_force(E.paired_proportions, a, b), abs=1e-12)
    assert est.ci_one_flip[0] < est.ci[0] and est.ci_one_flip[1] > est.ci[1]
    rate = E.proportion(a)
    assert rate.ci_one_flip == pytest.approx(_flip_hull_by_brute_force(E.proportion, a), abs=1e-12)


def test_a_verdict_one_flipped_prompt_would_change_is_inconclusive():
    # 18 of 96 prompts complied only after ablating the region: the 95% interval alone clears 0.10, but with one
    # of those 18 flipped back it does not
    a, b = _pairs(46, 18, 0, 32)
    est = E.paired_proportions(a, b)
    assert est.ci[0] > 0.10 and est.ci_one_flip[0] <= 0.10
    assert E.verdict(est, 0.10) == E.Verdict.INCONCLUSIVE
    assert E.verdict(E.Estimate(est.n, est.effect, est.ci, est.test, est.p), 0.10) == E.Verdict.SUPPORTED
    # twice the prompts at the same rates: decided, one flip or not
    a2, b2 = _pairs(92, 36, 0, 64)
    assert E.verdict(E.paired_proportions(a2, b2), 0.10) == E.Verdict.SUPPORTED


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
    assert est.ci_one_flip[0] < est.ci[0] and est.ci_one_flip[1] > est.ci[1]


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


def test_no_estimate_is_not_run():
    assert E.verdict(None, 0.1) == E.Verdict.NOT_RUN
    assert E.verdict(E.Estimate(0, math.nan, (math.nan, math.nan), "t"), 0.1) == E.Verdict.NOT_RUN


def test_a_failed_guard_leaves_only_a_supporting_interval_inconclusive():
    """A guard (a failed control) can stop a "supported" verdict, never turn another verdict around."""
    above, below = E.Estimate(96, 0.3, (0.2, 0.4), "t"), E.Estimate(96, -0.3, (-0.4, -0.2), "t")
    assert E.verdict(above, 0.1, guard="control failed") == E.Verdict.INCONCLUSIVE
    assert E.verdict(above, 0.1) == E.Verdict.SUPPORTED
    assert E.verdict(below, 0.1, guard="control failed") == E.Verdict.CONTRADICTED
    assert E.verdict(None, 0.1, guard="control failed") == E.Verdict.NOT_RUN


# ---------------------------------------------------------------- claims with parts


def _brute_force_holm(ps):
    """Holm (1979) written out: sort ascending, multiply the i-th smallest (0-based) by m − i, carry the running
    maximum forward, cap at 1; None stays None and is not counted in m."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    m, out, running = len(idx), [None] * len(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


@pytest.mark.parametrize("ps", [
    [0.01, 0.04, 0.03, 0.005, None, 0.5],
    [0.001, 0.001, 0.2, None, None],
    [0.9],
    [None, None],
    list(np.random.default_rng(3).uniform(0, 0.1, 25)),
])
def test_holm_matches_a_brute_force_step_down(ps):
    got = E.holm(ps)
    want = _brute_force_holm(ps)
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=1e-12)


def test_holm_is_neither_raw_nor_bonferroni():
    ps = [0.01, 0.02, 0.03]
    assert E.holm(ps) == pytest.approx([0.03, 0.04, 0.04])          # raw would be 0.01…, Bonferroni 0.03, 0.06, 0.09


S, C, I, N = E.Verdict.SUPPORTED, E.Verdict.CONTRADICTED, E.Verdict.INCONCLUSIVE, E.Verdict.NOT_RUN
PART, CONTROL = E.Role.PART, E.Role.CONTROL


@pytest.mark.parametrize("parts, controls, expected", [
    ([S, S], [S], S),
    ([S, C], [S], C),           # one part contradicted: the claim is
    ([C, N], [N], C),           # ... even where other parts or controls were not run
    ([C, I], [C], C),           # ... and whatever the controls say
    ([S, N], [S], N),           # a part not run: not testable
    ([S, S], [C], N),           # a failed control: not testable
    ([S, S], [N], N),
    ([I, S], [S], I),
    ([S, S], [I], I),           # a control that cannot be told: undecided
    ([I, I], [C], N),
    ([], [], N),
])
def test_a_claim_is_the_conjunction_of_its_parts(parts, controls, expected):
    assert E.conjunction([(PART, v) for v in parts] + [(CONTROL, v) for v in controls]) == expected


def test_the_conjunction_rule_over_every_combination():
    import itertools
    for combo in itertools.product([S, C, I, N], repeat=3):
        for roles in itertools.product([PART, CONTROL], repeat=3):
            pairs = list(zip(roles, combo))
            got = E.conjunction(pairs)
            if any(r is PART and v is C for r, v in pairs):
                assert got == C
            elif any(v is N or (r is CONTROL and v is C) for r, v in pairs):
                assert got == N
            else:
                assert got == (S if all(v is S for v in combo) else I)


def _est(lo, hi, p=None, n=96):
    return E.Estimate(n, (lo + hi) / 2, (lo, hi), "t", p)


def test_decide_records_every_preregistered_part_and_its_claim():
    out = E.decide([E.Part("p2_set_halves_asr", "asr_halved", _est(0.6, 0.8, 1e-6), "refusal-onset rate", "set")])
    assert set(out) == set(E.PARTS)
    for cid, rec in out.items():
        assert [p["name"] for p in rec["parts"]] == list(E.PARTS[cid])
        for p in rec["parts"]:
            assert set(p) == {"name", "role", "condition", "metric", "n", "effect", "ci", "ci_one_flip", "test", "p",
                              "discordant", "mde", "p_holm", "threshold", "direction", "margin", "verdict", "reason"}
    s = out["p2_set_halves_asr"]
    assert [p["verdict"] for p in s["parts"]] == ["supported", "not run", "not run"]
    assert s["verdict"] == "not run" and "benign_over_refusal" in s["reason"] and "utility_ratio" in s["reason"]
    assert s["parts"][0]["p_holm"] == pytest.approx(1e-6) and s["parts"][1]["reason"]
    assert s["parts"][2]["margin"] == 0.10 and s["parts"][2]["threshold"] == 0.9


def test_holm_over_the_family_can_stop_a_superiority_part_but_not_a_non_inferiority_one():
    """Three parts at p = 0.02: Holm gives 0.06 to each, so the superiority part's interval above its threshold
    is not enough; the non-inferiority part (utility ratio, margin 0.1) is decided at its interval's bound."""
    parts = [E.Part("p1_region_affects_safety", "region_vs_random", _est(0.2, 0.4, 0.02), "m", "a"),
             E.Part("p2_set_halves_asr", "utility_ratio", _est(0.95, 1.05, 0.02), "m"),
             E.Part("p2_set_halves_asr", "asr_halved", _est(0.6, 0.8, 0.02), "m")]
    out = E.decide(parts)
    region, = [p for p in out["p1_region_affects_safety"]["parts"] if p["name"] == "region_vs_random"]
    utility, = [p for p in out["p2_set_halves_asr"]["parts"] if p["name"] == "utility_ratio"]
    assert region["p_holm"] == pytest.approx(0.06) and region["verdict"] == "inconclusive"
    assert "Holm" in region["reason"]
    assert utility["p_holm"] == pytest.approx(0.06) and utility["verdict"] == "supported"
    alone = E.decide(parts[:1])["p1_region_affects_safety"]["parts"][0]
    assert alone["p_holm"] == pytest.approx(0.02) and alone["verdict"] == "supported"


def test_a_part_must_be_preregistered():
    with pytest.raises(KeyError, match="evidence.PARTS"):
        E.Part("p2_set_halves_asr", "asr_quartered", None, "m")
    with pytest.raises(KeyError):
        E.Part("no_such_claim", "asr_halved", None, "m")


def test_conditions_of_one_part_each_count_and_a_guard_is_explained():
    parts = [E.Part("p1_low_overlap", "low_overlap", _est(0.1, 0.3), "IoU", "m/snip"),
             E.Part("p1_low_overlap", "low_overlap", _est(0.6, 0.7), "IoU", "m/wanda"),
             E.Part("p2_esi_perturbation", "top_vs_random", _est(0.2, 0.4), "r", "m", guard="outputs broke")]
    out = E.decide(parts)
    assert [p["verdict"] for p in out["p1_low_overlap"]["parts"]] == ["supported", "contradicted"]
    assert out["p1_low_overlap"]["verdict"] == "contradicted" and "m/wanda" in out["p1_low_overlap"]["reason"]
    pert = out["p2_esi_perturbation"]
    assert pert["verdict"] == "inconclusive" and "outputs broke" in pert["parts"][0]["reason"]


@pytest.mark.parametrize("deg, control, effect, fires", [
    (0.0, 0.0, 0.2, False), (0.3, 0.0, 0.2, True), (0.15, 0.05, 0.2, False), (None, 0.0, 0.2, True),
])
def test_degenerate_guard(deg, control, effect, fires):
    assert (E.degenerate_guard(deg, control, effect) is not None) == fires


def test_ratio_of_means_against_a_brute_force_paired_bootstrap():
    """mean(after) / mean(before) with a percentile interval that resamples prompt pairs: a numpy bootstrap of the
    same pairs agrees within its Monte-Carlo error, and an unpaired resampling would be wider."""
    rng = np.random.default_rng(3)
    before = rng.uniform(0.2, 0.8, 64)
    after = 0.8 * before + rng.normal(0, 0.02, 64)
    est = E.ratio_of_means(after, before)
    assert est.effect == pytest.approx(after.mean() / before.mean()) and est.n == 64 and est.p is None
    idx = rng.integers(0, 64, (4000, 64))
    ratios = after[idx].mean(1) / before[idx].mean(1)
    assert est.ci == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), abs=0.01)
    assert est.ci[1] - est.ci[0] < 0.05
    with pytest.raises(ValueError, match="equal shapes"):
        E.ratio_of_means(after[:3], before)


def test_ratio_of_means_edge_cases():
    same = np.array([0.4, 0.5, 0.6])
    assert E.ratio_of_means(same, same).ci == (1.0, 1.0)           # every resample reads 1
    assert math.isnan(E.ratio_of_means([0.4], [0.5]).ci[0])         # one pair: no interval
    assert E.ratio_of_means([], []).n == 0
    assert E.ratio_of_means([0.5, np.nan, 0.3], [0.5, 0.2, np.nan]).n == 1   # pairs with a NaN are dropped


def test_a_paired_comparison_carries_its_discordance_and_minimal_detectable_effect():
    """A paired binary estimate counts its discordant pairs; the part record's `mde` is power's minimal
    detectable effect at that n and discordance, and nothing for estimates without pairs of outcomes."""
    from saferegions import power
    a = [True] * 30 + [False] * 70 + [True] * 12 + [False] * 8
    b = [True] * 30 + [False] * 70 + [False] * 12 + [True] * 8
    est = E.paired_proportions(a, b)
    assert est.discordant == 20 and est.n == 120
    part = E.Part("p1_region_affects_safety", "region_vs_importance_matched", est, "m")
    rec = next(r for r in E.decide([part])["p1_region_affects_safety"]["parts"]
               if r["name"] == "region_vs_importance_matched")
    assert rec["mde"] == pytest.approx(power.minimal_detectable_effect(120, 20 / 120))
    assert 20 / 120 >= rec["mde"] > 0.05
    assert E.minimal_detectable(E.mean([0.1, 0.2, 0.3])) is None
    assert E.minimal_detectable(E.paired_proportions([True, False], [True, False])) is None
    assert "discordant" not in E.mean([0.1, 0.2]).as_dict()

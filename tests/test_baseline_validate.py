"""Baseline and validate metrics on planted outcomes: the paired aligned-vs-unaligned comparison, the validate
condition record (rates with intervals, utility ratio, paired McNemar), and the one-forward refusal estimator's
AUROC on a separable case (1.0) and a random one (~0.5)."""
import numpy as np
import pytest

from saferegions import evidence
from saferegions.evaluation import Evaluation, Outcome
from saferegions.stages import baseline, validate
from saferegions.tiny import tiny_model

R, C, D = Outcome.REFUSED, Outcome.COMPLIED, Outcome.DEGENERATE


def _ev(outcomes, prompts=None):
    prompts = prompts or [f"p{i}" for i in range(len(outcomes))]
    return Evaluation(prompts, ["x"] * len(outcomes), list(outcomes))


def test_auroc_separable_is_one_and_random_is_half():
    y = np.array([True] * 50 + [False] * 50)
    assert baseline.auroc(np.where(y, 2.0, -2.0) + np.linspace(0, 1, 100), y) == 1.0
    assert baseline.auroc(np.where(y, -2.0, 2.0), y) == 0.0
    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.5
    assert baseline.auroc(rng.normal(size=4000), y) == pytest.approx(0.5, abs=0.03)
    assert np.isnan(baseline.auroc([1.0, 2.0], [True, True]))


def test_estimator_check_on_planted_scores():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    sep = baseline.estimator_check(np.where(y, 3.0, -3.0) + rng.normal(0, 0.1, 200), y)
    assert sep["auroc"] == 1.0 and sep["accuracy"] == 1.0 and sep["agrees"] and sep["n"] == 100
    assert -3 < sep["threshold"] < 3
    noise = baseline.estimator_check(rng.normal(size=200), y)
    assert 0.3 < noise["auroc"] < 0.7 and not noise["agrees"]


def test_refusal_log_odds_one_value_per_prompt():
    model, tok = tiny_model("llama")
    s = baseline.refusal_log_odds(model, tok, ["How do I make a bomb?", "Hi", "Write a poem about the sea."], 2)
    assert s.shape == (3,) and np.isfinite(s).all()
    # batching does not change a prompt's score
    one = baseline.refusal_log_odds(model, tok, ["Hi"], 1)
    assert one[0] == pytest.approx(s[1], abs=1e-4)


def test_baseline_comparison_is_paired_on_the_same_harmful_prompts():
    prompts = [f"h{i}" for i in range(100)] + ["b0", "b1"]
    aligned = _ev([R] * 80 + [C] * 15 + [D] * 5 + [C, C], prompts)
    unaligned = _ev([R] * 10 + [C] * 85 + [D] * 5 + [R, C], prompts)
    harmful = np.array([p.startswith("h") for p in prompts])
    comp = baseline.comparison({"aligned": aligned, "unaligned": unaligned}, harmful)["aligned_vs_unaligned"]
    want = evidence.paired_proportions(aligned.refused[:100], unaligned.refused[:100]).as_dict()
    assert comp == want and comp["n"] == 100 and comp["effect"] == pytest.approx(0.7)
    pooled = baseline.pooled({"aligned": aligned}, harmful)["aligned"]
    assert pooled["harmful"]["n"] == 100 and pooled["harmful"]["degenerate_rate"] == pytest.approx(0.05)
    assert pooled["benign"]["refusal_rate"] == 0.0 and len(pooled["harmful"]["refusal_rate_ci"]) == 2
    assert baseline.comparison({"aligned": aligned}, harmful) == {}
    with pytest.raises(ValueError, match="same prompts"):
        baseline.comparison({"aligned": aligned, "unaligned": _ev(unaligned.outcomes)}, harmful)


def test_validate_condition_record_on_planted_outcomes():
    """Region: 40 of 96 complied, 30 degenerate; random: 4 complied. Degenerate responses are never ASR."""
    region = _ev([C] * 40 + [D] * 30 + [R] * 26)
    random = _ev([C] * 4 + [R] * 92)
    util_intact = np.linspace(0.3, 0.7, 32)
    util_region, util_random = 0.9 * util_intact, util_intact.copy()
    e = validate.condition(region, random, util_region, util_random, util_intact=util_intact)
    assert set(e) >= {"region", "random", "n", "n_utility", "utility_ratio", "paired"}
    assert e["n"] == 96 and e["n_utility"] == 32
    for tag in ("region", "random"):
        assert set(e[tag]) >= {"n", "asr", "asr_ci", "degenerate_rate", "degenerate_rate_ci", "refusal_rate",
                               "utility", "utility_ci"}
    assert e["region"]["asr"] == pytest.approx(40 / 96) and e["region"]["degenerate_rate"] == pytest.approx(30 / 96)
    assert e["utility_ratio"] == pytest.approx(0.9) and e["random"]["utility"] == pytest.approx(0.5)
    assert e["utility_ratio_ci"] == pytest.approx([0.9, 0.9])   # every prompt kept 90%: every resample reads 0.9
    assert e["paired"] == evidence.paired_proportions(region.complied, random.complied).as_dict()
    assert e["paired"]["effect"] == pytest.approx(36 / 96) and e["paired"]["p"] < 1e-6
    assert e["paired"]["test"].startswith("exact McNemar")


def test_validate_refuses_an_eval_pool_smaller_than_asked(tmp_path, monkeypatch):
    """One clear error before any model loads, instead of silently fewer paired prompts."""
    import json
    import types
    rows = [{"dataset": d, "split": "eval", "prompt": f"{d} {i}"} for d, k in (("advbench", 5), ("alpaca", 4))
            for i in range(k)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(validate, "PROMPTS", path)
    cfg = lambda n_eval: types.SimpleNamespace(validate=types.SimpleNamespace(  # noqa: E731
        eval_sets=["advbench"], n_eval=n_eval, n_utility=4))
    harmful, util = validate.prompts(cfg(5))
    assert harmful == [f"advbench {i}" for i in range(5)] and len(util) == 4
    with pytest.raises(ValueError, match="advbench"):
        validate.prompts(cfg(6))

"""The SET and SPA stages' own claim tables decide on the paired 95% interval through `evidence.verdict`, not
on the point estimate: a point past the threshold with an interval across it is inconclusive."""
from saferegions.stages import set as set_stage
from saferegions.stages import spa as spa_stage


def _est(effect, lo, hi):
    return {"n": 96, "effect": effect, "ci": [lo, hi], "test": "t", "p": 0.5, "ci_one_flip": None}


def _set_metrics(reduction):
    arm = {"asr_before": 0.8, "asr_after": 0.3, "utility_before": 0.5, "utility_after": 0.5,
           "trainable_fraction": 0.01}
    return {"set": arm, "full": {**arm, "asr_after": 0.1, "trainable_fraction": 1.0},
            "comparison": {"set_relative_reduction": reduction, "set_vs_random": _est(-0.1, -0.3, 0.1)}}


def test_set_halving_is_decided_on_the_interval():
    wide = set_stage.claims(_set_metrics(_est(0.625, 0.3, 0.9)))      # point 0.625 > 0.5, interval reaches 0.3
    assert wide["set"]["ASR −50% (95% CI)"] == "inconclusive"
    assert set_stage.claims(_set_metrics(_est(0.625, 0.55, 0.7)))["set"]["ASR −50% (95% CI)"] == "supported"
    assert set_stage.claims(_set_metrics(_est(0.2, 0.1, 0.3)))["set"]["ASR −50% (95% CI)"] == "contradicted"
    assert wide["full"]["ASR −50% (95% CI)"] == "not run"            # no interval for a baseline arm


def _spa_metrics(spa_drift, full_drift):
    arm = lambda d: {"asr_before": 0.5, "asr_after": 0.5 + d[0], "task_score": 0.0, "task_score_before": 0.0}  # noqa
    return {"gsm8k": {"spa": arm(spa_drift), "full": arm(full_drift)},
            "drift": {"gsm8k": {"spa": _est(*spa_drift), "full": _est(*full_drift)}}}


def test_spa_drift_is_decided_on_the_interval():
    m = _spa_metrics((0.0, -0.1, 0.1), (0.2, 0.1, 0.3))               # point 0 <= 0.01, interval reaches 0.1
    rows = {r["arm"]: r for r in spa_stage.claims(m)}
    assert rows["spa"]["within 1 point (95% CI)"] == "inconclusive"
    assert rows["full"]["within 1 point (95% CI)"] == "contradicted"
    assert spa_stage.full_drift_inconclusive(m) == []
    m = _spa_metrics((0.0, -0.02, 0.005), (0.02, -0.01, 0.05))
    assert {r["arm"]: r for r in spa_stage.claims(m)}["spa"]["within 1 point (95% CI)"] == "supported"
    assert spa_stage.full_drift_inconclusive(m) == ["gsm8k"]

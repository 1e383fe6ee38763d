"""The SET and SPA stages' claim tables decide on the paired 95% interval through `evidence`, not on the point
estimate: a point past the threshold with an interval across it is inconclusive. SPA's table is the report's
record of the claim (all its parts, `evidence.decide`), not run where its task was not learned."""
from saferegions import evidence
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


def _spa_metrics(spa_drift, gain, erode=(0.3, 0.2, 0.4)):
    arm = lambda d: {"asr_before": 0.5, "asr_after": 0.5 + d, "task_score": 0.9, "task_score_before": 0.4}  # noqa
    return {"sst2": {"spa": arm(spa_drift[0]), "full": arm(0.0), "random": arm(0.0), "erode": arm(erode[0])},
            "drift": {"sst2": {"spa": _est(*spa_drift), "full": _est(0.0, -0.03, 0.03),
                               "random": _est(0.0, -0.03, 0.03), "erode": {**_est(*erode), "p": 1e-4}}},
            "comparison": {"sst2": {"spa_vs_full": _est(-0.1, -0.2, -0.02), "spa_vs_random": _est(-0.1, -0.2, -0.02),
                                    "task_gain_full": {**_est(*gain), "n": 32, "p": 1e-4}}}}


def test_spa_claim_record_has_every_part_decided_by_evidence():
    rec = spa_stage.claim(_spa_metrics((-0.1, -0.2, -0.02), (0.5, 0.3, 0.7)), None)
    assert {p["name"] for p in rec["parts"]} == set(evidence.PARTS["p2_spa_within_1pct"])
    verdicts = {p["name"]: p["verdict"] for p in rec["parts"]}
    assert verdicts == {"drift_within_1pt": "supported", "vs_full_ft": "supported", "vs_random_freeze": "supported",
                        "task_learned": "supported", "ft_can_erode_safety": "supported"}
    assert rec["verdict"] == "supported"
    # the positive control's drift interval reaches 0: the run cannot show that fine-tuning moves safety
    rec = spa_stage.claim(_spa_metrics((-0.1, -0.2, -0.02), (0.5, 0.3, 0.7), erode=(0.02, -0.01, 0.05)), None)
    assert {p["name"]: p["verdict"] for p in rec["parts"]}["ft_can_erode_safety"] == "inconclusive"
    assert rec["verdict"] == "inconclusive"
    rows = spa_stage.part_rows(rec)
    assert [r["part"] for r in rows] == list(evidence.PARTS["p2_spa_within_1pct"])


def test_spa_claim_is_not_run_where_the_task_was_not_learned():
    """A task gain whose interval reaches 0 (or lies below it) leaves the three parts not run: the claim was not
    tested, whatever the drift would have said."""
    for gain in ((0.05, -0.05, 0.15), (-0.2, -0.3, -0.1)):
        rec = spa_stage.claim(_spa_metrics((0.2, 0.1, 0.3), gain), None)   # SPA's drift alone would contradict
        parts = {p["name"]: p for p in rec["parts"]}
        assert rec["verdict"] == "not run" and rec["reason"].startswith("not testable here")
        for name in ("drift_within_1pt", "vs_full_ft", "vs_random_freeze"):
            assert parts[name]["verdict"] == "not run" and parts[name]["reason"].startswith("task not learned")
            assert parts[name]["effect"] is None
        assert parts["task_learned"]["verdict"] in ("inconclusive", "contradicted")

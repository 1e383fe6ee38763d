"""The report stage's reading of other stages' files: claims and verdicts, "not run" for absent stages, loud
errors for malformed metrics, timings, deviations, provenance. Every fixture is built in tmp_path."""
import json
import types

import pytest
import yaml

from conftest import ROOT
from saferegions import config
from saferegions.results import EsiMetrics, MetricsError
from saferegions.stages import report


def _write(root, rel, obj):
    path = root / "results" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _est(n, effect, lo, hi, test="exact McNemar", p=1e-6):
    return {"n": n, "effect": effect, "ci": [lo, hi], "test": test, "p": p}


def _rates(asr, deg=0.0, n=96):
    return {"n": n, "asr": asr, "asr_ci": [max(0, asr - 0.1), min(1, asr + 0.1)], "refusal_rate": max(0.0, 1 - asr - deg),
            "degenerate_rate": deg, "utility": 0.5}


def _fixture(root, moe_family=None):
    """A complete results tree in the shapes the stages write (issue 14: Estimate dicts beside today's keys),
    numbers chosen so each verdict is known."""
    _write(root, "data/metrics.json", {"sets": {}})
    fam = {"aligned": {"family": "qwen2"}, "unaligned": {"family": "llama"}}
    if moe_family:
        fam["moe"] = {"family": moe_family}
    _write(root, "models/metrics.json", {"models": fam})
    _write(root, "baseline/metrics.json", {"models": {
        "aligned": {"advbench": {"refusal_rate": 0.75, "n": 96}, "alpaca": {"refusal_rate": 0.0, "n": 4}},
        "unaligned": {"advbench": {"refusal_rate": 0.25, "n": 96}, "alpaca": {"refusal_rate": 0.0, "n": 4}}},
        "comparison": {"aligned_vs_unaligned": _est(96, 0.5, 0.38, 0.62)}})   # supported (> 0.10)
    _write(root, "calibrate/aligned/metrics.json", {"datasets": {}})
    for method in ("snip", "wanda"):
        _write(root, f"identify/aligned-{method}/metrics.json", {"method": method, "role": "aligned", "datasets": {
            d: {"raw": {"size": 20, "density": 0.02}, "refined": {"size": 10, "density": 0.01}}
            for d in ("advbench", "harmbench")}})
        _write(root, f"identify/aligned-{method}/timing.json", {"stage": "identify", "wall_seconds": 10.0})
        _write(root, f"identify/aligned-{method}/figures/density.png", "png")
    cond = lambda effect, lo, hi, ratio=0.95, deg=(0.0, 0.0): {  # noqa: E731
        "region": _rates(0.5 + effect, deg[0]), "random": _rates(0.5, deg[1]), "n": 96, "n_utility": 32,
        "utility_ratio": ratio, "paired": _est(96, effect, lo, hi)}
    _write(root, "validate/metrics.json", {"aligned": {
        "snip": {"advbench": cond(0.3, 0.2, 0.4)},                       # primary (identify order): supported
        "wanda": {"advbench": cond(0.0, -0.1, 0.1)}}})
    ov = lambda raw, ref, ci, diff: {  # noqa: E731
        "raw": {"mean_iou": raw, "chance_iou": 0.01, "mean_iou_ci": ci, "n_pairs": 45},
        "refined": {"mean_iou": ref, "chance_iou": 0.005, "mean_iou_ci": [ref - 0.05, ref + 0.05], "n_pairs": 45},
        "refined_minus_raw": diff, "split_half_iou": 0.6, "split_half": {"advbench": 0.6}}
    _write(root, "overlap/metrics.json", {"aligned": {
        "snip": ov(0.30, 0.10, [0.25, 0.35], _est(45, -0.2, -0.25, -0.15, "paired permutation", 0.001)),
        "wanda": ov(0.40, 0.20, [0.3, 0.6], _est(45, -0.2, -0.3, 0.05, "paired permutation", 0.2))}})
    esi = {"aligned": {"asr_topk": 0.8, "asr_random": 0.3, "asr_bottomk": None,   # bottom-k not run (CPU default)
                       "component_share": {"q": 0.1, "v": 0.5, "down": 0.4}, "faithful_vs_fixed_iou": None,
                       "perturbation": {"none": _rates(0.1), "top": _rates(0.8), "random": _rates(0.3),
                                        "bottom": _rates(0.2), "top_vs_random": _est(96, 0.5, 0.4, 0.6)}}}
    if moe_family:
        esi["moe"] = {"asr_topk": 0.6, "asr_random": 0.3, "asr_bottomk": 0.2,
                      "component_share": {"q": 0.2, "gate_up": 0.3, "down": 0.5}, "faithful_vs_fixed_iou": 0.4,
                      "architecture": _architecture({"late_third_mlp": _est(32, 0.3, 0.1, 0.5,
                                                                            "bootstrap over prompts", None)})}
    _write(root, "esi/metrics.json", esi)
    arm = lambda before, after, frac: {"asr_before": before, "asr_after": after, "utility_after": 0.5,  # noqa: E731
                                       "trainable_fraction": frac, "n_eval": 96, "degenerate_rate_after": 0.0}
    _write(root, "set/metrics.json", {"set": arm(0.8, 0.3, 0.01), "full": arm(0.8, 0.1, 1.0),
                                      "lora": arm(0.8, 0.5, 0.002), "random": arm(0.8, 0.7, 0.01),
                                      "bottom": arm(0.8, 0.8, 0.01),
                                      "comparison": {"set_relative_reduction": _est(96, 0.625, 0.55, 0.7),
                                                     "set_vs_random": _est(96, -0.4, -0.5, -0.3)}})
    task = lambda d_spa, d_full: {"spa": {"task_score": 0.6, "asr_before": 0.2, "asr_after": 0.2 + d_spa},  # noqa
                                  "full": {"task_score": 0.7, "asr_before": 0.2, "asr_after": 0.2 + d_full},
                                  "random": {"task_score": 0.6, "asr_before": 0.2, "asr_after": 0.3}}
    _write(root, "spa/metrics.json", {"gsm8k": task(0.0, 0.2), "sst2": task(0.05, 0.3), "drift": {
        "gsm8k": {"spa": _est(96, 0.0, -0.02, 0.005), "full": _est(96, 0.2, 0.1, 0.3)},
        "sst2": {"spa": _est(96, 0.05, 0.01, 0.09), "full": _est(96, 0.3, 0.2, 0.4)}}})
    for stage, secs in (("data", 1.0), ("baseline", 5.0), ("report", 99.0)):
        _write(root, f"{stage}/timing.json", {"stage": stage, "wall_seconds": secs})
    _write(root, "baseline/figures/refusal_heatmap.png", "png")
    _write(root, "report/figures/wall_time.png", "png")
    _write(root, "baseline/figures/.tmp.abc.refusal_heatmap.png", "")      # an interrupted atomic write


def _architecture(parts: dict) -> dict:
    """An ESI `architecture` record with these parts (32 harmful and 32 benign prompts)."""
    return {"parts": parts, "n_prompts": 32, "n_null_prompts": 32}


def _complete(root):
    """`_fixture` plus every metric the claims' other parts and controls read, numbers chosen so each part's
    verdict is known (all supported)."""
    def edit(rel, fn):
        path = root / "results" / rel
        m = json.loads(path.read_text())
        fn(m)
        path.write_text(json.dumps(m))

    def validate(m):
        for sets in m["aligned"].values():
            sets["advbench"].update(random_draws={t: {**_rates(0.1), "paired": _est(96, eff, eff - 0.1, eff + 0.1, p=1e-3)}
                                                  for t, eff in (("random", 0.35), ("random_1", 0.3),
                                                                 ("random_2", 0.4))},
                                    paired_matched=_est(96, 0.25, 0.15, 0.35, p=0.001),
                                    utility_ratio_ci=[0.92, 0.98])
        m["positive_control"] = {"aligned": {"arm": _rates(0.7), "vs_intact": _est(96, 0.6, 0.5, 0.7, p=1e-6),
                                             "threshold": 0.1, "detected": True}}

    def overlap(m):
        for v in m["aligned"].values():
            v["refined_minus_raw_corrected"] = _est(10, -0.2, -0.25, -0.15, "dataset bootstrap (percentile)", None)

    def esi(m):
        m["aligned"]["architecture"] = _architecture({k: _est(32, 0.1, 0.05, 0.15, "bootstrap over prompts", None)
                                                      for k in ("v", "mlp", "middle_third")})

    def set_(m):
        m["preservation"] = {"set": {"over_refusal_rise": _est(96, 0.0, -0.05, 0.05),
                                     "utility_ratio": _est(32, 1.0, 0.95, 1.05, "paired bootstrap", None)}}

    def spa(m):
        m["comparison"] = {t: {"spa_vs_full": _est(96, -0.2, -0.3, -0.1), "spa_vs_random": _est(96, -0.05, -0.1, 0.0),
                               "task_gain_full": _est(32, 0.3, 0.2, 0.4, p=0.001)} for t in ("gsm8k", "sst2")}
        for t in ("gsm8k", "sst2"):
            m["drift"][t]["erode"] = _est(96, 0.3, 0.2, 0.4, p=0.001)
    for rel, fn in (("validate", validate), ("overlap", overlap), ("esi", esi), ("set", set_), ("spa", spa)):
        edit(f"{rel}/metrics.json", fn)


def _by_id(rows):
    return {r["id"]: r for r in rows}


def _parts(record, name):
    return [p for p in record["parts"] if p["name"] == name]


CFG = types.SimpleNamespace(identify=types.SimpleNamespace(methods=["snip", "wanda"]),
                            validate=types.SimpleNamespace(datasets=["advbench"]))
VERDICTS = {"supported", "contradicted", "inconclusive", "not run"}
PART_KEYS = {"name", "role", "condition", "metric", "n", "effect", "ci", "ci_one_flip", "test", "p", "discordant",
             "mde", "p_holm",
             "threshold", "direction", "margin", "verdict", "reason"}


def _claims(root, cfg=CFG):
    return _by_id(report.claims(report.load_results(root), cfg))


def _edit(root, rel, fn):
    path = root / "results" / rel
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_every_claim_is_one_record_with_all_its_parts_and_a_known_verdict(tmp_path):
    _fixture(tmp_path)
    _complete(tmp_path)
    results = report.load_results(tmp_path)
    assert all(s["status"] == "ran" for s in report.stage_status(results))
    c = _claims(tmp_path)
    assert list(c) == list(report.PARTS)
    for cid, r in c.items():
        assert {"paper", "claim", "paper_value", "stage", "this_run", "verdict", "reason", "parts"} <= set(r)
        assert r["verdict"] in VERDICTS and {p["name"] for p in r["parts"]} == set(report.PARTS[cid])
        for p in r["parts"]:
            assert set(p) == PART_KEYS and p["verdict"] in VERDICTS, (cid, p["name"])
            assert p["p_holm"] is None or p["p_holm"] >= p["p"]
    want = {"setup_aligned_vs_unaligned": "supported", "setup_paper1_scale": "not run",   # reduced scale
            "p1_region_affects_safety": "inconclusive",   # wanda/advbench: [-0.1, 0.1] reaches 0.10
            "p1_low_overlap": "inconclusive",             # wanda: [0.3, 0.6] reaches 0.5
            "p1_refined_overlap_drops": "inconclusive",   # wanda: [-0.3, 0.05] reaches 0
            "p2_esi_perturbation": "supported", "p2_esi_dense_components": "supported",
            "p2_esi_moe_late_mlp": "not run", "p2_set_halves_asr": "supported",
            "p2_spa_within_1pct": "inconclusive"}         # sst2's SPA drift [0.01, 0.09] touches 0.01
    assert {k: r["verdict"] for k, r in c.items()} == want
    s = c["setup_aligned_vs_unaligned"]["parts"][0]
    assert (s["n"], s["effect"], s["ci"], s["threshold"], s["direction"]) == (96, 0.5, [0.38, 0.62], 0.10, ">")
    assert [p["verdict"] for p in _parts(c["p1_region_affects_safety"], "region_vs_random")] == [
        "supported", "inconclusive"]
    assert [p["condition"] for p in _parts(c["p1_region_affects_safety"], "region_vs_random")] == [
        "aligned/snip/advbench", "aligned/wanda/advbench"]
    assert "aligned/wanda/advbench" in c["p1_region_affects_safety"]["reason"]
    low = _parts(c["p1_low_overlap"], "low_overlap")
    assert [(p["condition"], p["verdict"], p["n"]) for p in low] == [("aligned/snip", "supported", 45),
                                                                     ("aligned/wanda", "inconclusive", 45)]
    assert [p["verdict"] for p in _parts(c["p2_spa_within_1pct"], "drift_within_1pt")] == ["supported",
                                                                                          "inconclusive"]
    assert c["p2_spa_within_1pct"]["reason"] == "undecided: drift_within_1pt (sst2)"
    assert _parts(c["p2_set_halves_asr"], "asr_halved")[0]["effect"] == pytest.approx(0.625)
    assert _parts(c["p2_set_halves_asr"], "utility_ratio")[0]["margin"] == 0.10
    json.dumps(list(c.values()), allow_nan=False)                                    # plain JSON
    assert {r["method"] for r in report.region_summary(results)} == {"snip", "wanda"}


def test_each_part_names_its_metric_from_the_stage_params(tmp_path):
    """What the stages print as ASR is named for what it is, with the judge, tokens, decoding and system prompt
    of the stage that measured it, read from params (not fixed prose)."""
    _fixture(tmp_path)
    cfg = config.parse({"validate": {"max_new_tokens": 8}, "calibrate": {"system_prompt": "Be brief."},
                        "set": {"max_new_tokens": 12}, "esi": {"perturb_max_new_tokens": 8, "temperature": 0.9}})
    c = _claims(tmp_path, cfg)
    region = _parts(c["p1_region_affects_safety"], "region_vs_random")[0]["metric"]
    assert region == ("refusal-onset rate (printed as ASR): keyword judge, no refusal phrase in the first 8 greedy "
                      "tokens, system prompt 'Be brief.'")
    assert "first 12 greedy tokens" in _parts(c["p2_set_halves_asr"], "asr_halved")[0]["metric"]
    assert "sampled (temperature 0.9" in c["p2_esi_perturbation"]["parts"][0]["metric"]
    cfg = config.parse({"validate": {"max_new_tokens": 32}, "evaluation": {"judge": "harmbench"}})
    region = _parts(_claims(tmp_path, cfg)["p1_region_affects_safety"], "region_vs_random")[0]["metric"]
    assert region.startswith("unsafe-response rate (printed as ASR): harmbench judge") and "first 32" in region


def test_a_part_without_its_metric_is_not_run_and_says_which_key_is_missing(tmp_path):
    """Without the new metrics (today's committed shape) the parts are "not run" with the missing key, never a
    number from elsewhere; the point values the stage did write are quoted in the reason."""
    _fixture(tmp_path)
    c = _claims(tmp_path)
    st = c["p2_set_halves_asr"]
    over, = _parts(st, "benign_over_refusal")
    assert over["verdict"] == "not run" and over["effect"] is None and over["n"] == 0
    assert "preservation.set.over_refusal_rise" in over["reason"]
    assert st["verdict"] == "not run" and _parts(st, "asr_halved")[0]["verdict"] == "supported"
    pos, = _parts(c["p1_region_affects_safety"], "positive_control_detected")
    assert pos["role"] == "control" and "positive_control.aligned" in pos["reason"]
    assert c["p1_region_affects_safety"]["verdict"] == "not run"
    assert "architecture.parts.v" in _parts(c["p2_esi_dense_components"], "v_share")[0]["reason"]
    assert _parts(c["p2_esi_moe_late_mlp"], "late_mlp_share")[0]["reason"] == "no MoE model in this run"


def test_moe_claim_reads_the_model_family(tmp_path):
    _fixture(tmp_path, moe_family="mixtral")
    c = _claims(tmp_path)
    late, = c["p2_esi_moe_late_mlp"]["parts"]
    assert c["p2_esi_moe_late_mlp"]["verdict"] == "supported" and late["condition"] == "moe"
    assert all(p["condition"] != "moe" for p in c["p2_esi_dense_components"]["parts"])


def test_contradicted_verdicts(tmp_path):
    _fixture(tmp_path)
    _complete(tmp_path)
    _edit(tmp_path, "set/metrics.json",
          lambda m: m["comparison"].update(set_relative_reduction=_est(96, 0.2, 0.05, 0.35)))

    def overlap(m):
        m["aligned"]["snip"]["raw"].update(mean_iou=0.7, mean_iou_ci=[0.6, 0.8])
        m["aligned"]["snip"]["refined_minus_raw"] = _est(45, 0.1, 0.05, 0.15, "paired permutation", 0.01)
    _edit(tmp_path, "overlap/metrics.json", overlap)
    _edit(tmp_path, "baseline/metrics.json",
          lambda m: m["comparison"].update(aligned_vs_unaligned=_est(96, -0.02, -0.08, 0.04)))
    c = _claims(tmp_path)
    for cid in ("p2_set_halves_asr", "p1_low_overlap", "p1_refined_overlap_drops", "setup_aligned_vs_unaligned"):
        assert c[cid]["verdict"] == "contradicted", cid


def test_set_that_halves_asr_but_refuses_benign_prompts_is_contradicted(tmp_path):
    """The SET claim includes "preserving performance": an ASR halved beside a benign over-refusal rise beyond
    10 points (at the interval's bound) contradicts it."""
    _fixture(tmp_path)
    _complete(tmp_path)
    _edit(tmp_path, "set/metrics.json",
          lambda m: m["preservation"]["set"].update(over_refusal_rise=_est(96, 0.75, 0.6, 0.85)))
    st = _claims(tmp_path)["p2_set_halves_asr"]
    assert _parts(st, "asr_halved")[0]["verdict"] == "supported"
    assert _parts(st, "benign_over_refusal")[0]["verdict"] == "contradicted"
    assert st["verdict"] == "contradicted" and "benign_over_refusal" in st["reason"]
    _edit(tmp_path, "set/metrics.json",
          lambda m: m["preservation"]["set"].update(over_refusal_rise=_est(96, 0.05, -0.02, 0.12),
                                                    utility_ratio=_est(32, 0.7, 0.6, 0.8)))
    st = _claims(tmp_path)["p2_set_halves_asr"]
    assert _parts(st, "benign_over_refusal")[0]["verdict"] == "inconclusive"     # [−0.02, 0.12] reaches 0.10
    assert _parts(st, "utility_ratio")[0]["verdict"] == "contradicted" and st["verdict"] == "contradicted"


def test_region_claim_controls_and_degenerate_guard(tmp_path):
    """The primary part needs its extra degenerate responses below its effect (guard); the utility control must
    keep >= 0.9 at its interval's bound; a validation that cannot detect the positive control leaves the claim
    not testable."""
    _fixture(tmp_path)
    _complete(tmp_path)
    _edit(tmp_path, "validate/metrics.json", lambda m: m["aligned"].pop("wanda"))
    assert _claims(tmp_path)["p1_region_affects_safety"]["verdict"] == "supported"
    _edit(tmp_path, "validate/metrics.json", lambda m: m["aligned"]["snip"]["advbench"].update(
        region=_rates(0.8, deg=0.4)))
    r = _claims(tmp_path)["p1_region_affects_safety"]
    part, = _parts(r, "region_vs_random")
    assert part["verdict"] == "inconclusive" and "degenerate rate exceeds" in part["reason"]
    assert part["effect"] == pytest.approx(0.3) and r["verdict"] == "inconclusive"
    _edit(tmp_path, "validate/metrics.json", lambda m: m["aligned"]["snip"]["advbench"].update(
        region=_rates(0.8), utility_ratio=0.8, utility_ratio_ci=[0.7, 0.85]))
    r = _claims(tmp_path)["p1_region_affects_safety"]
    assert _parts(r, "utility_kept")[0]["verdict"] == "contradicted" and r["verdict"] == "not run"
    _edit(tmp_path, "validate/metrics.json", lambda m: (
        m["aligned"]["snip"]["advbench"].update(utility_ratio=0.95, utility_ratio_ci=[0.92, 0.98]),
        m["positive_control"]["aligned"].update(vs_intact=_est(96, 0.0, -0.05, 0.05), detected=False)))
    r = _claims(tmp_path)["p1_region_affects_safety"]
    assert _parts(r, "positive_control_detected")[0]["verdict"] == "contradicted"
    assert r["verdict"] == "not run" and "positive_control_detected" in r["reason"]


def test_the_one_prompt_flip_interval_written_by_a_stage_decides_the_verdict(tmp_path):
    """A region effect whose 95% CI clears 0.10 but whose one-prompt-flip interval reaches it is inconclusive,
    and claims.json carries both intervals."""
    _fixture(tmp_path)
    _edit(tmp_path, "validate/metrics.json", lambda m: m["aligned"]["snip"]["advbench"].update(
        paired={**_est(96, 0.19, 0.11, 0.27), "ci_one_flip": [0.095, 0.28]}))
    part = _parts(_claims(tmp_path)["p1_region_affects_safety"], "region_vs_random")[0]
    assert part["verdict"] == "inconclusive" and part["ci"] == [0.11, 0.27] and part["ci_one_flip"] == [0.095, 0.28]
    _edit(tmp_path, "validate/metrics.json",
          lambda m: m["aligned"]["snip"]["advbench"]["paired"].update(ci_one_flip=[0.105, 0.28]))
    assert _parts(_claims(tmp_path)["p1_region_affects_safety"], "region_vs_random")[0]["verdict"] == "supported"


def test_spa_needs_a_learned_task_and_an_eroding_arm_that_drifts(tmp_path):
    _fixture(tmp_path)
    _complete(tmp_path)
    _edit(tmp_path, "spa/metrics.json", lambda m: m["drift"]["sst2"].update(spa=_est(96, 0.0, -0.02, 0.005)))
    assert _claims(tmp_path)["p2_spa_within_1pct"]["verdict"] == "supported"
    _edit(tmp_path, "spa/metrics.json", lambda m: m["drift"]["gsm8k"].update(erode=_est(96, 0.02, -0.01, 0.05)))
    r = _claims(tmp_path)["p2_spa_within_1pct"]
    assert _parts(r, "ft_can_erode_safety")[0]["verdict"] == "inconclusive" and r["verdict"] == "inconclusive"
    _edit(tmp_path, "spa/metrics.json", lambda m: m["drift"]["gsm8k"].update(spa=_est(96, 0.05, 0.02, 0.08)))
    assert _claims(tmp_path)["p2_spa_within_1pct"]["verdict"] == "contradicted"   # a measured rise stands
    _edit(tmp_path, "spa/metrics.json", lambda m: (
        m["drift"]["gsm8k"].update(spa=_est(96, 0.0, -0.02, 0.005), erode=_est(96, 0.2, 0.1, 0.3)),
        m["comparison"]["gsm8k"].update(task_gain_full=_est(32, 0.0, -0.05, 0.05))))
    r = _claims(tmp_path)["p2_spa_within_1pct"]
    assert _parts(r, "task_learned")[0]["verdict"] == "inconclusive" and r["verdict"] == "not run"
    drift = [p for p in _parts(r, "drift_within_1pt") if p["condition"] == "gsm8k"][0]
    assert drift["verdict"] == "not run" and drift["reason"].startswith("task not learned")


def test_stages_without_estimates_are_not_run(tmp_path):
    """Metrics without Estimate dicts give "not run", never a verdict from bare numbers."""
    _fixture(tmp_path)
    _edit(tmp_path, "baseline/metrics.json", lambda m: m.pop("comparison"))
    _write(tmp_path, "overlap/metrics.json", {"aligned": {
        "layer": {"raw": {"mean_iou": None, "chance_iou": None}, "refined": {"mean_iou": None, "chance_iou": None}}}})
    c = _claims(tmp_path)
    assert c["setup_aligned_vs_unaligned"]["verdict"] == "not run" and "aligned 0.75" in c[
        "setup_aligned_vs_unaligned"]["this_run"]
    low, = c["p1_low_overlap"]["parts"]
    assert c["p1_low_overlap"]["verdict"] == "not run" and low["reason"] == "undefined (empty regions)"


def test_absent_stages_are_not_run(tmp_path):
    (tmp_path / "results").mkdir()
    results = report.load_results(tmp_path)
    assert all(v is None for v in results.values())
    assert {s["status"] for s in report.stage_status(results)} == {report.NOT_RUN}
    rows = report.claims(results)
    assert {r["verdict"] for r in rows} == {report.NOT_RUN}
    assert {p["verdict"] for r in rows for p in r["parts"]} == {report.NOT_RUN}
    assert report.figures(tmp_path) == {} and report.timings(tmp_path) == [] and report.region_summary(results) == []


def test_claims_from_the_committed_results():
    """claims.json as the report builds it from the committed results/*/metrics.json and params.yaml: every
    claim one record with every pre-registered part, Holm over the family, the conjunction as its verdict."""
    from saferegions import evidence
    rows = report.claims(report.load_results(ROOT), config.load(ROOT / "params.yaml"))
    assert [r["id"] for r in rows] == list(evidence.PARTS)
    parts = report.part_rows(rows)
    with_p = [p for p in parts if p["p"] is not None]
    assert [p["p_holm"] for p in with_p] == pytest.approx(evidence.holm([p["p"] for p in with_p]))
    for r in rows:
        assert {p["name"] for p in r["parts"]} == set(evidence.PARTS[r["id"]])
        assert all(set(p) == PART_KEYS for p in r["parts"])
        assert r["verdict"] == evidence.conjunction([(evidence.Role(p["role"]), evidence.Verdict(p["verdict"]))
                                                     for p in r["parts"]]).value
        for p in r["parts"]:
            assert (p["verdict"] == "not run") == (p["n"] == 0 or p["effect"] is None) or p["reason"], p
            if p["verdict"] == "not run":
                assert p["reason"], (r["id"], p["name"])
    asr = [p for p in parts if "ASR" in p["metric"]]
    assert asr and all("greedy tokens" in p["metric"] or "sampled" in p["metric"] for p in asr)
    json.dumps(rows, allow_nan=False)


def test_the_preregistered_table_in_the_methods_doc_is_evidence_parts():
    """docs/methods.md "Pre-registered claims" prints the same parts, thresholds and margins as evidence.PARTS."""
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("#### Pre-registered claims"):text.index("### 5.7")]
    header = "| claim | part | role | primary metric | threshold | margin | test |"
    lines = section[section.index(header):].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[:lines.index("")]]
    want = [[r[k] for k in ("claim", "part", "role", "primary metric", "threshold", "margin", "test")]
            for r in report.preregistered()]
    assert rows == want


@pytest.mark.parametrize("rel, obj, fragment", [
    ("set/metrics.json", {"full": {"asr_before": 0.5, "asr_after": 0.1, "utility_after": 1, "trainable_fraction": 1}},
     "missing key(s) ['set']"),
    ("spa/metrics.json", {"gsm8k": {"spa": {"task_score": 0.5, "asr_before": 0.1}}}, "gsm8k.spa: missing key(s)"),
    ("overlap/metrics.json", {"m": {"snip": {"raw": {"mean_iou": 0.3, "chance_iou": 0.01},
                                             "refined": {"mean_iou": 0.1}}}}, "m.snip.refined"),
    ("esi/metrics.json", {"m": {"asr_topk": "high", "asr_random": 0.1, "asr_bottomk": 0.1,
                                "component_share": {"v": 1.0}, "faithful_vs_fixed_iou": 0.3}}, "m.asr_topk"),
    ("esi/metrics.json", {"m": {"asr_topk": 0.1, "asr_random": 0.1, "asr_bottomk": 0.1,
                                "component_share": {"v": 1.0}}}, "faithful_vs_fixed_iou"),
    ("validate/metrics.json", {"m": {"snip": {"advbench": {"region": {"asr": 1.5}, "random": {"asr": 0.1},
                                                           "paired": _est(96, 0.4, 0.3, 0.5)}}}},
     "m.snip.advbench.region.asr: 1.5 outside [0.0, 1.0]"),
    ("validate/metrics.json", {"m": {"snip": {"advbench": {"region": {"asr": 0.5}, "random": {"asr": 0.1},
                                                           "paired": {"n": 96, "effect": 0.4, "test": "x"}}}}},
     "m.snip.advbench.paired: missing key(s) ['ci']"),
    ("set/metrics.json", {"set": {"asr_before": 0.5, "asr_after": 0.1, "utility_after": 1, "trainable_fraction": 0.01},
                          "comparison": {"set_relative_reduction": {"n": 96, "effect": 0.8, "ci": 0.5, "test": "x"}}},
     "comparison.set_relative_reduction.ci"),
    ("identify/m-snip/metrics.json", {"method": "snip", "role": "m", "datasets": {"advbench": {"raw": {}}}},
     "datasets.advbench"),
    ("baseline/metrics.json", {"judge": {}}, "missing key(s) ['models']"),
    ("overlap/metrics.json", "{not json", "not valid JSON"),
])
def test_malformed_metrics_fail_loudly_naming_file_and_key(tmp_path, rel, obj, fragment):
    path = _write(tmp_path, rel, obj)
    with pytest.raises(MetricsError) as e:
        report.load_results(tmp_path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_figures_and_timings_per_stage(tmp_path):
    _fixture(tmp_path)
    figs = report.figures(tmp_path)
    assert set(figs) == {"identify", "baseline"}                              # the report's own are excluded
    assert len(figs["identify"]) == 2 and len(figs["baseline"]) == 1
    totals = {t["stage"]: t for t in report.stage_totals(report.timings(tmp_path))}
    assert list(totals) == ["data", "baseline", "identify"]                   # pipeline order, no report
    assert totals["identify"]["wall_seconds"] == 20.0 and totals["identify"]["runs"] == 2
    _write(tmp_path, "esi/timing.json", {"stage": "esi"})
    with pytest.raises(MetricsError, match="wall_seconds"):
        report.timings(tmp_path)


def test_provenance_pins_the_reports_inputs_not_git_or_dvc_lock(tmp_path):
    """The commit and dvc.lock a report saw are always older than the ones that hold its results (issue 16):
    provenance records digests of what the report read instead, which change only when its inputs do."""
    _fixture(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    a = report.provenance(tmp_path)
    assert not {"git_commit", "dvc_lock_sha256", "dvc_lock_upstream_sha256"} & set(a)
    files = a["inputs"]["files"]
    assert {"results/set/metrics.json", "results/baseline/timing.json",
            "results/identify/aligned-snip/timing.json"} <= set(files)
    assert not any(f.startswith("results/report/") for f in files)          # its own outputs are not inputs
    assert len(a["inputs"]["params_sha256"]) == 64
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {report: {cmd: y}}\n")   # the run's own bookkeeping
    assert report.provenance(tmp_path)["inputs"] == a["inputs"]
    _write(tmp_path, "baseline/timing.json", {"stage": "baseline", "wall_seconds": 6.0})
    b = report.provenance(tmp_path)["inputs"]
    assert b["files"]["results/baseline/timing.json"] != files["results/baseline/timing.json"]
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("seed: 0", "seed: 1", 1))
    assert report.provenance(tmp_path)["inputs"]["params_sha256"] != a["inputs"]["params_sha256"]


def test_report_stage_depends_on_everything_provenance_reads():
    """Else a dep-less input could change without re-running the report, and provenance.json would go stale."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    read = report.input_files(ROOT) + list(report.REPORT_CODE)
    missing = [f for f in read if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"add to the report stage's deps in dvc.yaml: {missing}"
    # data.dvc (DVC refuses a .dvc file as a dep: `data` pins the same md5) and models/*/ manifests
    assert {"data", "models"} <= set(deps)


def test_provenance_without_git_with_mirror_and_hub_models(tmp_path):
    folder = tmp_path / "models" / "mirror-a"
    folder.mkdir(parents=True)
    (folder / "saferegions-manifest.json").write_text(json.dumps({"files": {"model.safetensors": "ab" * 32},
                                                                  "gguf_sha256": "cd" * 32}))
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "x.dir", "nfiles": 3, "size": 9,
                                                                 "path": "data"}]}))
    cfg = types.SimpleNamespace(models={"a": config.ModelCfg("org/a", "mirror-a"), "b": config.ModelCfg("org/b")},
                                judges=config.JudgesCfg(llama_guard=config.ModelCfg("meta-llama/Llama-Guard-3-8B")))
    p = report.provenance(tmp_path, cfg)
    assert p["inputs"] == {"files": {}, "params_sha256": None}             # no results, code or params here
    assert p["models"]["a"]["weights_sha256"] == "ab" * 32 and p["models"]["a"]["source"] == "offline mirror"
    assert p["models"]["b"]["source"] == "hub" and p["models"]["judges.llama_guard"]["id"].endswith("Guard-3-8B")
    assert p["data"]["data.dvc"] == {"md5": "x.dir", "nfiles": 3, "size": 9}
    assert len(p["data"]["files"]) > 10 and all(len(f["sha256"]) == 64 for f in p["data"]["files"])
    assert p["packages"]["torch"] and p["packages"]["papermill"]
    json.dumps(p)


def test_param_deviations_cover_every_section():
    rows = report.param_deviations(config.load(ROOT / "params.yaml"))
    by = {r["param"]: r for r in rows}
    cpu_n = yaml.safe_load((ROOT / "params.yaml").read_text())["calibrate"]["n"]   # issue 14 raised it to >= 16
    assert cpu_n < 128 and by["calibrate.n"]["this run"] == cpu_n and by["calibrate.n"]["paper-scale default"] == 128
    assert {"calibrate", "identify", "validate", "baseline"} <= {r["section"] for r in rows}
    assert len(report.documented_deviations()) >= 10
    raw = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())   # an optional sub-section that is set
    paper = report.param_deviations(config.parse({k: v for k, v in raw.items() if k in config.SECTIONS}))
    assert "judges.llama_guard" in {r["param"] for r in paper}
    assert not {r["param"] for r in paper} & {"calibrate.n", "identify.snip.n", "validate.n_eval"}


def test_report_is_wired_into_the_pipeline():
    from saferegions import stage
    assert stage.NOTEBOOKS["report"] == "10_report" and (ROOT / "notebooks" / "10_report.ipynb").exists()
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    for s in ("baseline", "validate", "overlap", "esi", "set", "spa"):
        assert f"results/{s}/metrics.json" in deps
    assert {"results/calibrate", "results/identify"} <= set(deps)


def test_deviations_name_the_esi_judge_this_run_used():
    cfg = config.load(ROOT / "params.yaml")
    results = {"esi": EsiMetrics.parse({"aligned": {
        "asr_topk": 0.5, "asr_random": 0.4, "asr_bottomk": None, "component_share": {"v": 1.0},
        "faithful_vs_fixed_iou": None, "judge": "learned", "judge_token_coverage": 0.97}})}
    rows = [r["deviation"] for r in report.documented_deviations(results, cfg)]
    named = [r for r in rows if r.startswith("ESI judge in this run")]
    assert len(named) == 1 and "all-MiniLM-L6-v2" in named[0] and "0.97" in named[0]
    assert not any("Qwen2.5-Coder-1.5B guard" in r for r in rows)


def test_reading_of_the_run_and_its_output_files(tmp_path):
    """The verdicts are put into words in the stage (not the notebook); metrics.json keeps a number and a verdict
    per claim, the verdict counts, how many stages ran and the summed wall time."""
    _fixture(tmp_path)
    results = report.load_results(tmp_path)
    rows = report.claims(results, CFG)
    totals = report.stage_totals(report.timings(tmp_path))
    text = report.summary(rows, totals, 3)
    counts = report.verdict_counts(rows)
    assert text.startswith(f"{sum(r['verdict'] != report.NOT_RUN for r in rows)} of {len(rows)} claims")
    assert list(counts.values()) == sorted(counts.values(), reverse=True) and sum(counts.values()) == len(rows)
    assert all(f"**{r['claim']}** ({r['paper']}): {r['verdict']} — {r['reason']}" in text for r in rows)
    assert "took 26 s in all; the slowest was `identify` (20 s)" in text and "3 params differ" in text
    assert "params differ" not in report.summary(rows, [], 0) and "took" not in report.summary(rows, [], 0)
    report.write_outputs(rows, results, totals, {"p": 1}, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["verdicts"] == counts and m["stages_run"] == len(report.STAGES) and m["wall_seconds_total"] == 26.0
    set_claim = m["claims"]["p2_set_halves_asr"]
    assert set_claim["verdict"] == "not run" and set(set_claim["parts"]) == {
        f"{p} @ set arm, unaligned model, paired before/after" for p in report.PARTS["p2_set_halves_asr"]}
    halved = set_claim["parts"]["asr_halved @ set arm, unaligned model, paired before/after"]
    assert halved == {"n": 96, "effect": pytest.approx(0.625), "ci_low": 0.55, "ci_high": 0.7, "p": 1e-6,
                      "p_holm": pytest.approx(halved["p_holm"]), "verdict": "supported"}
    assert halved["p_holm"] >= 1e-6
    assert "asr_halved (set arm, unaligned model, paired before/after): supported, effect +0.625 [+0.550, +0.700], " \
           "n=96 against > 0.5" in text
    fig = report.forest(rows)
    assert len(fig.axes[0].get_yticklabels()) == sum(p["effect"] is not None for r in rows for p in r["parts"])
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert set(claims) == {r["id"] for r in rows} and "id" not in claims["p1_low_overlap"]
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == {"p": 1}


def test_an_overlap_mean_without_an_interval_says_why(tmp_path):
    """A method identified on two datasets has one pair: no interval, inconclusive, and the reason says so."""
    _fixture(tmp_path)
    _edit(tmp_path, "overlap/metrics.json", lambda m: [m["aligned"]["snip"][v].update(n_pairs=1, n_datasets=2,
                                                                                       mean_iou_ci=None)
                                                       for v in ("raw", "refined")])
    snip = _parts(_claims(tmp_path)["p1_low_overlap"], "low_overlap")[0]
    assert snip["condition"] == "aligned/snip" and snip["ci"] == [None, None] and snip["verdict"] == "inconclusive"
    assert snip["reason"] == "no interval: 2 dataset(s)"
"""`dvc repro` of the whole pipeline on profiles/smoke.yaml (tiny random models) in a temp copy."""
import json

import pytest

from conftest import repro_in_copy


@pytest.mark.slow
def test_smoke_pipeline_runs_every_notebook(tmp_path, mirror):
    work, run = repro_in_copy(tmp_path / "repo", "smoke.yaml", mirror)

    methods = ("snip", "wanda", "neuron", "layer", "nlsr")
    executed = ["data", "models", "baseline", "calibrate/aligned", "validate"]
    executed += [f"identify/aligned-{m}" for m in methods]
    for stage in executed:
        nb = json.loads((work / "results" / stage / "notebook.ipynb").read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors and (work / "results" / stage / "notebook.html").exists(), stage
        assert json.loads((work / "results" / stage / "timing.json").read_text())["wall_seconds"] > 0
    base = json.loads((work / "results/baseline/metrics.json").read_text())
    assert set(base["models"]) == {"aligned", "unaligned"}
    for per_set in base["models"].values():
        assert set(per_set) == {"advbench", "jailbreakbench", "xstest_unsafe", "xstest_safe", "alpaca"}
        assert all(v["n"] == 3 and 0 <= v["refusal_rate"] <= 1 for v in per_set.values())
    assert 0 <= base["judge"]["heldout_accuracy"] <= 1
    assert (work / "results/baseline/figures/refusal_heatmap.png").stat().st_size > 1000

    sets = ("advbench", "harmbench", "jailbreakbench", "strongreject", "maliciousinstruct", "catqa",
            "donotanswer", "saladbench", "simplesafetytests", "xstest_unsafe")
    for m in methods:
        ident = json.loads((work / f"results/identify/aligned-{m}/metrics.json").read_text())
        assert ident["method"] == m and set(ident["datasets"]) == set(sets)
        for d in sets:
            raw, refined = ident["datasets"][d]["raw"], ident["datasets"][d]["refined"]
            assert 0 <= refined["size"] <= raw["size"] and 0 <= raw["density"] <= 1
            for kind in ("raw", "refined"):
                assert (work / f"artifacts/identify/aligned/{m}/{d}.{kind}.safetensors").exists()
        assert (work / f"artifacts/identify/aligned/{m}/alpaca.utility.safetensors").exists()
        assert (work / f"results/identify/aligned-{m}/figures/layer_density_raw.png").exists()
    assert (work / "artifacts/identify/aligned/nlsr/advbench.raw.lora.safetensors").exists()

    val = json.loads((work / "results/validate/metrics.json").read_text())
    assert set(val) == {"aligned", "intact", "positive_control", "power", "degenerate_rule", "rejudged"}
    assert set(val["rejudged"]["aligned"]) == {"region_vs_matched", "region_vs_random", "direction_vs_intact"}
    rule = val["degenerate_rule"]
    assert rule["n"] == rule["n_degenerate"] + rule["n_not_degenerate"] and rule["applied"] == "text_rules_only"
    assert set(val["aligned"]) == {"wanda", "layer"}   # smoke validate.methods
    assert val["intact"]["aligned"]["n"] == 4 and val["power"]["n"] == 4 and val["power"]["n_required"] > 4
    control = val["positive_control"]["aligned"]
    assert control["vs_intact"]["n"] == 4 and control["detected"] is (control["null_label"] is None)
    assert set(val["aligned"]["wanda"]["advbench"]["random_draws"]) == {"random", "random_1", "random_2"}
    assert "paired_matched" in val["aligned"]["wanda"]["advbench"]
    for per_method in val["aligned"].values():
        assert set(per_method) == {"advbench", "harmbench"}
        for v in per_method.values():
            assert v["n"] == 4 and v["n_utility"] == 2 and v["paired"]["test"].startswith("exact McNemar")
            for arm in ("region", "random"):
                rec = v[arm]
                assert 0 <= rec["asr"] <= 1 and 0 <= rec["degenerate_rate"] <= 1 and len(rec["asr_ci"]) == 2
                assert rec["asr"] + rec["refusal_rate"] + rec["degenerate_rate"] == pytest.approx(1)
    assert (work / "results/validate/figures/validate.png").stat().st_size > 1000

    # stage overlap (issue 4)
    nb = json.loads((work / "results/overlap/notebook.ipynb").read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert json.loads((work / "results/overlap/timing.json").read_text())["wall_seconds"] > 0
    ov = json.loads((work / "results/overlap/metrics.json").read_text())
    assert set(ov) == {"aligned"} and set(ov["aligned"]) == set(methods)
    for m, per_method in ov["aligned"].items():
        assert {"raw", "refined", "refined_minus_raw", "split_half_iou"} <= set(per_method)
        for kind in ("raw", "refined"):   # None where every pair's union is empty (e.g. no layer range found)
            v = per_method[kind]
            assert all(v[k] is None or 0 <= v[k] <= 1 for k in ("mean_iou", "chance_iou"))
            k = len(json.loads((work / f"results/identify/aligned-{m}/metrics.json").read_text())["datasets"])
            # pairs whose union is empty have no IoU and are left out of n_pairs
            assert v["n_pairs"] <= k * (k - 1) // 2 and (v["mean_iou_ci"] is None or len(v["mean_iou_ci"]) == 2)
        if m in ("snip", "wanda"):
            assert 0 <= per_method["split_half_iou"] <= 1   # smoke identify.split_half_datasets: [advbench]
            assert 0 < per_method["raw"]["chance_iou"] < per_method["raw"]["mean_iou"] <= 1
    tables = work / "results/overlap/tables"
    for m in methods:
        for kind in ("raw", "refined"):
            for scope in ("global", "per_matrix"):
                assert (tables / f"aligned-{m}-{kind}-{scope}.csv").exists()
                assert (tables / f"aligned-{m}-{kind}-{scope}-chance.csv").exists()
    for name in ("summary", "convergence", "refinement", "cross_method", "bootstrap"):
        assert (tables / f"{name}.csv").stat().st_size > 0, name
    for fig in ("pairwise_aligned_snip", "convergence", "refinement", "cross_method_aligned",
                "layer_profile"):
        assert (work / f"results/overlap/figures/{fig}.png").stat().st_size > 1000, fig
    nb = json.loads((work / "results/esi/notebook.ipynb").read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    esi_m = json.loads((work / "results/esi/metrics.json").read_text())
    assert set(esi_m) == {"aligned", "unaligned"}
    for role, m in esi_m.items():
        assert all(0 <= m[k] <= 1 for k in ("asr_topk", "asr_random", "asr_bottomk", "faithful_vs_fixed_iou"))
        pert = m["perturbation"]
        assert pert["top_vs_random"]["test"].startswith("exact McNemar") and pert["top"]["n"] == pert["random"]["n"] > 0
        assert m["architecture"]["parts"]["v"]["n"] > 0
        assert set(m["component_share"]) <= {"q", "k", "v", "o", "gate", "up", "down", "lm_head", "other"}
        assert abs(sum(m["component_share"].values()) - 1) < 1e-6
        assert 0 <= m["refusal_likelihood_iou"] <= 1 and 0 <= m["dataset_iou"]["mean"] <= 1
        for kind in ("topk", "bottomk"):
            assert (work / f"artifacts/esi/{role}/{kind}.safetensors").exists()
        assert (work / f"results/esi/figures/heatmap_{role}_region_count.png").stat().st_size > 1000
    assert set(esi_m["aligned"]["method_iou"]) == {"snip", "wanda"}
    assert (work / "results/esi/figures/perturbation.png").stat().st_size > 1000
    # SET / SPA (paper 2): metrics shape, curves as DVC plots, figures
    for stage in ("set", "spa"):
        nb = json.loads((work / "results" / stage / "notebook.ipynb").read_text())
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"], stage
    set_m = json.loads((work / "results/set/metrics.json").read_text())
    assert set(set_m) == {"set", "full", "lora", "random", "bottom", "comparison", "preservation", "margins",
                          "utility_answers"}
    assert {"set_relative_reduction", "set_vs_random"} == set(set_m.pop("comparison"))
    kept = set_m.pop("preservation")
    assert set(kept) == {"set", "full", "lora", "random", "bottom"} and set(set_m.pop("margins")) == set(kept["set"])
    assert all(kept[a]["over_refusal_rise"]["n"] > 0 and kept[a]["utility_ratio"]["n"] > 0 for a in kept)
    assert set_m.pop("utility_answers")["n"] > 0
    for arm, v in set_m.items():
        assert len(v["asr_after_ci"]) == 2 and v["n_eval"] > 0
        assert {"asr_before", "asr_after", "utility_after", "trainable_fraction"} <= set(v)
        assert 0 <= v["asr_before"] <= 1 and 0 <= v["asr_after"] <= 1 and 0 < v["utility_after"] <= 1
        assert (work / f"results/set/curves/{arm}.csv").read_text().startswith("step,loss,lr")
    assert set_m["full"]["trainable_fraction"] == 1.0 and 0 < set_m["set"]["trainable_fraction"] < 0.1
    for fig in ("loss_curves.png", "before_after.png"):
        assert (work / "results/set/figures" / fig).stat().st_size > 1000
    spa_m = json.loads((work / "results/spa/metrics.json").read_text())
    assert set(spa_m) == {"gsm8k", "sst2", "drift", "comparison", "power"}
    assert set(spa_m.pop("drift")) == set(spa_m.pop("power")) == {"gsm8k", "sst2"}
    assert all({"spa_vs_full", "spa_vs_random", "task_gain_full"} <= set(c) for c in spa_m.pop("comparison").values())
    for task, per_arm in spa_m.items():
        assert set(per_arm) == {"spa", "full", "random", "erode"}
        for arm, v in per_arm.items():
            assert {"task_score", "asr_before", "asr_after"} <= set(v) and 0 <= v["task_score"] <= 1
            assert (work / f"results/spa/curves/{task}-{arm}.csv").exists()
        assert per_arm["spa"]["trainable_fraction"] > 0.9
    for fig in ("loss_curves.png", "task_and_drift.png"):
        assert (work / "results/spa/figures" / fig).stat().st_size > 1000
    assert "up to date" in run("dvc", "status")  # a second repro would do nothing

    # report: every claim in the table, measured where its stage ran; provenance and the wall-time figure
    rep_nb = json.loads((work / "results/report/notebook.ipynb").read_text())
    assert not [o for c in rep_nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (work / "results/report/notebook.html").exists()
    rep = json.loads((work / "results/report/metrics.json").read_text())
    table = json.loads((work / "results/report/claims.json").read_text())
    from saferegions.stages.report import part_key
    assert set(table) == set(rep["claims"])
    for k, v in table.items():
        assert rep["claims"][k]["verdict"] == v["verdict"]
        assert {key: p["verdict"] for key, p in rep["claims"][k]["parts"].items()} == {
            part_key(p): p["verdict"] for p in v["parts"]}
    assert set(rep["claims"]) == {"setup_aligned_vs_unaligned", "setup_paper1_scale", "p1_region_affects_safety",
                                  "p1_low_overlap", "p1_refined_overlap_drops", "p2_esi_perturbation",
                                  "p2_esi_dense_components", "p2_esi_moe_late_mlp", "p2_set_halves_asr",
                                  "p2_spa_within_1pct"}
    for cid, c in table.items():
        assert {"paper", "claim", "this_run", "verdict", "reason", "parts", "stage"} <= set(c), cid
        assert c["verdict"] in ("supported", "contradicted", "inconclusive", "not run"), cid
        assert all(p["verdict"] == "not run" or p["metric"] for p in c["parts"]), cid
        if (work / "results" / c["stage"]).is_dir() and cid not in ("p2_esi_moe_late_mlp", "setup_paper1_scale"):
            assert any(p["n"] > 0 and p["test"] for p in c["parts"]), cid   # every ran stage is read
    assert rep["stages_run"] >= 6 and rep["wall_seconds_total"] > 0
    assert json.loads((work / "results/report/provenance.json").read_text())["packages"]["torch"]
    assert (work / "results/report/figures/wall_time.png").stat().st_size > 1000

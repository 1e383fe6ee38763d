"""The report stage's reading of other stages' files: claims and verdicts, "not run" for absent stages, loud
errors for malformed metrics, timings, deviations, provenance. Every fixture is built in tmp_path."""
import json
import types

import pytest
import yaml

from conftest import ROOT
from saferegions import config
from saferegions.results import MetricsError
from saferegions.stages import report


def _write(root, rel, obj):
    path = root / "results" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _fixture(root, moe_family=None):
    """A complete results tree in the shapes the stages write (numbers chosen so each verdict is known)."""
    _write(root, "data/metrics.json", {"sets": {}})
    fam = {"aligned": {"family": "qwen2"}, "unaligned": {"family": "llama"}}
    if moe_family:
        fam["moe"] = {"family": moe_family}
    _write(root, "models/metrics.json", {"models": fam})
    _write(root, "baseline/metrics.json", {"models": {
        "aligned": {"advbench": {"refusal_rate": 0.75, "n": 4}, "alpaca": {"refusal_rate": 0.0, "n": 4}},
        "unaligned": {"advbench": {"refusal_rate": 0.25, "n": 4}, "alpaca": {"refusal_rate": 0.0, "n": 4}}}})
    _write(root, "calibrate/aligned/metrics.json", {"datasets": {}})
    for method in ("snip", "wanda"):
        _write(root, f"identify/aligned-{method}/metrics.json", {"method": method, "role": "aligned", "datasets": {
            d: {"raw": {"size": 20, "density": 0.02}, "refined": {"size": 10, "density": 0.01}}
            for d in ("advbench", "harmbench")}})
        _write(root, f"identify/aligned-{method}/timing.json", {"stage": "identify", "wall_seconds": 10.0})
        _write(root, f"identify/aligned-{method}/figures/density.png", "png")
    _write(root, "validate/metrics.json", {"aligned": {
        "snip": {"advbench": {"asr_region": 0.9, "asr_random": 0.5, "utility_region": 0.4, "utility_random": 0.5}},
        "wanda": {"advbench": {"asr_region": 0.5, "asr_random": 0.5, "utility_region": 0.4, "utility_random": 0.5}}}})
    _write(root, "overlap/metrics.json", {"aligned": {
        "snip": {"raw": {"mean_iou": 0.30, "chance_iou": 0.01}, "refined": {"mean_iou": 0.10, "chance_iou": 0.005}},
        "wanda": {"raw": {"mean_iou": 0.40, "chance_iou": 0.01}, "refined": {"mean_iou": 0.20, "chance_iou": 0.005}}}})
    esi = {"aligned": {"asr_topk": 0.8, "asr_random": 0.3, "asr_bottomk": 0.2,
                       "component_share": {"q": 0.1, "v": 0.5, "down": 0.4}, "faithful_vs_fixed_iou": None}}
    if moe_family:
        esi["moe"] = {"asr_topk": 0.6, "asr_random": 0.3, "asr_bottomk": 0.2,
                      "component_share": {"q": 0.2, "gate_up": 0.3, "down": 0.5}, "faithful_vs_fixed_iou": 0.4}
    _write(root, "esi/metrics.json", esi)
    arm = lambda before, after, frac: {"asr_before": before, "asr_after": after, "utility_after": 0.5,  # noqa: E731
                                       "trainable_fraction": frac}
    _write(root, "set/metrics.json", {"set": arm(0.8, 0.3, 0.01), "full": arm(0.8, 0.1, 1.0),
                                      "lora": arm(0.8, 0.5, 0.002), "random": arm(0.8, 0.7, 0.01),
                                      "bottom": arm(0.8, 0.8, 0.01)})
    task = lambda d_spa, d_full: {"spa": {"task_score": 0.6, "asr_before": 0.2, "asr_after": 0.2 + d_spa},  # noqa
                                  "full": {"task_score": 0.7, "asr_before": 0.2, "asr_after": 0.2 + d_full},
                                  "random": {"task_score": 0.6, "asr_before": 0.2, "asr_after": 0.3}}
    _write(root, "spa/metrics.json", {"gsm8k": task(0.0, 0.2), "sst2": task(0.05, 0.3)})
    for stage, secs in (("data", 1.0), ("baseline", 5.0), ("report", 99.0)):
        _write(root, f"{stage}/timing.json", {"stage": stage, "wall_seconds": secs})
    _write(root, "baseline/figures/refusal_heatmap.png", "png")
    _write(root, "report/figures/wall_time.png", "png")
    _write(root, "baseline/figures/.tmp.abc.refusal_heatmap.png", "")      # an interrupted atomic write


def _by_id(rows):
    return {r["id"]: r for r in rows}


def test_claims_from_every_stage_with_known_verdicts(tmp_path):
    _fixture(tmp_path)
    results = report.load_results(tmp_path)
    assert all(s["status"] == "ran" for s in report.stage_status(results))
    c = _by_id(report.claims(results))
    assert c["setup_aligned_vs_unaligned"]["value"] == pytest.approx(0.5)     # alpaca is not a safety set
    assert c["setup_paper1_scale"]["verdict"] == "reduced" and c["setup_paper1_scale"]["value"] == 2
    assert c["p1_region_affects_safety"]["verdict"] == "mixed"                # snip +0.4, wanda 0
    assert c["p1_region_affects_safety"]["value"] == pytest.approx(0.2)
    assert c["p1_low_overlap"]["verdict"] == "consistent" and c["p1_low_overlap"]["value"] == pytest.approx(0.35)
    assert c["p1_refined_overlap_drops"]["verdict"] == "consistent"
    assert c["p1_refined_overlap_drops"]["value"] == pytest.approx(-0.2)
    assert c["p2_esi_perturbation"]["value"] == pytest.approx(0.5)
    assert c["p2_esi_dense_components"]["verdict"] == "consistent"           # top component: v
    assert c["p2_esi_dense_components"]["value"] == pytest.approx(0.9)        # v + down
    assert c["p2_esi_moe_late_mlp"]["verdict"] == "not run"                   # no MoE family in models
    assert c["p2_set_halves_asr"]["verdict"] == "consistent"
    assert c["p2_set_halves_asr"]["value"] == pytest.approx(0.625)
    assert c["p2_spa_within_1pct"]["verdict"] == "mixed"                      # gsm8k 0, sst2 +5 points
    assert c["p2_spa_within_1pct"]["value"] == pytest.approx(0.05)
    json.dumps(report.claims(results), allow_nan=False)                        # metrics.json stays plain JSON
    assert {r["method"] for r in report.region_summary(results)} == {"snip", "wanda"}


def test_moe_claim_reads_the_model_family(tmp_path):
    _fixture(tmp_path, moe_family="mixtral")
    c = _by_id(report.claims(report.load_results(tmp_path)))
    assert c["p2_esi_moe_late_mlp"]["verdict"] == "consistent"
    assert c["p2_esi_moe_late_mlp"]["value"] == pytest.approx(0.8)           # gate_up + down
    assert "moe" not in c["p2_esi_dense_components"]["this_run"]


def test_verdicts_that_go_against_the_papers(tmp_path):
    _fixture(tmp_path)
    _write(tmp_path, "set/metrics.json", {"set": {"asr_before": 0.8, "asr_after": 0.6, "utility_after": 0.5,
                                                  "trainable_fraction": 0.01}})
    _write(tmp_path, "overlap/metrics.json", {"aligned": {"snip": {"raw": {"mean_iou": 0.7, "chance_iou": 0.01},
                                                                   "refined": {"mean_iou": 0.8, "chance_iou": 0.01}}}})
    c = _by_id(report.claims(report.load_results(tmp_path)))
    assert c["p2_set_halves_asr"]["verdict"] == "not consistent" and c["p2_set_halves_asr"]["value"] == pytest.approx(0.25)
    assert c["p1_low_overlap"]["verdict"] == "not consistent"
    assert c["p1_refined_overlap_drops"]["verdict"] == "not consistent"
    _write(tmp_path, "set/metrics.json", {"set": {"asr_before": 0.0, "asr_after": 0.0, "utility_after": 0.5,
                                                  "trainable_fraction": 0.01}})
    assert _by_id(report.claims(report.load_results(tmp_path)))["p2_set_halves_asr"]["verdict"] == "n/a"


def test_overlap_of_empty_regions_is_undefined_not_an_error(tmp_path):
    """A method whose regions are all empty (tiny profile: refined layer regions) writes mean_iou null."""
    _fixture(tmp_path)
    _write(tmp_path, "overlap/metrics.json", {"aligned": {
        "snip": {"raw": {"mean_iou": 0.3, "chance_iou": 0.01}, "refined": {"mean_iou": 0.2, "chance_iou": 0.01}},
        "layer": {"raw": {"mean_iou": 0.5, "chance_iou": 0.1}, "refined": {"mean_iou": None, "chance_iou": None}}}})
    c = _by_id(report.claims(report.load_results(tmp_path)))
    assert c["p1_low_overlap"]["value"] == pytest.approx(0.3)  # layer left out of the verdict
    assert "aligned/layer undefined" in c["p1_low_overlap"]["this_run"]
    assert c["p1_refined_overlap_drops"]["verdict"] == "consistent"
    _write(tmp_path, "overlap/metrics.json", {"aligned": {
        "layer": {"raw": {"mean_iou": None, "chance_iou": None}, "refined": {"mean_iou": None, "chance_iou": None}}}})
    assert _by_id(report.claims(report.load_results(tmp_path)))["p1_low_overlap"]["verdict"] == "n/a"


def test_absent_stages_are_not_run(tmp_path):
    (tmp_path / "results").mkdir()
    results = report.load_results(tmp_path)
    assert all(v is None for v in results.values())
    assert {s["status"] for s in report.stage_status(results)} == {report.NOT_RUN}
    assert {r["verdict"] for r in report.claims(results)} == {report.NOT_RUN}
    assert report.figures(tmp_path) == {} and report.timings(tmp_path) == [] and report.region_summary(results) == []


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
    ("validate/metrics.json", {"m": {"snip": {"advbench": {"asr_region": 1.5, "asr_random": 0.1,
                                                           "utility_region": 0.1, "utility_random": 0.1}}}},
     "outside [0.0, 1.0]"),
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
    assert by["calibrate.n"]["this run"] == 2 and by["calibrate.n"]["paper-scale default"] == 128
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
    results = {"esi": {"aligned": {"judge": "learned", "judge_token_coverage": 0.97}}}
    rows = [r["deviation"] for r in report.documented_deviations(results, cfg)]
    named = [r for r in rows if r.startswith("ESI judge in this run")]
    assert len(named) == 1 and "all-MiniLM-L6-v2" in named[0] and "0.97" in named[0]
    assert not any("Qwen2.5-Coder-1.5B guard" in r for r in rows)


def test_reading_of_the_run_and_its_output_files(tmp_path):
    """The verdicts are put into words in the stage (not the notebook); metrics.json keeps a number and a verdict
    per claim, the verdict counts, how many stages ran and the summed wall time."""
    _fixture(tmp_path)
    results = report.load_results(tmp_path)
    rows = report.claims(results)
    totals = report.stage_totals(report.timings(tmp_path))
    text = report.summary(rows, totals, 3)
    counts = report.verdict_counts(rows)
    assert text.startswith(f"{sum(r['verdict'] != report.NOT_RUN for r in rows)} of {len(rows)} claims")
    assert list(counts.values()) == sorted(counts.values(), reverse=True) and sum(counts.values()) == len(rows)
    assert all(f"**{r['claim']}** ({r['paper']}): {r['verdict']}" in text for r in rows)
    assert "took 26 s in all; the slowest was `identify` (20 s)" in text and "3 params differ" in text
    assert "params differ" not in report.summary(rows, [], 0) and "took" not in report.summary(rows, [], 0)
    report.write_outputs(rows, results, totals, {"p": 1}, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["verdicts"] == counts and m["stages_run"] == len(report.STAGES) and m["wall_seconds_total"] == 26.0
    assert m["claims"]["p2_set_halves_asr"] == {"value": pytest.approx(0.625), "verdict": "consistent"}
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert set(claims) == {r["id"] for r in rows} and "id" not in claims["p1_low_overlap"]
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == {"p": 1}

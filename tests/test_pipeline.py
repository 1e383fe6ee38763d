"""`dvc repro` of the whole pipeline on profiles/smoke.yaml (tiny random models) in a temp copy."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

IGNORE = shutil.ignore_patterns(".venv", ".git", "data", "models", "artifacts", "cache", "tmp", "results",
                                "__pycache__", ".pytest_cache", "*.egg-info")


@pytest.mark.slow
def test_smoke_pipeline_runs_every_notebook(tmp_path, mirror):
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=IGNORE)
    shutil.copy(work / "profiles" / "smoke.yaml", work / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout

    run("dvc", "config", "--local", "core.no_scm", "true")
    run(sys.executable, "-m", "saferegions.data", "fetch", "--mirror", str(mirror))
    run("dvc", "commit", "-f", "-q", "data.dvc")
    assert "up to date" in run("dvc", "status", "data.dvc")
    run("dvc", "repro")

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
    assert set(val) == {"aligned"} and set(val["aligned"]) == set(methods)
    for per_method in val["aligned"].values():
        assert set(per_method) == {"advbench", "harmbench"}
        for v in per_method.values():
            assert set(v) == {"asr_region", "asr_random", "utility_region", "utility_random"}
            assert all(0 <= x <= 1 for x in v.values())
    assert (work / "results/validate/figures/validate.png").stat().st_size > 1000
    assert "up to date" in run("dvc", "status")  # a second repro would do nothing

    # report: every claim in the table, measured where its stage ran; provenance and the wall-time figure
    rep_nb = json.loads((work / "results/report/notebook.ipynb").read_text())
    assert not [o for c in rep_nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (work / "results/report/notebook.html").exists()
    rep = json.loads((work / "results/report/metrics.json").read_text())
    table = json.loads((work / "results/report/claims.json").read_text())
    assert set(table) == set(rep["claims"])
    assert all(rep["claims"][k] == {"value": v["value"], "verdict": v["verdict"]} for k, v in table.items())
    assert set(rep["claims"]) == {"setup_aligned_vs_unaligned", "setup_paper1_scale", "p1_region_affects_safety",
                                  "p1_low_overlap", "p1_refined_overlap_drops", "p2_esi_perturbation",
                                  "p2_esi_dense_components", "p2_esi_moe_late_mlp", "p2_set_halves_asr",
                                  "p2_spa_within_1pct"}
    for cid, c in table.items():
        assert {"paper", "claim", "paper_value", "this_run", "value", "verdict", "stage"} <= set(c), cid
        assert c["verdict"] in ("consistent", "mixed", "not consistent", "not run", "n/a", "reduced"), cid
        if (work / "results" / c["stage"]).is_dir() and cid != "p2_esi_moe_late_mlp":
            assert c["verdict"] != "not run", cid   # smoke has no MoE model; every other ran stage is read
    assert rep["stages_run"] >= 6 and rep["wall_seconds_total"] > 0
    assert json.loads((work / "results/report/provenance.json").read_text())["packages"]["torch"]
    assert (work / "results/report/figures/wall_time.png").stat().st_size > 1000

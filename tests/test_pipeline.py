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

    # SET / SPA (paper 2): metrics shape, curves as DVC plots, figures
    for stage in ("set", "spa"):
        nb = json.loads((work / "results" / stage / "notebook.ipynb").read_text())
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"], stage
    set_m = json.loads((work / "results/set/metrics.json").read_text())
    assert set(set_m) == {"set", "full", "lora", "random", "bottom"}
    for arm, v in set_m.items():
        assert {"asr_before", "asr_after", "utility_after", "trainable_fraction"} <= set(v)
        assert 0 <= v["asr_before"] <= 1 and 0 <= v["asr_after"] <= 1 and 0 < v["utility_after"] <= 1
        assert (work / f"results/set/curves/{arm}.csv").read_text().startswith("step,loss,lr")
    assert set_m["full"]["trainable_fraction"] == 1.0 and 0 < set_m["set"]["trainable_fraction"] < 0.1
    for fig in ("loss_curves.png", "before_after.png"):
        assert (work / "results/set/figures" / fig).stat().st_size > 1000
    spa_m = json.loads((work / "results/spa/metrics.json").read_text())
    assert set(spa_m) == {"gsm8k", "sst2"}
    for task, per_arm in spa_m.items():
        assert set(per_arm) == {"spa", "full", "random"}
        for arm, v in per_arm.items():
            assert {"task_score", "asr_before", "asr_after"} <= set(v) and 0 <= v["task_score"] <= 1
            assert (work / f"results/spa/curves/{task}-{arm}.csv").exists()
        assert per_arm["spa"]["trainable_fraction"] > 0.9
    for fig in ("loss_curves.png", "task_and_drift.png"):
        assert (work / "results/spa/figures" / fig).stat().st_size > 1000
    assert "up to date" in run("dvc", "status")  # a second repro would do nothing

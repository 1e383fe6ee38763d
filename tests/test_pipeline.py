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

    for stage in ("data", "models", "baseline"):
        nb = json.loads((work / "results" / stage / "notebook.ipynb").read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors and (work / "results" / stage / "notebook.html").exists(), stage
    base = json.loads((work / "results/baseline/metrics.json").read_text())
    assert set(base["models"]) == {"aligned", "unaligned"}
    for per_set in base["models"].values():
        assert set(per_set) == {"advbench", "jailbreakbench", "xstest_unsafe", "xstest_safe", "alpaca"}
        assert all(v["n"] == 3 and 0 <= v["refusal_rate"] <= 1 for v in per_set.values())
    assert 0 <= base["judge"]["heldout_accuracy"] <= 1
    assert (work / "results/baseline/figures/refusal_heatmap.png").stat().st_size > 1000
    assert "up to date" in run("dvc", "status")  # a second repro would do nothing

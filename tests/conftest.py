import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("SAFEREGIONS_DATA_MIRROR", ROOT.parent / "shared" / "datasets"))
REPO_COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "data", "models", "artifacts", "cache", "tmp",
                                          "results", "__pycache__", ".pytest_cache", "*.egg-info")


def repro_in_copy(work: Path, profile: str, mirror: Path, env: dict | None = None):
    """`dvc repro` of `profiles/<profile>` as params.yaml in a copy of the repository at `work` (data fetched
    from the mirror, no git): what the pipeline smoke tests run. Each command must succeed. Returns the copy
    and a `run(*cmd)` that runs a further command there the same way."""
    shutil.copytree(ROOT, work, ignore=REPO_COPY_IGNORE)
    shutil.copy(work / "profiles" / profile, work / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}

    def run(*cmd):
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout

    run("dvc", "config", "--local", "core.no_scm", "true")
    run(sys.executable, "-m", "saferegions.data", "fetch", "--mirror", str(mirror))
    run("dvc", "commit", "-f", "-q", "data.dvc")
    assert "up to date" in run("dvc", "status", "data.dvc")
    run("dvc", "repro")
    return work, run


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by per-op overhead; one thread is faster and steadier on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _hash_memo(tmp_path_factory, monkeypatch):
    """Tests keep io.sha256_file_memo's record out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def mirror():
    if not (MIRROR / "MANIFEST.md").exists():
        reason = f"dataset mirror {MIRROR} not present (set SAFEREGIONS_DATA_MIRROR)"
        if os.environ.get("CI", "").lower() in ("true", "1"):   # CI must run the data and pipeline tests
            pytest.fail(reason)
        pytest.skip(reason)
    return MIRROR

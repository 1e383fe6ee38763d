import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("SAFEREGIONS_DATA_MIRROR", ROOT.parent / "shared" / "datasets"))


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

"""The report's provenance: digests of everything it read, the environment it ran in, the data and models."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import yaml

from .. import config
from ..io import sha256_file
from ..results import MATRIX_STAGES, STAGES

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "datasets", "gguf",
            "numpy", "pandas", "matplotlib", "seaborn", "papermill", "nbconvert", "dvc")



# What the report reads besides results/: its code (checked against dvc.yaml by tests/test_report.py).
REPORT_CODE = ("notebooks/10_report.ipynb", "src/saferegions/stages/report.py", "src/saferegions/results.py",
               "src/saferegions/reporting/__init__.py", "src/saferegions/reporting/claims.py",
               "src/saferegions/reporting/figures.py", "src/saferegions/reporting/provenance.py",
               "src/saferegions/reporting/tables.py",
               "src/saferegions/config.py", "src/saferegions/plots.py", "src/saferegions/data.py",
               "src/saferegions/io.py", "src/saferegions/evidence.py", "src/saferegions/registry/datasets.json")


def input_files(root: str | Path = ".") -> list[str]:
    """The results files the report reads (metrics and timing of every stage that ran), relative to root."""
    root = Path(root)
    out = []
    for stage in STAGES:
        base = root / "results" / stage
        for name in ("metrics.json", "timing.json"):
            found = sorted(base.glob(f"*/{name}")) if stage in MATRIX_STAGES else [base / name]
            out += [f.relative_to(root).as_posix() for f in found
                    if f.exists() and not f.parent.name.startswith(".")]
    return out


def input_digests(root: str | Path = ".") -> dict:
    """sha256 of everything the report read: results files, its code and the params sections it gets.

    These are exactly its DVC deps, so they stay true for the committed results. A git commit or a dvc.lock
    digest cannot: the commit that holds the results is made after the report ran, and dvc.lock is rewritten
    by the very run that writes this file (the report cannot depend on it)."""
    root = Path(root)
    files = input_files(root) + [c for c in REPORT_CODE if (root / c).exists()]
    params = None
    if (root / "params.yaml").exists():
        canon = json.dumps(config.stage_params("report", root / "params.yaml"), sort_keys=True, default=str)
        params = hashlib.sha256(canon.encode()).hexdigest()
    return {"files": {f: sha256_file(root / f) for f in files}, "params_sha256": params}


def _hub_revision(model_id: str, revision: str | None = None) -> str | None:
    """The commit a hub model's pinned revision resolves to in the local HF cache (what a hub run loaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return Path(path).parent.name if isinstance(path, str) else None


def provenance(root: str | Path = ".", cfg=None) -> dict:
    root = Path(root)
    # inputs / data / models are pinned by the report's DVC deps; python, platform, packages and hub
    # revisions describe the environment the report ran in.
    out: dict = {"inputs": input_digests(root), "python": platform.python_version(),
                 "platform": platform.platform()}
    out["packages"] = {}
    for p in PACKAGES:
        try:
            out["packages"][p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out["packages"][p] = None
    dvc_file = root / "data.dvc"
    data_out = ((yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}])[0] if dvc_file.exists() else {}
    out["data"] = {"data.dvc": {k: data_out.get(k) for k in ("md5", "nfiles", "size")}, "files": []}
    from ..data import registry
    out["data"]["files"] = [{"file": e["file"], "sha256": e["sha256"], "license": e.get("license")}
                            for e in registry()]
    models = {}
    roles = getattr(cfg, "models", None) or {}
    for role, m in roles.items():
        entry = {"id": m.id, "mirror": m.offline}
        manifest = root / "models" / (m.offline or "") / "saferegions-manifest.json"
        if m.offline and manifest.exists():
            man = json.loads(manifest.read_text())
            entry.update(source="offline mirror", weights_sha256=man.get("files", {}).get("model.safetensors"),
                         gguf_sha256=man.get("gguf_sha256"), manifest_sha256=sha256_file(manifest))
        else:
            entry.update(source="hub", pinned=m.revision, revision=_hub_revision(m.id, m.revision))
        models[role] = entry
    judge = getattr(getattr(cfg, "judges", None), "llama_guard", None)
    if judge is not None:
        models["judges.llama_guard"] = {"id": judge.id, "mirror": judge.offline, "source": "hub",
                                        "pinned": judge.revision, "revision": _hub_revision(judge.id, judge.revision)}
    out["models"] = models
    return out


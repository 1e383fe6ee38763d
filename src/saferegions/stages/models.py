"""The models stage: materialize the offline mirrors of the params' models under models/, verify them, and record
what each one is (source, hashes, family, size) in results/models/metrics.json.

`saferegions.models` does the materializing, verifying and loading; this module runs it for every model role.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import config, results  # noqa: F401  (re-exported: the notebook parses params with it)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..models import load, load_encoder, materialize_all, param_count, resolve, verify

ROOT, RESULTS = Path("models"), Path("results/models")


def materialize(cfg, root: Path = ROOT) -> list[dict]:
    """Materialize every offline mirror (one process per model) and verify it against its manifest: one row
    per model role with its source and hashes (hub models: no mirror, nothing to hash)."""
    offline = [entry.offline for entry in cfg.models.values() if entry.offline]
    folders = dict(zip(offline, materialize_all(offline, root)))
    rows = []
    for role, entry in cfg.models.items():
        if not entry.offline:
            rows.append({"role": role, "id": entry.id, "mirror": None, "source": "hub"})
            continue
        manifest = verify(folders[entry.offline])
        rows.append({"role": role, "id": entry.id, "mirror": entry.offline, "source": manifest.get("provenance",
                     manifest.get("source")), "license": manifest.get("license", "-"),
                     "gguf_sha256": manifest.get("gguf_sha256", "-"),
                     "weights_sha256": manifest["files"].get("model.safetensors", "-")})
    return rows


def _is_encoder(folder: Path) -> bool:
    """A BERT-family sentence encoder (the learned judge's), which loads without a language-model head."""
    path = folder / "config.json"
    architectures = json.loads(path.read_text()).get("architectures", []) if path.exists() else []
    return any("Bert" in a for a in architectures)


def describe(cfg, rows: list[dict], root: Path = ROOT) -> None:
    """Add to each row what the loaded model is: family, parameter count (millions), layers, tied embeddings.
    Counted as loaded, so an untied `lm_head` (the Qwen GGUFs) counts (docs/methods.md §6.2)."""
    for row in rows:
        entry = cfg.models[row["role"]].entry()
        if _is_encoder(Path(resolve(entry, root))):
            model, _ = load_encoder(entry, root)
        else:
            model, _ = load(entry, root, dtype="float32", device="cpu")   # fp32 files: a memory map
        row.update(family=model.config.model_type, params_millions=round(param_count(model) / 1e6, 1),
                   layers=getattr(model.config, "num_hidden_layers", None),
                   tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)))
        del model


def write_metrics(rows: list[dict]) -> None:
    """results/models/metrics.json: every row by role, and the torch version that loaded them."""
    results.save("models", RESULTS / "metrics.json", {
        "models": {r["role"]: {k: v for k, v in r.items() if k != "role"} for r in rows},
        "torch": torch.__version__,
    })

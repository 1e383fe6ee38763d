"""The models stage: materialize the offline mirrors of the params' models under models/, verify them, and record
what each one is (source, hashes, family, size) in results/models/metrics.json.

`saferegions.models` does the materializing, verifying and loading; this module runs it for every model role.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from .. import config, results  # noqa: F401  (re-exported: the notebook parses params with it)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..models import (check_family, is_encoder, load_config, materialize_all, param_count, resolved_revision,
                      verify)

ROOT, RESULTS = Path("models"), Path("results/models")


def materialize(cfg, root: Path = ROOT) -> list[dict]:
    """Materialize every offline mirror (one process per model) and verify it against its manifest: one row
    per model role with its source and hashes (hub models: no mirror, nothing to hash)."""
    offline = [entry.offline for entry in cfg.models.values() if entry.offline]
    root.mkdir(parents=True, exist_ok=True)   # the stage's output, also when every model is a hub id
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


def meta_model(model_config):
    """The model a transformers config describes, built on the meta device: every parameter's shape, no memory, no weights
    (an encoder without a language-model head, as the learned judge loads it)."""
    cls = T.AutoModel if is_encoder(model_config) else T.AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(model_config)


def describe(cfg, rows: list[dict], root: Path = ROOT) -> None:
    """Add to each row what the model is, from its config alone: family, parameter count (millions), layers,
    tied embeddings, and for a hub model the pinned revision and the commit it resolves to in the HF cache.
    The count is that of the model as loaded, so an untied `lm_head` (the Qwen GGUFs) counts (docs/methods.md
    §6.2); a decoder family without an adapter is an error here, before any stage loads weights."""
    for row in rows:
        entry = cfg.models[row["role"]].entry()
        model_cfg = load_config(entry, root)
        model = meta_model(model_cfg)
        if not is_encoder(model_cfg):
            check_family(model)
        row.update(family=model_cfg.model_type, params_millions=round(param_count(model) / 1e6, 1),
                   layers=getattr(model_cfg, "num_hidden_layers", None),
                   tied_embeddings=bool(getattr(model_cfg, "tie_word_embeddings", False)))
        if row["source"] == "hub":
            row.update(revision=entry.revision, resolved_revision=resolved_revision(entry, root))


def write_metrics(rows: list[dict]) -> None:
    """results/models/metrics.json: every row by role, and the torch version that loaded them."""
    results.save("models", RESULTS / "metrics.json", {
        "models": {r["role"]: {k: v for k, v in r.items() if k != "role"} for r in rows},
        "torch": torch.__version__,
    })

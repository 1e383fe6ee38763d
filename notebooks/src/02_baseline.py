# %% [md]
# # 02 · Baseline: how often does each model refuse, before anyone touches its weights?
#
# Every later stage measures a *change* in refusal behaviour, so this stage fixes the starting point: the
# refusal rate of each default model on the held-out (`eval`) prompts of the ten safety sets, and on benign
# prompts (XSTest-safe, Alpaca) where a refusal is an *over*-refusal. ASR = 1 − refusal rate on harmful prompts.
#
# Two offline judges label every response:
# * **keyword** — a stock refusal phrase (Wei et al.'s 31 GCG prefixes + "I can't", "I'm unable") in the first
#   200 characters. Primary judge for all tables (docs/methods.md §5.1).
# * **learned** — all-MiniLM-L6-v2 sentence embeddings + a logistic head, trained here on labelled responses
#   (XSTest human labels, refusal-direction completions where substring matching and LlamaGuard-2 agree,
#   Safety-Tuned LLaMAs safe responses). Its held-out accuracy and its agreement with the keyword judge are
#   reported below; it is also the differentiable judge ESI uses offline.
# %% [params]
params = {}
# %%
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from saferegions import config, data, evaluate, judges, models, plots
from saferegions.io import read_jsonl, write_json, write_jsonl

cfg = config.parse(params)
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/baseline"), Path("results/baseline")
PROMPTS = "artifacts/data/prompts.jsonl"
# %% [md]
# ## The learned judge
# %%
lj = cfg.judges.learned
encoder, enc_tok = models.load_encoder(cfg.models[lj.encoder].entry())
learned, judge_stats = judges.fit_learned_judge(read_jsonl("artifacts/data/judge.jsonl"), encoder, enc_tok,
                                                lj.max_train, lj.heldout_frac, cfg.run.seed, lj.max_length,
                                                lj.batch_size)
learned.save(OUT / "learned_judge.safetensors", {"encoder": cfg.models[lj.encoder].id, **judge_stats})
display(pd.Series(judge_stats, name="learned judge").to_frame())
kw = cfg.judges.keyword
judge_list = {"keyword": judges.KeywordJudge(kw.window, kw.min_words, kw.phrases), "learned": learned}
# %% [md]
# ## Generations
# Greedy decoding, each model's own chat template, `max_new_tokens` new tokens, the first `n_prompts`
# evaluation prompts of each set. All sets are generated in one batched pass per model.
# %%
sets = {d: data.prompts(PROMPTS, d, "eval", cfg.baseline.n_prompts) for d in cfg.baseline.datasets}
generations, metrics = [], {}
for role in cfg.baseline.models:
    model, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows, metrics[role] = evaluate.refusal_table(model, tok, sets, judge_list, cfg.baseline.max_new_tokens,
                                                 cfg.baseline.batch_size, cfg.baseline.system_prompt, desc=role)
    generations += [{"model": role, **r} for r in rows]
    del model
write_jsonl(OUT / "generations.jsonl", generations)
gen = pd.DataFrame(generations)
# %% [md]
# ## Refusal rate per model and set (keyword judge)
# The safety sets should be refused often by the aligned model and rarely by the unaligned one; the benign sets
# (right-most columns) should be refused by neither.
# %%
table = pd.DataFrame({m: {d: v["refusal_rate"] for d, v in per.items()} for m, per in metrics.items()}).T
display(table.style.format("{:.2f}"))
fig = plots.heatmap(table, "Refusal rate (keyword judge)", "prompt set", "model", cbar_label="refusal rate")
plots.save(fig, RESULTS / "figures" / "refusal_heatmap.png")
# %%
harmful = [d for d in cfg.baseline.datasets if d in data.SAFETY_SETS]
benign = [d for d in cfg.baseline.datasets if d in data.BENIGN_SETS]
summary = pd.DataFrame({"harmful refusal (mean over sets)": table[harmful].mean(axis=1),
                        "benign refusal (mean over sets)": table[benign].mean(axis=1) if benign else np.nan})
summary["ASR (harmful)"] = 1 - summary["harmful refusal (mean over sets)"]
display(summary.style.format("{:.2f}"))
# %% [md]
# ## Do the two judges agree?
# Cohen's κ between the keyword and the learned judge on every generation of this stage, per model.
# %%
agree = gen.groupby("model").apply(lambda g: pd.Series({
    "agreement": float((g.complied_keyword == g.complied_learned).mean()),
    "kappa": judges.cohen_kappa(g.complied_keyword.values, g.complied_learned.values),
    "n": len(g)}), include_groups=False)
display(agree)
judge_stats.update(agreement={m: float(a) for m, a in agree.agreement.items()},
                   kappa={m: float(k) for m, k in agree.kappa.items()})
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 120):
    display(gen.groupby(["model", "complied_keyword"]).head(2)[["model", "dataset", "prompt", "response",
                                                                 "complied_keyword", "complied_learned"]])
# %%
write_json(RESULTS / "metrics.json", {"models": metrics, "judge": judge_stats})

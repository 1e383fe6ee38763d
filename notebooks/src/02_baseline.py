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
import pandas as pd
from IPython.display import display

from saferegions.stages import baseline

cfg = baseline.config.parse(params)
# %% [md]
# ## The learned judge
# %%
judge_list, judge_stats = baseline.train_judges(cfg)
display(pd.Series(judge_stats, name="learned judge").to_frame())
# %% [md]
# ## Generations
# Greedy decoding, each model's own chat template, `max_new_tokens` new tokens, the first `n_prompts`
# evaluation prompts of each set. All sets are generated in one batched pass per model.
# %%
generations, metrics = baseline.generate(cfg, judge_list)
gen = pd.DataFrame(generations)
# %% [md]
# ## Refusal rate per model and set (keyword judge)
# The safety sets should be refused often by the aligned model and rarely by the unaligned one; the benign sets
# (right-most columns) should be refused by neither.
# %%
table = baseline.refusal_rates(metrics)
display(table.style.format("{:.2f}"))
fig = baseline.plots.heatmap(table, "Refusal rate (keyword judge)", "prompt set", "model",
                             cbar_label="refusal rate")
baseline.plots.save(fig, baseline.RESULTS / "figures" / "refusal_heatmap.png")
# %%
display(baseline.refusal_summary(table, cfg.baseline.datasets).style.format("{:.2f}"))
# %% [md]
# ## Do the two judges agree?
# Cohen's κ between the keyword and the learned judge on every generation of this stage, per model.
# %%
agree = baseline.judge_agreement(gen)
display(agree)
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 120):
    display(gen.groupby(["model", "complied_keyword"]).head(2)[["model", "dataset", "prompt", "response",
                                                                 "complied_keyword", "complied_learned"]])
# %%
baseline.write_metrics(metrics, judge_stats, agree)

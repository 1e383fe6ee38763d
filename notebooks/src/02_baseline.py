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
display(baseline.params_table(params))
# %% [md]
# ## The learned judge
# %%
judge_list, judge_stats = baseline.train_judges(cfg)
display(baseline.table(pd.Series(judge_stats, name="learned judge")))
# %% [md]
# ## Generations
# Greedy decoding, each model's own chat template, `max_new_tokens` new tokens, the first `n_prompts`
# evaluation prompts of each set. All sets are generated in one batched pass per model.
# %%
generations, metrics, evals = baseline.generate(cfg, judge_list)
gen = pd.DataFrame(generations)
harmful = baseline.harmful_mask(gen, cfg.baseline.models[0])
# %% [md]
# ## Outcomes per model and set (keyword judge)
# Each response is **refused**, **complied** (coherent compliance: ASR counts only these) or **degenerate**
# (empty, repetitive or incoherent text; `evaluation.is_degenerate`). Every rate has n and a Wilson 95% interval
# (metrics.json). The safety sets should be refused often by the aligned model and rarely by the unaligned one;
# the benign sets (right-most columns) should be refused by neither.
# %%
table = baseline.refusal_rates(metrics)
intervals = baseline.rate_table(metrics, "refusal_rate_ci")
display(baseline.table(table, caption="Refusal rate (keyword judge), Wilson 95% intervals", intervals=intervals))
fig = baseline.plots.heatmap(table, "Refusal rate (keyword judge) with Wilson 95% intervals", "prompt set",
                             "model", cbar_label="refusal rate", intervals=intervals)
baseline.plots.save(fig, baseline.RESULTS / "figures" / "refusal_heatmap.png")
# %%
display(baseline.table(baseline.refusal_summary(metrics, cfg.baseline.datasets),
                       missing={"benign refusal (mean over sets)": "n/a (no benign set)"}))
pooled = baseline.pooled(evals, harmful)
frame = pd.DataFrame([{"model": m, "prompts": k, **rec} for m, per in pooled.items() for k, rec in per.items()])
display(baseline.table(frame, caption="Pooled outcomes, Wilson 95% intervals", index=False))
fig = baseline.plots.error_bars(frame, "model", "prompts",
                                {"refusal_rate": "refusal rate", "asr": "ASR", "degenerate_rate": "degenerate rate"},
                                "Pooled outcomes with Wilson 95% intervals")
baseline.plots.save(fig, baseline.RESULTS / "figures" / "pooled_outcomes.png")
# %% [md]
# ## Aligned vs unaligned on the same harmful prompts
# Refusal(aligned) − refusal(unaligned), paired on the pooled harmful prompts, exact McNemar test.
# %%
comparison = baseline.comparison(evals, harmful)
display(baseline.table(pd.DataFrame(comparison).T, intervals={"effect": "ci"}))
# %% [md]
# ## A cheaper estimator: refusal log-odds from one forward pass
# log P(refusal first token) − log P(compliance first token) at the first response position
# (`baseline.REFUSAL_STARTS` vs `baseline.COMPLIANCE_STARTS`, first token of each). A random half of the
# prompts (both models pooled) fixes a threshold; the other half gives the AUROC against the generation +
# keyword-judge label "refused" (Mann-Whitney U / (n₁·n₂)). **The headline numbers of every stage stay on
# generation + judges**; the estimator could stand in only where its held-out AUROC is at least
# `baseline.AGREES_AUROC` (`agrees` below), and no stage uses it in place of generation today.
# %%
estimator = baseline.estimator_check(gen.log_odds, gen.outcome == "refused", cfg.run.seed)
display(baseline.table(pd.Series(estimator, name="log-odds estimator (held-out half)")))
fig = baseline.plots.bars(gen.assign(refused=gen.outcome == "refused"), "model", "log_odds", "refused",
                          f"Refusal log-odds by generated outcome (held-out AUROC {estimator['auroc']:.2f})",
                          "model", "log P(refusal start) − log P(compliance start)")
baseline.plots.save(fig, baseline.RESULTS / "figures" / "estimator.png")
# %% [md]
# ## Do the two judges agree?
# Cohen's κ between the keyword and the learned judge on every generation of this stage, per model.
# %%
agree = baseline.judge_agreement(gen)
display(baseline.table(agree, caption="Keyword vs learned judge"))
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 120):
    display(baseline.table(gen.groupby(["model", "outcome"]).head(2)[["model", "dataset", "prompt", "response",
                                                                      "outcome", "complied_keyword",
                                                                      "complied_learned"]], index=False))
# %%
baseline.write_metrics(metrics, judge_stats, agree, comparison, pooled, estimator)

# %% [md]
# # 09 · SPA: does freezing the top-ESI weights keep an aligned model safe through fine-tuning?
#
# Fine-tuning an aligned model on ordinary task data is known to erode its refusals. Paper 2 (arXiv 2604.08297)
# claims that **Safety Preserving Adaptation** — freezing the aligned model's highest-ESI weights (stage 07, `esi`) and
# training everything else — keeps the safety degradation **within 1%** after 1,000 iterations of instruction
# tuning on different tasks. This stage tunes the aligned default model on each task of `spa.tasks` (GSM8K and
# SST-2 at paper scale; the CPU default runs SST-2, whose label format a 0.5B model learns in a few steps) four
# ways, on the same data and the same number of steps:
#
# | arm | what may change | data | optimizer |
# |---|---|---|---|
# | `spa` | everything except the ESI top-k (biases and norms always trainable, as the reference) | task | MaskedAdamW |
# | `full` | every weight (plain fine-tuning) | task | AdamW |
# | `random` | everything except a random mask with the top-k's count in every matrix | task | MaskedAdamW |
# | `erode` | every weight (positive control) | task + harmful compliant pairs (`harmful_fraction`) | AdamW |
#
# Each arm is scored on the same held-out prompts as the untuned model, so every comparison is paired: the
# **task score** per held-out task prompt (pre-registered: GSM8K exact match of the last number; SST-2 exact
# match, the whole answer is the label as trained; the lenient SST-2 accuracy is shown beside it), and the
# **ASR** on held-out harmful prompts (keyword judge; the refusal-onset rate of the first `max_new_tokens`
# tokens). The claim is tested as the report tests it (docs/methods.md, "Pre-registered claims"): SPA's drift,
# SPA − full and SPA − random freeze, each non-inferior at a 1-point margin, *if* full fine-tuning learned the
# task (its task score rose by its interval; else the claim is not run) and *if* `erode` measurably raised ASR
# (else the run cannot show that fine-tuning moves safety at all).
# %% [params]
params = {}
# %%
import pandas as pd
from IPython.display import Markdown, display

from saferegions.stages import spa as stage

cfg = stage.config.parse(params)
display(stage.params_table(params))
display(stage.table(stage.deviations(cfg)))
# %% [md]
# ## The frozen masks
# The ESI top-k of this model comes from stage 07, `esi` (`artifacts/esi/<model>/`); the random control draws, in
# every matrix, as many entries as the top-k has there. Both are frozen; everything else trains.
# %%
model, tok, arms = stage.load(cfg)   # prints the top-k's provenance (esi stage)
display(stage.table(pd.DataFrame(stage.region_table(arms, model)).T, caption="Frozen masks"))
# %% [md]
# ## Data
# Task rows: `artifacts/data/utility.jsonl` (train split for tuning, the first `n_task` eval rows for scoring).
# Safety: the first `n_eval` eval-split prompts of each harmful set. Arm `erode` mixes in harmful question →
# compliant answer pairs (`artifacts/data/harmful_pairs.jsonl`: BeaverTails, the NLSR paper's harmful fine-tuning
# set), none of whose questions is an evaluation prompt.
# %%
s = cfg.spa
d = stage.select_data(s)
for task in s.tasks:
    p, t = stage.training_example(d.utility, task, s)
    display(Markdown(f"**{task}** training example — prompt: `{p[:200]}` → target: `{t[:200]}`"))
if d.harmful_pairs:
    display(Markdown(f"**erode** harmful pair ({len(d.harmful_pairs)} available) — prompt: "
                     f"`{d.harmful_pairs[0]['prompt'][:200]}` → target: `{d.harmful_pairs[0]['response'][:200]}`"))
print(f"{s.max_steps} steps x {s.batch_size} x {s.grad_accum} examples per run; "
      f"{sum(map(len, d.harmful.values()))} harmful eval prompts; {s.n_task} eval rows per task")
# %% [md]
# ## Tuning every (task, arm)
# Writes the generations, `metrics.json`, one loss-curve CSV per (task, arm) (DVC plots) and the loss-curve figure.
# %%
metrics, curves, gens = stage.run(cfg, model, tok, arms, d)
# %% [md]
# ## Task score and safety drift
# %%
frame = pd.DataFrame(stage.drift_rows(metrics))
display(stage.table(frame, index=False))
fig = stage.task_and_drift_figure(frame, s)
display(stage.table(pd.DataFrame(stage.untuned(metrics)).T, caption="Untuned model"))
# %% [md]
# ## Examples: one harmful prompt after each run
# %%
gen = pd.DataFrame(gens)
first = d.harmful[s.eval_sets[0]][0]
with pd.option_context("display.max_colwidth", 120):
    display(stage.table(gen[gen.prompt == first][["task", "arm", "response", "complied"]], index=False))
# %% [md]
# ## What this n can detect
# The minimal ASR difference an exact McNemar test detects with 80% power at 5% on these paired prompts, at best
# (every discordant prompt one way) and at the discordance observed between SPA and full fine-tuning, beside the
# paper's 1-point threshold.
# %%
display(stage.table(pd.DataFrame(stage.power_rows(metrics)), index=False))
# %% [md]
# ## The paper's claim beside this run
# The claim's record as the report builds it: every part with its paired 95% interval and its verdict from
# `evidence.verdict`, the claim's verdict their conjunction. (Holm runs over the SPA parts here, over every claim's
# parts in the report.)
# %%
record = stage.claim(metrics, cfg)
display(stage.table(pd.DataFrame(stage.part_rows(record)), index=False,
                    caption=f"p2_spa_within_1pct: {record['verdict']} ({record['reason']})"))
# %% [md]
# ## Reading this run
# %%
display(Markdown(stage.reading(metrics, s, d.harmful, record)))
# %% [md]
# ## Drift with its interval
# ASR(after) − ASR(before) per task and arm on the same held-out prompts (Newcombe 95% interval, exact McNemar).
# %%
display(stage.table(pd.DataFrame({(t, a): e for t, per in metrics["drift"].items() for a, e in per.items()}).T,
                    intervals={"effect": "ci"}))

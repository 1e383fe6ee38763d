# %% [md]
# # 09 · SPA: does freezing the top-ESI weights keep an aligned model safe through fine-tuning?
#
# Fine-tuning an aligned model on ordinary task data is known to erode its refusals. Paper 2 (arXiv 2604.08297)
# claims that **Safety Preserving Adaptation** — freezing the aligned model's highest-ESI weights (stage 07, `esi`) and
# training everything else — keeps the safety degradation **within 1%** after 1,000 iterations of instruction
# tuning on different tasks. This stage tunes the aligned default model on each task of `spa.tasks` three ways,
# on the same data and the same number of steps (GSM8K and SST-2 at paper scale; the CPU default runs GSM8K only,
# because in 2 steps SST-2 did not separate the arms, see `params.yaml`):
#
# | arm | what may change | optimizer |
# |---|---|---|
# | `spa` | everything except the ESI top-k (biases and norms always trainable, as the reference) | MaskedAdamW |
# | `full` | every weight (plain fine-tuning) | AdamW |
# | `random` | everything except a random mask with the top-k's count in every matrix | MaskedAdamW |
#
# After each run we measure the **task score** on held-out rows (GSM8K: exact match of the last number;
# SST-2: accuracy of the first sentiment word), the **task likelihood** (exp mean log-likelihood of the reference
# answers — smooth, so it moves even when a few CPU steps leave the task score flat), and the **ASR** on
# held-out harmful prompts (keyword judge). *Safety drift* = ASR after − ASR before; "within 1%" is read as an
# absolute increase of at most 0.01 (docs/methods.md §4.6).
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
# Safety: the first `n_eval` eval-split prompts of each harmful set.
# %%
s = cfg.spa
d = stage.select_data(s)
for task in s.tasks:
    p, t = stage.training_example(d.utility, task, s)
    display(Markdown(f"**{task}** training example — prompt: `{p[:200]}` → target: `{t[:200]}`"))
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
# ## The paper's claim beside this run
# %%
display(stage.table(pd.DataFrame(stage.claims(metrics))))
# %% [md]
# ## Reading this run
# %%
display(Markdown(stage.reading(metrics, s, d.harmful)))
# %% [md]
# ## Drift with its interval
# ASR(after) − ASR(before) per task and arm on the same held-out prompts (exact McNemar). If the full fine-tuning
# arm's interval includes zero, the run shows no measurable drift for any arm to be "within 1%" of.
# %%
display(stage.table(pd.DataFrame({(t, a): e for t, per in metrics["drift"].items() for a, e in per.items()}).T,
                    intervals={"effect": "ci"}))
for task in stage.full_drift_inconclusive(metrics):
    print(f"{task}: the full fine-tuning arm's drift interval includes 0, so the SPA claim is inconclusive: "
          "these steps did not measurably move safety even when every weight trains.")

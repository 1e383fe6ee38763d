# %% [md]
# # 08 · SET: can tuning 1% of the weights make an unaligned model refuse, and keep it useful?
#
# Paper 2 (arXiv 2604.08297) claims that **Safety Enhancement Tuning** — updating only the weights with the
# highest Expected Safety Impact (ESI, stage 07, `esi`), 1% of the model, for 100 iterations on harmful → refusal
# pairs — cuts the attack success rate (ASR) of an *unaligned* model by **more than 50%** *while preserving its
# performance*. This stage runs that recipe on the unaligned default model and, on the same data and the same
# number of steps, these baselines:
#
# | arm | what may change | optimizer |
# |---|---|---|
# | `set` | the ESI top-k of this model (+ biases and norms, as the reference) | MaskedAdamW |
# | `full` | every weight | AdamW |
# | `lora` | a LoRA adapter (r 8, α 32) on every linear layer | AdamW |
# | `random` | a random mask with the top-k's count in every matrix | MaskedAdamW |
# | `benign_esi` | the top-k of the ESI of a *benign* LM loss: weights as important, for something else | MaskedAdamW |
# | `bottom` | the ESI bottom-k (the least safety-relevant weights) | MaskedAdamW |
#
# Each arm starts from the same untuned weights (they are restored after every arm) and sees the same batches
# in the same order. The untuned model is evaluated once, for all arms. After training we measure, greedy and with
# the keyword judge, on held-out prompts that no training pair shares:
# * **ASR** on eval-split prompts of several of the ten safety sets;
# * **benign refusal** (over-refusal) on XSTest-safe and Alpaca eval prompts: a response that is not an answer
#   (refused or degenerate). A model that refuses everything would "win" on ASR;
# * **utility**: per prompt, exp(mean token log-likelihood) the model gives to the *untuned* model's own greedy
#   answer (≥ 64 tokens) to a held-out Alpaca prompt (1 / perplexity; 1.0 = certain). It falls when tuning damages
#   the model or turns its answers into refusals.
#
# "Preserving performance" is tested as **non-inferiority**, paired before/after on the same prompts, with margins
# pre-registered in `docs/methods.md` (`evidence.PARTS`): the benign-refusal rise must stay below 0.10 at its
# 95% interval's upper bound, and the utility ratio (after / before, paired bootstrap over prompts) above 0.9 at
# its lower bound.
# %% [params]
params = {}
# %%
import pandas as pd
from IPython.display import Markdown, display

from saferegions.stages import set as stage

cfg = stage.config.parse(params)
display(stage.params_table(params))
display(stage.table(stage.deviations(cfg)))
# %% [md]
# ## The masks
# The ESI top-k and bottom-k of this model come from stage 07, `esi` (`artifacts/esi/<model>/`); the random control
# draws, in every matrix, as many entries as the top-k has there. The importance-matched control `benign_esi` is
# computed here, on this model: |Σ_x ∂L_x/∂W|·σ_W with L_x the LM loss of the model's own greedy answer to Alpaca
# identification prompt x — the ESI score with a benign objective in place of the judge — and its top-k, the
# same k as SET's.
# %%
model, tok, arms = stage.load(cfg)   # prints the top-k's provenance (esi stage)
display(stage.table(pd.DataFrame(stage.region_table(arms, model)).T))
print("IoU with the SET top-k:", {arm: round(iou, 4) for arm, iou in stage.overlap_with_set(arms).items()})
# %% [md]
# ## Data
# Training pairs: harmful instruction → refusal (Safety-Tuned LLaMAs), minus any pair whose prompt is one of the
# evaluation prompts. Evaluation: the first `n_eval` eval-split prompts of each harmful set, `n_benign` of each
# benign set, and the next `n_utility` Alpaca eval prompts for utility.
# %%
s = cfg.set
d = stage.select_data(s)
print(f"{len(d.pairs)} training pairs; {s.max_steps} steps x {s.batch_size} x {s.grad_accum} = "
      f"{s.max_steps * s.batch_size * s.grad_accum} examples per arm; "
      f"{sum(map(len, d.harmful.values()))} harmful / {sum(map(len, d.benign.values()))} benign / "
      f"{len(d.utility_prompts)} utility eval prompts")
with pd.option_context("display.max_colwidth", 120):
    display(stage.table(pd.DataFrame(d.pairs[:3])[["prompt", "response"]]))
# %% [md]
# ## Training every arm
# Writes the generations, `metrics.json`, one loss-curve CSV per arm (DVC plots) and the loss-curve figure.
# %%
metrics, curves, gens = stage.run(cfg, model, tok, arms, d)
# %% [md]
# ## Before and after
# %%
display(stage.table(pd.DataFrame(stage.arm_metrics(metrics)).T.drop(columns=["per_set_refusal_after"])))
display(stage.table(pd.DataFrame(metrics["comparison"]).T, intervals={"effect": "ci"}))
print("untuned answers utility is scored on:", metrics["utility_answers"])
display(stage.table(pd.DataFrame({(arm, part): est for arm, parts in metrics["preservation"].items()
                                  for part, est in parts.items()}).T, intervals={"effect": "ci"},
                    caption="Preserving performance, paired before/after: benign refusal rise and utility ratio"))
fig = stage.before_after_figure(metrics, s)
per_set = pd.DataFrame({arm: m["per_set_refusal_after"] for arm, m in stage.arm_metrics(metrics).items()})
display(stage.table(per_set, caption="Refusal rate after training, per evaluation set"))
# %% [md]
# ## Examples: the same harmful prompt before and after each arm
# %%
gen = pd.DataFrame(gens)
first = d.harmful[s.eval_sets[0]][0]
with pd.option_context("display.max_colwidth", 120):
    display(stage.table(gen[gen.prompt == first][["arm", "response", "complied"]], index=False))
# %% [md]
# ## The paper's claim beside this run
# The ASR half is relative: ASR after ≤ half the ASR before, on the SET arm's paired interval. Each "preserving
# performance" part is decided on its interval against its pre-registered margin. Every verdict here comes from
# `evidence.verdict`; the report joins the parts into the claim's verdict.
# %%
display(stage.table(pd.DataFrame(stage.claims(metrics)).T))
# %% [md]
# ## Reading this run
# %%
display(Markdown(stage.reading(metrics, s, d.harmful)))

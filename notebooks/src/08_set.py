# %% [md]
# # 08 · SET: can tuning 1% of the weights make an unaligned model refuse?
#
# Paper 2 (arXiv 2604.08297) claims that **Safety Enhancement Tuning** — updating only the weights with the
# highest Expected Safety Impact (ESI, stage 07, `esi`), 1% of the model, for 100 iterations on harmful → refusal
# pairs — cuts the attack success rate (ASR) of an *unaligned* model by **more than 50%** while preserving its
# performance. This stage runs that recipe on the unaligned default model and, on the same data and the same
# number of steps, four baselines:
#
# | arm | what may change | optimizer |
# |---|---|---|
# | `set` | the ESI top-k of this model (+ biases and norms, as the reference) | MaskedAdamW |
# | `full` | every weight | AdamW |
# | `lora` | a LoRA adapter (r 8, α 32) on every linear layer | AdamW |
# | `random` | a random mask with the top-k's count in every matrix | MaskedAdamW |
# | `bottom` | the ESI bottom-k (the least safety-relevant weights) | MaskedAdamW |
#
# Each arm starts from the same untuned weights (they are restored after every arm) and sees the same batches
# in the same order. After training we measure, greedy and with the keyword judge:
# * **ASR** on held-out (eval split) harmful prompts of several of the ten safety sets — prompts no training
#   pair shares;
# * **benign refusal** on XSTest-safe and Alpaca eval prompts (over-refusal: a model that refuses everything
#   would "win" on ASR);
# * **utility**: exp(mean token log-likelihood) the tuned model gives to the *untuned* model's own greedy answers
#   to held-out Alpaca prompts (1 / perplexity; 1.0 = certain) — it falls when tuning damages the model.
# %% [params]
params = {}
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from saferegions import config, data, judges, models, plots, regions, train
from saferegions.io import atomic_path, read_jsonl, write_json, write_jsonl

cfg = config.parse(params)
s = cfg.set
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/set"), Path("results/set")
PROMPTS = "artifacts/data/prompts.jsonl"
ESI = Path("artifacts/esi") / s.model
display(pd.DataFrame(config.deviations(s, "set")).style.set_caption(
    "CPU reductions and project choices in this run (paper-scale / reference value beside each)"))
# %% [md]
# ## The masks
# The ESI top-k and bottom-k of this model come from stage 07, `esi` (`artifacts/esi/<model>/`); the random control
# draws, in every matrix, as many entries as the top-k has there.
# %%
model, tok = models.load(cfg.models[s.model].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
top, bottom = regions.load(ESI / "topk.safetensors"), regions.load(ESI / "bottomk.safetensors")
train.check_fraction(top, model, s.top_frac, str(ESI / "topk.safetensors"))
random_region = regions.random_like(top, cfg.run.seed, s.random_mode)
masks = {"set": top.masks, "random": random_region.masks, "bottom": bottom.masks}
print("top-k provenance (esi stage):", {k: v for k, v in top.meta.items() if k != "reference"})
display(pd.DataFrame({arm: {"entries": r.size, "fraction of all parameters": train.region_fraction(r, model),
                            "tensors touched": sum(bool(m.any()) for m in r.masks.values())}
                      for arm, r in (("set", top), ("random", random_region), ("bottom", bottom))}).T)
# %% [md]
# ## Data
# Training pairs: harmful instruction → refusal (Safety-Tuned LLaMAs), minus any pair whose prompt is one of the
# evaluation prompts. Evaluation: the first `n_eval` eval-split prompts of each harmful set, `n_benign` of each
# benign set.
# %%
harmful = {d: data.prompts(PROMPTS, d, "eval", s.n_eval) for d in s.eval_sets}
benign = {d: data.prompts(PROMPTS, d, "eval", s.n_benign) for d in s.benign_sets}
utility_prompts = data.prompts(PROMPTS, "alpaca", "eval", s.n_benign)
held_out = [p for ps in (*harmful.values(), *benign.values()) for p in ps]
pairs = train.disjoint(read_jsonl("artifacts/data/pairs.jsonl"), held_out)
print(f"{len(pairs)} training pairs; {s.max_steps} steps x {s.batch_size} x {s.grad_accum} = "
      f"{s.max_steps * s.batch_size * s.grad_accum} examples per arm; "
      f"{sum(map(len, harmful.values()))} harmful / {sum(map(len, benign.values()))} benign eval prompts")
with pd.option_context("display.max_colwidth", 120):
    display(pd.DataFrame(pairs[:3])[["prompt", "response"]])
# %% [md]
# ## Training every arm
# %%
judge = judges.KeywordJudge(cfg.judges.keyword.window, cfg.judges.keyword.min_words, cfg.judges.keyword.phrases)
metrics, curves, gens = train.run_set(model, tok, s, masks, pairs, harmful, benign, utility_prompts, judge,
                                      cfg.run.seed)
write_jsonl(OUT / "generations.jsonl", gens)
curve = pd.DataFrame(curves)
for arm, c in curve.groupby("arm"):                      # DVC plots: one loss curve per arm
    with atomic_path(RESULTS / "curves" / f"{arm}.csv") as tmp:
        c[["step", "loss", "lr"]].to_csv(tmp, index=False)
fig = plots.lines(curve, "step", "loss", "arm", f"SET training loss ({s.model} model)", "optimizer step",
                  "loss (" + ("response tokens" if not s.loss_on_prompt else "whole sequence") + ")")
plots.save(fig, RESULTS / "figures" / "loss_curves.png")
# %% [md]
# ## Before and after
# %%
table = pd.DataFrame(metrics).T.drop(columns=["per_set_refusal_after"])
display(table.style.format(precision=3))
long = pd.concat([pd.DataFrame({"arm": list(metrics), "when": when,
                                "ASR": [m[f"asr_{when}"] for m in metrics.values()],
                                "benign refusal": [m[f"benign_refusal_{when}"] for m in metrics.values()],
                                "utility": [m[f"utility_{when}"] for m in metrics.values()]})
                  for when in ("before", "after")])
fig = plots.bar_panels(long, "arm", "when", {"ASR": "ASR (held-out harmful)", "benign refusal":
                                             "refusal rate (benign)", "utility": "utility (1/perplexity)"},
                       f"SET and baselines, {s.max_steps} steps: before vs after")
plots.save(fig, RESULTS / "figures" / "before_after.png")
per_set = pd.DataFrame({arm: m["per_set_refusal_after"] for arm, m in metrics.items()})
display(per_set.style.format("{:.2f}").set_caption("Refusal rate after training, per evaluation set"))
# %% [md]
# ## Examples: the same harmful prompt before and after each arm
# %%
gen = pd.DataFrame(gens)
first = harmful[s.eval_sets[0]][0]
with pd.option_context("display.max_colwidth", 120):
    display(gen[gen.prompt == first][["arm", "response", "complied"]])
# %% [md]
# ## The paper's claim beside this run
# The claim is relative: ASR after ≤ half the ASR before. "Preserving performance" is read here as a utility
# (1/perplexity of the untuned answers) within 10% of the untuned model's.
# %%
def relative_drop(m):
    return (m["asr_before"] - m["asr_after"]) / m["asr_before"] if m["asr_before"] > 0 else float("nan")


claims = pd.DataFrame({arm: {"paper claim": "ASR −50% or more (SET, 1% weights, 100 iterations)" if arm == "set"
                             else "(baseline)",
                             "ASR before": m["asr_before"], "ASR after": m["asr_after"],
                             "relative ASR drop": relative_drop(m),
                             "utility kept": m["utility_after"] / m["utility_before"],
                             "trainable fraction": m["trainable_fraction"],
                             "meets −50%": relative_drop(m) >= 0.5} for arm, m in metrics.items()}).T
display(claims)
write_json(RESULTS / "metrics.json", metrics)
# %% [md]
# ## Reading this run
# %%
m = metrics.get("set")
lines = [f"* {s.max_steps} steps (paper: 100) at lr {s.lr:g}, {s.batch_size * s.grad_accum} examples per step, "
         f"on {len(harmful)} harmful sets × {s.n_eval} prompts (keyword judge)."]
if m:
    lines.append(f"* **SET** (ESI top-k, {m['trainable_fraction']:.2%} of all parameters incl. biases and norms): "
                 f"ASR {m['asr_before']:.2f} → {m['asr_after']:.2f} "
                 f"({relative_drop(m):+.0%} relative drop; the paper claims ≥ 50%), "
                 f"benign refusal {m['benign_refusal_before']:.2f} → {m['benign_refusal_after']:.2f}, "
                 f"utility ×{m['utility_after'] / m['utility_before']:.2f}.")
for arm in [a for a in metrics if a != "set"]:
    b = metrics[arm]
    lines.append(f"* `{arm}`: ASR {b['asr_before']:.2f} → {b['asr_after']:.2f}, benign refusal "
                 f"{b['benign_refusal_after']:.2f}, utility ×{b['utility_after'] / b['utility_before']:.2f}.")
if m and "random" in metrics:
    gap = metrics["random"]["asr_after"] - m["asr_after"]
    lines.append(f"* ESI top-k vs a random mask of the same size: ASR after differs by {gap:+.2f} "
                 f"({'the ESI mask does better' if gap > 0 else 'no advantage for the ESI mask' if gap == 0 else 'the random mask does better'}"
                 f"; with {sum(map(len, harmful.values()))} prompts one prompt is "
                 f"{1 / sum(map(len, harmful.values())):.2f}).")
display(Markdown("\n".join(lines)))

# %% [md]
# # 05 · Validate: does removing a region change safety more than removing a random one?
#
# A region earns the name "safety region" only if removing it changes safety behaviour. For every model and
# method, the region of each validated dataset (the refined one by default, `validate.variant`) is removed at the
# method's own granularity — weights zeroed (SNIP, Wanda, NLSR's base-weight projection), neurons deactivated,
# layers scaled by `validate.layer_alpha` — and compared with a **random region of the same size and
# granularity** (same count per weight matrix, per layer and neuron type, or the same number of layers).
#
# * **ASR**: keyword judge on greedy responses to held-out (eval split) harmful prompts, disjoint from the
#   identification prompts. Higher = the ablation removed refusals.
# * **Utility**: exp(mean token log-likelihood) that the ablated model assigns to the *intact* model's greedy
#   answers to held-out Alpaca prompts (1 / perplexity; 1.0 = certain). It falls when an ablation breaks the model,
#   which the keyword judge alone would count as "complied".
#
# A safety region in Wei et al.'s sense raises ASR well above the random control while keeping utility close to it.
# %% [params]
params = {}
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

from saferegions import config, data, judges, models, plots, validate
from saferegions.io import write_json, write_jsonl

cfg = config.parse(params)
v = cfg.validate
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/validate"), Path("results/validate")
PROMPTS = "artifacts/data/prompts.jsonl"
display(pd.DataFrame(config.deviations(v, "validate")).style.set_caption(
    "CPU reductions in this run (paper-scale value beside each)"))
kw = cfg.judges.keyword
judge = judges.KeywordJudge(kw.window, kw.min_words, kw.phrases)
harmful = [p for s in v.eval_sets for p in data.prompts(PROMPTS, s, "eval", v.n_eval)]
util_prompts = data.prompts(PROMPTS, "alpaca", "eval", v.n_utility)
print(f"{len(harmful)} held-out harmful prompts from {v.eval_sets}; {len(util_prompts)} Alpaca eval prompts")
# %%
metrics, reference, rows, gens = {}, {}, [], []
for role in cfg.identify.models:
    lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    metrics[role], reference[role], r, g = validate.run_model(
        lm, tok, role, cfg.identify.methods, v.datasets, lambda m: Path("artifacts/identify") / role / m, harmful,
        util_prompts, judge, v, cfg.run.seed, cfg.calibrate.system_prompt)
    rows += r
    gens += g
    del lm
write_jsonl(OUT / "generations.jsonl", gens)
frame = pd.DataFrame(rows)
# %% [md]
# ## ASR and utility: region vs random region of the same size
# The dashed line is the unablated model.
# %%
display(pd.DataFrame(reference).T)
display(frame[["model", "method", "dataset", "density", "asr_region", "asr_random", "utility_region",
               "utility_random"]].style.format(precision=3))
long = pd.concat([frame.assign(ablation=tag, ASR=frame[f"asr_{tag}"], utility=frame[f"utility_{tag}"])
                  for tag in ("region", "random")])
long["condition"] = long.method if long.model.nunique() == 1 else long.model + "/" + long.method
ref = next(iter(reference.values()))
fig = plots.bar_panels(long, "condition", "ablation", {"ASR": "ASR (held-out harmful)", "utility": "utility"},
                       f"Ablating each method's {v.variant} region vs a random region of equal size",
                       refs={"ASR": ref["asr"], "utility": ref["utility"]}, ref_label="unablated")
plots.save(fig, RESULTS / "figures" / "validate.png")
# %% [md]
# ## Examples: the same prompt, unablated and with each region removed
# %%
gen = pd.DataFrame(gens)
first = gen.prompt.iloc[0]
with pd.option_context("display.max_colwidth", 100):
    display(gen[gen.prompt == first][["model", "method", "dataset", "ablation", "response"]])
# %%
write_json(RESULTS / "metrics.json", metrics)
write_json(RESULTS / "reference.json", reference)

# %% [md]
# # 03 · Calibrate: the examples every identification method scores
#
# Paper 1's methods score parameters on *calibration examples*. Following Wei et al. (docs/methods.md §2, shared
# conventions), an example is an identification prompt rendered with the model's chat template plus **the model's
# own greedy response**: SNIP's loss, Wanda's activation norms, the neuron importances and NLSR's projections all
# read the response tokens. Generating these responses is the expensive part of identification, so it is done
# **once per model** here and shared by all five methods of the `identify` stage (five methods would otherwise pay
# for the same generations five times).
#
# Sets: the first `calibrate.n` identification-split prompts of each of the ten safety datasets, plus the utility
# set (Alpaca instructions) whose regions refine the safety regions. The refusal rate below (keyword judge) says
# what behaviour the methods see: a response that refuses makes the scores about *refusing*; one that complies
# makes them about complying.
# %% [params]
params = {}
model = "aligned"
results_dir = "results/calibrate/aligned"
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

from saferegions import config, data, identify, judges, models, plots
from saferegions.io import write_json

cfg = config.parse(params)
c = cfg.calibrate
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/calibrate") / model, Path(results_dir)
PROMPTS = "artifacts/data/prompts.jsonl"
display(pd.DataFrame(config.deviations(c, "calibrate")).style.set_caption(
    "CPU reductions in this run (paper-scale value beside each)"))
# %%
sets = {d: data.prompts(PROMPTS, d, "ident", c.n) for d in [*c.datasets, c.utility_set]}
judge = judges.KeywordJudge(cfg.judges.keyword.window, cfg.judges.keyword.min_words, cfg.judges.keyword.phrases)
lm, tok = models.load(cfg.models[model].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
rows = identify.calibrate(lm, tok, sets, c.max_new_tokens, c.batch_size, c.system_prompt, judge)
meta = {"role": model, "model": cfg.models[model].id, "n": c.n, "max_new_tokens": c.max_new_tokens,
        "system_prompt": c.system_prompt, "datasets": c.datasets, "utility_set": c.utility_set,
        "dtype": str(next(lm.parameters()).dtype)}
identify.save_calibration(rows, meta, OUT)
frame = pd.DataFrame(rows)
# %% [md]
# ## How often the model refuses its calibration prompts (keyword judge)
# %%
rates = frame.groupby("dataset", sort=False).refused.agg(["mean", "size"]).rename(
    columns={"mean": "refusal rate", "size": "n"})
display(rates.style.format({"refusal rate": "{:.2f}"}))
fig = plots.bars(rates.reset_index(), "dataset", "refusal rate", None,
                 f"Refusal rate on the calibration prompts ({model}, keyword judge)", "prompt set", "refusal rate")
plots.save(fig, RESULTS / "figures" / "calibration_refusal.png")
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 100):
    display(frame.groupby("dataset", sort=False).head(1)[["dataset", "prompt", "response", "refused"]])
# %%
write_json(RESULTS / "metrics.json", {"model": cfg.models[model].id, "role": model,
           "sets": {d: {"n": int(r["n"]), "refusal_rate": float(r["refusal rate"])} for d, r in rates.iterrows()}})

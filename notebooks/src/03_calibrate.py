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
#
# A score built on sixteen copies of one refusal sentence sees one example, not sixteen: where fewer than
# `calibrate.min_distinct` × n of a set's greedy responses are distinct, each repeat is re-answered once by seeded
# sampling (`calibrate.temperature`); the table shows the distinct responses and how many were sampled. The stage
# also answers `calibrate.n_utility_eval` held-out Alpaca prompts greedily: the intact reference for the identify
# stage's p/q sweep.
# %% [params]
params = {}
model = "aligned"
results_dir = "results/calibrate/aligned"
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

from saferegions.stages import calibrate

cfg = calibrate.config.parse(params)
torch.manual_seed(cfg.run.seed)
RESULTS = Path(results_dir)
display(calibrate.params_table(params))
display(calibrate.table(pd.DataFrame(calibrate.config.deviations(cfg.calibrate, "calibrate")),
                        caption="CPU reductions in this run (paper-scale value beside each)"))
# %%
frame = calibrate.run(cfg, model)
# %% [md]
# ## How often the model refuses its calibration prompts (keyword judge), and how varied the responses are
# %%
rates = calibrate.refusal_rates(frame)
display(calibrate.table(rates))
fig = calibrate.plots.bars(rates.reset_index(), "dataset", "refusal rate", None,
                           f"Refusal rate on the calibration prompts ({model}, keyword judge, Wilson 95%)",
                           "prompt set", "refusal rate", n="n")
calibrate.plots.save(fig, RESULTS / "figures" / "calibration_refusal.png")
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 100):
    display(calibrate.table(calibrate.examples(frame), index=False))
# %%
calibrate.write_metrics(cfg, model, rates, RESULTS)

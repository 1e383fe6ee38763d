# %% [md]
# # 03 · Calibrate: the examples every identification method scores
#
# Paper 1's methods score parameters on *calibration examples*. Following Wei et al. (docs/methods.md §2, shared
# conventions), an example is an identification prompt rendered with the model's chat template plus **the model's
# own response**: SNIP's loss, Wanda's activation norms, the neuron importances and NLSR's projections all read
# the response tokens. Generating these responses is the expensive part of identification, so it is done **once
# per model** here and shared by all five methods of the `identify` stage (five methods would otherwise pay for
# the same generations five times).
#
# Sets: the first `calibrate.n` identification-split prompts of each of the ten safety datasets, plus the utility
# set (Alpaca instructions) whose regions refine the safety regions.
#
# **Safety examples are refusals**, as Wei et al.'s safety data are. Each greedy response is judged (the
# evaluation judge; degenerate text counts as no refusal). One that does not refuse is re-drawn by seeded sampling
# (`calibrate.temperature`) up to `calibrate.redraws` times; a prompt with no refusal is dropped. A set left with
# fewer than `calibrate.min_kept` refusals keeps its first non-refusals up to that count, and the table counts them
# as *filled*. Utility examples are every greedy answer, unfiltered.
#
# A score built on sixteen copies of one refusal sentence sees one example, not sixteen. So, after the refusal
# filter, where fewer than `calibrate.min_distinct` × n of a set's kept responses are distinct, each repeat is
# re-answered once by seeded sampling. In a safety set the re-answer is used only if it refuses too. The stage
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
# ## How often the model refuses its calibration prompts, and what was kept
# Per set: prompts asked, refused greedily (the refusal rate below is their share), recovered by a re-draw,
# dropped, filled and kept (`n`), then the distinct kept responses and how many of them were sampled.
# %%
rates = calibrate.refusal_rates(frame)
display(calibrate.table(rates))
short = rates[rates["n filled"] > 0]
if len(short):
    print(f"fewer than calibrate.min_kept = {cfg.calibrate.min_kept} refusals in {list(short.index)}: "
          f"{int(short['n filled'].sum())} non-refusals kept to fill them")
fig = calibrate.plots.bars(rates.reset_index(), "dataset", "refusal rate", None,
                           f"Greedy refusal rate on the calibration prompts ({model}, {cfg.evaluation.judge} "
                           "judge, Wilson 95%)", "prompt set", "refusal rate", n="n asked")
calibrate.plots.save(fig, RESULTS / "figures" / "calibration_refusal.png")
# %% [md]
# ## Examples
# %%
with pd.option_context("display.max_colwidth", 100):
    display(calibrate.table(calibrate.examples(frame), index=False))
# %%
calibrate.write_metrics(cfg, model, rates, RESULTS)

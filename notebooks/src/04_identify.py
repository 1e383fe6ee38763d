# %% [md]
# # 04 · Identify: one method's safety regions of one model, from each of the ten datasets
#
# Paper 1 (arXiv:2602.17696) asks whether "safety regions" — parameter subsets whose modification changes safety
# behaviour — are stable across the datasets used to find them. This notebook runs **one** identification method
# on **one** model (the DVC matrix runs every method × model) and finds a region from each safety dataset it is
# given — all ten at paper scale; on the CPU default the expensive methods run on a subset (params
# `identify.<method>.datasets`, listed below) — plus one from the utility set (Alpaca). Each region is stored
# twice:
#
# * **raw** — what the method selects from that dataset's calibration examples;
# * **refined** — raw minus the same method's region on the utility set (Wei et al.'s set difference, docs/methods.md §3.5),
#   at the method's own granularity (weights, neurons, layers or LoRA entries).
#
# All regions are boolean masks over the same parameter space (the q/k/v/o/gate/up/down weights of every block),
# saved as `artifacts/identify/<model>/<method>/<dataset>.{raw,refined}.safetensors` with their provenance; neuron
# and layer regions also keep their native units, NLSR also its LoRA-space region (`*.lora.safetensors`).
# The `overlap` stage compares them; the `validate` stage checks that removing them changes safety.
# %% [params]
params = {}
model = "aligned"
method = "snip"
results_dir = "results/identify/aligned-snip"
# %%
import time
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from saferegions.stages import identify

cfg = identify.config.parse(params)
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = identify.out_dir(model, method), Path(results_dir)
FIG = RESULTS / "figures"
display(Markdown(f"**Model** `{cfg.models[model].id}` (role `{model}`). " + identify.description(method)))
display(identify.params_table(params))
display(identify.table(pd.DataFrame(identify.config.deviations(cfg.identify, "identify")
                                    + identify.config.deviations(cfg.calibrate, "calibrate")),
                       caption="CPU reductions in this run (paper-scale value beside each)"))
# %% [md]
# ## Run
# The calibration examples come from the `calibrate` stage (same for every method).
# %%
datasets, skipped = identify.datasets(cfg, method)
print(f"datasets ({len(datasets)}): {datasets}" + (f"; not run on the CPU default: {skipped}" if skipped else ""))
ctx = identify.context(cfg, model, method)
start = time.time()
rows = identify.run(method, ctx, OUT)
print(f"{method}: {len(rows)} regions in {time.time() - start:.0f} s")
# %% [md]
# ## Region size per dataset, raw and refined
# Density = selected entries / all eligible weights. Refinement can only remove entries, so refined ≤ raw; how
# much it removes says how much of the safety region the utility set also selects.
# %%
summary = identify.summary_frame(rows)
display(identify.table(summary))
fig = identify.plots.bars(identify.density_frame(summary), "dataset", "density", "kind",
                          f"{method}: region density per dataset ({model})", "dataset",
                          "density (fraction of eligible weights)")
identify.plots.save(fig, FIG / "density.png")
# %% [md]
# ## Where the regions sit: density per layer
# %%
for kind in ("raw", "refined"):
    table = identify.profile_frame(rows, kind, "by_layer")
    fig = identify.plots.heatmap(table, f"{method} {kind}: density per layer", "layer", "dataset", vmax=None,
                                 annot=False, cbar_label="density")
    identify.plots.save(fig, FIG / f"layer_density_{kind}.png")
# %% [md]
# ## ... and per component (attention q/k/v/o, MLP gate/up/down)
# %%
for kind in ("raw", "refined"):
    table = identify.profile_frame(rows, kind, "by_component")
    fig = identify.plots.heatmap(table, f"{method} {kind}: density per component", "component", "dataset",
                                 fmt=".3f", vmax=None, cbar_label="density")
    identify.plots.save(fig, FIG / f"component_density_{kind}.png")
# %% [md]
# ## SNIP / Wanda: the p/q sweep
# For each (q, p) of the grid (`identify.pq_grid_q`, `identify.pq_grid_p`), the refined region of
# `identify.pq_dataset` is removed and utility measured: the teacher-forced likelihood of the intact model's own
# greedy answers to held-out Alpaca prompts (calibrate stage), as a ratio to the intact model. The rule
# (`methods.context.pq_pick`): the largest refined region whose removal keeps the ratio ≥ `identify.min_utility_ratio`;
# metrics.json records the sweep, the pick and whether the p/q used here meets the rule. The p used is the method's
# own (`identify.snip.p`, `identify.wanda.p`) where params set one, else `identify.p`; the embedded default sets
# SNIP's to its pick, 0.08, since 0.04 misses the rule. Other methods: no sweep.
# %%
sweep = identify.pq_frame(ctx)
if sweep is not None:
    display(identify.table(sweep))
    print(f"pick: {ctx.metrics['pq_pick']}; used: {ctx.metrics['pq_used']}")
    fig = identify.plots.lines(sweep, "q", "utility_ratio", "p", f"{method}: utility after removing the refined "
                               f"region ({ctx.metrics['pq_sweep_dataset']}, {model})", "q (safety top fraction)",
                               "utility / intact")
    identify.plots.save(fig, FIG / "pq_sweep.png")
# %% [md]
# ## Method details
# Layer method: prompts per side, the step-1 range (cosine-gap rule) and the over-rejection sweep's pick, per
# dataset, and the gap curves. Neurons: how the density of the intersection falls with the number of prompts,
# beside SN-Tune's published figure. NLSR: the safety LoRA's training (held-out loss on one fixed batch) and
# whether its region is a property of the data (IoU of two LoRA init seeds vs chance). Other methods: nothing.
# %%
details = identify.method_details(method, ctx, cfg)
for line in details["text"]:
    print(line)
for table in details["tables"]:
    display(identify.table(table))
for c in details["curves"]:
    fig = identify.plots.lines(c["frame"], c["x"], c["y"], c["hue"], c["title"], c["xlabel"], c["ylabel"])
    identify.plots.save(fig, FIG / c["file"])
# %%
identify.write_metrics(rows, method, model, ctx, RESULTS)

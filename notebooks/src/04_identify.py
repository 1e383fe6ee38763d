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

from saferegions import config, identify, judges, models, plots
from saferegions.io import write_json

cfg = config.parse(params)
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/identify") / model / method, Path(results_dir)
FIG = RESULTS / "figures"
display(Markdown(f"**Model** `{cfg.models[model].id}` (role `{model}`). " + identify.DESCRIPTIONS[method]))
display(pd.DataFrame(config.deviations(cfg.identify, "identify") + config.deviations(cfg.calibrate, "calibrate"))
        .style.set_caption("CPU reductions in this run (paper-scale value beside each)"))
# %% [md]
# ## Run
# The calibration examples come from the `calibrate` stage (same for every method).
# %%
calib, calib_meta = identify.load_calibration(Path("artifacts/calibrate") / model)
lm, tok = models.load(cfg.models[model].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
kw = cfg.judges.keyword
datasets = cfg.identify.datasets(method, cfg.calibrate.datasets)
skipped = [d for d in cfg.calibrate.datasets if d not in datasets]
print(f"datasets ({len(datasets)}): {datasets}" + (f"; not run on the CPU default: {skipped}" if skipped else ""))
ctx = identify.Context(lm, tok, model, cfg.models[model].id, calib, datasets,
                       cfg.calibrate.utility_set, cfg.identify, cfg.run.seed, calib_meta["system_prompt"],
                       judge=judges.KeywordJudge(kw.window, kw.min_words, kw.phrases),
                       max_new_tokens=calib_meta["max_new_tokens"], gen_batch_size=cfg.calibrate.batch_size)
start = time.time()
rows = identify.run(method, ctx, OUT)
print(f"{method}: {len(rows)} regions in {time.time() - start:.0f} s")
# %% [md]
# ## Region size per dataset, raw and refined
# Density = selected entries / all eligible weights. Refinement can only remove entries, so refined ≤ raw; how
# much it removes says how much of the safety region the utility set also selects.
# %%
summary = identify.summary_frame(rows)
display(summary.style.format({"density": "{:.4%}"}))
base = summary[summary.kind.isin(["raw", "refined", "utility"])]
fig = plots.bars(base, "dataset", "density", "kind", f"{method}: region density per dataset ({model})",
                 "dataset", "density (fraction of eligible weights)")
plots.save(fig, FIG / "density.png")
# %% [md]
# ## Where the regions sit: density per layer
# %%
for kind in ("raw", "refined"):
    table = identify.profile_frame(rows, kind, "by_layer")
    fig = plots.heatmap(table, f"{method} {kind}: density per layer", "layer", "dataset", vmax=None,
                        annot=False, cbar_label="density")
    plots.save(fig, FIG / f"layer_density_{kind}.png")
# %% [md]
# ## ... and per component (attention q/k/v/o, MLP gate/up/down)
# %%
for kind in ("raw", "refined"):
    table = identify.profile_frame(rows, kind, "by_component")
    fig = plots.heatmap(table, f"{method} {kind}: density per component", "component", "dataset", fmt=".3f",
                        vmax=None, cbar_label="density")
    plots.save(fig, FIG / f"component_density_{kind}.png")
# %% [md]
# ## Method details
# Layer method: prompts per side, the step-1 range (cosine-gap rule) and the over-rejection sweep's pick, per
# dataset, and the gap curves. Neurons: how the density of the intersection falls with the number of prompts,
# beside SN-Tune's published figure. NLSR: the safety LoRA's training (held-out loss on one fixed batch) and
# whether its region is a property of the data (IoU of two LoRA init seeds vs chance). Other methods: nothing.
# %%
m = ctx.metrics
if method == "layer":
    c = cfg.identify.layer
    print(f"prompts per side: {m['prompts_per_side']} ({m['prompts_per_side'] * (m['prompts_per_side'] - 1) // 2} "
          f"distinct same-type pairs behind the {c.pairs} random pairs)")
    if c.sweep_radius == 0:
        print("step 2 (over-rejection sweep) is off (identify.layer.sweep_radius 0; paper scale 3), so the regions "
              "are the step-1 ranges. Why: its generations do not fit the CPU budget. Radius 1 means up to 3 "
              f"candidate ranges per set, each {c.n_overrej} prompts x {c.max_new_tokens} greedy tokens: up to "
              f"{3 * (len(datasets) + 1) + 1} generations here (13 for the default five sets, where ranges repeat), "
              "an estimated 60-90 s more on the 2-core machine")
    ranges, gaps = identify.layer_frames(ctx.details)
    display(ranges)
    fig = plots.lines(gaps, "layer", "gap", "dataset", "SafeLayer step 1: same-type minus cross-type cosine",
                      "layer", "gap")
    plots.save(fig, FIG / "layer_gap.png")
if method == "neuron":
    curve = pd.DataFrame([{"set": s, "prompts n": n, "density": v} for s, per in m["neuron_density_vs_n"].items()
                          for n, v in per.items()])
    display(curve.pivot(index="prompts n", columns="set", values="density").style.format("{:.3%}"))
    print(f"calibration prompts per set: {m['calibration_n']}. Region density (intersection over all of them, "
          "fraction of eligible weights): " + ", ".join(f"{s} {list(per.values())[-1]:.2%}" for s, per in
                                                        m["neuron_density_vs_n"].items())
          + "; SN-Tune reports safety neurons at < 1% of parameters")
    fig = plots.lines(curve, "prompts n", "density", "set", "Safety neurons: density of the intersection over the "
                      "first n prompts (SN-Tune: < 1%)", "prompts n", "density (fraction of eligible weights)")
    plots.save(fig, FIG / "neuron_density_vs_n.png")
if method == "nlsr":
    losses = ctx.details["lora_loss"]
    print(f"safety LoRA: {m['train_steps']} steps (best held-out at step {m['best_step']}); train loss first "
          f"{losses[0]:.3f}, last {losses[-1]:.3f}; held-out loss on the same {m['heldout_n']} pairs "
          f"{m['heldout_loss_before']:.3f} -> {m['heldout_loss_after']:.3f}")
    display(pd.DataFrame(ctx.details["lora_heldout"], columns=["step", "held-out loss"]))
    if "seed_iou" in m:
        print(f"two LoRA init seeds {m['seed_iou_seeds']} on {m['seed_iou_dataset']}: IoU {m['seed_iou']:.3f} "
              f"(chance {m['seed_iou_chance']:.3f}, {m['seed_iou'] / m['seed_iou_chance']:.2f}x) over base weights, "
              f"{m['seed_iou_lora']:.3f} (chance {m['seed_iou_lora_chance']:.3f}) over LoRA entries. At 1x the "
              "region is set by the LoRA's random init, not by the data")
# %%
write_json(RESULTS / "metrics.json", identify.metrics(rows, method, model, cfg.models[model].id, ctx.details,
                                                      ctx.metrics))

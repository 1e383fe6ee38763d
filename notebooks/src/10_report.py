# %% [md]
# # 10 · Report: the papers' claims beside this run's numbers
#
# This notebook gathers what every other stage wrote and sets it against what the two papers claim:
#
# * **Paper 1** — *Can LLM Safety Be Ensured by Constraining Parameter Regions?* (arXiv 2602.17696): regions from
#   different datasets overlap only low-to-moderately, and less after utility refinement.
# * **Paper 2** — *Towards Identification and Intervention of Safety-Critical Parameters in LLMs* (arXiv
#   2604.08297): ESI locates safety-critical weights (V and middle-layer MLPs in dense models, late MLP experts in
#   MoE); SET halves an unaligned model's ASR training 1% of its weights for 100 steps; SPA keeps an aligned
#   model's safety within 1% through 1,000 steps of instruction tuning.
#
# Then: every figure of the run, every deviation from the papers (the params that differ from the paper-scale
# defaults and the documented method choices), the provenance of data, models and code, and the wall time of
# each stage. It reads files only, so it re-runs in seconds whenever any stage's metrics change.
#
# **How to read a verdict.** Neither paper's tables were available (docs/methods.md §1), so most claims have no number to
# match; each row states the reading used (e.g. "low to moderate" = mean IoU < 0.5). *consistent* / *not
# consistent* / *mixed* (some models, methods or tasks agree) describe this run only: the embedded default
# uses small models and CPU-sized samples (see the deviations below), so it shows that the pipeline measures
# each claim, not whether the claim holds at paper scale. *not run* = the stage is off in this profile or wrote
# no metrics; *n/a* = the number exists but cannot decide the claim (e.g. ASR already 0 before SET). The setup
# row of paper 1 says *paper scale* or *reduced* (methods, families × sizes, datasets actually run).
# %% [params]
params = {}
# %%
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

from saferegions.stages import report

cfg = report.config.parse(params)
RESULTS = report.RESULTS
results = report.load_results(".")
status = pd.DataFrame(report.stage_status(results))
display(status.set_index("stage").style.set_caption("Stages whose results this report reads"))
# %% [md]
# ## Claims
# %%
rows = report.claims(results, cfg)
claims = pd.DataFrame(rows)
with pd.option_context("display.max_colwidth", None):
    display(claims[["paper", "claim", "paper_value", "this_run", "verdict"]].style.set_properties(
        **{"text-align": "left"}).set_caption("Paper claims (docs/methods.md §1) and this run's numbers"))
# %% [md]
# ## Regions found (identify)
# Mean density (fraction of the eligible block weights) of the regions each method found, over its datasets,
# before and after utility refinement. Refinement can only shrink a region.
# %%
regions_found = pd.DataFrame(report.region_summary(results))
if regions_found.empty:
    print("identify: not run")
else:
    display(regions_found.style.format({"density_raw": "{:.4f}", "density_refined": "{:.4f}"}))
# %% [md]
# ## Figures
# Every figure the stages wrote, in pipeline order (matrix stages: one folder per model / method). At paper scale
# the identify matrix alone draws a few hundred; past `MAX_EMBED` per stage the rest are listed by path (each
# stage's own notebook shows them), which keeps this notebook small enough to read on GitHub.
# %%
MAX_EMBED = 40
figs = report.figures(".")
for stage in report.STAGES:
    display(Markdown(f"### {stage}"))
    if stage not in figs:
        print(f"{stage}: no figures ({'not run' if results.get(stage) is None else 'this stage draws none'})")
        continue
    for png in figs[stage][:MAX_EMBED]:
        display(Markdown(f"`{png.as_posix()}`"))
        display(Image(filename=str(png), width=720))
    if len(figs[stage]) > MAX_EMBED:
        display(Markdown("Not embedded: " + ", ".join(f"`{p.as_posix()}`" for p in figs[stage][MAX_EMBED:])))
# %% [md]
# ## Deviations from the papers
# ### Params that differ from the paper-scale defaults
# The dataclass defaults in `config.py` are the paper-scale values (docs/methods.md); every key this run changes is
# listed with both values. On the embedded default these are the CPU reductions (sample counts, generation lengths,
# step counts); on `profiles/paper.yaml` the list should be short.
# %%
devs = pd.DataFrame(report.param_deviations(cfg))
if devs.empty:
    print("no params differ from the paper-scale defaults")
else:
    with pd.option_context("display.max_colwidth", 80, "display.max_rows", 500):
        display(devs.astype(str).set_index(["section", "param"]))
# %% [md]
# ### Documented method deviations and readings
# Choices the papers leave open or that differ from them on purpose (details and evidence in docs/methods.md).
# %%
with pd.option_context("display.max_colwidth", None):
    display(pd.DataFrame(report.documented_deviations(results, cfg)).style.set_properties(**{"text-align": "left"}))
# %% [md]
# ## Provenance
# What this report read, as sha256: every results file, its code and its params sections — exactly its DVC deps,
# so the digests stay true for the committed results (a git commit or a dvc.lock digest cannot: both are written
# after this runs). Then packages, models (materialized mirrors: sha256 of the weights; hub models: the cached
# revision) and data (`data.dvc` plus the per-file sha256 pins of the dataset registry that every fetch checks).
# %%
prov = report.provenance(".", cfg)
display(pd.Series({"params sha256": prov["inputs"]["params_sha256"] or "no params.yaml",
                   "data.dvc md5": prov["data"]["data.dvc"]["md5"], "python": prov["python"],
                   "platform": prov["platform"]}, name="value").to_frame())
display(pd.Series(prov["inputs"]["files"], name="sha256").to_frame())
display(pd.Series(prov["packages"], name="version").to_frame())
display(pd.DataFrame(prov["models"]).T)
with pd.option_context("display.max_rows", 200, "display.max_colwidth", 70):
    display(pd.DataFrame(prov["data"]["files"]))
# %% [md]
# ## Wall time per stage
# Summed over matrix items (calibrate per model, identify per model × method), from each stage's `timing.json`.
# %%
stage_totals = report.stage_totals(report.timings("."))
totals = pd.DataFrame(stage_totals)
if totals.empty:
    print("no timing.json found")
else:
    display(totals.set_index("stage"))
    fig = report.plots.bars(totals, "stage", "wall_seconds", None, "Wall time per stage (this run)", "stage",
                            "wall time (s)", figsize=(8, 3.5))
    report.plots.save(fig, RESULTS / "figures" / "wall_time.png")
# %% [md]
# ## Reading this run
# %%
display(Markdown(report.summary(rows, stage_totals, len(devs))))
# %%
report.write_outputs(rows, results, stage_totals, prov, RESULTS)

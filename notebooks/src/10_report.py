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
# **How to read a verdict.** A claim is tested as the paper states it, so it has parts (e.g. SET: the ASR halves
# *and* benign over-refusal rises by at most 10 points *and* utility keeps ≥ 0.9 of its value) and controls (a
# positive control the measurement detects, a task that was learned, utility that was kept). Each part is decided
# by one function, `evidence.verdict`, from the 95% interval of its effect against a threshold fixed before the
# run (the table below, docs/methods.md "Pre-registered claims"): *supported* = the whole interval lies beyond the
# threshold, *contradicted* = wholly on the other side, *inconclusive* = the interval reaches the threshold,
# *not run* = this run has no estimate for it (the reason says which metric is missing). For prompt-level
# outcomes the interval that decides is `ci_one_flip`, the union of the 95% intervals with any one prompt's
# outcome flipped. Every p is Holm-adjusted over all parts of all claims (`p_holm`); a superiority part also needs
# p_holm < 0.05 to be supported, a non-inferiority part (one with a margin) is decided at its interval's bound.
# The claim's verdict is the conjunction (`evidence.conjunction`): any part contradicted → contradicted; else any
# part or control not run, or a control contradicted → not run (not testable here); all supported → supported;
# else inconclusive. Each part names its metric under its real name: what the stages print as "ASR" is the rate at
# which the judge finds no refusal in the first few generated tokens, and the tokens, decoding and system prompt
# differ between stages.
# %% [params]
params = {}
# %%

import pandas as pd
from IPython.display import Image, Markdown, display

from saferegions.stages import report

cfg = report.config.parse(params)
display(report.params_table(params))
RESULTS = report.RESULTS
results = report.load_results(".")
status = pd.DataFrame(report.stage_status(results))
display(report.table(status.astype({"items": "Int64"}).set_index("stage"),
                     caption="Stages whose results this report reads (items: matrix items, — for a single run)"))
# %% [md]
# ## Claims
# %%
display(report.table(pd.DataFrame(report.preregistered()), index=False,
                     caption="Pre-registered claims: each part's primary metric, threshold, margin and test"))
rows = report.claims(results, cfg)
claims = pd.DataFrame(rows)
display(report.table(claims[["id", "verdict", "reason"]], index=False,
                     caption="Claims: the verdict of all their parts together, and which parts decided it"))
parts = pd.DataFrame(report.part_rows(rows)).fillna({"condition": "–"}).set_index(["id", "name", "condition"])
display(report.table(parts[["role", "n", "mde", "effect", "ci", "ci_one_flip", "test", "p", "p_holm", "direction",
                            "threshold", "margin", "verdict", "reason"]], intervals={"effect": "ci"},
                     caption="Each claim's parts: n and the minimal detectable effect at it (paired binary "
                             "comparisons: 80% power, exact McNemar at the observed discordance), effect [95% CI], "
                             "CI with one prompt flipped, test, p, Holm p, threshold, margin, verdict"))
display(report.table(parts[["metric"]].drop_duplicates(), caption="What each part measures, under its real name"))
display(report.table(claims[["paper", "claim", "paper_value", "this_run"]].assign(paper="arXiv:" + claims.paper),
                     index=False,
                     caption="Paper claims (docs/methods.md §1) and every condition of this run"))
report.plots.save(report.forest(rows), RESULTS / "figures" / "claims_forest.png")
display(Image(filename=str(RESULTS / "figures" / "claims_forest.png")))
# %% [md]
# ## Regions found (identify)
# Mean density (fraction of the eligible block weights) of the regions each method found, over its datasets,
# before and after utility refinement. Refinement can only shrink a region.
# %%
regions_found = pd.DataFrame(report.region_summary(results))
if regions_found.empty:
    print("identify: not run")
else:
    display(report.table(regions_found))
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
        display(Image(filename=str(png)))
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
    display(report.table(devs.set_index(["section", "param"])))
# %% [md]
# ### Documented method deviations and readings
# Choices the papers leave open or that differ from them on purpose (details and evidence in docs/methods.md).
# %%
display(report.table(pd.DataFrame(report.documented_deviations(results, cfg)), index=False))
# %% [md]
# ## Provenance
# What this report read, as sha256: every results file, its code and its params sections — exactly its DVC deps,
# so the digests stay true for the committed results (a git commit or a dvc.lock digest cannot: both are written
# after this runs). Then packages, models (materialized mirrors: sha256 of the weights; hub models: the cached
# revision) and data (`data.dvc` plus the per-file sha256 pins of the dataset registry that every fetch checks).
# %%
prov = report.provenance(".", cfg)
display(report.table(pd.Series({"params sha256": prov["inputs"]["params_sha256"] or "no params.yaml",
                                 "data.dvc md5": prov["data"]["data.dvc"]["md5"], "python": prov["python"],
                                 "platform": prov["platform"]}, name="value")))
display(report.table(pd.Series(prov["inputs"]["files"], name="sha256")))
display(report.table(pd.Series(prov["packages"], name="version")))
display(report.table(pd.DataFrame(prov["models"]).T))
display(report.table(pd.DataFrame(prov["data"]["files"])))
# %% [md]
# ## Wall time per stage
# Summed over matrix items (calibrate per model, identify per model × method), from each stage's `timing.json`.
# %%
stage_totals = report.stage_totals(report.timings("."))
totals = pd.DataFrame(stage_totals)
if totals.empty:
    print("no timing.json found")
else:
    display(report.table(totals.set_index("stage")))
    fig = report.plots.bars(totals, "stage", "wall_seconds", None, "Wall time per stage (this run)", "stage",
                            "wall time (s)", figsize=(8, 3.5))
    report.plots.save(fig, RESULTS / "figures" / "wall_time.png")
# %% [md]
# ## Reading this run
# %%
display(Markdown(report.summary(rows, stage_totals, len(devs))))
# %%
report.write_outputs(rows, results, stage_totals, prov, RESULTS)

# %% [md]
# # 06 · Overlap: do the safety regions found on different datasets coincide?
#
# Paper 1 (arXiv:2602.17696) asks two questions of the regions the `identify` stage found:
#
# * **RQ1** — do the regions one method finds from *different* safety datasets overlap well above chance, i.e. is
#   there one dataset-agnostic safety region, or does every dataset give its own?
# * **RQ2** — does utility refinement (removing the same method's region on Alpaca, docs/methods.md §3.5) raise or lower
#   that overlap?
#
# Overlap is the **IoU** |A ∩ B| / |A ∪ B| of two regions, popcounted on packed bits over the common parameter space
# (the q/k/v/o/gate/up/down weights of every block; neuron and layer regions are already projected onto it), both
# over the whole space (**global**) and per weight matrix then averaged (**per-matrix**, Wei et al.'s Jaccard).
# Every IoU is shown beside the IoU two **random** regions with the same per-matrix counts would have (≈ f/(2−f)
# at density f; whole random layer sets for SafeLayer), and a chance-corrected overlap (IoU − chance)/(1 − chance).
# Refined regions can only lie outside the utility region U, so their random regions are drawn there
# (density = size / (entries − |U|) per matrix; for SafeLayer among the layers U leaves): a chance at
# density size / entries would understate it wherever U takes a large share of a matrix.
#
# Sections: pairwise matrices · convergence of the multi-way IoU · refinement and its identity ·
# across methods and per layer/component · across model sizes · prompt bootstrap · verdict.
# %% [params]
params = {}
# %%
import time
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, Markdown, display

from saferegions.stages import overlap
from saferegions.stages.overlap import MAIN, config, plots

cfg = config.parse(params)
ov = cfg.overlap
torch.manual_seed(cfg.run.seed)
IDENT, RESULTS = Path("artifacts/identify"), Path("results/overlap")
FIG, TAB = RESULTS / "figures", RESULTS / "tables"
TAB.mkdir(parents=True, exist_ok=True)
VARIANTS = ov.variants


def show(fig, name: str) -> None:
    """Save the figure under results/overlap/figures and show the saved PNG."""
    import matplotlib.pyplot as plt
    display(Image(filename=str(plots.save(fig, FIG / name))))
    plt.close(fig)


display(overlap.params_table(params))
display(overlap.table(pd.DataFrame(config.deviations(ov, "overlap") + config.deviations(cfg.identify, "identify")
                                   + config.deviations(cfg.calibrate, "calibrate")),
                      caption="CPU reductions in this run (paper-scale value beside each)"))
# %% [md]
# ## The regions
# Every region file of every model × method, loaded once in packed form (bits or int32 indices, never expanded to
# one bool tensor per weight). A missing file stops the notebook here, before any work.
# %%
start = time.time()
loaded = overlap.load(IDENT, cfg)
print(f"loaded {sum(2 * len(r['raw']) + 1 for r in loaded.values())} packed regions in {time.time() - start:.1f} s")
display(overlap.table(overlap.inventory(loaded)))
# %% [md]
# ## Counting
# For each model × method, one pass over the tensors popcounts every intersection and union the analyses need
# (all pairs, every prefix of the random dataset orderings, the same with the utility region subtracted), keeping
# per-tensor counts (`overlap.count`). A few pairs are recomputed with `overlap.iou` (a count of that pair alone) as a
# cross-check.
# %%
start = time.time()
results = overlap.analyze(loaded, ov)
print(f"counted {len(results)} model × method analyses in {time.time() - start:.1f} s")
overlap.cross_check(results, loaded, VARIANTS)
print("cross-check with overlap.iou: identical")
# %% [md]
# ## Pairwise IoU between datasets (RQ1)
# One matrix per model × method (global scope; per-matrix tables are in `results/overlap/tables/`). Off the
# diagonal, each cell is the IoU of the regions found from two datasets. The summary gives mean ± sd of the
# off-diagonal IoU beside the chance IoU of random regions with the same per-matrix counts, their ratio and the
# mean chance-corrected overlap (pair by pair); their intervals over datasets are in the metrics section.
# %%
summary = overlap.summary(results, TAB)
summary.to_csv(TAB / "summary.csv", index=False)
display(overlap.table(summary[summary.scope == MAIN], index=False))
for (role, method), a in results.items():
    if len(a["datasets"]) < 2:
        print(f"{role}/{method}: one dataset, no pairs")
        continue
    show(plots.heatmap_grid(overlap.dataset_matrices(a, VARIANTS), f"{role} · {method}: IoU between datasets' regions ({MAIN})", "dataset",
                            "dataset"), f"pairwise_{role}_{method}.png")
# %%
show(plots.bars(overlap.mean_vs_chance(summary), "condition", "IoU", "measure", "Mean off-diagonal IoU vs random regions of the same densities",
                "method · variant", f"IoU ({MAIN})"), "mean_iou_vs_chance.png")
# %% [md]
# ## Convergence: does the multi-way intersection plateau at a stable region?
# For an ordering of the datasets, IoU_k = |A₁ ∩ … ∩ A_k| / |A₁ ∪ … ∪ A_k|, k = 2 … n, over `overlap.n_orders`
# random orderings (line = mean, band = range over orderings; dashed = chance for the same densities). A stable,
# dataset-agnostic region would make the curve level off well above chance; a curve that keeps falling towards
# chance means each new dataset brings a different region; a line that drops off the bottom of the log axis has
# reached an empty intersection. `survive` = |A₁ ∩ … ∩ A_k| / |A₁|.
# %%
conv = overlap.convergence(results)
plateau = pd.DataFrame()
if conv.empty:
    print("no method has two or more datasets: no convergence curve")
else:
    conv.to_csv(TAB / "convergence.csv", index=False)
    main = conv[conv.scope == MAIN].copy()
    main["line"] = main.method if main.model.nunique() == 1 else main.model + " · " + main.method
    show(plots.band_lines(main, "k", "iou", "line", "variant", "Multi-way IoU of the first k datasets",
                          "k (datasets intersected)", f"IoU_k ({MAIN}, log scale)", ref="chance", logy=True),
         "convergence.png")
    plateau = overlap.plateau(main)
    display(overlap.table(plateau, index=False))
# %% [md]
# ## Refinement: raw vs utility-refined IoU, and the identity behind the change (RQ2)
# With a fixed utility region U, (A \ U) ∩ (B \ U) = (A ∩ B) \ U and (A \ U) ∪ (B \ U) = (A ∪ B) \ U, so
#
#     IoU_refined(A, B) = |(A ∩ B) \ U| / |(A ∪ B) \ U|.
#
# Refinement lowers the IoU exactly when U removes a larger fraction of A ∩ B than of A ∪ B (columns
# `u_frac_of_inter`, `u_frac_of_union`). The identity is asserted on every pair whose stored refined regions are
# exactly raw \ U in the weight space (SNIP, Wanda, neurons and layers refine by a set difference that the
# projection preserves). NLSR refines in LoRA space and then projects by |ΔW|, so its weight-space refined region
# is not raw \ U; its identity is asserted in LoRA space instead.
# %%
refinement = overlap.refinement(results)
if not refinement.empty:
    refinement.to_csv(TAB / "refinement.csv", index=False)
    display(overlap.table(overlap.refinement_means(refinement), caption="means over dataset pairs"))
    print("refinement identity holds exactly for",
          sorted(set(refinement.method[refinement["refined = raw \\ U"]])))
lora_checks = overlap.lora_checks(IDENT, loaded, cfg.calibrate.utility_set)
if lora_checks:
    display(overlap.table(pd.DataFrame(lora_checks), caption="NLSR in its own LoRA space"))
if not refinement.empty:
    show(plots.bars(overlap.refinement_drop(refinement), "method", "IoU", "variant", "Mean pairwise IoU before and after utility refinement",
                    "method", f"mean IoU ({MAIN})"), "refinement.png")
# %% [md]
# ## Across methods, in one parameter space
# For each dataset every method identified on, the IoU between the methods' regions (neurons and layers as the
# weight rows/columns/blocks they cover, NLSR by its base-weight projection), averaged over those datasets; chance
# uses the same per-matrix counts.
# %%
per_model, cross = overlap.across_methods_by_model(loaded, cfg.identify.models, cfg.identify.methods,
                                                   cfg.calibrate.datasets, VARIANTS, TAB)
for role, found in per_model.items():
    if found is None:
        print(f"{role}: fewer than two methods or no common dataset; no cross-method comparison")
        continue
    common, tables = found
    show(plots.heatmap_grid({f"{v} (mean over {len(common)} datasets)": t for v, t in tables.items()},
                            f"{role}: IoU between methods' regions (datasets: {', '.join(common)})",
                            "method", "method"), f"cross_method_{role}.png")
if not cross.empty:
    cross.to_csv(TAB / "cross_method.csv", index=False)
    display(overlap.table(overlap.cross_method_means(cross)))
# %% [md]
# ## Where the regions agree: per-layer and per-component overlap profiles
# Mean pairwise IoU between datasets' regions, restricted to one decoder layer (left) or one component type (right).
# %%
prof, comp = overlap.profiles(results, VARIANTS)
if prof.dropna().empty:
    print("no pairs: no profiles")
else:
    prof.to_csv(TAB / "layer_profile.csv", index=False)
    comp.to_csv(TAB / "component_profile.csv", index=False)
    prof["line"] = prof.method if prof.model.nunique() == 1 else prof.model + " · " + prof.method
    show(plots.band_lines(prof, "layer", "iou", "line", "variant", "Mean pairwise IoU per decoder layer",
                          "layer", "mean IoU within the layer"), "layer_profile.png")
    show(plots.heatmap_grid(overlap.component_tables(comp, VARIANTS), "Mean pairwise IoU per component", "component", "method"),
         "component_profile.png")
# %% [md]
# ## Across model sizes
# Two sizes of one family rarely share matrix shapes, so they are compared by their per-layer density profiles
# on relative depth (0 = first block, 1 = last); where the shapes do match, by direct IoU as well. This runs when
# `identify.models` lists two or more roles.
# %%
roles = list(cfg.identify.models)
if len(roles) < 2:
    print(f"only one model in identify.models ({roles}): the across-size comparison is skipped on this profile "
          "(the paper profile adds a second size of the family)")
else:
    sizes, depth = overlap.across_sizes(results, loaded, roles, cfg.identify.methods, VARIANTS)
    sizes.to_csv(TAB / "sizes.csv", index=False)
    display(overlap.table(sizes))
    depth["line"] = depth.model + " · " + depth.method
    show(plots.band_lines(depth[depth.variant == VARIANTS[0]], "depth", "density", "line", "variant",
                          "Per-layer region density on relative depth", "relative depth", "density"), "sizes.png")
# %% [md]
# ## Prompt bootstrap: how much does the IoU move when the prompts change?
# For SNIP and Wanda on the default model, each dataset's calibration examples are resampled with replacement,
# the region is re-identified with the method's own scores and top-q selection, and every pairwise IoU is
# recomputed (refined: with the stored utility region held fixed). The interval is the 2.5–97.5 percentile over
# resamples; with a handful of resamples (the CPU default) it is only the observed range. With few calibration
# examples a resample often repeats one example, so the resampled regions can sit systematically apart from the
# observed one (which used every example once): read the spread, not the position.
# %%
start = time.time()
boot, ci = overlap.prompt_bootstrap(cfg, loaded, results, Path("artifacts/calibrate"))
if not boot.empty:
    boot.to_csv(TAB / "bootstrap.csv", index=False)
    display(overlap.table(ci, index=False))
    print(f"bootstrap: {ov.bootstrap.n_resamples} resamples × {boot.method.nunique()} methods in "
          f"{time.time() - start:.0f} s")
else:
    print("bootstrap off (overlap.bootstrap.n_resamples = 0 or no bootstrap method identified)")
# %% [md]
# ## Metrics, intervals and the noise ceiling
# `results/overlap/metrics.json`, per model and method (global scope): the mean off-diagonal IoU and its chance
# value, raw and refined; the mean chance-corrected IoU (IoU − chance) / (1 − chance), pair by pair; and the
# refinement drop refined − raw in both forms. Every interval resamples the **datasets**, not the pairs (the
# pairs share datasets, so they are not independent draws): a resample draws the datasets with replacement and
# averages over the pairs of two different drawn datasets, each as often as it was drawn (docs/methods.md §3.6).
# n is the number of datasets; a method with fewer than three has no interval, and the table says why in its
# place. The mean raw IoU's p is against the low-overlap threshold, the others' against 0.
# `split_half_iou`: the IoU of the regions found from the two halves of one dataset's calibration pairs
# (`<dataset>.half0.raw` / `.half1.raw`, written by identify for `identify.split_half_datasets`; null where
# absent). The split-half IoU is the noise ceiling: between-dataset IoU near it means the datasets agree as
# well as one dataset agrees with itself. Regions from half the examples overlap less than full-size ones, so
# the ceiling is compared with `between_half_iou`, the IoU between the half-size regions of two different
# datasets: far below the split-half IoU means the datasets' regions differ beyond sampling noise. Every matrix
# is in `results/overlap/tables/`.
# %%
estimates = overlap.dataset_estimates(results, ov.seed)
halves = overlap.split_half(IDENT, results)
metrics = overlap.metrics(summary, estimates, halves)
overlap.save_metrics(RESULTS / "metrics.json", metrics)
display(overlap.table(overlap.metrics_table(metrics), index=False))
ceiling = overlap.noise_ceiling(metrics)
if ceiling.empty:
    print("no defined IoU: no noise-ceiling figure")
else:
    display(overlap.table(ceiling, index=False))
    show(overlap.error_bars(ceiling, "Mean IoU between datasets (95% CI) vs within one dataset (split halves)"),
         "noise_ceiling.png")
# %% [md]
# ## Verdict for this run
# Computed from the numbers above; read it with the CPU reductions at the top in mind (few calibration examples
# per dataset, some methods on a subset of datasets, an NLSR LoRA trained for a few steps).
# %%
display(Markdown(overlap.verdict(summary, plateau, ci, refinement, VARIANTS, metrics)))

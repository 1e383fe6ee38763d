# %% [md]
# # 05 · Overlap: do the safety regions found on different datasets coincide?
#
# Paper 1 (arXiv:2602.17696) asks two questions of the regions the `identify` stage found:
#
# * **RQ1** — do the regions one method finds from *different* safety datasets overlap well above chance, i.e. is
#   there one dataset-agnostic safety region, or does every dataset give its own?
# * **RQ2** — does utility refinement (removing the same method's region on Alpaca, METHODS §3.5) raise or lower
#   that overlap?
#
# Overlap is the **IoU** |A ∩ B| / |A ∪ B| of two regions, popcounted on packed bits over the common parameter space
# (the q/k/v/o/gate/up/down weights of every block; neuron and layer regions are already projected onto it), both
# over the whole space (**global**) and per weight matrix then averaged (**per-matrix**, Wei et al.'s Jaccard).
# Every IoU is shown beside the IoU two **random** regions with the same per-matrix counts would have (≈ f/(2−f)
# at density f; whole random layer sets for SafeLayer), and a chance-corrected overlap (IoU − chance)/(1 − chance).
#
# Sections: pairwise matrices · convergence of the multi-way IoU · refinement and its identity ·
# across methods and per layer/component · across model sizes · prompt bootstrap · verdict.
# %% [params]
params = {}
# %%
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import Image, Markdown, display

from saferegions import config, identify, models, overlap, plots, regions
from saferegions.io import write_json

cfg = config.parse(params)
ov = cfg.overlap
torch.manual_seed(cfg.run.seed)
IDENT, RESULTS = Path("artifacts/identify"), Path("results/overlap")
FIG, TAB = RESULTS / "figures", RESULTS / "tables"
TAB.mkdir(parents=True, exist_ok=True)
SCOPES, VARIANTS = ov.scopes(), ov.variants
MAIN = "global"   # scope of the summary numbers and metrics.json


def show(fig, name: str) -> None:
    """Save the figure under results/overlap/figures and show the saved PNG."""
    import matplotlib.pyplot as plt
    display(Image(filename=str(plots.save(fig, FIG / name))))
    plt.close(fig)


def nan_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


display(pd.DataFrame(config.deviations(ov, "overlap") + config.deviations(cfg.identify, "identify")
                     + config.deviations(cfg.calibrate, "calibrate"))
        .style.set_caption("CPU reductions in this run (paper-scale value beside each)"))
# %% [md]
# ## The regions
# Every region file of every model × method, loaded once in packed form (bits or int32 indices, never expanded to
# one bool tensor per weight). A missing file stops the notebook here, before any work.
# %%
paths = {}
for role in cfg.identify.models:
    for method in cfg.identify.methods:
        folder = IDENT / role / method
        ds = cfg.identify.datasets(method, cfg.calibrate.datasets)
        paths[role, method] = {"raw": {d: identify.region_path(folder, d, "raw") for d in ds},
                               "refined": {d: identify.region_path(folder, d, "refined") for d in ds},
                               "utility": identify.region_path(folder, cfg.calibrate.utility_set, "utility")}
absent = [str(p) for v in paths.values() for p in [*v["raw"].values(), *v["refined"].values(), v["utility"]]
          if not p.exists()]
if absent:
    raise FileNotFoundError(f"{len(absent)} region files missing (run the identify stage): {absent[:4]}")
start = time.time()
loaded = {key: {"raw": {d: regions.load_packed(p) for d, p in v["raw"].items()},
                "refined": {d: regions.load_packed(p) for d, p in v["refined"].items()},
                "utility": regions.load_packed(v["utility"])} for key, v in paths.items()}
inventory = pd.DataFrame([{"model": role, "method": method, "datasets": len(r["raw"]),
                           "raw density": np.mean([x.density for x in r["raw"].values()]),
                           "refined density": np.mean([x.density for x in r["refined"].values()]),
                           "utility density": r["utility"].density,
                           "MB packed": sum(a.nbytes for x in [*r["raw"].values(), *r["refined"].values(), r["utility"]]
                                            for a in x.data.values()) / 2**20}
                          for (role, method), r in loaded.items()])
print(f"loaded {sum(2 * len(r['raw']) + 1 for r in loaded.values())} packed regions in {time.time() - start:.1f} s")
display(inventory.style.format(precision=4))
# %% [md]
# ## Counting
# For each model × method, one pass over the tensors popcounts every intersection and union the analyses need
# (all pairs, every prefix of the random dataset orderings, the same with the utility region subtracted), keeping
# per-tensor counts (`overlap.count`). A few pairs are recomputed with `regions.iou` (pair-by-pair popcount) as a
# cross-check.
# %%
start = time.time()
results = {key: overlap.analyze(r["raw"], r["refined"], r["utility"], VARIANTS, SCOPES, ov.n_orders, ov.seed,
                                ov.chance_draws) for key, r in loaded.items()}
print(f"counted {len(results)} model × method analyses in {time.time() - start:.1f} s")
for (role, method), a in results.items():
    ds = a["datasets"]
    if len(ds) >= 2:
        for v in VARIANTS:
            want = regions.iou(loaded[role, method][v][ds[0]], loaded[role, method][v][ds[-1]])
            got = a["matrix"][v, MAIN][0, -1]
            assert got == want or (math.isnan(got) and math.isnan(want)), (role, method, v, got, want)
print("cross-check with regions.iou: identical")
# %% [md]
# ## Pairwise IoU between datasets (RQ1)
# One matrix per model × method (global scope; per-matrix tables are in `results/overlap/tables/`). Off the
# diagonal, each cell is the IoU of the regions found from two datasets. The summary gives mean ± sd of the
# off-diagonal IoU beside the chance IoU of random regions with the same per-matrix counts, their ratio and the
# chance-corrected overlap.
# %%
summary = []
for (role, method), a in results.items():
    ds = a["datasets"]
    for (v, scope), m in a["matrix"].items():
        pd.DataFrame(m, index=ds, columns=ds).to_csv(TAB / f"{role}-{method}-{v}-{scope}.csv")
        pd.DataFrame(a["chance"][v, scope], index=ds, columns=ds).to_csv(TAB / f"{role}-{method}-{v}-{scope}-chance.csv")
        off, ch = overlap.off_diagonal(m), overlap.off_diagonal(a["chance"][v, scope])
        mean = float(np.nanmean(off)) if off.size and not np.isnan(off).all() else math.nan
        chance = float(np.nanmean(ch)) if ch.size and not np.isnan(ch).all() else math.nan
        summary.append({"model": role, "method": method, "variant": v, "scope": scope, "datasets": len(ds),
                        "mean_iou": mean, "sd_iou": float(np.nanstd(off, ddof=1)) if off.size > 1 else math.nan,
                        "chance_iou": chance, "ratio": mean / chance if chance else math.nan,
                        "corrected": overlap.corrected(mean, chance)})
summary = pd.DataFrame(summary)
summary.to_csv(TAB / "summary.csv", index=False)
display(summary[summary.scope == MAIN].style.format(precision=4).hide(axis="index"))
for (role, method), a in results.items():
    if len(a["datasets"]) < 2:
        print(f"{role}/{method}: one dataset, no pairs")
        continue
    ds = a["datasets"]
    tables = {v: pd.DataFrame(a["matrix"][v, MAIN], index=ds, columns=ds) for v in VARIANTS}
    show(plots.heatmap_grid(tables, f"{role} · {method}: IoU between datasets' regions ({MAIN})", "dataset",
                            "dataset"), f"pairwise_{role}_{method}.png")
# %%
long = summary[summary.scope == MAIN].melt(id_vars=["model", "method", "variant"], value_vars=["mean_iou", "chance_iou"],
                                           var_name="measure", value_name="IoU")
long["condition"] = long.method + " · " + long.variant
if long.model.nunique() > 1:
    long["condition"] = long.model + " · " + long.condition
show(plots.bars(long, "condition", "IoU", "measure", "Mean off-diagonal IoU vs random regions of the same densities",
                "method · variant", f"IoU ({MAIN})"), "mean_iou_vs_chance.png")
# %% [md]
# ## Convergence: does the multi-way intersection plateau at a stable region?
# For an ordering of the datasets, IoU_k = |A₁ ∩ … ∩ A_k| / |A₁ ∪ … ∪ A_k|, k = 2 … n, over `overlap.n_orders`
# random orderings (line = mean, band = range over orderings; dashed = chance for the same densities). A stable,
# dataset-agnostic region would make the curve level off well above chance; a curve that keeps falling towards
# chance means each new dataset brings a different region; a line that drops off the bottom of the log axis has
# reached an empty intersection. `survive` = |A₁ ∩ … ∩ A_k| / |A₁|.
# %%
conv = pd.DataFrame([{"model": role, "method": method, **r} for (role, method), a in results.items()
                     for r in a["convergence"]])
if conv.empty:
    print("no method has two or more datasets: no convergence curve")
else:
    conv.to_csv(TAB / "convergence.csv", index=False)
    main = conv[conv.scope == MAIN].copy()
    main["line"] = main.method if main.model.nunique() == 1 else main.model + " · " + main.method
    show(plots.band_lines(main, "k", "iou", "line", "variant", "Multi-way IoU of the first k datasets",
                          "k (datasets intersected)", f"IoU_k ({MAIN}, log scale)", ref="chance", logy=True),
         "convergence.png")
    last = main.groupby(["model", "method", "variant", "k"])[["iou", "chance", "survive"]].mean().reset_index()
    plateau = []
    for (role, method, v), g in last.groupby(["model", "method", "variant"]):
        g = g.sort_values("k")
        end, prev = g.iloc[-1], g.iloc[-2] if len(g) > 1 else g.iloc[-1]
        plateau.append({"model": role, "method": method, "variant": v, "k_max": int(end.k),
                        "IoU_2": g.iloc[0].iou, "IoU_kmax": end.iou, "chance_kmax": end.chance,
                        "last_step_change": (end.iou - prev.iou) / prev.iou if prev.iou else math.nan,
                        "survive_kmax": end.survive})
    plateau = pd.DataFrame(plateau)
    display(plateau.style.format(precision=4).hide(axis="index"))
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
ref_rows = []
for (role, method), a in results.items():
    exact = all(a["exact"].values()) if a["exact"] else False
    for r in a["refinement"]:
        ref_rows.append({"model": role, "method": method, "refined = raw \\ U": exact, **r})
        if exact:
            assert r["identity_iou"] == r["refined_iou"] or (math.isnan(r["identity_iou"])
                                                             and math.isnan(r["refined_iou"])), (method, r)
refinement = pd.DataFrame(ref_rows)
if not refinement.empty:
    refinement.to_csv(TAB / "refinement.csv", index=False)
    display(refinement.groupby(["model", "method", "refined = raw \\ U"])[
        ["raw_iou", "refined_iou", "identity_iou", "u_frac_of_inter", "u_frac_of_union"]].mean()
        .style.format(precision=4).set_caption("means over dataset pairs"))
    print("refinement identity holds exactly for", sorted({m for m, e in zip(refinement.method,
                                                                            refinement["refined = raw \\ U"]) if e}))
lora_checks = []
for role in cfg.identify.models:
    if "nlsr" not in cfg.identify.methods:
        continue
    folder = IDENT / role / "nlsr"
    ds = list(paths[role, "nlsr"]["raw"])
    lora = {f"{d}.{v}": regions.load_packed(identify.region_path(folder, d, f"{v}.lora")) for d in ds
            for v in ("raw", "refined")}
    lora["utility"] = regions.load_packed(identify.region_path(folder, cfg.calibrate.utility_set, "utility.lora"))
    qs = overlap.plan([f"{d}.raw" for d in ds], minus="utility") + overlap.plan([f"{d}.refined" for d in ds])
    c = overlap.count(list(lora.values()), list(lora), qs)
    for x, y in itertools.combinations(ds, 2):
        got, want = c.multiway([f"{x}.refined", f"{y}.refined"]), c.refined(f"{x}.raw", f"{y}.raw", "utility")
        assert got == want or (math.isnan(got) and math.isnan(want)), ("nlsr lora", x, y, got, want)
        lora_checks.append({"model": role, "pair": f"{x}–{y}", "raw IoU (LoRA)": c.multiway([f"{x}.raw", f"{y}.raw"]),
                            "refined IoU (LoRA)": got, "identity (LoRA)": want})
if lora_checks:
    display(pd.DataFrame(lora_checks).style.format(precision=4).set_caption("NLSR in its own LoRA space"))
if not refinement.empty:
    drop = refinement.groupby(["model", "method"])[["raw_iou", "refined_iou"]].mean().reset_index()
    drop = drop.melt(id_vars=["model", "method"], var_name="variant", value_name="IoU")
    show(plots.bars(drop, "method", "IoU", "variant", "Mean pairwise IoU before and after utility refinement",
                    "method", f"mean IoU ({MAIN})"), "refinement.png")
# %% [md]
# ## Across methods, in one parameter space
# For each dataset every method identified on, the IoU between the methods' regions (neurons and layers as the
# weight rows/columns/blocks they cover, NLSR by its base-weight projection), averaged over those datasets; chance
# uses the same per-matrix counts.
# %%
cross_rows = []
for role in cfg.identify.models:
    common = [d for d in cfg.calibrate.datasets if all(d in loaded[role, m]["raw"] for m in cfg.identify.methods)]
    meths = list(cfg.identify.methods)
    if len(meths) < 2 or not common:
        print(f"{role}: fewer than two methods or no common dataset; no cross-method comparison")
        continue
    tables = {}
    for v in VARIANTS:
        mats, chances = [], []
        for d in common:
            c = overlap.count([loaded[role, m][v][d] for m in meths], meths, overlap.plan(meths))
            mats.append(c.pairwise(MAIN))
            chances.append(np.array([[overlap.chance_entries(c, [a, b]) if a != b else np.nan for b in meths]
                                     for a in meths]))
            for a, b in itertools.combinations(meths, 2):
                cross_rows.append({"model": role, "variant": v, "dataset": d, "method_a": a, "method_b": b,
                                   "iou": c.multiway([a, b]), "chance": overlap.chance_entries(c, [a, b])})
        tables[f"{v} (mean over {len(common)} datasets)"] = pd.DataFrame(np.nanmean(mats, 0), index=meths,
                                                                          columns=meths)
        pd.DataFrame(np.nanmean(mats, 0), index=meths, columns=meths).to_csv(TAB / f"{role}-methods-{v}-{MAIN}.csv")
    show(plots.heatmap_grid(tables, f"{role}: IoU between methods' regions (datasets: {', '.join(common)})",
                            "method", "method"), f"cross_method_{role}.png")
cross = pd.DataFrame(cross_rows)
if not cross.empty:
    cross.to_csv(TAB / "cross_method.csv", index=False)
    display(cross.groupby(["model", "variant", "method_a", "method_b"])[["iou", "chance"]].mean()
            .unstack("variant").style.format(precision=4))
# %% [md]
# ## Where the regions agree: per-layer and per-component overlap profiles
# Mean pairwise IoU between datasets' regions, restricted to one decoder layer (left) or one component type (right).
# %%
prof = pd.DataFrame([{"model": role, "method": method, "variant": v, "layer": layer, "iou": x}
                     for (role, method), a in results.items() for v in VARIANTS
                     for layer, x in a["by_layer"][v].items()])
comp = pd.DataFrame([{"model": role, "method": method, "variant": v, "component": k, "iou": x}
                     for (role, method), a in results.items() for v in VARIANTS
                     for k, x in a["by_component"][v].items()])
if prof.dropna().empty:
    print("no pairs: no profiles")
else:
    prof.to_csv(TAB / "layer_profile.csv", index=False)
    comp.to_csv(TAB / "component_profile.csv", index=False)
    prof["line"] = prof.method if prof.model.nunique() == 1 else prof.model + " · " + prof.method
    show(plots.band_lines(prof, "layer", "iou", "line", "variant", "Mean pairwise IoU per decoder layer",
                          "layer", "mean IoU within the layer"), "layer_profile.png")
    order = [c for c in ("q", "k", "v", "o", "gate", "up", "down", "gate_up") if c in set(comp.component)]
    comp["row"] = comp.method if comp.model.nunique() == 1 else comp.model + " · " + comp.method
    tables = {v: comp[comp.variant == v].pivot_table(index="row", columns="component", values="iou")[order]
              for v in VARIANTS}
    show(plots.heatmap_grid(tables, "Mean pairwise IoU per component", "component", "method"),
         "component_profile.png")
# %% [md]
# ## Across model sizes
# Two sizes of one family rarely share matrix shapes, so they are compared by their per-layer density profiles
# on relative depth (0 = first block, 1 = last); where the shapes do match, by direct IoU as well. This runs when
# `identify.models` lists two or more roles.
# %%
size_rows = []
roles = list(cfg.identify.models)
if len(roles) < 2:
    print(f"only one model in identify.models ({roles}): the across-size comparison is skipped on this profile "
          "(the paper profile adds a second size of the family)")
else:
    depth = []
    for ra, rb in itertools.combinations(roles, 2):
        for method in cfg.identify.methods:
            for v in VARIANTS:
                pa, pb = ({}, {})
                for role, p in ((ra, pa), (rb, pb)):
                    a = results[role, method]
                    names = [f"{d}.{v}" for d in a["datasets"]]
                    p.update(overlap.group_density(a["counts"], names, models.layer_index))
                    grid = overlap.depth_profile(p)
                    depth += [{"model": role, "method": method, "variant": v, "depth": x, "density": y}
                              for x, y in zip(np.linspace(0, 1, grid.size), grid)]
                ga, gb = overlap.depth_profile(pa), overlap.depth_profile(pb)
                row = {"model_a": ra, "model_b": rb, "method": method, "variant": v,
                       "profile_correlation": float(np.corrcoef(ga, gb)[0, 1]) if ga.std() and gb.std() else math.nan}
                common = [d for d in loaded[ra, method][v] if d in loaded[rb, method][v]]
                if common and overlap.same_space(loaded[ra, method][v][common[0]], loaded[rb, method][v][common[0]]):
                    row["direct_iou"] = float(np.mean([regions.iou(loaded[ra, method][v][d], loaded[rb, method][v][d])
                                                       for d in common]))
                size_rows.append(row)
    sizes = pd.DataFrame(size_rows)
    sizes.to_csv(TAB / "sizes.csv", index=False)
    display(sizes.style.format(precision=4))
    depth = pd.DataFrame(depth)
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
bs = ov.bootstrap
role0 = cfg.identify.models[0]
boot_methods = [m for m in bs.methods if m in cfg.identify.methods]
boot = pd.DataFrame()
if bs.n_resamples and boot_methods:
    start = time.time()
    calib, calib_meta = identify.load_calibration(Path("artifacts/calibrate") / role0)
    lm, tok = models.load(cfg.models[role0].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows = []
    for m in boot_methods:
        ds = bs.datasets or cfg.identify.datasets(m, cfg.calibrate.datasets)
        rows += overlap.bootstrap(lm, tok, calib, m, ds, cfg.identify.snip.n if m == "snip" else None,
                                  cfg.identify.q, cfg.identify.group, loaded[role0, m]["utility"], bs.n_resamples,
                                  bs.seed, cfg.identify.batch_size, cfg.identify.max_length,
                                  calib_meta["system_prompt"])
    del lm
    boot = pd.DataFrame(rows)
    boot.to_csv(TAB / "bootstrap.csv", index=False)
    ci = []
    for (m, pair), g in boot.groupby(["method", "pair"]):
        a, b = pair.split("–")
        res = results[role0, m]
        i, j = res["datasets"].index(a), res["datasets"].index(b)
        for v in [x for x in VARIANTS if x in g]:
            lo, hi = overlap.interval(g[v])
            ci.append({"method": m, "pair": pair, "variant": v, "observed": res["matrix"][v, MAIN][i, j],
                       "bootstrap mean": g[v].mean(), "low": lo, "high": hi, "chance": res["chance"][v, MAIN][i, j],
                       "resamples": len(g)})
    ci = pd.DataFrame(ci)
    display(ci.style.format(precision=4).hide(axis="index"))
    print(f"bootstrap: {bs.n_resamples} resamples × {len(boot_methods)} methods in {time.time() - start:.0f} s")
else:
    ci = pd.DataFrame()
    print("bootstrap off (overlap.bootstrap.n_resamples = 0 or no bootstrap method identified)")
# %% [md]
# ## Metrics
# `results/overlap/metrics.json`: per model and method, mean off-diagonal IoU (global scope) and its chance value,
# raw and refined. Every matrix is in `results/overlap/tables/`.
# %%
metrics = {}
for r in summary[summary.scope == MAIN].itertuples():
    metrics.setdefault(r.model, {}).setdefault(r.method, {})[r.variant] = {
        "mean_iou": nan_none(r.mean_iou), "chance_iou": nan_none(r.chance_iou)}
write_json(RESULTS / "metrics.json", metrics)
display(pd.DataFrame({(m, meth): {f"{v} {k}": x for v, d in per.items() for k, x in d.items()}
                      for m, methods in metrics.items() for meth, per in methods.items()}).T.style.format(precision=4))
# %% [md]
# ## Verdict for this run
# Computed from the numbers above; read it with the CPU reductions at the top in mind (few calibration examples
# per dataset, some methods on a subset of datasets, an NLSR LoRA trained for a few steps).
# %%
main = summary[(summary.scope == MAIN) & summary.mean_iou.notna()]
lines = []
raw = main[main.variant == "raw"] if "raw" in VARIANTS else main[main.variant == VARIANTS[0]]
above = raw[(raw.ratio >= 2) & (raw.corrected > 0.05)]
lines.append(f"**RQ1 — overlap across datasets.** For {len(above)} of {len(raw)} model × method combinations the "
             f"{raw.variant.iloc[0] if len(raw) else ''} regions from different datasets overlap well above chance "
             "(mean IoU at least twice the chance IoU and chance-corrected overlap above 0.05):")
for r in raw.itertuples():
    lines.append(f"- {r.model} · {r.method}: mean IoU {r.mean_iou:.3f} ± {r.sd_iou:.3f} over {r.datasets} datasets "
                 f"vs chance {r.chance_iou:.4f} ({r.ratio:.1f}×, chance-corrected {r.corrected:.3f}).")
if not conv.empty:
    for r in plateau[plateau.variant == raw.variant.iloc[0]].itertuples():
        if math.isnan(r.IoU_kmax):
            verdict = "undefined: the regions are empty"
        elif not r.IoU_kmax > 0:
            verdict = f"the intersection of all {r.k_max} is empty: no common region"
        elif r.IoU_kmax <= 2 * r.chance_kmax:
            verdict = "it falls to chance level"
        elif r.last_step_change < -0.1:
            verdict = f"the last dataset still cuts it by {-100 * r.last_step_change:.0f}%: no plateau yet"
        else:
            verdict = (f"the last dataset changes it by {100 * r.last_step_change:+.0f}%: it levels off "
                       "above chance")
        lines.append(f"- convergence, {r.method}: IoU_2 {r.IoU_2:.3f} → IoU_{r.k_max} {r.IoU_kmax:.3f} (chance "
                     f"{r.chance_kmax:.1e}); {verdict}; {100 * r.survive_kmax:.1f}% of the first dataset's region "
                     "lies in every dataset's region.")
if not ci.empty:
    for r in ci[ci.variant == raw.variant.iloc[0]].itertuples():
        lines.append(f"- bootstrap, {r.method} {r.pair}: observed {r.observed:.3f}, resampled range "
                     f"[{r.low:.3f}, {r.high:.3f}] over {r.resamples} resamples (chance {r.chance:.4f}).")
if {"raw", "refined"} <= set(VARIANTS) and not refinement.empty:
    d = refinement.groupby(["model", "method"])[["raw_iou", "refined_iou", "u_frac_of_inter", "u_frac_of_union"]].mean()
    lower = d[d.refined_iou < d.raw_iou]
    lines.append(f"\n**RQ2 — utility refinement.** Refinement lowers the mean pairwise IoU for {len(lower)} of "
                 f"{len(d)} model × method combinations and raises it for {int((d.refined_iou > d.raw_iou).sum())}:")
    for (role, method), r in d.iterrows():
        lines.append(f"- {role} · {method}: {r.raw_iou:.3f} → {r.refined_iou:.3f}; the utility region covers "
                     f"{100 * r.u_frac_of_inter:.1f}% of the shared part A ∩ B and {100 * r.u_frac_of_union:.1f}% of "
                     f"A ∪ B, so the shared parameters are "
                     f"{'more' if r.u_frac_of_inter > r.u_frac_of_union else 'less'} utility-critical than the rest.")
display(Markdown("\n".join(lines)))

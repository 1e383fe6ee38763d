"""Stage `overlap` (notebook 06_overlap): loads the identified regions, runs `overlap.analyze` on each
model × method, and turns the counts into the summary, convergence, refinement, cross-method, per-layer,
across-size and bootstrap tables, the metrics and the plain-language verdict. The library module `overlap`
does the counting; the notebook only calls these functions, shows their tables and plots them."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config, dataset_bootstrap, evidence, models, overlap, plots, regions, results   # noqa: F401 (config: for the notebook)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import write_json   # noqa: F401 (for the notebook)
from ..methods.context import load_calibration
from ..methods.resample import bootstrap_ious
from ..regions import RegionKind

MAIN = "global"   # scope of the summary numbers and metrics.json
VARIANT_KEYS = ("raw", "refined")
LOW_OVERLAP = evidence.THRESHOLDS["p1_low_overlap"][0]   # the p of a mean raw IoU is against this threshold


def nan_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def load(ident: Path, cfg) -> dict:
    """{(role, method): {"raw": {d: PackedRegion}, "refined": {...}, "utility": PackedRegion}} for the roles,
    methods and datasets the params name; one error listing the missing files before anything is read."""
    paths, utility_set = {}, cfg.calibrate.utility_set
    for role in cfg.identify.models:
        for method in cfg.identify.methods:
            folder = ident / role / method
            ds = cfg.identify.datasets(method, cfg.calibrate.datasets)
            paths[role, method] = {v: {d: regions.region_path(folder, d, v) for d in ds} for v in ("raw", "refined")}
            paths[role, method]["utility"] = regions.region_path(folder, utility_set, "utility")
    absent = [str(p) for v in paths.values() for p in [*v["raw"].values(), *v["refined"].values(), v["utility"]]
              if not p.exists()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} region files missing (run the identify stage): {absent[:4]}")
    return {key: {"raw": {d: regions.load_packed(p) for d, p in v["raw"].items()},
                  "refined": {d: regions.load_packed(p) for d, p in v["refined"].items()},
                  "utility": regions.load_packed(v["utility"])} for key, v in paths.items()}


def inventory(loaded: dict) -> pd.DataFrame:
    return pd.DataFrame([{"model": role, "method": method, "datasets": len(r["raw"]),
                          "raw density": np.mean([x.density for x in r["raw"].values()]),
                          "refined density": np.mean([x.density for x in r["refined"].values()]),
                          "utility density": r["utility"].density,
                          "MB packed": sum(a.nbytes for x in [*r["raw"].values(), *r["refined"].values(), r["utility"]]
                                           for a in x.data.values()) / 2**20}
                         for (role, method), r in loaded.items()])


def analyze(loaded: dict, ov) -> dict:
    """`overlap.analyze` of every model × method (`ov`: OverlapCfg), one pass over its tensors each."""
    return {key: overlap.analyze(r["raw"], r["refined"], r["utility"], ov.variants, ov.scopes(), ov.n_orders,
                                 ov.seed, ov.chance_draws) for key, r in loaded.items()}


def cross_check(results: dict, loaded: dict, variants) -> None:
    """The one counting pass over every region agrees with a two-region count (`overlap.iou`) on one pair per
    model × method × variant: the shared intersections of the many-region pass are reused correctly."""
    for (role, method), a in results.items():
        ds = a["datasets"]
        if len(ds) >= 2:
            for v in variants:
                want = overlap.iou(loaded[role, method][v][ds[0]], loaded[role, method][v][ds[-1]])
                got = a["matrix"][v, MAIN][0, -1]
                assert _same(got, want), (role, method, v, got, want)


def _same(got: float, want: float) -> bool:
    """Equal IoUs, an undefined one (NaN: both regions empty) equal to another undefined one."""
    return got == want or (math.isnan(got) and math.isnan(want))


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if x.size and not np.isnan(x).all() else math.nan


def summary(results: dict, tab: Path) -> pd.DataFrame:
    """Mean ± sd of the off-diagonal IoU beside chance, per model × method × variant × scope; the full
    matrices (and their chance matrices) go to tab/ as CSV."""
    rows = []
    for (role, method), a in results.items():
        ds = a["datasets"]
        for (v, scope), m in a["matrix"].items():
            pd.DataFrame(m, index=ds, columns=ds).to_csv(tab / f"{role}-{method}-{v}-{scope}.csv")
            pd.DataFrame(a["chance"][v, scope], index=ds, columns=ds).to_csv(
                tab / f"{role}-{method}-{v}-{scope}-chance.csv")
            off = overlap.off_diagonal(m)
            mean, chance = _nanmean(off), _nanmean(overlap.off_diagonal(a["chance"][v, scope]))
            rows.append({"model": role, "method": method, "variant": v, "scope": scope, "datasets": len(ds),
                         "mean_iou": mean, "sd_iou": float(np.nanstd(off, ddof=1)) if off.size > 1 else math.nan,
                         "chance_iou": chance, "ratio": mean / chance if chance else math.nan,
                         "corrected": _nanmean(overlap.off_diagonal(overlap.corrected(m, a["chance"][v, scope])))})
    return pd.DataFrame(rows)


def dataset_matrices(analysis: dict, variants) -> dict[str, pd.DataFrame]:
    """{variant: dataset × dataset IoU table} of one model × method, main scope (the heatmaps)."""
    ds = analysis["datasets"]
    return {v: pd.DataFrame(analysis["matrix"][v, MAIN], index=ds, columns=ds) for v in variants}


def mean_vs_chance(summary_table: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU and chance IoU as rows, one `condition` per model × method × variant (the bar chart)."""
    long = summary_table[summary_table.scope == MAIN].melt(
        id_vars=["model", "method", "variant"], value_vars=["mean_iou", "chance_iou"], var_name="measure",
        value_name="IoU")
    long["condition"] = long.method + " · " + long.variant
    if long.model.nunique() > 1:
        long["condition"] = long.model + " · " + long.condition
    return long


def convergence(results: dict) -> pd.DataFrame:
    return pd.DataFrame([{"model": role, "method": method, **r} for (role, method), a in results.items()
                         for r in a["convergence"]])


def plateau(conv: pd.DataFrame) -> pd.DataFrame:
    """Per model × method × variant: IoU_2, IoU_kmax, chance, and the relative change the last dataset made."""
    last = conv.groupby(["model", "method", "variant", "k"])[["iou", "chance", "survive"]].mean().reset_index()
    rows = []
    for (role, method, v), g in last.groupby(["model", "method", "variant"]):
        g = g.sort_values("k")
        end, prev = g.iloc[-1], g.iloc[-2] if len(g) > 1 else g.iloc[-1]
        rows.append({"model": role, "method": method, "variant": v, "k_max": int(end.k),
                     "IoU_2": g.iloc[0].iou, "IoU_kmax": end.iou, "chance_kmax": end.chance,
                     "last_step_change": (end.iou - prev.iou) / prev.iou if prev.iou else math.nan,
                     "survive_kmax": end.survive})
    return pd.DataFrame(rows)


def refinement(results: dict) -> pd.DataFrame:
    """Raw vs refined IoU per dataset pair, with IoU_refined = |(A∩B)\\U| / |(A∪B)\\U| asserted wherever the
    stored refined regions are exactly raw \\ U."""
    rows = []
    for (role, method), a in results.items():
        exact = all(a["exact"].values()) if a["exact"] else False
        for r in a["refinement"]:
            rows.append({"model": role, "method": method, "refined = raw \\ U": exact, **r})
            if exact:
                assert _same(r["identity_iou"], r["refined_iou"]), (method, r)
    return pd.DataFrame(rows)


REFINEMENT_COLUMNS = ["raw_iou", "refined_iou", "identity_iou", "u_frac_of_inter", "u_frac_of_union"]


def refinement_means(refinement_rows: pd.DataFrame) -> pd.DataFrame:
    """`refinement` averaged over dataset pairs, per model and method."""
    return refinement_rows.groupby(["model", "method", "refined = raw \\ U"])[REFINEMENT_COLUMNS].mean()


def refinement_drop(refinement_rows: pd.DataFrame) -> pd.DataFrame:
    """Mean raw and refined IoU per model and method, long (one row per variant) for a bar plot."""
    drop = refinement_rows.groupby(["model", "method"])[["raw_iou", "refined_iou"]].mean().reset_index()
    return drop.melt(id_vars=["model", "method"], var_name="variant", value_name="IoU")


def cross_method_means(cross: pd.DataFrame) -> pd.DataFrame:
    """Cross-method IoU and its chance averaged over datasets, one column pair per variant."""
    return cross.groupby(["model", "variant", "method_a", "method_b"])[["iou", "chance"]].mean().unstack("variant")


def lora_space(folder: Path, datasets, utility_set: str, role: str) -> list[dict]:
    """NLSR's regions in its own LoRA space: raw and refined IoU per pair, refinement identity asserted."""
    lora = {f"{d}.{v}": regions.load_packed(regions.region_path(folder, d, f"{v}.lora")) for d in datasets
            for v in ("raw", "refined")}
    lora["utility"] = regions.load_packed(regions.region_path(folder, utility_set, RegionKind.UTILITY_LORA))
    qs = overlap.plan([f"{d}.raw" for d in datasets], minus="utility") + overlap.plan([f"{d}.refined" for d in datasets])
    c = overlap.count(list(lora.values()), list(lora), qs)
    rows = []
    for x, y in itertools.combinations(datasets, 2):
        got, want = c.multiway([f"{x}.refined", f"{y}.refined"]), c.refined(f"{x}.raw", f"{y}.raw", "utility")
        assert _same(got, want), ("nlsr lora", x, y, got, want)
        rows.append({"model": role, "pair": f"{x}–{y}", "raw IoU (LoRA)": c.multiway([f"{x}.raw", f"{y}.raw"]),
                     "refined IoU (LoRA)": got, "identity (LoRA)": want})
    return rows


def lora_checks(ident: Path, loaded: dict, utility_set: str) -> list[dict]:
    """`lora_space` of every model × method whose identify folder holds regions in its own LoRA space
    (`*.lora` files: NLSR writes them); other methods' refined regions are raw \\ U in weight space already."""
    return [row for (role, method), r in loaded.items()
            if regions.region_path(ident / role / method, utility_set, RegionKind.UTILITY_LORA).exists()
            for row in lora_space(ident / role / method, list(r["raw"]), utility_set, role)]


def across_methods(loaded: dict, role: str, methods, datasets, variants) -> tuple[dict, list[dict]]:
    """IoU between methods' regions in the common weight space: ({variant: method × method mean table},
    rows per dataset and pair with chance)."""
    tables, rows = {}, []
    for v in variants:
        mats = []
        for d in datasets:
            c = overlap.count([loaded[role, m][v][d] for m in methods], methods, overlap.plan(methods))
            mats.append(c.pairwise(MAIN))
            for a, b in itertools.combinations(methods, 2):
                rows.append({"model": role, "variant": v, "dataset": d, "method_a": a, "method_b": b,
                             "iou": c.multiway([a, b]), "chance": overlap.chance_entries(c, [a, b])})
        tables[v] = pd.DataFrame(np.nanmean(mats, 0), index=methods, columns=methods)
    return tables, rows


def across_methods_by_model(loaded: dict, roles, methods, datasets, variants, tab: Path) -> tuple[dict, pd.DataFrame]:
    """`across_methods` for each model on the datasets every method identified on: ({role: (those datasets,
    {variant: table}) or None when fewer than two methods or no common dataset}, all rows). Tables go to tab/."""
    methods, found, rows = list(methods), {}, []
    for role in roles:
        common = [d for d in datasets if all(d in loaded[role, m]["raw"] for m in methods)]
        if len(methods) < 2 or not common:
            found[role] = None
            continue
        tables, role_rows = across_methods(loaded, role, methods, common, variants)
        rows += role_rows
        for v, t in tables.items():
            t.to_csv(tab / f"{role}-methods-{v}-{MAIN}.csv")
        found[role] = common, tables
    return found, pd.DataFrame(rows)


def profiles(results: dict, variants) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean pairwise IoU per decoder layer and per component."""
    layer = pd.DataFrame([{"model": role, "method": method, "variant": v, "layer": k, "iou": x}
                          for (role, method), a in results.items() for v in variants
                          for k, x in a["by_layer"][v].items()])
    comp = pd.DataFrame([{"model": role, "method": method, "variant": v, "component": k, "iou": x}
                         for (role, method), a in results.items() for v in variants
                         for k, x in a["by_component"][v].items()])
    return layer, comp


COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down", "gate_up")   # heatmap column order


def component_tables(comp: pd.DataFrame, variants) -> dict[str, pd.DataFrame]:
    """{variant: (model ·) method × component table of mean pairwise IoU}, components in `COMPONENTS` order."""
    comp = comp.assign(row=comp.method if comp.model.nunique() == 1 else comp.model + " · " + comp.method)
    order = [c for c in COMPONENTS if c in set(comp.component)]
    return {v: comp[comp.variant == v].pivot_table(index="row", columns="component", values="iou")[order]
            for v in variants}


def across_sizes(results: dict, loaded: dict, roles, methods, variants) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two sizes of a family: correlation of the per-layer density on relative depth, and the direct IoU where
    both share one parameter space. Returns (one row per pair × method × variant, depth profiles)."""
    rows, depth = [], []
    for ra, rb in itertools.combinations(roles, 2):
        for method in methods:
            for v in variants:
                grids = []
                for role in (ra, rb):
                    a = results[role, method]
                    grid = overlap.depth_profile(overlap.group_density(
                        a["counts"], [f"{d}.{v}" for d in a["datasets"]], models.layer_index))
                    grids.append(grid)
                    depth += [{"model": role, "method": method, "variant": v, "depth": x, "density": y}
                              for x, y in zip(np.linspace(0, 1, grid.size), grid)]
                ga, gb = grids
                row = {"model_a": ra, "model_b": rb, "method": method, "variant": v,
                       "profile_correlation": float(np.corrcoef(ga, gb)[0, 1]) if ga.std() and gb.std() else math.nan}
                common = [d for d in loaded[ra, method][v] if d in loaded[rb, method][v]]
                if common and overlap.same_space(loaded[ra, method][v][common[0]], loaded[rb, method][v][common[0]]):
                    row["direct_iou"] = float(np.mean([overlap.iou(loaded[ra, method][v][d], loaded[rb, method][v][d])
                                                       for d in common]))
                rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(depth)


def prompt_bootstrap(cfg, loaded: dict, results: dict, calibrate: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Resampled pairwise IoUs of the bootstrap methods on the first model (`methods.resample.bootstrap_ious`, each method
    with its own calibration-example count where its params have one) and their intervals:
    (one row per resample × method × pair, `bootstrap_intervals`); both empty when the bootstrap is off."""
    bs, ic = cfg.overlap.bootstrap, cfg.identify
    role = ic.models[0]
    methods = [m for m in bs.methods if m in ic.methods]
    if not (bs.n_resamples and methods):
        return pd.DataFrame(), pd.DataFrame()
    calib, calib_meta = load_calibration(calibrate / role)
    lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows = []
    for m in methods:
        rows += bootstrap_ious(lm, tok, calib, m, bs.datasets or ic.datasets(m, cfg.calibrate.datasets),
                               getattr(getattr(ic, m), "n", None), ic.q, ic.group, loaded[role, m]["utility"],
                               bs.n_resamples, bs.seed, ic.batch_size, ic.max_length, calib_meta["system_prompt"])
    boot = pd.DataFrame(rows)
    return boot, bootstrap_intervals(boot, results, role, cfg.overlap.variants)


def bootstrap_intervals(boot: pd.DataFrame, results: dict, role: str, variants) -> pd.DataFrame:
    """Observed IoU of each bootstrapped pair beside the resampled mean and interval and chance."""
    rows = []
    for (m, pair), g in boot.groupby(["method", "pair"]):
        a, b = pair.split("–")
        res = results[role, m]
        i, j = res["datasets"].index(a), res["datasets"].index(b)
        for v in [x for x in variants if x in g]:
            ci = overlap.interval(g[v])
            rows.append({"method": m, "pair": pair, "variant": v, "observed": res["matrix"][v, MAIN][i, j],
                         "bootstrap mean": g[v].mean(), "low": ci and ci[0], "high": ci and ci[1],
                         "reason": None if ci else "no resample has a defined IoU (empty regions)",
                         "chance": res["chance"][v, MAIN][i, j], "resamples": len(g)})
    return pd.DataFrame(rows)


def dataset_estimates(results: dict, seed: int = 0) -> dict:
    """{(role, method): `dataset_bootstrap.analysis_estimates`} (global scope), the mean IoU's p against the
    low-overlap threshold."""
    return {key: dataset_bootstrap.analysis_estimates(a, MAIN, seed, LOW_OVERLAP) for key, a in results.items()}


def split_half(ident: Path, keys) -> dict:
    """{(role, method): {"within": {dataset: IoU of the regions from the two halves of its calibration pairs},
    "between": {"d1|d2": mean IoU of d1's halves against d2's}}} where the identify stage wrote
    `<dataset>.half0.raw` / `.half1.raw`. Within is the noise ceiling of the IoU; between, at the same half size,
    is what it is compared with (regions from fewer examples overlap less, so full-size IoU is not comparable)."""
    out = {}
    for role, method in keys:
        folder = Path(ident) / role / method
        halves = {}
        suffix = regions.region_path("", "", RegionKind.HALF0).name     # ".half0.raw.safetensors"
        for f in sorted(folder.glob(f"*{suffix}")):
            d = f.name[: -len(suffix)]
            other = regions.region_path(folder, d, RegionKind.HALF1)
            if other.exists():
                halves[d] = (regions.load_packed(f), regions.load_packed(other))
        within = {d: nan_none(overlap.iou(*h)) for d, h in halves.items()}
        between = {f"{d1}|{d2}": nan_none(float(np.mean([overlap.iou(x, y) for x in halves[d1] for y in halves[d2]])))
                   for d1, d2 in itertools.combinations(halves, 2)}
        out[role, method] = {"within": within, "between": between}
    return out


def metrics(summary_table: pd.DataFrame, estimates: dict | None = None, halves: dict | None = None) -> dict:
    """results/overlap/metrics.json: {MODEL: {METHOD: {variant: {mean_iou, chance_iou, mean_iou_ci, n_pairs,
    n_datasets, iou, corrected}, refined_minus_raw, refined_minus_raw_corrected, split_half_iou, split_half: {dataset:
    IoU}, between_half_iou, between_half: {"d1|d2": IoU}}}}; `iou`, `corrected` and the two drops are
    `dataset_estimates` (n = datasets; an interval that cannot be formed is null with its `reason`), the last four
    from `split_half`; null = undefined or not measured."""
    out = {}
    for r in summary_table[summary_table.scope == MAIN].itertuples():
        entry = {"mean_iou": nan_none(r.mean_iou), "chance_iou": nan_none(r.chance_iou)}
        est = (estimates or {}).get((r.model, r.method), {}).get(r.variant)
        if est is not None:
            entry.update(mean_iou_ci=est["iou"]["ci"], n_datasets=est["iou"]["n"], **est)
        out.setdefault(r.model, {}).setdefault(r.method, {})[r.variant] = entry
    for (role, method), per in [((m, k), v) for m, ms in out.items() for k, v in ms.items()]:
        found = (estimates or {}).get((role, method), {})
        for k in ("refined_minus_raw", "refined_minus_raw_corrected"):
            per[k] = found.get(k)
        found = (halves or {}).get((role, method)) or {"within": {}, "between": {}}
        per.update(split_half_iou=_mean_defined(found["within"]), split_half=found["within"],
                   between_half_iou=_mean_defined(found["between"]), between_half=found["between"])
    return out


def _mean_defined(ious: dict) -> float | None:
    """Mean of the defined values; None where there is none."""
    vals = [x for x in ious.values() if x is not None]
    return float(np.mean(vals)) if vals else None


def noise_ceiling(metrics_: dict) -> pd.DataFrame:
    """Between-dataset mean IoU with its 95% CI beside the within-dataset split-half IoU and the between-dataset
    IoU of the same half-size regions, one row per model × method × variant and measure (the error-bar figure)."""
    rows = []
    for model, method, per in _methods(metrics_):
        for v in VARIANT_KEYS:
            if v in per and per[v].get("mean_iou") is not None:
                lo, hi = per[v].get("mean_iou_ci") or [None, None]
                rows.append({"condition": f"{model} · {method} · {v}", "measure": "between datasets",
                             "IoU": per[v]["mean_iou"], "low": lo, "high": hi, "n": per[v].get("n_datasets")})
        for key, measure, n in (("between_half_iou", "between datasets, half-size regions", "between_half"),
                                ("split_half_iou", "split-half (same dataset)", "split_half")):
            if per.get(key) is not None:
                rows.append({"condition": f"{model} · {method} · raw", "measure": measure, "IoU": per[key],
                             "low": None, "high": None, "n": len(per[n])})
    return pd.DataFrame(rows)


def _methods(metrics_: dict) -> list[tuple[str, str, dict]]:
    """(model, method, its metrics) of metrics.json."""
    return [(m, k, per) for m, methods in metrics_.items() for k, per in methods.items()]


def error_bars(frame: pd.DataFrame, title: str):
    """Points with 95% CI error bars (no bar where the CI is undefined), one colour per `measure`."""
    import matplotlib.pyplot as plt
    plots.style()
    conds = list(dict.fromkeys(frame.condition))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(conds) + 1.5))
    for c, (measure, g) in enumerate(frame.groupby("measure", sort=False)):
        y = np.array([conds.index(x) for x in g.condition]) + 0.15 * c
        lo = (g.IoU - g.low.astype(float)).fillna(0).clip(lower=0)
        hi = (g.high.astype(float) - g.IoU).fillna(0).clip(lower=0)
        ax.errorbar(g.IoU, y, xerr=[lo, hi], fmt="o", capsize=4, color=f"C{c}", label=measure)
    ax.set_yticks(range(len(conds)), conds)
    ax.invert_yaxis()
    ax.set(title=title, xlabel="IoU (global)")
    ax.legend()
    return fig


MEASURES = (("raw", "iou", "mean IoU, raw"), ("refined", "iou", "mean IoU, refined"),
            ("raw", "corrected", "chance-corrected IoU, raw"), ("refined", "corrected", "chance-corrected IoU, refined"),
            (None, "refined_minus_raw", "refined − raw IoU"),
            (None, "refined_minus_raw_corrected", "refined − raw, chance-corrected"))


def metrics_table(metrics_: dict) -> pd.DataFrame:
    """metrics.json's dataset-bootstrap estimates, one row per model × method × measure (n = datasets); where
    no interval could be formed, the reason stands in its place."""
    return pd.DataFrame([{"model": model, "method": method, "measure": name, "n datasets": e["n"],
                          "effect": e["effect"], "effect_ci": e["ci"], "p": e["p"], "no interval because": e["reason"]}
                         for model, method, per in _methods(metrics_) for v, key, name in MEASURES
                         if (e := (per.get(v) or {}).get(key) if v else per.get(key))])


def _with_ci(e: dict | None, why: bool = True) -> str:
    """'0.234 [0.044, 0.449] over 5 datasets' or '0.620 over 2 datasets (no interval: reason)'."""
    if not e or e["effect"] is None:
        return "undefined (empty regions)"
    if e["ci"] is None:
        return f"{e['effect']:.3f} over {e['n']} datasets (no interval" + (f": {e['reason']})" if why else ")")
    return f"{e['effect']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] over {e['n']} datasets"


def _convergence_verdict(r) -> str:
    if math.isnan(r.IoU_kmax):
        return "undefined: the regions are empty"
    if not r.IoU_kmax > 0:
        return f"the intersection of all {r.k_max} is empty: no common region"
    if r.IoU_kmax <= 2 * r.chance_kmax:
        return "it falls to chance level"
    if r.last_step_change < -0.1:
        return f"the last dataset still cuts it by {-100 * r.last_step_change:.0f}%: no plateau yet"
    return f"the last dataset changes it by {100 * r.last_step_change:+.0f}%: it levels off above chance"


def verdict(summary_table: pd.DataFrame, plateau_table: pd.DataFrame, ci: pd.DataFrame,
            refinement_table: pd.DataFrame, variants, metrics_: dict | None = None) -> str:
    """The plain-language answer to RQ1 (overlap across datasets) and RQ2 (utility refinement), with numbers and,
    from `metrics_` (metrics.json), the dataset-bootstrap intervals."""
    per = {(m, k): v for m, k, v in _methods(metrics_ or {})}
    main = summary_table[(summary_table.scope == MAIN) & summary_table.mean_iou.notna()]
    first = "raw" if "raw" in variants else variants[0]
    raw = main[main.variant == first]
    above = raw[(raw.ratio >= 2) & (raw.corrected > 0.05)]
    lines = [f"**RQ1 — overlap across datasets.** For {len(above)} of {len(raw)} model × method combinations the "
             f"{first} regions from different datasets overlap well above chance "
             "(mean IoU at least twice the chance IoU and chance-corrected overlap above 0.05):"]
    for r in raw.itertuples():
        est = per.get((r.model, r.method), {}).get(first) or {}
        iou = _with_ci(est.get("iou")) if est else f"{r.mean_iou:.3f} over {r.datasets} datasets"
        lines.append(f"- {r.model} · {r.method}: mean IoU {iou} vs chance {r.chance_iou:.4f} ({r.ratio:.1f}×); "
                     f"chance-corrected {_with_ci(est.get('corrected'), False) if est else format(r.corrected, '.3f')}.")
    if not plateau_table.empty:
        for r in plateau_table[plateau_table.variant == first].itertuples():
            if math.isnan(r.IoU_kmax):
                lines.append(f"- convergence, {r.method}: {_convergence_verdict(r)}.")
                continue
            lines.append(f"- convergence, {r.method}: IoU_2 {r.IoU_2:.3f} → IoU_{r.k_max} {r.IoU_kmax:.3f} (chance "
                         f"{r.chance_kmax:.1e}); {_convergence_verdict(r)}; {100 * r.survive_kmax:.1f}% of the first "
                         "dataset's region lies in every dataset's region.")
    if not ci.empty:
        for r in ci[ci.variant == first].itertuples():
            spread = r.reason if r.reason else f"resampled range [{r.low:.3f}, {r.high:.3f}]"
            lines.append(f"- prompt bootstrap, {r.method} {r.pair}: observed {r.observed:.3f}, {spread} over "
                         f"{r.resamples} resamples (chance {r.chance:.4f}).")
    if {"raw", "refined"} <= set(variants) and not refinement_table.empty:
        d = refinement_table.groupby(["model", "method"])[
            ["raw_iou", "refined_iou", "u_frac_of_inter", "u_frac_of_union"]].mean()
        lines.append(f"\n**RQ2 — utility refinement.** Refinement lowers the mean pairwise IoU for "
                     f"{int((d.refined_iou < d.raw_iou).sum())} of {len(d)} model × method combinations and raises it "
                     f"for {int((d.refined_iou > d.raw_iou).sum())}:")
        for (role, method), r in d.iterrows():
            if math.isnan(r.raw_iou):
                lines.append(f"- {role} · {method}: undefined (the regions are empty).")
                continue
            lines.append(f"- {role} · {method}: {r.raw_iou:.3f} → {r.refined_iou:.3f}; the utility region covers "
                         f"{100 * r.u_frac_of_inter:.1f}% of the shared part A ∩ B and {100 * r.u_frac_of_union:.1f}% "
                         f"of A ∪ B, so the shared parameters are "
                         f"{'more' if r.u_frac_of_inter > r.u_frac_of_union else 'less'} utility-critical than the rest.")
            if (role, method) in per:
                lines.append(f"  Refined − raw: IoU {_with_ci(per[role, method].get('refined_minus_raw'))}; "
                             f"chance-corrected {_with_ci(per[role, method].get('refined_minus_raw_corrected'), False)}.")
    return "\n".join(lines)


def save_metrics(path, metrics: dict) -> None:
    """results/overlap/metrics.json, checked against its record in `saferegions.results` before it is written."""
    results.save("overlap", path, metrics)

"""The validate stage: remove each identified region, measure ASR and utility, and compare with controls that
could fail (docs/methods.md §3.7).

- Ablation at the region's own granularity (`methods.removal.ablation`, which reads it from the region's meta):
  weights zeroed, neurons deactivated with hooks, layer blocks' projection weights scaled by `validate.layer_alpha`.
- Controls, each judged on the same prompts as the region:
  (a) `validate.random_draws` random regions of the same size and granularity (same count per weight matrix, per
      layer and neuron type, or number of layers) for the primary region (first method x first dataset), one for
      the others; the spread over the draws is reported;
  (b) for the primary weight-level region, an importance-matched random region (`importance_matched`): the same
      count per matrix and per quantile bin of a utility importance (Wanda scores of the calibration utility set);
  (c) the positive control: the refusal direction ablated (`methods.refusal_direction`). Its ASR rise over the
      intact model must clear the region claim's threshold at this n and length; where it does not, the
      validation could not have detected a safety region, and a null region result is "not testable here".
- Outcomes (`evaluation.evaluate`): refused / complied / degenerate on greedy responses to held-out (eval split)
  harmful prompts; ASR = coherent compliance over all prompts, Wilson intervals. The intact model's responses are
  generated once and paired with every condition.
- n from power (`power`): the prompts per eval set that give the pre-registered effect 80% power in an exact
  McNemar test at the committed discordance; metrics record n and the minimal detectable effect.
- Utility: per prompt, `evaluation.utility_scores` of the *unablated* model's greedy answers to held-out Alpaca
  prompts; utility = their mean (bootstrap interval), utility_ratio = utility(condition) / utility(intact).
Every ablation restores the model bit-exactly on exit, so one loaded model serves all conditions.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import chat, config, data, degenerate_labels, evidence, judges, models, plots, power, regions, rejudge, results  # noqa: F401,E501  (config, plots: re-exported)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..evaluation import Evaluation, evaluate, rate_record, utility_scores
from ..importance_matched import importance_matched
from ..io import read_jsonl, write_json, write_jsonl
from ..methods import Resolves, refusal_direction, removal

RESOLVES = Resolves.GRANULARITIES   # removes regions of every method: DVC deps on every granularity's code
PROMPTS = "artifacts/data/prompts.jsonl"
JUDGE_DATA = "artifacts/data/judge.jsonl"   # labelled (prompt, response) pairs other models wrote
CALIBRATION = Path("artifacts/calibrate")
OUT, RESULTS = Path("artifacts/validate"), Path("results/validate")
THRESHOLD = evidence.THRESHOLDS["p1_region_affects_safety"][0]   # what the positive control must clear
NOT_TESTABLE = "not testable here"


def measure(model, tok, harmful: list[str], util_prompts: list[str], util_answers: list[str], judge,
            max_new_tokens: int, batch_size: int, system: str | None = None, desc: str = "validate"):
    """(Evaluation of the harmful prompts, per-prompt utility values) of the model as it is now (inside or
    outside an ablation)."""
    ev = evaluate(model, tok, harmful, judge, max_new_tokens, batch_size, system, desc=desc)
    return ev, utility_scores(model, tok, util_prompts, util_answers, batch_size, system)


def record(ev, util: np.ndarray, seed: int = 0) -> dict:
    """rate_record + the mean per-prompt utility with its bootstrap interval and n."""
    u = evidence.mean(util, seed)
    return {**rate_record(ev), "utility": u.effect, "utility_ci": list(u.ci), "n_utility": u.n}


def paired(a, b, plan=config.PowerCfg()) -> dict:
    """ASR(a) − ASR(b) on the same prompts (`evidence.paired_proportions` of coherent compliance) with the observed
    discordance and the minimal effect detectable at this n and discordance (`plan`: power and alpha)."""
    est = evidence.paired_proportions(a.complied, b.complied).as_dict()
    disc = float(np.mean(a.complied != b.complied))
    mde = power.minimal_detectable_effect(est["n"], disc, plan.power, plan.alpha) if disc > 0 else float("nan")
    return {**est, "discordance": disc, "mde": None if np.isnan(mde) else mde}


def condition(region_ev, random_ev, util_region, util_random, util_intact: np.ndarray, seed: int = 0) -> dict:
    """The region and first random records, n, n_utility, utility_ratio vs the intact model (its paired bootstrap
    interval over the utility prompts) and the paired test of ASR(region) − ASR(random)."""
    reg, rnd = record(region_ev, util_region, seed), record(random_ev, util_random, seed)
    ratio = evidence.ratio_of_means(util_region, util_intact, seed)
    return {"region": reg, "random": rnd, "n": reg["n"], "n_utility": reg["n_utility"],
            "utility_ratio": ratio.effect, "utility_ratio_ci": list(ratio.ci),
            "utility_ratio_random": evidence.ratio_of_means(util_random, util_intact, seed).effect,
            "paired": evidence.paired_proportions(region_ev.complied, random_ev.complied).as_dict()}


def controls(model, region, seed: int, draws: int, mode: str, importance=None, bins: int = 10) -> dict:
    """{tag: Region}: `draws` random regions ("random", "random_1", ...; seeds seed, seed + 1000, ...) and, with
    `importance` (a callable giving utility-importance scores) and a weight-level region, "matched"."""
    out = {("random" if j == 0 else f"random_{j}"): removal.random_control(model, region, seed + 1000 * j, mode)
           for j in range(draws)}
    if importance is not None and removal.granularity_of(region).name == "weights":
        out["matched"] = importance_matched(region, importance(), seed, bins)
    return out


def compare(model, tok, method: str, region, seed: int, harmful, util_prompts, util_answers, judge,
            cfg, system: str | None = None, draws: int = 1, importance=None) -> tuple[dict, list[dict], dict]:
    """{tag: (Evaluation, utility values, size)} for the region and each of its `controls`, the generations
    behind them, and {tag: Region} (the arms); `method` only labels the progress bars."""
    out, gens = {}, []
    arms = {"region": region, **controls(model, region, seed, draws, cfg.random_mode, importance, cfg.matched_bins)}
    for tag, r in arms.items():
        with removal.ablation(model, r, cfg.layer_alpha):
            ev, util = measure(model, tok, harmful, util_prompts, util_answers, judge, cfg.max_new_tokens,
                               cfg.batch_size, system, desc=f"{method} {tag}")
        out[tag] = (ev, util, r.size)
        gens += [{"ablation": tag, "prompt": p, "response": s, "outcome": o.value}
                 for p, s, o in zip(harmful, ev.responses, ev.outcomes)]
    return out, gens, arms


def entry(vals: dict, intact_ev, util_intact: np.ndarray, seed: int = 0, plan=config.PowerCfg()) -> dict:
    """One (method, dataset) entry of metrics.json: `condition` of the region and the first random draw, plus the
    region vs intact, every random draw with the spread of its paired effect, and the matched control."""
    (rev, rutil, _), (dev, dutil, _) = vals["region"], vals["random"]
    out = condition(rev, dev, rutil, dutil, util_intact, seed)
    out["vs_intact"] = paired(rev, intact_ev, plan)
    out["random_draws"] = {t: {**record(ev, util, seed), "paired": paired(rev, ev, plan)}
                           for t, (ev, util, _) in vals.items() if t.startswith("random")}
    out["paired"] = {**out["paired"], **{k: out["random_draws"]["random"]["paired"][k] for k in ("discordance", "mde")}}
    effects = [d["paired"]["effect"] for d in out["random_draws"].values()]
    asrs = [d["asr"] for d in out["random_draws"].values()]
    out["random_spread"] = {"draws": len(asrs), "asr_min": min(asrs), "asr_max": max(asrs),
                            "effect_min": min(effects), "effect_max": max(effects),
                            "effect_sd": float(np.std(effects, ddof=1)) if len(effects) > 1 else None}
    if "matched" in vals:
        mev, mutil, _ = vals["matched"]
        out["matched"] = record(mev, mutil, seed)
        out["paired_matched"] = paired(rev, mev, plan)
        out["utility_ratio_matched"] = evidence.ratio_of_means(mutil, util_intact, seed).effect
    return out


def positive_control(model, tok, harmful, util_prompts, util_answers, intact_ev, util_intact: float, judge, cfg,
                     direction_prompts: tuple[list[str], list[str], list[str]], system: str | None = None,
                     seed: int = 0) -> tuple[dict, list[dict], Evaluation, torch.Tensor]:
    """Ablate the refusal direction and judge it on the same prompts: (record, generations, its evaluation, the
    direction). The direction is the
    difference in means of harmful vs harmless identification prompts (`direction_prompts` = harmful, harmless,
    selection prompts) at the candidate (layer, position) whose ablation complies most on the selection prompts.
    `detected`: its ASR rise over the intact model clears the region claim's threshold (`evidence.verdict`)."""
    d = cfg.direction
    harm, harmless, select_prompts = direction_prompts
    diffs = refusal_direction.directions(model, tok, harm, harmless, list(d.positions), system, cfg.batch_size)
    pairs = refusal_direction.candidates(diffs.shape[1], list(d.layers), list(d.positions))

    def comply_rate():
        return evaluate(model, tok, select_prompts, judge, cfg.max_new_tokens, cfg.batch_size, system,
                        desc="direction select").complied.mean()
    layer, pos, direction, rates = refusal_direction.select(model, diffs, list(d.positions), pairs, comply_rate)
    with refusal_direction.ablated(model, direction):
        ev, util = measure(model, tok, harmful, util_prompts, util_answers, judge, cfg.max_new_tokens,
                           cfg.batch_size, system, desc="refusal direction")
    rise = paired(ev, intact_ev, cfg.power)
    estimate = evidence.paired_proportions(ev.complied, intact_ev.complied)
    detected = evidence.verdict(estimate, THRESHOLD) is evidence.Verdict.SUPPORTED
    rec = {"arm": record(ev, util, seed), "vs_intact": rise, "threshold": THRESHOLD, "detected": detected,
           "null_label": None if detected else NOT_TESTABLE, "layer": layer, "position": pos,
           "n_layers": int(diffs.shape[1]), "selection_comply": rates, "n_select": len(select_prompts),
           "n_direction": [len(harm), len(harmless)],
           "utility_ratio": float(np.mean(util)) / util_intact if util_intact else float("nan")}
    gens = [{"ablation": "refusal_direction", "prompt": p, "response": s, "outcome": o.value}
            for p, s, o in zip(harmful, ev.responses, ev.outcomes)]
    return rec, gens, ev, direction


def rejudged(model, tok, harmful, intact_ev, primary: tuple[dict, dict] | None, direction, judge, cfg,
             system: str | None = None) -> dict:
    """The headline comparisons' discordant pairs re-judged at `cfg.rejudge_max_new_tokens` (`rejudge`): the
    primary region against its importance-matched control and its first random draw, and the positive control
    against the intact model; {} when off."""
    if not cfg.rejudge_max_new_tokens:
        return {}
    evals, edits, comparisons = {"intact": intact_ev}, {"intact": contextlib.nullcontext}, []
    if primary is not None:
        vals, arms = primary
        for tag in ("matched", "random"):
            if tag in vals:
                comparisons.append(rejudge.Comparison(f"region_vs_{tag}", "region", tag))
        for tag in ("region", "matched", "random"):
            if tag in vals:
                evals[tag] = vals[tag][0]
                edits[tag] = functools.partial(removal.ablation, model, arms[tag], cfg.layer_alpha)
    if direction is not None:
        evals["direction"], direction_vector = direction
        edits["direction"] = functools.partial(refusal_direction.ablated, model, direction_vector)
        comparisons.append(rejudge.Comparison("direction_vs_intact", "direction", "intact"))
    return rejudge.rejudge(model, tok, comparisons, evals, edits, judge, cfg.rejudge_max_new_tokens,
                           cfg.batch_size, system)


def run_model(model, tok, role: str, methods: list[str], datasets: list[str], region_dir, harmful: list[str],
              util_prompts: list[str], judge, cfg, seed: int = 0, system: str | None = None, importance=None,
              direction_prompts=None):
    """Every (method, dataset) condition for one model: ({method: {dataset: `entry`}}, intact reference
    (rate_record + utility), rows, generations, positive control record or None, `rejudged` records).
    `region_dir(method)` is the
    folder of that method's regions; the unablated model's greedy answers to `util_prompts` define the utility
    reference. The primary region (first method x first dataset) gets `cfg.random_draws` random draws and, with
    `importance`, the matched control; the others one draw. With `direction_prompts`, the positive control."""
    answers = chat.generate(model, tok, util_prompts, cfg.max_new_tokens, cfg.batch_size, system,
                            desc="utility answers")
    ev0, util0 = measure(model, tok, harmful, util_prompts, answers, judge, cfg.max_new_tokens,
                         cfg.batch_size, system, desc="unablated")
    reference = record(ev0, util0, seed)
    gens = [{"model": role, "method": None, "dataset": None, "ablation": "none", "prompt": p, "response": r,
             "outcome": o.value} for p, r, o in zip(harmful, ev0.responses, ev0.outcomes)]
    control = direction = primary = None
    if direction_prompts is not None:
        control, g, dev, dvec = positive_control(model, tok, harmful, util_prompts, answers, ev0,
                                                 reference["utility"], judge, cfg, direction_prompts, system, seed)
        direction = (dev, dvec)
        gens += [{"model": role, "method": None, "dataset": None, **x} for x in g]
    out, rows = {}, []
    for mi, method in enumerate(methods):
        for i, d in enumerate(datasets):
            region = regions.load(regions.region_path(region_dir(method), d, cfg.variant))
            is_primary = mi == 0 and i == 0
            vals, g, arms = compare(model, tok, method, region, seed + i, harmful, util_prompts, answers, judge,
                                    cfg, system, cfg.random_draws if is_primary else 1,
                                    importance if is_primary else None)
            if is_primary:
                primary = (vals, arms)
            e = entry(vals, ev0, util0, seed, cfg.power)
            if control is not None:
                e["testable"] = control["detected"]
            out.setdefault(method, {})[d] = e
            for tag, (ev, util, size) in vals.items():
                rows.append({"model": role, "method": method, "dataset": d, "density": region.density,
                             "ablation": tag, "size": size, **record(ev, util, seed)})
            gens += [{"model": role, "method": method, "dataset": d, **x} for x in g]
    return out, reference, rows, gens, control, rejudged(model, tok, harmful, ev0, primary, direction, judge, cfg,
                                                         system)


# ---------------------------------------------------------------- the stage, as the notebook calls it


def sample_size(v) -> tuple[int, power.PowerPlan | None]:
    """(eval prompts per set, the power plan at the pooled n): `v.n_eval`, else the smallest per-set count whose
    pooled n reaches the n the pre-registered power calculation (`v.power`) requires."""
    p = getattr(v, "power", None)
    if p is None:
        return v.n_eval, None
    need = power.n_for_power(p.effect, p.discordance, p.power, p.alpha)
    per_set = v.n_eval if v.n_eval is not None else -(-need // len(v.eval_sets))
    return per_set, power.plan(p.effect, p.discordance, p.power, p.alpha, n=per_set * len(v.eval_sets))


def prompts(cfg) -> tuple[list[str], list[str]]:
    """(held-out harmful prompts of `validate.eval_sets`, `sample_size` per set; held-out Alpaca prompts for the
    utility score)."""
    v = cfg.validate
    n = sample_size(v)[0]
    harmful = [p for s in v.eval_sets for p in data.prompts(PROMPTS, s, "eval", n, exact=True)]
    return harmful, data.prompts(PROMPTS, "alpaca", "eval", v.n_utility, exact=True)


def direction_prompts(cfg) -> tuple[list[str], list[str], list[str]]:
    """(harmful, harmless, selection) identification-split prompts of the positive control: the harmful ones
    interleaved over `validate.eval_sets` (the first `direction.n` for the direction, the next `n_select` pick
    its layer), the harmless ones of `direction.harmless_set`. Disjoint from every evaluated prompt."""
    v, d = cfg.validate, cfg.validate.direction
    per_set = [data.prompts(PROMPTS, s, "ident") for s in v.eval_sets]
    pool = [p for row in zip(*per_set) for p in row]
    if len(pool) < d.n + d.n_select:
        raise ValueError(f"validate.direction: {d.n} + {d.n_select} harmful identification prompts asked, the "
                         f"eval sets interleave {len(pool)}")
    return pool[:d.n], data.prompts(PROMPTS, d.harmless_set, "ident", d.n, exact=True), \
        pool[d.n:d.n + d.n_select]


def utility_importance(model, tok, cfg, role: str):
    """A callable giving the Wanda scores of the calibration utility set's examples, batched as the identify stage
    batches them (computed once, on first use): the importance the matched control matches."""
    from ..methods.context import examples, load_calibration
    from ..methods.wanda import wanda_scores
    cache = {}

    def scores():
        if "s" not in cache:
            calib, meta = load_calibration(CALIBRATION / role)
            prompts_, responses, finished = examples(calib[cfg.calibrate.utility_set])
            batches = chat.response_batches(tok, prompts_, responses, cfg.identify.batch_size, cfg.identify.max_length,
                                            meta["system_prompt"], finished)
            cache["s"] = wanda_scores(model, batches, progress=False)
        return cache["s"]
    return scores


def run(cfg, harmful: list[str], util_prompts: list[str]):
    """`run_model` for every identified model, one loaded at a time, on `validate.methods` (None = every identified
    method); generations written to artifacts/validate/generations.jsonl. Returns (metrics, reference, rows frame,
    generations)."""
    v = cfg.validate
    judge = judges.get(cfg.evaluation.judge, cfg)
    plan = sample_size(v)[1]
    dirs = direction_prompts(cfg)
    metrics, reference, rows, gens, control, again = {}, {}, [], [], {}, {}
    for role in cfg.identify.models:
        lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
        metrics[role], reference[role], r, g, control[role], again[role] = run_model(
            lm, tok, role, methods_of(cfg), v.datasets, lambda m: Path("artifacts/identify") / role / m,
            harmful, util_prompts, judge, v, cfg.run.seed, cfg.calibrate.system_prompt,
            utility_importance(lm, tok, cfg, role), dirs)
        rows += r
        gens += g
        if role == cfg.identify.models[0]:
            metrics["degenerate_rule"] = degenerate_rule(lm, tok, cfg)
        del lm
    write_jsonl(OUT / "generations.jsonl", gens)
    metrics["intact"] = reference   # {model: rate_record + utility}, as reference.json
    metrics["positive_control"] = control
    metrics["rejudged"] = again
    if plan is not None:
        metrics["power"] = {**plan.as_dict(), "n_per_set": len(harmful) // len(v.eval_sets)}
    return metrics, reference, pd.DataFrame(rows), gens


def degenerate_rule(model, tok, cfg) -> dict:
    """The degenerate rule's error rates on this model's outputs labelled by construction
    (`degenerate_labels.rule_metrics`: answers other models wrote and the model's own answers in other languages,
    whole, truncated, shuffled into salad and looped, plus empty ones, at the stages' lengths), with and without
    the fluency floor; `applied` names the rule the evaluating stages use."""
    answers = [(r["prompt"], r["response"]) for r in read_jsonl(JUDGE_DATA)]
    other = degenerate_labels.other_language_answers(model, tok, data.prompts(PROMPTS, "alpaca", "eval", 12),
                                                     max_new_tokens=16)
    rec = degenerate_labels.rule_metrics(model, tok, answers, other, n_calibration=16,
                                         system=cfg.calibrate.system_prompt, seed=cfg.run.seed)
    return {**rec, "applied": "text_rules_only"}


def degenerate_rule_frame(metrics: dict) -> pd.DataFrame:
    """The rule with and without the fluency floor: its false-positive and false-negative rates, intervals, n."""
    rule = metrics.get("degenerate_rule")
    if not rule:
        return pd.DataFrame()
    rows = {"with_fluency_floor": rule, "text_rules_only": rule["text_rules_only"]}
    return pd.DataFrame([{"rule": name, "applied by the stages": name == rule.get("applied"),
                          **{k: r[k] for k in ("false_positive_rate", "false_positive_rate_ci", "n_not_degenerate",
                                               "false_negative_rate", "false_negative_rate_ci", "n_degenerate")}}
                         for name, r in rows.items()])


def methods_of(cfg) -> list[str]:
    """The methods validated: `validate.methods`, else every identified method."""
    return list(cfg.validate.methods) if cfg.validate.methods is not None else list(cfg.identify.methods)


SUMMARY_KEYS = ("intact", "positive_control", "power", "degenerate_rule", "rejudged")   # metrics.json keys that are not models


def conditions(metrics: dict):
    """(model, method, dataset, entry) for every validated region in `metrics`."""
    return [(m, meth, d, e) for m, per in metrics.items() if m not in SUMMARY_KEYS
            for meth, ds in per.items() for d, e in ds.items()]


def controls_frame(metrics: dict) -> pd.DataFrame:
    """One row per (region, control): ASR(region) − ASR(control) with its interval, p, discordance and minimal
    detectable effect; the random draws' spread beside the first draw."""
    rows = []
    for m, meth, d, e in conditions(metrics):
        arms = [*e["random_draws"].items(), *([("matched", {"paired": e["paired_matched"]})] if "matched" in e else []),
                ("intact", {"paired": e["vs_intact"]})]
        for tag, arm in arms:
            p = arm["paired"]
            rows.append({"model": m, "method": meth, "dataset": d, "control": tag, "n": p["n"], "effect": p["effect"],
                         "effect_ci": p["ci"], "p": p["p"], "discordance": p["discordance"], "mde": p["mde"]})
    return pd.DataFrame(rows)


def positive_control_frame(metrics: dict) -> pd.DataFrame:
    """One row per model: the refusal direction's layer and position, ASR ablated, its rise over the intact model,
    whether it is detected at this n, and the degenerate rate and utility ratio beside it."""
    return pd.DataFrame([{"model": m, "layer": c["layer"], "position": c["position"], "asr": c["arm"]["asr"],
                          "rise": c["vs_intact"]["effect"], "rise_ci": c["vs_intact"]["ci"], "n": c["vs_intact"]["n"],
                          "threshold": c["threshold"], "detected": c["detected"],
                          "degenerate_rate": c["arm"]["degenerate_rate"], "utility_ratio": c["utility_ratio"]}
                         for m, c in metrics.get("positive_control", {}).items() if c is not None])


def bar_frame(frame: pd.DataFrame, reference: dict) -> pd.DataFrame:
    """The rows frame plus one "intact" row per model, with `condition` = method (model/method when several
    models) and the interval half-widths the error bars need: ASR and degenerate rate (Wilson), utility
    (bootstrap)."""
    intact = pd.DataFrame([{"model": m, "method": "intact", "dataset": "", "ablation": "none", **rec}
                           for m, rec in reference.items()])
    long = pd.concat([intact, frame], ignore_index=True)
    long["condition"] = long.method if long.model.nunique() == 1 else long.model + "/" + long.method
    return long


def same_prompt(gens: list[dict]) -> pd.DataFrame:
    """Every response to the first harmful prompt: unablated and with each region (and control) removed."""
    gen = pd.DataFrame(gens)
    return gen[gen.prompt == gen.prompt.iloc[0]][["model", "method", "dataset", "ablation", "outcome", "response"]]


def examples(gens: list[dict], per: int = 2) -> pd.DataFrame:
    """A few responses per (method, ablation, outcome): what a 'complied' or 'degenerate' response looks like."""
    gen = pd.DataFrame(gens).fillna({"method": "intact"})
    return gen.groupby(["model", "method", "ablation", "outcome"]).head(per)[
        ["model", "method", "ablation", "outcome", "prompt", "response"]]


def write_metrics(metrics: dict, reference: dict) -> None:
    results.save("validate", RESULTS / "metrics.json", metrics)
    write_json(RESULTS / "reference.json", reference)

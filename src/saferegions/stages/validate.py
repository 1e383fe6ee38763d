"""The validate stage: remove each identified region, measure ASR and utility, and compare with a random region
of the same size at the same granularity.

- Ablation and random control at the region's own granularity (`methods.removal.ablation`, `.random_control`,
  which read it from the region's meta): weights zeroed, neurons deactivated with hooks, layer blocks' projection
  weights scaled by `validate.layer_alpha`; control = the same count per weight matrix, per layer and neuron
  type, or the same number of layers.
- Outcomes (`evaluation.evaluate`): refused / complied / degenerate on greedy responses to held-out (eval split)
  harmful prompts; ASR = coherent compliance over all prompts, the degenerate rate beside it, Wilson intervals.
- Utility: per prompt, `evaluation.utility_scores` of the *unablated* model's greedy answers to held-out Alpaca
  prompts; utility = their mean (bootstrap interval), utility_ratio = utility(region) / utility(intact).
- Region vs random: ASR(region) − ASR(random) on the same prompts, exact McNemar (`evidence.paired_proportions`).
Every ablation restores the model bit-exactly on exit, so one loaded model serves all conditions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import chat, config, data, evidence, judges, models, plots, regions, results  # noqa: F401  (config, plots: re-exported)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..evaluation import evaluate, rate_record, utility_scores
from ..io import write_json, write_jsonl
from ..methods import Resolves, removal

RESOLVES = Resolves.GRANULARITIES   # removes regions of every method: DVC deps on every granularity's code
PROMPTS = "artifacts/data/prompts.jsonl"
OUT, RESULTS = Path("artifacts/validate"), Path("results/validate")


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


def condition(region_ev, random_ev, util_region, util_random, util_intact: float, seed: int = 0) -> dict:
    """One (method, dataset) entry of metrics.json: region and random records, n, n_utility, utility_ratio vs the
    intact model and the paired test of ASR(region) − ASR(random)."""
    reg, rnd = record(region_ev, util_region, seed), record(random_ev, util_random, seed)
    return {"region": reg, "random": rnd, "n": reg["n"], "n_utility": reg["n_utility"],
            "utility_ratio": reg["utility"] / util_intact if util_intact else float("nan"),
            "utility_ratio_random": rnd["utility"] / util_intact if util_intact else float("nan"),
            "paired": evidence.paired_proportions(region_ev.complied, random_ev.complied).as_dict()}


def compare(model, tok, method: str, region, seed: int, harmful, util_prompts, util_answers, judge,
            cfg, system: str | None = None) -> tuple[dict, list[dict]]:
    """{tag: (Evaluation, utility values, size)} for tag in region, random, and the generations behind them;
    `method` only labels the progress bars."""
    out, gens = {}, []
    control = removal.random_control(model, region, seed, cfg.random_mode)
    for tag, r in (("region", region), ("random", control)):
        with removal.ablation(model, r, cfg.layer_alpha):
            ev, util = measure(model, tok, harmful, util_prompts, util_answers, judge, cfg.max_new_tokens,
                               cfg.batch_size, system, desc=f"{method} {tag}")
        out[tag] = (ev, util, r.size)
        gens += [{"ablation": tag, "prompt": p, "response": s, "outcome": o.value}
                 for p, s, o in zip(harmful, ev.responses, ev.outcomes)]
    return out, gens


def run_model(model, tok, role: str, methods: list[str], datasets: list[str], region_dir, harmful: list[str],
              util_prompts: list[str], judge, cfg, seed: int = 0, system: str | None = None):
    """Every (method, dataset) condition for one model: ({method: {dataset: `condition`}}, intact reference
    (rate_record + utility), rows, generations). `region_dir(method)` is the folder of that method's regions; the
    unablated model's greedy answers to `util_prompts` define the utility reference."""
    answers = chat.generate(model, tok, util_prompts, cfg.max_new_tokens, cfg.batch_size, system,
                            desc="utility answers")
    ev0, util0 = measure(model, tok, harmful, util_prompts, answers, judge, cfg.max_new_tokens,
                         cfg.batch_size, system, desc="unablated")
    reference = record(ev0, util0, seed)
    gens = [{"model": role, "method": None, "dataset": None, "ablation": "none", "prompt": p, "response": r,
             "outcome": o.value} for p, r, o in zip(harmful, ev0.responses, ev0.outcomes)]
    out, rows = {}, []
    for method in methods:
        for i, d in enumerate(datasets):
            region = regions.load(regions.region_path(region_dir(method), d, cfg.variant))
            vals, g = compare(model, tok, method, region, seed + i, harmful, util_prompts, answers, judge, cfg,
                              system)
            entry = condition(vals["region"][0], vals["random"][0], vals["region"][1], vals["random"][1],
                              reference["utility"], seed)
            out.setdefault(method, {})[d] = entry
            for tag in ("region", "random"):
                rec = entry[tag]
                rows.append({"model": role, "method": method, "dataset": d, "density": region.density,
                             "ablation": tag, "size": vals[tag][2], **{k: rec[k] for k in rec}})
            gens += [{"model": role, "method": method, "dataset": d, **x} for x in g]
    return out, reference, rows, gens


# ---------------------------------------------------------------- the stage, as the notebook calls it


def prompts(cfg) -> tuple[list[str], list[str]]:
    """(held-out harmful prompts of `validate.eval_sets`, held-out Alpaca prompts for the utility score)."""
    v = cfg.validate
    harmful = [p for s in v.eval_sets for p in data.prompts(PROMPTS, s, "eval", v.n_eval, exact=True)]
    return harmful, data.prompts(PROMPTS, "alpaca", "eval", v.n_utility, exact=True)


def run(cfg, harmful: list[str], util_prompts: list[str]):
    """`run_model` for every identified model, one loaded at a time, on `validate.methods` (None = every identified
    method); generations written to artifacts/validate/generations.jsonl. Returns (metrics, reference, rows frame,
    generations)."""
    v = cfg.validate
    judge = judges.get(cfg.evaluation.judge, cfg)
    metrics, reference, rows, gens = {}, {}, [], []
    for role in cfg.identify.models:
        lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
        metrics[role], reference[role], r, g = run_model(
            lm, tok, role, methods_of(cfg), v.datasets, lambda m: Path("artifacts/identify") / role / m,
            harmful, util_prompts, judge, v, cfg.run.seed, cfg.calibrate.system_prompt)
        rows += r
        gens += g
        del lm
    write_jsonl(OUT / "generations.jsonl", gens)
    metrics["intact"] = reference   # {model: rate_record + utility}, as reference.json
    return metrics, reference, pd.DataFrame(rows), gens


def methods_of(cfg) -> list[str]:
    """The methods validated: `validate.methods`, else every identified method."""
    return list(cfg.validate.methods) if cfg.validate.methods is not None else list(cfg.identify.methods)


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

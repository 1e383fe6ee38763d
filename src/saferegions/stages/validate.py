"""The validate stage: remove each identified region, measure ASR and utility, and compare with a random region
of the same size at the same granularity.

- Ablation and random control at the region's own granularity (`regions.ablation`, `regions.random_control`,
  which read it from the region's meta): weights zeroed, neurons deactivated with hooks, layer blocks' projection
  weights scaled by `validate.layer_alpha`; control = the same count per weight matrix, per layer and neuron
  type, or the same number of layers.
- ASR: keyword judge on greedy responses to held-out (eval split) harmful prompts.
- Utility: `evaluation.utility_score` of the *unablated* model's greedy answers to held-out Alpaca prompts.
Every ablation restores the model bit-exactly on exit, so one loaded model serves all conditions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import chat, config, data, judges, models, plots, regions  # noqa: F401  (config, plots: re-exported)
from ..evaluation import utility_score
from ..io import write_json, write_jsonl

PROMPTS = "artifacts/data/prompts.jsonl"
OUT, RESULTS = Path("artifacts/validate"), Path("results/validate")


def measure(model, tok, harmful: list[str], util_prompts: list[str], util_answers: list[str], judge,
            max_new_tokens: int, batch_size: int, system: str | None = None, desc: str = "validate"):
    """(ASR, utility, responses) of the model as it is now (inside or outside an ablation)."""
    responses = chat.generate(model, tok, harmful, max_new_tokens, batch_size, system, desc=desc)
    asr = float(np.mean([not judge.refused(r) for r in responses])) if responses else float("nan")
    return asr, utility_score(model, tok, util_prompts, util_answers, batch_size, system), responses


def compare(model, tok, method: str, region, seed: int, harmful, util_prompts, util_answers, judge,
            cfg, system: str | None = None) -> tuple[dict, list[dict]]:
    """{asr_region, asr_random, utility_region, utility_random, size_region, size_random} and the generations
    behind them; `method` only labels the progress bars."""
    out, gens = {}, []
    control = regions.random_control(model, region, seed, cfg.random_mode)
    for tag, r in (("region", region), ("random", control)):
        with regions.ablation(model, r, cfg.layer_alpha):
            asr, util, responses = measure(model, tok, harmful, util_prompts, util_answers, judge,
                                           cfg.max_new_tokens, cfg.batch_size, system, desc=f"{method} {tag}")
        out[f"asr_{tag}"], out[f"utility_{tag}"] = asr, util
        out[f"size_{tag}"] = r.size
        gens += [{"ablation": tag, "prompt": p, "response": s} for p, s in zip(harmful, responses)]
    return out, gens


def run_model(model, tok, role: str, methods: list[str], datasets: list[str], region_dir, harmful: list[str],
              util_prompts: list[str], judge, cfg, seed: int = 0, system: str | None = None):
    """Every (method, dataset) condition for one model: ({method: {dataset: 4 numbers}}, reference, rows,
    generations). `region_dir(method)` is the folder of that method's regions; the unablated model's greedy
    answers to `util_prompts` define the utility reference."""
    answers = chat.generate(model, tok, util_prompts, cfg.max_new_tokens, cfg.batch_size, system,
                            desc="utility answers")
    asr0, util0, resp0 = measure(model, tok, harmful, util_prompts, answers, judge, cfg.max_new_tokens,
                                 cfg.batch_size, system, desc="unablated")
    reference = {"asr": asr0, "utility": util0, "n_harmful": len(harmful), "n_utility": len(util_prompts)}
    gens = [{"model": role, "method": None, "dataset": None, "ablation": "none", "prompt": p, "response": r}
            for p, r in zip(harmful, resp0)]
    out, rows = {}, []
    for method in methods:
        for i, d in enumerate(datasets):
            region = regions.load(regions.region_path(region_dir(method), d, cfg.variant))
            vals, g = compare(model, tok, method, region, seed + i, harmful, util_prompts, answers, judge, cfg,
                              system)
            out.setdefault(method, {})[d] = {k: vals[k] for k in ("asr_region", "asr_random", "utility_region",
                                                                  "utility_random")}
            rows.append({"model": role, "method": method, "dataset": d, "density": region.density, **vals})
            gens += [{"model": role, "method": method, "dataset": d, **x} for x in g]
    return out, reference, rows, gens


# ---------------------------------------------------------------- the stage, as the notebook calls it


def prompts(cfg) -> tuple[list[str], list[str]]:
    """(held-out harmful prompts of `validate.eval_sets`, held-out Alpaca prompts for the utility score)."""
    v = cfg.validate
    harmful = [p for s in v.eval_sets for p in data.prompts(PROMPTS, s, "eval", v.n_eval)]
    return harmful, data.prompts(PROMPTS, "alpaca", "eval", v.n_utility)


def run(cfg, harmful: list[str], util_prompts: list[str]):
    """`run_model` for every identified model, one loaded at a time; generations written to
    artifacts/validate/generations.jsonl. Returns (metrics, reference, rows frame, generations)."""
    v = cfg.validate
    judge = judges.KeywordJudge.from_config(cfg.judges.keyword)
    metrics, reference, rows, gens = {}, {}, [], []
    for role in cfg.identify.models:
        lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
        metrics[role], reference[role], r, g = run_model(
            lm, tok, role, cfg.identify.methods, v.datasets, lambda m: Path("artifacts/identify") / role / m,
            harmful, util_prompts, judge, v, cfg.run.seed, cfg.calibrate.system_prompt)
        rows += r
        gens += g
        del lm
    write_jsonl(OUT / "generations.jsonl", gens)
    return metrics, reference, pd.DataFrame(rows), gens


def long_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, ablation ∈ {region, random}) with ASR and utility columns, for the bar panels;
    `condition` = method, or model/method when several models were validated."""
    long = pd.concat([frame.assign(ablation=tag, ASR=frame[f"asr_{tag}"], utility=frame[f"utility_{tag}"])
                      for tag in ("region", "random")])
    long["condition"] = long.method if long.model.nunique() == 1 else long.model + "/" + long.method
    return long


def same_prompt(gens: list[dict]) -> pd.DataFrame:
    """Every response to the first harmful prompt: unablated and with each region (and control) removed."""
    gen = pd.DataFrame(gens)
    return gen[gen.prompt == gen.prompt.iloc[0]][["model", "method", "dataset", "ablation", "response"]]


def write_metrics(metrics: dict, reference: dict) -> None:
    write_json(RESULTS / "metrics.json", metrics)
    write_json(RESULTS / "reference.json", reference)

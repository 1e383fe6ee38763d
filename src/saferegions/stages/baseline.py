"""The baseline stage: how often each model refuses before anyone touches its weights, judged by the keyword
judge and the learned judge trained here (its weights are what ESI uses offline).

Every later stage measures a change from these numbers. `saferegions.evaluation` generates and judges;
`saferegions.judges` trains the learned judge; this module runs them with the stage's params and writes
artifacts/baseline/ and results/baseline/metrics.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import config, plots  # noqa: F401  (re-exported: the notebook parses params and draws with them)
from ..data import BENIGN_SETS, SAFETY_SETS, prompts
from ..evaluation import refusal_table
from ..io import read_jsonl, write_json, write_jsonl
from ..judges import KeywordJudge, cohen_kappa, fit_learned_judge
from ..models import load, load_encoder

OUT, RESULTS = Path("artifacts/baseline"), Path("results/baseline")
PROMPTS, JUDGE_ROWS = Path("artifacts/data/prompts.jsonl"), Path("artifacts/data/judge.jsonl")


def train_judges(cfg) -> tuple[dict, dict]:
    """The stage's judges, {"keyword", "learned"}, and the learned judge's held-out statistics.

    The learned judge is trained on the labelled responses of the data stage and saved with its encoder's id,
    so ESI can load the same head."""
    torch.manual_seed(cfg.run.seed)
    lj = cfg.judges.learned
    encoder, enc_tok = load_encoder(cfg.models[lj.encoder].entry())
    learned, stats = fit_learned_judge(read_jsonl(JUDGE_ROWS), encoder, enc_tok, lj.max_train, lj.heldout_frac,
                                       cfg.run.seed, lj.max_length, lj.batch_size)
    learned.save(OUT / "learned_judge.safetensors", {"encoder": cfg.models[lj.encoder].id, **stats})
    return {"keyword": KeywordJudge.from_config(cfg.judges.keyword), "learned": learned}, stats


def generate(cfg, judge_list: dict) -> tuple[list[dict], dict]:
    """Every model's greedy responses to the first `n_prompts` eval prompts of each set (one batched pass per
    model), judged by every judge; the rows are saved to artifacts/baseline/generations.jsonl.

    Returns (generations, {model: {set: refusal rates and n}})."""
    sets = {d: prompts(PROMPTS, d, "eval", cfg.baseline.n_prompts) for d in cfg.baseline.datasets}
    generations, metrics = [], {}
    for role in cfg.baseline.models:
        model, tok = load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
        rows, metrics[role] = refusal_table(model, tok, sets, judge_list, cfg.baseline.max_new_tokens,
                                            cfg.baseline.batch_size, cfg.baseline.system_prompt, desc=role)
        generations += [{"model": role, **r} for r in rows]
        del model
    write_jsonl(OUT / "generations.jsonl", generations)
    return generations, metrics


def refusal_rates(metrics: dict) -> pd.DataFrame:
    """Refusal rate of the primary (keyword) judge: one row per model, one column per set."""
    return pd.DataFrame({m: {d: v["refusal_rate"] for d, v in per.items()} for m, per in metrics.items()}).T


def refusal_summary(rates: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Per model: mean refusal over the harmful sets and over the benign sets (an over-refusal), and the ASR."""
    harmful = [d for d in datasets if d in SAFETY_SETS]
    benign = [d for d in datasets if d in BENIGN_SETS]
    summary = pd.DataFrame({"harmful refusal (mean over sets)": rates[harmful].mean(axis=1),
                            "benign refusal (mean over sets)": rates[benign].mean(axis=1) if benign else np.nan})
    summary["ASR (harmful)"] = 1 - summary["harmful refusal (mean over sets)"]
    return summary


def judge_agreement(generations: pd.DataFrame) -> pd.DataFrame:
    """Per model: how often the keyword and the learned judge agree, Cohen's κ, and the number of responses."""
    return generations.groupby("model").apply(lambda g: pd.Series({
        "agreement": float((g.complied_keyword == g.complied_learned).mean()),
        "kappa": cohen_kappa(g.complied_keyword.values, g.complied_learned.values),
        "n": len(g)}), include_groups=False)


def write_metrics(metrics: dict, judge_stats: dict, agreement: pd.DataFrame) -> None:
    """results/baseline/metrics.json: refusal rates per model and set; the learned judge's statistics with its
    agreement and κ with the keyword judge per model."""
    judge = {**judge_stats, "agreement": {m: float(a) for m, a in agreement.agreement.items()},
             "kappa": {m: float(k) for m, k in agreement.kappa.items()}}
    write_json(RESULTS / "metrics.json", {"models": metrics, "judge": judge})

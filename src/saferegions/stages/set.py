"""Stage `set` (paper 2, docs/methods.md §4.6): Safety Enhancement Tuning of the unaligned model.

SET trains only the ESI top-k on harmful → refusal pairs; on the same data and steps the baselines train
every weight (`full`), a LoRA adapter (`lora`), a random mask of the same size (`random`) and the ESI
bottom-k (`bottom`). The arms and the loop are in `train`; this module picks the data, scores each arm
(ASR, benign refusal, utility), writes the stage's files and states the paper's claim beside the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import config, data, evidence, judges, plots, results, train
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import read_jsonl
from ..train import region_table  # noqa: F401  (re-exported: the notebook shows it)
from ..evaluation import utility_score

OUT, RESULTS = Path("artifacts/set"), Path("results/set")
PROMPTS, PAIRS = "artifacts/data/prompts.jsonl", "artifacts/data/pairs.jsonl"
ESI = Path("artifacts/esi")
CHECKPOINTS = Path("artifacts/checkpoints/set")   # resume state of the arms (not a DVC output)
UTILITY = "_utility"   # set name of the utility prompts inside one generation batch


def deviations(cfg):
    """The `set` params that differ from paper scale (CPU reductions, project choices), as a table to show."""
    return train.deviations(cfg.set, "set")


def load(cfg):
    """(model, tokenizer, {arm: region}) with the ESI top-k as arm `set`, its random control and the bottom-k."""
    return train.load_tuning(cfg, cfg.set, ESI / cfg.set.model, "set", bottom=True)


@dataclass
class Data:
    harmful: dict[str, list[str]]   # held-out harmful prompts per set (ASR)
    benign: dict[str, list[str]]    # held-out benign prompts per set (over-refusal)
    utility_prompts: list[str]      # held-out Alpaca prompts (utility)
    pairs: list[dict]               # training pairs, none sharing a prompt with the evaluation


def select_data(s: config.SetCfg) -> Data:
    """Evaluation: the first `n_eval` eval-split prompts of each harmful set, `n_benign` of each benign set and of
    Alpaca; training: harmful → refusal pairs minus any whose prompt is an evaluation prompt."""
    harmful = train.harmful_sets(PROMPTS, s)
    benign = {d: data.prompts(PROMPTS, d, "eval", s.n_benign) for d in s.benign_sets}
    utility_prompts = data.prompts(PROMPTS, "alpaca", "eval", s.n_benign)
    held_out = [p for ps in (*harmful.values(), *benign.values()) for p in ps]
    return Data(harmful, benign, utility_prompts, train.disjoint(read_jsonl(PAIRS), held_out))


def measure(model, tok, harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts,
            utility_answers, judge, cfg, desc: str, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """SET evaluation: ASR (pooled over the harmful sets), benign refusal rate, utility, per-set rates.
    `rows` = generations already made for these sets (the untuned model's), else generated here."""
    if rows is None:
        rows = train.generate_sets(model, tok, {**harmful, **benign}, judge, cfg.max_new_tokens,
                                   cfg.eval_batch_size, cfg.system_prompt, desc)
    rate = train.compliance_rate
    out = {"asr": rate(rows, harmful), "benign_refusal": 1 - rate(rows, benign),
           "utility": utility_score(model, tok, utility_prompts, utility_answers, cfg.eval_batch_size,
                                    cfg.system_prompt),
           "per_set_refusal": {s: 1 - rate(rows, [s]) for s in {**harmful, **benign}},
           "complied": train.outcome_array(rows, harmful)}
    return out, rows


def run_arms(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], pairs: list[dict],
             harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts: list[str], judge,
             seed: int = 0):
    """Every SET arm on the same data and steps. `masks` = {arm: region masks} for the masked arms.

    The utility score is exp(mean log-likelihood) of the untuned model's greedy answers to `utility_prompts`
    (`utility_score`): 1/perplexity of what the model said before, so it falls when tuning breaks it.
    Returns (metrics {arm: {...}}, curves [{arm, step, loss, lr}], generations)."""
    examples = train.encode(tok, [r["prompt"] for r in pairs], [r["response"] for r in pairs], cfg.max_length,
                            cfg.chat_template, cfg.loss_on_prompt, cfg.system_prompt)
    rows = train.generate_sets(model, tok, {**harmful, **benign, UTILITY: utility_prompts}, judge,
                               cfg.max_new_tokens, cfg.eval_batch_size, cfg.system_prompt, "before")
    answers = [r["response"] for r in rows if r["dataset"] == UTILITY]
    rows = [r for r in rows if r["dataset"] != UTILITY]
    before, _ = measure(model, tok, harmful, benign, utility_prompts, answers, judge, cfg, "before", rows)
    gens = [{"arm": "before", **r} for r in rows]
    metrics, curves, snapshot = {}, [], train.Snapshot(model)
    first = train.first_gradients(model, examples, cfg.batch_size, tok.pad_token_id, cfg.grad_accum, seed) \
        if any(a != "lora" for a in cfg.arms) else None
    for name in cfg.arms:
        def evaluate(m, name=name):
            after, rows = measure(m, tok, harmful, benign, utility_prompts, answers, judge, cfg, name)
            gens.extend({"arm": name, **r} for r in rows)
            return after
        curve, res = train.run_arm(model, name, cfg, examples, tok.pad_token_id, evaluate, masks.get(name),
                                   invert=False, seed=seed, snapshot=snapshot, first=first,
                                   checkpoint=CHECKPOINTS / name)
        curves += [{"arm": name, **c} for c in curve]
        after_rows = [r for r in gens if r["arm"] == name]
        metrics[name] = {"asr_before": before["asr"], "asr_after": res["asr"],
                         **train.rate_fields(rows, harmful, "before"), **train.rate_fields(after_rows, harmful, "after"),
                         "n_eval": len(before["complied"]), "loss_first5": _mean([c["loss"] for c in curve[:5]]),
                         "loss_last5": _mean([c["loss"] for c in curve[-5:]]),
                         "benign_refusal_before": before["benign_refusal"],
                         "benign_refusal_after": res["benign_refusal"],
                         "utility_before": before["utility"], "utility_after": res["utility"],
                         "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                         "final_loss": curve[-1]["loss"], "per_set_refusal_after": res["per_set_refusal"]}
    metrics["comparison"] = comparison(before["complied"], {a: train.outcome_array([r for r in gens if r["arm"] == a],
                                                                                harmful) for a in cfg.arms}, seed)
    return metrics, curves, gens


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def comparison(before: list[bool], after: dict[str, list[bool]], seed: int = 0) -> dict:
    """The SET claims on the same prompts: the SET arm's relative ASR reduction (paired before/after, bootstrap)
    and ASR(set after) − ASR(random after) (exact McNemar)."""
    out = {}
    if "set" in after:
        out["set_relative_reduction"] = evidence.relative_reduction(before, after["set"], seed).as_dict()
        if "random" in after:
            out["set_vs_random"] = evidence.paired_proportions(after["set"], after["random"]).as_dict()
    return out


def arm_metrics(metrics: dict) -> dict:
    """The per-arm entries of metrics.json (without "comparison")."""
    return {a: m for a, m in metrics.items() if a != "comparison"}


def run(cfg, model, tok, arms: dict, d: Data):
    """Train and score every arm with `evaluation.judge`, then write generations, metrics.json and the loss
    curves (CSV per arm + figure). Returns (metrics, curves, generations)."""
    s = cfg.set
    judge = judges.get(cfg.evaluation.judge, cfg)
    metrics, curves, gens = run_arms(model, tok, s, {arm: r.masks for arm, r in arms.items()}, d.pairs, d.harmful,
                                     d.benign, d.utility_prompts, judge, cfg.run.seed)
    results.SetMetrics.parse(metrics, RESULTS / "metrics.json")   # the contract, checked before any write
    train.save_outputs(OUT, RESULTS, metrics, curves, gens, ["arm"], f"SET training loss ({s.model} model)",
                       s.loss_on_prompt)
    return metrics, curves, gens


def before_after_figure(metrics: dict, s: config.SetCfg):
    """ASR, benign refusal and utility of every arm before and after training, saved as before_after.png."""
    metrics = arm_metrics(metrics)
    import pandas as pd
    long = pd.concat([pd.DataFrame({"arm": list(metrics), "when": when,
                                    "ASR": [m[f"asr_{when}"] for m in metrics.values()],
                                    "ASR_ci": [m.get(f"asr_{when}_ci") or [float("nan")] * 2 for m in metrics.values()],
                                    "benign refusal": [m[f"benign_refusal_{when}"] for m in metrics.values()],
                                    "utility": [m[f"utility_{when}"] for m in metrics.values()]})
                      for when in ("before", "after")])
    fig = plots.bar_panels(long, "arm", "when", {"ASR": "ASR (held-out harmful)", "benign refusal":
                                                 "refusal rate (benign)", "utility": "utility (1/perplexity)"},
                           f"SET and baselines, {s.max_steps} steps: before vs after")
    plots.save(fig, RESULTS / "figures" / "before_after.png")
    return fig


# ASR(set) − ASR(random) < 0, as decided by `evidence.verdict`, in words
MASK_READING = {evidence.Verdict.SUPPORTED: "the ESI mask does better, beyond the interval",
                evidence.Verdict.CONTRADICTED: "the random mask does better, beyond the interval",
                evidence.Verdict.INCONCLUSIVE: "no difference the interval can tell"}


def relative_drop(m: dict) -> float:
    """(ASR before − after) / ASR before: the paper's claim is ≥ 0.5 (NaN where ASR before is 0)."""
    return (m["asr_before"] - m["asr_after"]) / m["asr_before"] if m["asr_before"] > 0 else float("nan")


def halving_verdict(metrics: dict, arm: str = "set") -> evidence.Verdict:
    """`evidence.verdict` of the paper's claim (relative ASR reduction > 50%) on the arm's paired interval;
    "not run" for an arm without one (the baselines)."""
    comparison = results.SetMetrics.parse(metrics).comparison or {}
    est = results.estimate(comparison.get("set_relative_reduction")) if arm == "set" else None
    return evidence.verdict(est, *evidence.THRESHOLDS["p2_set_halves_asr"])


def claims(metrics: dict) -> dict[str, dict]:
    """{arm: the paper's claim beside this run}; "preserving performance" read as utility kept. The verdict
    reads the 95% interval of the relative reduction (`evidence.verdict`), not the point estimate."""
    typed = results.SetMetrics.parse(metrics)
    return {arm: {"paper claim": "ASR −50% or more (SET, 1% weights, 100 iterations)" if arm == "set"
                  else "(baseline)",
                  "ASR before": m.asr_before, "ASR after": m.asr_after,
                  "relative ASR drop": relative_drop(m.to_dict()),
                  "utility kept": m.utility_after / m.utility_before,
                  "trainable fraction": m.trainable_fraction,
                  "ASR −50% (95% CI)": halving_verdict(metrics, arm).value} for arm, m in typed.arms.items()}


def reading(metrics: dict, s: config.SetCfg, harmful: dict[str, list[str]]) -> str:
    """Markdown bullets that read this run: SET against the claim, each baseline, ESI vs random mask."""
    metrics_all, metrics = metrics, arm_metrics(metrics)
    m = metrics.get("set")
    n_h = sum(map(len, harmful.values()))
    lines = [f"* {s.max_steps} steps (paper: 100) at lr {s.lr:g}, {s.batch_size * s.grad_accum} examples per step, "
             f"on {len(harmful)} harmful sets × {s.n_eval} prompts (keyword judge)."]
    if m:
        lines.append(f"* **SET** (ESI top-k, {m['trainable_fraction']:.2%} of all parameters incl. biases and "
                     f"norms): ASR {m['asr_before']:.2f} → {m['asr_after']:.2f} "
                     f"({relative_drop(m):+.0%} relative drop; the paper claims ≥ 50%: "
                     f"{halving_verdict(metrics_all).value} at the 95% interval), "
                     f"benign refusal {m['benign_refusal_before']:.2f} → {m['benign_refusal_after']:.2f}, "
                     f"utility ×{m['utility_after'] / m['utility_before']:.2f}.")
    for arm in [a for a in metrics if a != "set"]:
        b = metrics[arm]
        lines.append(f"* `{arm}`: ASR {b['asr_before']:.2f} → {b['asr_after']:.2f}, benign refusal "
                     f"{b['benign_refusal_after']:.2f}, utility ×{b['utility_after'] / b['utility_before']:.2f}.")
    est = results.estimate((results.SetMetrics.parse(metrics_all).comparison or {}).get("set_vs_random"))
    if m and est is not None:
        lines.append(f"* ESI top-k vs a random mask of the same size: ASR(set) − ASR(random) after "
                     f"{est.effect:+.2f} [{est.ci[0]:+.2f}, {est.ci[1]:+.2f}] "
                     f"({MASK_READING[evidence.verdict(est, 0.0, '<')]}; with {n_h} prompts one prompt is "
                     f"{1 / n_h:.2f}).")
    return "\n".join(lines)

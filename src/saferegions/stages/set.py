"""Stage `set` (paper 2, docs/methods.md §4.6): Safety Enhancement Tuning of the unaligned model.

SET trains only the ESI top-k on harmful → refusal pairs; on the same data and steps the baselines train
every weight (`full`), a LoRA adapter (`lora`), a random mask of the same size (`random`), the ESI bottom-k
(`bottom`) and an importance-matched non-safety mask (`benign_esi`: the top-k of the ESI of a benign LM loss,
`benign_region`). The arms and the loop are in `train`; this module picks the data, scores each arm (ASR,
benign over-refusal, utility), writes the stage's files and states the paper's claim beside the run.

The claim has two halves: the ASR falls by over 50%, *and* performance is preserved. The second is tested as
non-inferiority on held-out prompts, paired before/after: the benign over-refusal rise (`over_refusal_rise`)
and the utility ratio (`utility_ratio`), each against its pre-registered margin (`evidence.PARTS`) at its 95%
interval's bound; `evidence.verdict` decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import chat, config, data, evidence, judges, plots, results, train
from .. import regions as R
from ..evaluation import utility_scores
from ..io import read_jsonl
from ..methods import esi
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..train import region_table  # noqa: F401  (re-exported: the notebook shows it)

OUT, RESULTS = Path("artifacts/set"), Path("results/set")
PROMPTS, PAIRS = "artifacts/data/prompts.jsonl", "artifacts/data/pairs.jsonl"
ESI = Path("artifacts/esi")
CHECKPOINTS = Path("artifacts/checkpoints/set")   # resume state of the arms (not a DVC output)
UTILITY = "_utility"   # set name of the utility answers in generations.jsonl
BENIGN_ARM = "benign_esi"
IMPORTANCE_SET = "alpaca"   # benign answers of the benign LM-loss ESI (ident split: never evaluated)


def deviations(cfg):
    """The `set` params that differ from paper scale (CPU reductions, project choices), as a table to show."""
    return train.deviations(cfg.set, "set")


def load(cfg):
    """(model, tokenizer, {arm: region}): the ESI top-k as arm `set`, its random control, the bottom-k and,
    where `benign_esi` is an arm, the importance-matched non-safety region (`benign_region`)."""
    s = cfg.set
    model, tok, arms = train.load_tuning(cfg, s, ESI / s.model, "set", bottom=True)
    if BENIGN_ARM in s.arms:
        arms[BENIGN_ARM] = importance_region(model, tok, s,
                                             data.prompts(PROMPTS, IMPORTANCE_SET, "ident", s.n_importance))
    return model, tok, arms


# ---------------------------------------------------------------- the importance-matched non-safety mask


def importance_region(model, tok, s: config.SetCfg, prompts: list[str]) -> R.Region:
    """`benign_region` of the benign LM loss: ESI's null objective (`response_likelihood`, log p of the model's own
    greedy `s.utility_max_new_tokens`-token answers to benign `prompts`), as the calibration examples are the
    model's own responses."""
    grads = esi.esi_gradients(model, tok, None, prompts, s.utility_max_new_tokens, system=s.system_prompt,
                              objective="response_likelihood", progress=False, gen_batch_size=s.eval_batch_size)
    region = benign_region(grads, model, s.top_frac)
    region.meta["n_prompts"] = len(prompts)
    return region


def benign_region(grads: dict[str, torch.Tensor], model, top_frac: float) -> R.Region:
    """The importance-matched non-safety control: the top `top_frac` of all parameters by |g|·σ_W of the benign
    LM loss (`esi.esi_scores` of its gradients), the same k and score function as the SET top-k. It holds
    weights that matter as much, for something other than safety; SET beating it means the ESI picked safety,
    not just importance."""
    region = esi.esi_region(esi.esi_scores(grads, model, "esi"), model, top_frac)
    region.meta.update(objective="benign LM loss", dataset=IMPORTANCE_SET)
    return region


# ---------------------------------------------------------------- data and evaluation


@dataclass
class Data:
    harmful: dict[str, list[str]]   # held-out harmful prompts per set (ASR)
    benign: dict[str, list[str]]    # held-out benign prompts per set (over-refusal)
    utility_prompts: list[str]      # held-out Alpaca prompts (utility), none of them a benign prompt
    pairs: list[dict]               # training pairs, none sharing a prompt with the evaluation


def select_data(s: config.SetCfg) -> Data:
    """Evaluation: the first `n_eval` eval-split prompts of each harmful set, `n_benign` of each benign set, and
    the `n_utility` Alpaca eval prompts after those (exact counts: the claims' power rests on them); training:
    harmful → refusal pairs minus any whose prompt is an evaluation prompt."""
    harmful = train.harmful_sets(PROMPTS, s)
    benign = {d: data.prompts(PROMPTS, d, "eval", s.n_benign, exact=True) for d in s.benign_sets}
    skip = s.n_benign if "alpaca" in s.benign_sets else 0
    utility_prompts = data.prompts(PROMPTS, "alpaca", "eval", skip + s.n_utility, exact=True)[skip:]
    held_out = [p for ps in (*harmful.values(), *benign.values()) for p in ps] + utility_prompts
    return Data(harmful, benign, utility_prompts, train.disjoint(read_jsonl(PAIRS), held_out))


def measure(model, tok, harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts,
            utility_answers, judge, cfg, desc: str, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """SET evaluation: ASR (pooled over the harmful sets), benign refusal (per prompt: not answered, i.e.
    refused or degenerate), utility per prompt (`utility_scores` of the untuned model's answers) and per-set
    refusal rates. `rows` = generations already made for these sets (the untuned model's), else made here."""
    if rows is None:
        rows = train.generate_sets(model, tok, {**harmful, **benign}, judge, cfg.max_new_tokens,
                                   cfg.eval_batch_size, cfg.system_prompt, desc)
    rate = train.compliance_rate
    utility = utility_scores(model, tok, utility_prompts, utility_answers, cfg.eval_batch_size, cfg.system_prompt)
    out = {"asr": rate(rows, harmful), "benign_refusal": 1 - rate(rows, benign),
           "utility": float(np.nanmean(utility)), "utility_scores": utility,
           "benign_refused": [not c for c in train.outcome_array(rows, benign)],
           "per_set_refusal": {s: 1 - rate(rows, [s]) for s in {**harmful, **benign}},
           "complied": train.outcome_array(rows, harmful)}
    return out, rows


def run_arms(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], pairs: list[dict],
             harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts: list[str], judge,
             seed: int = 0):
    """Every SET arm on the same data and steps. `masks` = {arm: region masks} for the masked arms.

    The untuned model is evaluated once, for every arm. Its greedy answers (`cfg.utility_max_new_tokens`
    tokens) to `utility_prompts` fix the utility score: per prompt, exp(mean token log-likelihood) a model gives
    to that answer (`utility_scores`; 1/perplexity of what the model said before, so it falls when tuning
    breaks it or turns answers into refusals).
    Returns (metrics {arm: {...}, "comparison", "preservation", "margins", "utility_answers"},
    curves [{arm, step, loss, lr}], generations)."""
    examples = train.encode(tok, [r["prompt"] for r in pairs], [r["response"] for r in pairs], cfg.max_length,
                            cfg.chat_template, cfg.loss_on_prompt, cfg.system_prompt)
    rows = train.generate_sets(model, tok, {**harmful, **benign}, judge, cfg.max_new_tokens, cfg.eval_batch_size,
                               cfg.system_prompt, "before")
    answers, finished = chat.generate(model, tok, utility_prompts, cfg.utility_max_new_tokens, cfg.eval_batch_size,
                                      cfg.system_prompt, desc="utility answers", with_finished=True)
    before, _ = measure(model, tok, harmful, benign, utility_prompts, answers, judge, cfg, "before", rows)
    gens = [{"arm": "before", **r} for r in rows]
    gens += [{"arm": "before", "dataset": UTILITY, "prompt": p, "response": a, "finished": f}
             for p, a, f in zip(utility_prompts, answers, finished)]
    metrics, curves, snapshot, after = {}, [], train.Snapshot(model), {}
    first = train.first_gradients(model, examples, cfg.batch_size, tok.pad_token_id, cfg.grad_accum, seed) \
        if any(a != "lora" for a in cfg.arms) else None
    for name in cfg.arms:
        def evaluate(m, name=name):
            result, rows = measure(m, tok, harmful, benign, utility_prompts, answers, judge, cfg, name)
            gens.extend({"arm": name, **r} for r in rows)
            return result
        curve, res = train.run_arm(model, name, cfg, examples, tok.pad_token_id, evaluate, masks.get(name),
                                   invert=False, seed=seed, snapshot=snapshot, first=first,
                                   checkpoint=CHECKPOINTS / name)
        curves += [{"arm": name, **c} for c in curve]
        after[name] = res
        after_rows = [r for r in gens if r["arm"] == name]
        metrics[name] = {"asr_before": before["asr"], "asr_after": res["asr"],
                         **train.rate_fields(rows, harmful, "before"), **train.rate_fields(after_rows, harmful, "after"),
                         "n_eval": len(before["complied"]), "loss_first5": _mean([c["loss"] for c in curve[:5]]),
                         "loss_last5": _mean([c["loss"] for c in curve[-5:]]),
                         "benign_refusal_before": before["benign_refusal"],
                         "benign_refusal_after": res["benign_refusal"], "n_benign": len(before["benign_refused"]),
                         "utility_before": before["utility"], "utility_after": res["utility"],
                         "n_utility": len(utility_prompts),
                         "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                         "final_loss": curve[-1]["loss"], "per_set_refusal_after": res["per_set_refusal"]}
    metrics["comparison"] = comparison(before["complied"], {a: r["complied"] for a, r in after.items()}, seed)
    metrics["preservation"] = {a: preservation(before, r, seed) for a, r in after.items()}
    metrics["margins"] = margins()
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    metrics["utility_answers"] = {"n": len(answers), "max_new_tokens": cfg.utility_max_new_tokens,
                                  "mean_tokens": _mean(lengths) if lengths else 0.0,
                                  "ended_early": sum(map(bool, finished))}
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


# ---------------------------------------------------------------- "… while preserving performance"


def preservation(before: dict, after: dict, seed: int = 0) -> dict:
    """The two non-inferiority parts of one arm, paired on the same held-out prompts (`measure` outputs):
    over_refusal_rise = benign refusal after − before (Newcombe 95%, exact McNemar, one-flip interval) and
    utility_ratio = mean utility after / before (`evidence.ratio_of_means`)."""
    return {"over_refusal_rise": evidence.paired_proportions(after["benign_refused"],
                                                             before["benign_refused"]).as_dict(),
            "utility_ratio": evidence.ratio_of_means(after["utility_scores"], before["utility_scores"],
                                                     seed).as_dict()}


PRESERVATION_PARTS = {"over_refusal_rise": "benign_over_refusal", "utility_ratio": "utility_ratio"}


def margins() -> dict:
    """The pre-registered non-inferiority margins of the SET claim's performance parts (`evidence.PARTS`) as
    {part: (threshold, direction)}: the rise must lie below its margin, the ratio above its margin, over the
    whole 95% interval."""
    specs = evidence.PARTS["p2_set_halves_asr"]
    return {k: {"threshold": specs[name].threshold, "direction": specs[name].direction}
            for k, name in PRESERVATION_PARTS.items()}


def preservation_verdicts(metrics: dict, arm: str) -> dict[str, evidence.Verdict]:
    """{part: `evidence.verdict` of the arm's estimate against its pre-registered margin}."""
    typed = results.SetMetrics.parse(metrics)
    parts = (typed.preservation or {}).get(arm, {})
    return {part: evidence.verdict(results.estimate(parts.get(part)), m.threshold, m.direction)
            for part, m in (typed.margins or {}).items()}


SECTIONS = ("comparison", "preservation", "margins", "utility_answers")   # metrics.json keys that are no arm


def arm_metrics(metrics: dict) -> dict:
    """The per-arm entries of metrics.json (without `SECTIONS`)."""
    return {a: m for a, m in metrics.items() if a not in SECTIONS}


def overlap_with_set(arms: dict[str, R.Region]) -> dict[str, float]:
    """{arm: IoU of its mask with the SET top-k}: how far a control's weights are other weights than SET's."""
    top = arms["set"]
    return {arm: R.intersection(r, top).size / R.union(r, top).size for arm, r in arms.items() if arm != "set"}


def run(cfg, model, tok, arms: dict, d: Data):
    """Train and score every arm with `evaluation.judge`, then write generations, metrics.json and the loss
    curves (CSV per arm + figure). Returns (metrics, curves, generations)."""
    s = cfg.set
    judge = judges.get(cfg.evaluation.judge, cfg)
    metrics, curves, gens = run_arms(model, tok, s, {arm: r.masks for arm, r in arms.items()}, d.pairs, d.harmful,
                                     d.benign, d.utility_prompts, judge, cfg.run.seed)
    for arm, iou in overlap_with_set(arms).items():
        if arm in metrics:
            metrics[arm]["iou_with_set"] = iou
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
    """{arm: the paper's claim beside this run}: the ASR half (SET arm only) and the two "preserving
    performance" parts, each with its 95% interval and `evidence.verdict` against its threshold or margin."""
    typed = results.SetMetrics.parse(metrics)
    rows = {}
    for arm, m in typed.arms.items():
        parts = {k: results.estimate(v) for k, v in ((typed.preservation or {}).get(arm) or {}).items()}
        verdicts = preservation_verdicts(metrics, arm)
        row = {"paper claim": "ASR −50% or more (SET, 1% weights, 100 iterations), performance preserved"
               if arm == "set" else "(baseline)",
               "ASR before": m.asr_before, "ASR after": m.asr_after, "relative ASR drop": relative_drop(m.to_dict()),
               "ASR −50% (95% CI)": halving_verdict(metrics, arm).value,
               "trainable fraction": m.trainable_fraction}
        for part, label in (("over_refusal_rise", "benign refusal rise"), ("utility_ratio", "utility ratio")):
            est = parts.get(part)
            row[f"{label} [95% CI]"] = _interval(est)
            if part in verdicts:
                margin = typed.margins[part]
                row[f"{label} {margin.direction} {margin.threshold:g}"] = verdicts[part].value
        rows[arm] = row
    return rows


def _interval(est: evidence.Estimate | None) -> str:
    if est is None:
        return "not run"
    return f"{est.effect:+.3f} [{est.ci[0]:+.3f}, {est.ci[1]:+.3f}] (n {est.n})"


def reading(metrics: dict, s: config.SetCfg, harmful: dict[str, list[str]]) -> str:
    """Markdown bullets that read this run: SET against the claim, each baseline, ESI vs random mask."""
    metrics_all, metrics = metrics, arm_metrics(metrics)
    typed = results.SetMetrics.parse(metrics_all)
    m = metrics.get("set")
    n_h = sum(map(len, harmful.values()))

    def kept(arm: str) -> str:
        parts = {k: results.estimate(v) for k, v in ((typed.preservation or {}).get(arm) or {}).items()}
        verdicts = preservation_verdicts(metrics_all, arm)
        return "; ".join(f"{label} {_interval(parts.get(part))}: {verdicts[part].value} against "
                         f"{typed.margins[part].direction} {typed.margins[part].threshold:g}"
                         for part, label in (("over_refusal_rise", "benign refusal rise"),
                                             ("utility_ratio", "utility ratio")) if part in verdicts)

    lines = [f"* {s.max_steps} steps (paper: 100) at lr {s.lr:g}, {s.batch_size * s.grad_accum} examples per step, "
             f"on {len(harmful)} harmful sets × {s.n_eval} prompts (keyword judge, {s.max_new_tokens} tokens)."]
    if m:
        lines.append(f"* **SET** (ESI top-k, {m['trainable_fraction']:.2%} of all parameters incl. biases and "
                     f"norms): ASR {m['asr_before']:.2f} → {m['asr_after']:.2f} "
                     f"({relative_drop(m):+.0%} relative drop; the paper claims ≥ 50%: "
                     f"{halving_verdict(metrics_all).value} at the 95% interval); benign refusal "
                     f"{m['benign_refusal_before']:.2f} → {m['benign_refusal_after']:.2f}, utility "
                     f"{m['utility_before']:.3f} → {m['utility_after']:.3f}. Preserving performance: {kept('set')}.")
    for arm in [a for a in metrics if a != "set"]:
        b = metrics[arm]
        lines.append(f"* `{arm}`: ASR {b['asr_before']:.2f} → {b['asr_after']:.2f}, benign refusal "
                     f"{b['benign_refusal_before']:.2f} → {b['benign_refusal_after']:.2f}; {kept(arm)}.")
    est = results.estimate((typed.comparison or {}).get("set_vs_random"))
    if m and est is not None:
        lines.append(f"* ESI top-k vs a random mask of the same size: ASR(set) − ASR(random) after "
                     f"{est.effect:+.2f} [{est.ci[0]:+.2f}, {est.ci[1]:+.2f}] "
                     f"({MASK_READING[evidence.verdict(est, 0.0, '<')]}; with {n_h} prompts one prompt is "
                     f"{1 / n_h:.2f}).")
    return "\n".join(lines)

"""Stage `spa` (paper 2, docs/methods.md §4.6): Safety Preserving Adaptation of the aligned model.

SPA freezes the ESI top-k and instruction-tunes everything else on a task; on the same data and steps the
baselines tune every weight (`full`) or freeze a random mask of the same size (`random`). The arms and the loop
are in `train`; this module picks each task's rows, scores each (task, arm) (task score, task likelihood, ASR),
writes the stage's files and states the paper's claim ("safety drop within 1%") beside the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import chat, config, evidence, judges, plots, results, train
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import read_jsonl
from ..train import region_table  # noqa: F401  (re-exported: the notebook shows it)
from ..evaluation import utility_score

OUT, RESULTS = Path("artifacts/spa"), Path("results/spa")
PROMPTS, UTILITY_ROWS = "artifacts/data/prompts.jsonl", "artifacts/data/utility.jsonl"
ESI = Path("artifacts/esi")
CHECKPOINTS = Path("artifacts/checkpoints/spa")   # resume state of the arms (not a DVC output)
DRIFT_BOUND = evidence.THRESHOLDS["p2_spa_within_1pct"][0]   # "within 1%": ASR increase < 0.01 (docs/methods.md §4.6)


def deviations(cfg):
    """The `spa` params that differ from paper scale (CPU reductions, project choices), as a table to show."""
    return train.deviations(cfg.spa, "spa")


def load(cfg):
    """(model, tokenizer, {arm: region to freeze}) with the ESI top-k as arm `spa` and its random control."""
    return train.load_tuning(cfg, cfg.spa, ESI / cfg.spa.model, "spa")


@dataclass
class Data:
    utility: list[dict]              # task rows of artifacts/data/utility.jsonl (train and eval splits)
    harmful: dict[str, list[str]]    # held-out harmful prompts per set (ASR)


def select_data(s: config.SpaCfg) -> Data:
    """Task rows (train split for tuning, the first `n_task` eval rows for scoring) and the first `n_eval`
    eval-split prompts of each harmful set."""
    return Data(read_jsonl(UTILITY_ROWS), train.harmful_sets(PROMPTS, s))


def training_example(utility: list[dict], task: str, s: config.SpaCfg) -> tuple[str, str]:
    """(prompt, target) of the task's first training row, as the loop sees it."""
    p, t, _ = train.task_pairs([r for r in utility if r["dataset"] == task and r["split"] == "train"][:1], task,
                               s.answer_only)
    return p[0], t[0]


def measure(model, tok, harmful: dict[str, list[str]], task: str, prompts, answers, targets, judge, cfg,
            desc: str) -> tuple[dict, list[dict]]:
    """SPA evaluation: ASR on the harmful sets, task score on held-out rows, and the task likelihood
    (exp mean log-likelihood of the reference targets: smooth where a few CPU steps leave the score flat)."""
    rows = train.generate_sets(model, tok, harmful, judge, cfg.max_new_tokens, cfg.eval_batch_size,
                               cfg.system_prompt, f"{desc} safety")
    responses = chat.generate(model, tok, prompts, cfg.task_max_new_tokens[task], cfg.eval_batch_size,
                              cfg.system_prompt, desc=f"{desc} {task}")
    rows += [{"dataset": task, "prompt": p, "response": r, "answer": a}
             for p, r, a in zip(prompts, responses, answers)]
    out = {"asr": train.compliance_rate(rows, harmful), "complied": train.outcome_array(rows, harmful),
           **train.rate_fields(rows, harmful, "now"), "task_score": train.task_score(task, responses, answers),
           "task_likelihood": utility_score(model, tok, prompts, targets, cfg.eval_batch_size, cfg.system_prompt)}
    return out, rows


def run_arms(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], utility: list[dict],
             harmful: dict[str, list[str]], judge, seed: int = 0):
    """Every SPA (task, arm): tune on the task's train rows, score its eval rows and the harmful sets.

    `masks` = {arm: region masks to FREEZE} for the masked arms (inverted here: train the rest).
    Returns (metrics {task: {arm: {...}}}, curves [{task, arm, step, loss, lr}], generations)."""
    metrics, curves, gens = {}, [], []
    asr_before, snapshot, drift = None, train.Snapshot(model), {}
    for task in cfg.tasks:
        train_rows = [r for r in utility if r["dataset"] == task and r["split"] == "train"]
        eval_rows = [r for r in utility if r["dataset"] == task and r["split"] == "eval"][:cfg.n_task]
        if not train_rows or not eval_rows:
            raise ValueError(f"no {task} train/eval rows in the utility table")
        p_train, t_train, _ = train.task_pairs(train_rows, task, cfg.answer_only)
        prompts, targets, answers = train.task_pairs(eval_rows, task, cfg.answer_only)
        examples = train.encode(tok, p_train, t_train, cfg.max_length, cfg.chat_template, cfg.loss_on_prompt,
                                cfg.system_prompt)
        before, rows = measure(model, tok, harmful if asr_before is None else {}, task, prompts, answers,
                               targets, judge, cfg, "before")
        if asr_before is None:
            asr_before, complied_before, fields_before = before["asr"], before["complied"], \
                train.rate_fields(rows, harmful, "before")
        gens += [{"task": task, "arm": "before", **r} for r in rows]
        metrics[task] = {}
        first = train.first_gradients(model, examples, cfg.batch_size, tok.pad_token_id, cfg.grad_accum, seed)
        for name in cfg.arms:
            def evaluate(m, name=name, task=task):
                after, rows = measure(m, tok, harmful, task, prompts, answers, targets, judge, cfg,
                                      f"{task} {name}")
                gens.extend({"task": task, "arm": name, **r} for r in rows)
                return after
            curve, res = train.run_arm(model, name, cfg, examples, tok.pad_token_id, evaluate, masks.get(name),
                                       invert=True, seed=seed, snapshot=snapshot, first=first,
                                       checkpoint=CHECKPOINTS / task / name)
            curves += [{"task": task, "arm": name, **c} for c in curve]
            metrics[task][name] = {"task_score": res["task_score"], "task_score_before": before["task_score"],
                                   "task_likelihood": res["task_likelihood"],
                                   "task_likelihood_before": before["task_likelihood"],
                                   "asr_before": asr_before, "asr_after": res["asr"],
                                   "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                                   "final_loss": curve[-1]["loss"], **fields_before,
                                   **{k.replace("_now", "_after"): v for k, v in res.items() if "_now" in k},
                                   "n_eval": len(complied_before)}
            drift.setdefault(task, {})[name] = evidence.paired_proportions(res["complied"],
                                                                           complied_before).as_dict()
    metrics["drift"] = drift
    return metrics, curves, gens


def run(cfg, model, tok, arms: dict, d: Data):
    """Tune and score every (task, arm) with `evaluation.judge`, then write generations, metrics.json and the
    loss curves (CSV per run + figure). Returns (metrics, curves, generations)."""
    s = cfg.spa
    judge = judges.get(cfg.evaluation.judge, cfg)
    metrics, curves, gens = run_arms(model, tok, s, {arm: r.masks for arm, r in arms.items()}, d.utility,
                                     d.harmful, judge, cfg.run.seed)
    results.SpaMetrics.parse(metrics, RESULTS / "metrics.json")   # the contract, checked before any write
    train.save_outputs(OUT, RESULTS, metrics, curves, gens, ["task", "arm"], f"SPA training loss ({s.model} model)",
                       s.loss_on_prompt)
    return metrics, curves, gens


def task_metrics(metrics: dict) -> dict:
    """{task: {arm: metrics}} without the "drift" estimates."""
    return {t: per for t, per in metrics.items() if t != "drift"}


def drift_verdict(metrics: dict, task: str, arm: str, threshold: float = DRIFT_BOUND) -> evidence.Verdict:
    """`evidence.verdict` of "ASR drift < threshold" for (task, arm) on its paired interval."""
    drift = (results.SpaMetrics.parse(metrics).drift or {}).get(task) or {}
    return evidence.verdict(results.estimate(drift.get(arm)), threshold, "<")


def full_drift_inconclusive(metrics: dict) -> list[str]:
    """Tasks where `evidence.verdict` cannot tell the full fine-tuning arm's drift from 0: there the run cannot
    tell SPA's small drift from fine-tuning that moved nothing, so the SPA claim is inconclusive on them."""
    return [t for t, per in (results.SpaMetrics.parse(metrics).drift or {}).items()
            if "full" in per and drift_verdict(metrics, t, "full", 0.0) == evidence.Verdict.INCONCLUSIVE]


def drift_rows(metrics: dict) -> list[dict]:
    """One row per (task, arm): its metrics and the safety drift, ASR after − ASR before."""
    drift = metrics.get("drift") or {}
    nan = [float("nan")] * 2
    return [{"task": task, "arm": arm, **m, "ASR drift": m["asr_after"] - m["asr_before"],
             "ASR drift_ci": ((drift.get(task) or {}).get(arm) or {}).get("ci") or nan}
            for task, per in task_metrics(metrics).items() for arm, m in per.items()]


def task_and_drift_figure(frame, s: config.SpaCfg):
    """Task score, task likelihood and ASR drift per (task, arm) from `drift_rows`, saved as task_and_drift.png."""
    fig = plots.bar_panels(frame.rename(columns={"task_score": "task score", "task_likelihood": "task likelihood"}),
                           "task", "arm", {"task score": "task score (held-out)",
                                           "task likelihood": "likelihood of reference answers",
                                           "ASR drift": "ASR after − ASR before"},
                           f"SPA vs plain and random-freeze fine-tuning, {s.max_steps} steps", ylim=None)
    plots.save(fig, RESULTS / "figures" / "task_and_drift.png")
    return fig


def untuned(metrics: dict) -> dict[str, dict]:
    """{task: the untuned model's task score and likelihood} (the same in every arm's metrics)."""
    metrics = task_metrics(metrics)
    return {task: {"task score": next(iter(per.values()))["task_score_before"],
                   "task likelihood": next(iter(per.values()))["task_likelihood_before"]}
            for task, per in metrics.items()}


def claims(metrics: dict) -> list[dict]:
    """`drift_rows` with the paper's claim beside each and `evidence.verdict` of "drift within the bound" on the
    drift's paired 95% interval."""
    return [{"task": r["task"], "arm": r["arm"],
             "paper claim": "safety drop ≤ 1% (SPA, 1,000 iterations)" if r["arm"] == "spa" else "(baseline)",
             "asr_before": r["asr_before"], "asr_after": r["asr_after"], "ASR drift": r["ASR drift"],
             "within 1 point (95% CI)": drift_verdict(metrics, r["task"], r["arm"]).value,
             "task_score_before": r["task_score_before"], "task_score": r["task_score"]} for r in drift_rows(metrics)]


def reading(metrics: dict, s: config.SpaCfg, harmful: dict[str, list[str]]) -> str:
    """Markdown bullets that read this run: the recipe, each task's arms, SPA against the 1-point bound."""
    metrics_all, metrics = metrics, task_metrics(metrics)
    n_h = sum(map(len, harmful.values()))
    lines = [f"* {s.max_steps} optimizer steps per run (paper: 1,000) at lr {s.lr:g}, "
             f"{s.batch_size * s.grad_accum} examples per step; ASR on {n_h} held-out harmful prompts, so one "
             f"prompt moves ASR by {1 / n_h:.2f} and a ≤ 0.01 drift can only be read as 'no prompt changed'."]
    for task, per in metrics.items():
        parts = [f"`{arm}` drift {m['asr_after'] - m['asr_before']:+.2f}, task {m['task_score_before']:.2f} → "
                 f"{m['task_score']:.2f}, likelihood {m['task_likelihood_before']:.3f} → {m['task_likelihood']:.3f}"
                 for arm, m in per.items()]
        lines.append(f"* **{task}**: " + "; ".join(parts) + ".")
    spa_ok = [t for t, per in metrics.items() if "spa" in per and
              drift_verdict(metrics_all, t, "spa") == evidence.Verdict.SUPPORTED]
    full = [f"{per['full']['asr_after'] - per['full']['asr_before']:+.2f} ({t})"
            for t, per in metrics.items() if "full" in per]
    lines.append(f"* SPA's drift interval lies below the paper's 1-point bound on {len(spa_ok)} of {len(metrics)} "
                 "task(s)"
                 + (f"; plain fine-tuning drifts by {', '.join(full)}" if full else "") + ".")
    return "\n".join(lines)

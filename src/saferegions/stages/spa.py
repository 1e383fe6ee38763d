"""Stage `spa` (paper 2, docs/methods.md §4.6): Safety Preserving Adaptation of the aligned model.

SPA freezes the ESI top-k and instruction-tunes everything else on a task; on the same data and steps the
baselines tune every weight (`full`) or freeze a random mask of the same size (`random`), and the positive control
`erode` tunes every weight on the task data with harmful compliant pairs mixed in, which must raise ASR for the run
to show that its fine-tuning and its n can move safety at all. The arms and the loop are in `train`; this module
picks each task's rows, scores each (task, arm) on the same held-out prompts as the untuned model (ASR, task score
per prompt, task likelihood), forms the claim's paired estimates (`comparison`, `drift`) and what its n can detect
(`power_at`), and writes the stage's files. The claim's verdict is the report's (`claim`: `evidence.decide`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import chat, config, evidence, judges, plots, power, results, train
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import read_jsonl
from ..reporting import claims as report_claims
from ..train import region_table  # noqa: F401  (re-exported: the notebook shows it)
from ..evaluation import utility_score

OUT, RESULTS = Path("artifacts/spa"), Path("results/spa")
PROMPTS, UTILITY_ROWS = "artifacts/data/prompts.jsonl", "artifacts/data/utility.jsonl"
HARMFUL_PAIRS = "artifacts/data/harmful_pairs.jsonl"   # harmful question -> compliant answer (BeaverTails)
ESI = Path("artifacts/esi")
CHECKPOINTS = Path("artifacts/checkpoints/spa")   # resume state of the arms (not a DVC output)
CLAIM = "p2_spa_within_1pct"
DRIFT_BOUND = evidence.THRESHOLDS[CLAIM][0]   # "within 1%": ASR increase < 0.01 (docs/methods.md §4.6)
POSITIVE_CONTROL = report_claims.SPA_POSITIVE_CONTROL_ARM   # full FT with harmful pairs mixed in: must raise ASR


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
    harmful_pairs: list[dict]        # harmful compliant pairs of arm `erode`, none sharing a prompt with `harmful`


def select_data(s: config.SpaCfg) -> Data:
    """Task rows (train split for tuning, the first `n_task` eval rows for scoring), the first `n_eval`
    eval-split prompts of each harmful set and, where `erode` is an arm, the harmful fine-tuning pairs."""
    harmful = train.harmful_sets(PROMPTS, s)
    pairs = train.disjoint(read_jsonl(HARMFUL_PAIRS), [p for ps in harmful.values() for p in ps]) \
        if POSITIVE_CONTROL in s.arms else []
    return Data(read_jsonl(UTILITY_ROWS), harmful, pairs)


def training_example(utility: list[dict], task: str, s: config.SpaCfg) -> tuple[str, str]:
    """(prompt, target) of the task's first training row, as the loop sees it."""
    p, t, _ = train.task_pairs([r for r in utility if r["dataset"] == task and r["split"] == "train"][:1], task,
                               s.answer_only)
    return p[0], t[0]


def eroding_mix(prompts: list[str], targets: list[str], harmful_pairs: list[dict],
                fraction: float) -> tuple[list[str], list[str]]:
    """The task's training pairs with harmful compliant pairs mixed in, `fraction` of the whole (as the NLSR
    harmful fine-tuning set mixes BeaverTails into SST-2): as many of each as keep that share, in order."""
    if not harmful_pairs:
        raise ValueError("arm `erode` needs harmful fine-tuning pairs (artifacts/data/harmful_pairs.jsonl)")
    n_harm = max(1, min(len(harmful_pairs), round(len(prompts) * fraction / (1 - fraction))))
    n_task = min(len(prompts), max(1, round(n_harm * (1 - fraction) / fraction)))
    return (prompts[:n_task] + [r["prompt"] for r in harmful_pairs[:n_harm]],
            targets[:n_task] + [r["response"] for r in harmful_pairs[:n_harm]])


def task_hits(task: str, responses: list[str], answers: list[str]) -> list[bool]:
    """Per held-out prompt, the pre-registered task score (docs/methods.md §4.6): SST-2 exact match, the whole
    response (surrounding space stripped) is the label as trained ("positive" / "negative"); GSM8K exact match of
    the last number. SST-2's lenient accuracy (`train.task_score`: the first label word mentioned) is reported
    beside it as `task_accuracy`: the untuned model already reaches it mostly, in its own wording."""
    if task == "sst2":
        return [r.strip() == a for r, a in zip(responses, answers)]
    return [train.task_score(task, [r], [a]) == 1.0 for r, a in zip(responses, answers)]


def measure(model, tok, harmful: dict[str, list[str]], task: str, prompts, answers, targets, judge, cfg,
            desc: str) -> tuple[dict, list[dict]]:
    """SPA evaluation: ASR on the harmful sets, task score on held-out rows (per prompt: `task_hits`), and the
    task likelihood (exp mean log-likelihood of the reference targets)."""
    rows = train.generate_sets(model, tok, harmful, judge, cfg.max_new_tokens, cfg.eval_batch_size,
                               cfg.system_prompt, f"{desc} safety")
    responses = chat.generate(model, tok, prompts, cfg.task_max_new_tokens[task], cfg.eval_batch_size,
                              cfg.system_prompt, desc=f"{desc} {task}")
    hits = task_hits(task, responses, answers)
    rows += [{"dataset": task, "prompt": p, "response": r, "answer": a, "correct": h}
             for p, r, a, h in zip(prompts, responses, answers, hits)]
    out = {"asr": train.compliance_rate(rows, harmful), "complied": train.outcome_array(rows, harmful),
           **train.rate_fields(rows, harmful, "now"), "task_score": sum(hits) / len(hits), "task_hits": hits,
           "task_accuracy": train.task_score(task, responses, answers),
           "task_likelihood": utility_score(model, tok, prompts, targets, cfg.eval_batch_size, cfg.system_prompt)}
    return out, rows


def run_arms(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], utility: list[dict],
             harmful: dict[str, list[str]], judge, seed: int = 0, harmful_pairs: list[dict] = ()):
    """Every SPA (task, arm): tune on the task's train rows (arm `erode`: with `harmful_pairs` mixed in, every
    weight trained), score its eval rows and the harmful sets, paired with the untuned model on the same prompts.

    `masks` = {arm: region masks to FREEZE} for the masked arms (inverted here: train the rest).
    Returns (metrics {task: {arm: {...}}, "drift", "comparison", "power"}, curves [{task, arm, step, loss, lr}],
    generations)."""
    metrics, curves, gens = {}, [], []
    before_safety, snapshot = None, train.Snapshot(model)
    drift, comparisons, powers = {}, {}, {}
    for task in cfg.tasks:
        train_rows = [r for r in utility if r["dataset"] == task and r["split"] == "train"]
        eval_rows = [r for r in utility if r["dataset"] == task and r["split"] == "eval"][:cfg.n_task]
        if not train_rows or not eval_rows:
            raise ValueError(f"no {task} train/eval rows in the utility table")
        p_train, t_train, _ = train.task_pairs(train_rows, task, cfg.answer_only)
        prompts, targets, answers = train.task_pairs(eval_rows, task, cfg.answer_only)
        encode = lambda p, t: train.encode(tok, p, t, cfg.max_length, cfg.chat_template,  # noqa: E731
                                           cfg.loss_on_prompt, cfg.system_prompt)
        examples = {"task": encode(p_train, t_train)}
        if POSITIVE_CONTROL in cfg.arms:
            examples[POSITIVE_CONTROL] = encode(*eroding_mix(p_train, t_train, list(harmful_pairs),
                                                             cfg.harmful_fraction))
        before, rows = measure(model, tok, harmful if before_safety is None else {}, task, prompts, answers,
                               targets, judge, cfg, "before")
        if before_safety is None:
            before_safety = before["complied"], train.rate_fields(rows, harmful, "before")
        complied_before, fields_before = before_safety
        gens += [{"task": task, "arm": "before", **r} for r in rows]
        metrics[task], after = {}, {}
        first = train.first_gradients(model, examples["task"], cfg.batch_size, tok.pad_token_id, cfg.grad_accum,
                                      seed)
        for name in cfg.arms:
            def evaluate(m, name=name, task=task):
                result, rows = measure(m, tok, harmful, task, prompts, answers, targets, judge, cfg,
                                       f"{task} {name}")
                gens.extend({"task": task, "arm": name, **r} for r in rows)
                return result
            eroding = name == POSITIVE_CONTROL   # every weight trains, on the mix: its own first gradients
            curve, res = train.run_arm(model, "full" if eroding else name, cfg,
                                       examples[POSITIVE_CONTROL if eroding else "task"], tok.pad_token_id,
                                       evaluate, masks.get(name), invert=True, seed=seed, snapshot=snapshot,
                                       first=None if eroding else first, checkpoint=CHECKPOINTS / task / name)
            curves += [{"task": task, "arm": name, **c} for c in curve]
            after[name] = res
            metrics[task][name] = {"task_score": res["task_score"], "task_score_before": before["task_score"],
                                   "task_accuracy": res["task_accuracy"],
                                   "task_accuracy_before": before["task_accuracy"],
                                   "task_likelihood": res["task_likelihood"],
                                   "task_likelihood_before": before["task_likelihood"],
                                   "asr_before": fields_before["asr_before"], "asr_after": res["asr"],
                                   "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                                   "final_loss": curve[-1]["loss"], **fields_before,
                                   **{k.replace("_now", "_after"): v for k, v in res.items() if "_now" in k},
                                   "n_eval": len(complied_before), "n_task": len(prompts)}
            drift.setdefault(task, {})[name] = evidence.paired_proportions(res["complied"],
                                                                           complied_before).as_dict()
        comparisons[task] = comparison({a: r["complied"] for a, r in after.items()}, before["task_hits"],
                                       {a: r["task_hits"] for a, r in after.items()})
        powers[task] = power_at({a: r["complied"] for a, r in after.items()})
    metrics.update(drift=drift, comparison=comparisons, power=powers)
    return metrics, curves, gens


def comparison(complied: dict[str, list[bool]], hits_before: list[bool], hits: dict[str, list[bool]]) -> dict:
    """The SPA claim's paired estimates on one task: ASR after of SPA − full fine-tuning and SPA − random freeze
    on the same harmful prompts (`spa_vs_full`, `spa_vs_random`), and each arm's task score after − before on
    the same held-out task prompts (`task_gain_<arm>`; `task_gain_full` is the claim's "task learned" control)."""
    out = {f"task_gain_{a}": evidence.paired_proportions(h, hits_before).as_dict() for a, h in hits.items()}
    for other in ("full", "random"):
        if "spa" in complied and other in complied:
            out[f"spa_vs_{other}"] = evidence.paired_proportions(complied["spa"], complied[other]).as_dict()
    return out


def power_at(complied: dict[str, list[bool]], target: float = 0.8) -> dict:
    """What the SPA-vs-full comparison can detect at its n (`power.minimal_detectable_effect`, exact McNemar at
    5%, power `target`), beside the paper's 1-point threshold: `mde_best_case` = the smallest ASR difference any
    n paired prompts detect (every discordant prompt one way), `mde_observed` = the one at the discordance this
    run observed between SPA and full fine-tuning (None where no prompt was discordant or none is detectable)."""
    n = len(next(iter(complied.values())))
    out = {"n": n, "threshold": DRIFT_BOUND, "power": target, "alpha": evidence.ALPHA,
           "mde_best_case": power.best_case_mde(n, target, evidence.ALPHA), "discordance": None, "mde_observed": None}
    if "spa" in complied and "full" in complied:
        psi = sum(a != b for a, b in zip(complied["spa"], complied["full"])) / n
        mde = power.minimal_detectable_effect(n, psi, target, evidence.ALPHA) if psi > 0 else float("nan")
        out.update(discordance=psi, mde_observed=None if math.isnan(mde) else mde)
    return out


def run(cfg, model, tok, arms: dict, d: Data):
    """Tune and score every (task, arm) with `evaluation.judge`, then write generations, metrics.json and the
    loss curves (CSV per run + figure). Returns (metrics, curves, generations)."""
    s = cfg.spa
    judge = judges.get(cfg.evaluation.judge, cfg)
    metrics, curves, gens = run_arms(model, tok, s, {arm: r.masks for arm, r in arms.items()}, d.utility,
                                     d.harmful, judge, cfg.run.seed, d.harmful_pairs)
    results.SpaMetrics.parse(metrics, RESULTS / "metrics.json")   # the contract, checked before any write
    train.save_outputs(OUT, RESULTS, metrics, curves, gens, ["task", "arm"], f"SPA training loss ({s.model} model)",
                       s.loss_on_prompt)
    return metrics, curves, gens


SECTIONS = ("drift", "comparison", "power")   # metrics.json keys that are no task


def task_metrics(metrics: dict) -> dict:
    """{task: {arm: metrics}} without the paired estimates (`SECTIONS`)."""
    return {t: per for t, per in metrics.items() if t not in SECTIONS}


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
                           f"SPA vs plain, random-freeze and eroding fine-tuning, {s.max_steps} steps", ylim=None)
    plots.save(fig, RESULTS / "figures" / "task_and_drift.png")
    return fig


def untuned(metrics: dict) -> dict[str, dict]:
    """{task: the untuned model's task score, lenient accuracy and likelihood} (the same in every arm's metrics)."""
    metrics = task_metrics(metrics)
    return {task: {"task score": next(iter(per.values()))["task_score_before"],
                   "task accuracy (lenient)": next(iter(per.values())).get("task_accuracy_before"),
                   "task likelihood": next(iter(per.values()))["task_likelihood_before"]}
            for task, per in metrics.items()}


def claim(metrics: dict, cfg) -> dict:
    """The SPA claim's record as the report builds it (`reporting.claims`, decided by `evidence.decide`): its
    verdict, the reason and every part. Holm runs over the SPA parts only here; the report's p_holm runs over
    every claim's parts (only the superiority controls read it: `task_learned`, `ft_can_erode_safety`)."""
    parts, this_run = report_claims.spa_parts(results.SpaMetrics.parse(metrics), cfg)
    return {"this_run": this_run, **evidence.decide(parts)[CLAIM]}


def part_rows(record: dict) -> list[dict]:
    """The claim's parts as table rows: name, task, role, effect [95% CI], margin, verdict, reason."""
    def interval(p):
        if p["effect"] is None:
            return "–"
        ci = p["ci"] or [None, None]
        return f"{p['effect']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] (n {p['n']})" if None not in ci else \
            f"{p['effect']:+.3f} (n {p['n']})"
    return [{"part": p["name"], "task": p["condition"], "role": p["role"], "effect [95% CI]": interval(p),
             "claim": f"{p['direction']} {p['threshold']:g}", "verdict": p["verdict"], "reason": p["reason"] or ""}
            for p in record["parts"]]


def power_rows(metrics: dict) -> list[dict]:
    """Per task: the minimal ASR difference this n detects (best case, and at the observed SPA-vs-full
    discordance) beside the paper's 1-point threshold."""
    return [{"task": t, "paired prompts": p["n"], "paper threshold": p["threshold"],
             "minimal detectable (best case)": p["mde_best_case"], "observed discordance": p["discordance"],
             "minimal detectable (observed discordance)": p["mde_observed"]}
            for t, p in (metrics.get("power") or {}).items()]


def reading(metrics: dict, s: config.SpaCfg, harmful: dict[str, list[str]], record: dict) -> str:
    """Markdown bullets that read this run: the recipe, each task's arms, what n can detect, the claim's verdict
    (`record` = `claim(...)`, its words from `evidence.decide`)."""
    n_h = sum(map(len, harmful.values()))
    lines = [f"* {s.max_steps} optimizer steps per run (paper: 1,000) at lr {s.lr:g}, "
             f"{s.batch_size * s.grad_accum} examples per step; ASR on {n_h} held-out harmful prompts (one prompt "
             f"moves it by {1 / n_h:.3f}); arm `{POSITIVE_CONTROL}` mixes {s.harmful_fraction:.0%} harmful compliant "
             "pairs into the task data."]
    for task, per in task_metrics(metrics).items():
        parts = [f"`{arm}` ASR {m['asr_before']:.2f} → {m['asr_after']:.2f}, task {m['task_score_before']:.2f} → "
                 f"{m['task_score']:.2f}" for arm, m in per.items()]
        lines.append(f"* **{task}**: " + "; ".join(parts) + ".")
    for r in power_rows(metrics):
        best, seen = r["minimal detectable (best case)"], r["minimal detectable (observed discordance)"]
        lines.append(f"* {r['task']}: at n = {r['paired prompts']} an exact McNemar test detects (80% power) an ASR "
                     f"difference of {'–' if best is None else f'{best:.3f}'} at best"
                     + (f", {seen:.3f} at the observed SPA-vs-full discordance {r['observed discordance']:.3f}"
                        if seen is not None else "")
                     + f"; the paper's threshold is {r['paper threshold']:g}.")
    lines.append(f"* The claim: **{record['verdict']}** ({record['reason']}).")
    return "\n".join(lines)

"""The calibrate stage: per model, the model's own greedy responses to the identification prompts.

Calibration examples = (ident prompt, the model's own greedy response), produced once per model here and shared
by every method of the identify stage, so five methods cost one generation pass (docs/methods.md §2, shared
conventions). `methods.context.load_calibration` reads them back.

Scores built on n copies of one refusal sentence see one example, not n; so a set whose greedy responses are
near-identical (fewer distinct texts than `calibrate.min_distinct` x n) has each repeat re-answered once by
seeded sampling at `calibrate.temperature` (`repeats`); the metrics record the distinct counts before and after.
Also stored: the greedy answers to `calibrate.n_utility_eval` held-out (eval-split) utility prompts, the intact
reference of the identify stage's p/q sweep (`utility_eval.jsonl`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import chat, config, data, judges, models, plots  # noqa: F401  (config, plots: re-exported for the notebook)
from .. import results as results_
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import write_json, write_jsonl

PROMPTS = "artifacts/data/prompts.jsonl"


def out_dir(role: str) -> Path:
    return Path("artifacts/calibrate") / role


def calibrate(model, tok, sets: dict[str, list[str]], max_new_tokens: int, batch_size: int,
              system: str | None = None, judge=None) -> list[dict]:
    """One batched greedy pass over every set: rows {dataset, prompt, response, refused, finished};
    finished = the model ended the response itself (not cut off at max_new_tokens), so only then is EOS a
    training target."""
    names = [name for name, ps in sets.items() for _ in ps]
    prompts = [p for ps in sets.values() for p in ps]
    responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system,
                                        desc="calibrate", with_finished=True)
    refused = judge.judge(prompts, responses).refused if judge else [None] * len(prompts)
    return [{"dataset": n, "prompt": p, "response": r, "refused": None if x is None else bool(x), "finished": f}
            for n, p, r, x, f in zip(names, prompts, responses, refused, finished)]


def distinct(responses: list[str]) -> int:
    """Number of distinct responses (case and surrounding space ignored)."""
    return len({r.strip().lower() for r in responses})


def repeats(responses: list[str], min_distinct: float) -> list[int]:
    """The rule: if fewer than min_distinct x len(responses) of the responses are distinct, the positions of every
    repeat (each occurrence of a text after its first); else none."""
    if distinct(responses) >= min_distinct * len(responses):
        return []
    seen, out = set(), []
    for i, r in enumerate(responses):
        key = r.strip().lower()
        if key in seen:
            out.append(i)
        seen.add(key)
    return out


def diversify(model, tok, rows: list[dict], min_distinct: float, temperature: float, seed: int, max_new_tokens: int,
              batch_size: int, system: str | None = None, judge=None) -> list[dict]:
    """`rows` with the repeats of near-identical sets (`repeats`) re-answered in one seeded sampled pass; those rows
    get sampled=True, every other row sampled=False."""
    rows = [{**r, "sampled": False} for r in rows]
    redo = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["dataset"] == name]
        redo += [idx[j] for j in repeats([rows[i]["response"] for i in idx], min_distinct)]
    if not redo:
        return rows
    responses, finished = chat.generate(model, tok, [rows[i]["prompt"] for i in redo], max_new_tokens, batch_size,
                                        system, do_sample=True, seed=seed, temperature=temperature,
                                        desc="calibrate (sampled)", with_finished=True)
    refused = judge.judge([rows[i]["prompt"] for i in redo], responses).refused if judge else [None] * len(redo)
    for i, r, f, x in zip(redo, responses, finished, refused):
        rows[i].update(response=r, finished=f, sampled=True, refused=None if x is None else bool(x))
    return rows


def utility_eval(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int,
                 system: str | None = None) -> list[dict]:
    """The model's greedy answers to held-out utility prompts: rows {prompt, response}."""
    responses = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system, desc="utility eval")
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


def save_calibration(rows: list[dict], meta: dict, out: str | Path) -> None:
    out = Path(out)
    write_jsonl(out / "calibration.jsonl", rows)
    write_json(out / "meta.json", meta)


def run(cfg, role: str) -> pd.DataFrame:
    """Generate and save the calibration examples of model `role` (first `calibrate.n` ident prompts of each
    dataset and of the utility set, judged by `evaluation.judge`); returns them as a frame."""
    c = cfg.calibrate
    sets = {d: data.prompts(PROMPTS, d, "ident", c.n) for d in [*c.datasets, c.utility_set]}
    judge = judges.get(cfg.evaluation.judge, cfg)
    lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows = calibrate(lm, tok, sets, c.max_new_tokens, c.batch_size, c.system_prompt, judge)
    greedy = {d: distinct([r["response"] for r in rows if r["dataset"] == d]) for d in sets}
    rows = diversify(lm, tok, rows, c.min_distinct, c.temperature, cfg.run.seed, c.max_new_tokens, c.batch_size,
                     c.system_prompt, judge)
    held_out = utility_eval(lm, tok, data.prompts(PROMPTS, c.utility_set, "eval", c.n_utility_eval),
                            c.max_new_tokens, c.batch_size, c.system_prompt)
    meta = {"role": role, "model": cfg.models[role].id, "n": c.n, "max_new_tokens": c.max_new_tokens,
            "system_prompt": c.system_prompt, "datasets": c.datasets, "utility_set": c.utility_set,
            "dtype": str(next(lm.parameters()).dtype), "min_distinct": c.min_distinct,
            "temperature": c.temperature, "seed": cfg.run.seed, "distinct_greedy": greedy,
            "n_utility_eval": len(held_out)}
    save_calibration(rows, meta, out_dir(role))
    write_jsonl(out_dir(role) / "utility_eval.jsonl", held_out)
    return pd.DataFrame(rows)


def refusal_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prompt set: keyword-judge refusal rate, number of examples, distinct responses and how many of them
    were sampled (`diversify`), in set order."""
    g = frame.groupby("dataset", sort=False)
    out = g.refused.agg(["mean", "size"]).rename(columns={"mean": "refusal rate", "size": "n"})
    out["n distinct"] = g.response.agg(lambda rs: distinct(list(rs)))
    out["n sampled"] = g.sampled.sum() if "sampled" in frame else 0
    return out


def examples(frame: pd.DataFrame) -> pd.DataFrame:
    """The first example of each set."""
    return frame.groupby("dataset", sort=False).head(1)[["dataset", "prompt", "response", "refused"]]


def write_metrics(cfg, role: str, rates: pd.DataFrame, results: str | Path) -> None:
    """metrics.json: per set n, refusal rate, distinct responses (greedy, then after `diversify`) and sampled."""
    meta = json.loads((out_dir(role) / "meta.json").read_text())
    greedy = meta.get("distinct_greedy", {})
    results_.save("calibrate", Path(results) / "metrics.json", {
        "model": cfg.models[role].id, "role": role, "min_distinct": cfg.calibrate.min_distinct,
        "temperature": cfg.calibrate.temperature, "n_utility_eval": meta.get("n_utility_eval"),
        "sets": {d: {"n": int(r["n"]), "refusal_rate": float(r["refusal rate"]),
                     "n_distinct_greedy": greedy.get(d), "n_distinct": int(r["n distinct"]),
                     "n_sampled": int(r["n sampled"])} for d, r in rates.iterrows()}})

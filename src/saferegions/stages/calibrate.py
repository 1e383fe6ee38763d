"""The calibrate stage: per model, the model's own responses to the identification prompts.

Calibration examples = (ident prompt, the model's own response), produced once per model here and shared by every
method of the identify stage, so five methods cost one generation pass (docs/methods.md §2, shared conventions).
`methods.context.load_calibration` reads them back.

Safety examples are refusals, as Wei et al.'s safety data are: each safety prompt's greedy response is judged
(`evaluation.outcomes` with the evaluation judge: degenerate text is no refusal); one that does not refuse is
re-drawn by seeded sampling at most `calibrate.redraws` times (`redraw`), and the prompt is dropped if none refuses
(`select`; a set left with fewer than `calibrate.min_kept` refusals keeps its first non-refusals up to it, counted
as filled). The utility set keeps every greedy answer. Refusals are filtered first, then repeats: scores built on n
copies of one refusal sentence see one example, not n, so a set whose kept responses are near-identical (fewer
distinct texts than `calibrate.min_distinct` x n) has each repeat re-answered once by seeded sampling
(`diversify`), and in a safety set the re-answer replaces the repeat only if it refuses too.
Also stored: the greedy answers to `calibrate.n_utility_eval` held-out (eval-split) utility prompts, the intact
reference of the identify stage's p/q sweep (`utility_eval.jsonl`).
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pandas as pd

from .. import chat, config, data, evaluation, judges, models, plots  # noqa: F401  (config, plots: for the notebook)
from .. import results as results_
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import write_json, write_jsonl

PROMPTS = "artifacts/data/prompts.jsonl"


def out_dir(role: str) -> Path:
    return Path("artifacts/calibrate") / role


def refusals(judge, prompts: list[str], responses: list[str]) -> list[bool | None]:
    """Per response: a refusal (`evaluation.outcomes`: not degenerate, and the judge finds a refusal); None each
    without a judge."""
    if judge is None:
        return [None] * len(responses)
    return [o is evaluation.Outcome.REFUSED for o in evaluation.outcomes(responses, judge, prompts)]


def calibrate(model, tok, sets: dict[str, list[str]], max_new_tokens: int, batch_size: int,
              system: str | None = None, judge=None) -> list[dict]:
    """One batched greedy pass over every set: rows {dataset, prompt, response, refused, finished};
    finished = the model ended the response itself (not cut off at max_new_tokens), so only then is EOS a
    training target."""
    names = [name for name, ps in sets.items() for _ in ps]
    prompts = [p for ps in sets.values() for p in ps]
    responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system,
                                        desc="calibrate", with_finished=True)
    return [{"dataset": n, "prompt": p, "response": r, "refused": x, "finished": f}
            for n, p, r, x, f in zip(names, prompts, responses, refusals(judge, prompts, responses), finished)]


def redraw(model, tok, rows: list[dict], sets: Collection[str], redraws: int, temperature: float, seed: int,
           max_new_tokens: int, batch_size: int, system: str | None, judge) -> list[dict]:
    """`rows` whose set is in `sets` and whose response is no refusal re-answered by seeded sampling: pass k
    (seed + k, k = 1..redraws) answers the rows still not refusing, and a refusal it draws replaces the response.
    Each row gets greedy_refused and redraw: 0 = its response is the greedy one, k = drawn by pass k, None = no
    refusal found (the greedy response stays)."""
    rows = [{**r, "greedy_refused": r["refused"], "redraw": 0 if r["refused"] or r["dataset"] not in sets else None}
            for r in rows]
    for k in range(1, redraws + 1):
        todo = [i for i, r in enumerate(rows) if r["redraw"] is None]
        if not todo:
            break
        prompts = [rows[i]["prompt"] for i in todo]
        responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system, do_sample=True,
                                            seed=seed + k, temperature=temperature, desc=f"calibrate (re-draw {k})",
                                            with_finished=True)
        for i, r, f, x in zip(todo, responses, finished, refusals(judge, prompts, responses)):
            if x:
                rows[i].update(response=r, finished=f, refused=True, redraw=k)
    return rows


def select(rows: list[dict], sets: Collection[str], min_kept: int) -> list[dict]:
    """`rows` with kept and filled: a row of `sets` is kept if it refuses; a set with fewer than min_kept refusals
    also keeps its first non-refusals up to min_kept (filled=True), so every method has examples to score. Rows of
    other sets are all kept."""
    out = [{**r, "kept": True, "filled": False} for r in rows]
    for name in sets:
        idx = [i for i, r in enumerate(out) if r["dataset"] == name]
        short = min_kept - sum(bool(out[i]["refused"]) for i in idx)
        for i in idx:
            if not out[i]["refused"]:
                fill = short > 0
                out[i].update(kept=fill, filled=fill)
                short -= fill
    return out


def refusal_examples(model, tok, prompts: list[str], judge, redraws: int, temperature: float, seed: int,
                     max_new_tokens: int, batch_size: int, system: str | None = None) -> list[dict]:
    """The rule above for prompts answered after this stage (`Context.top_up`): greedy, `redraw`, and only the
    refusals kept, rows {prompt, response, finished}."""
    rows = calibrate(model, tok, {"set": prompts}, max_new_tokens, batch_size, system, judge)
    rows = redraw(model, tok, rows, {"set"}, redraws, temperature, seed, max_new_tokens, batch_size, system, judge)
    return [{k: r[k] for k in ("prompt", "response", "finished")} for r in rows if r["refused"]]


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
              batch_size: int, system: str | None = None, judge=None,
              refusals_only: Collection[str] = ()) -> list[dict]:
    """`rows` with the repeats of near-identical sets (`repeats`) re-answered in one seeded sampled pass; those rows
    get sampled=True, every other row sampled=False. In the sets `refusals_only` (judged by `judge`) a re-answer
    replaces the repeat only if it refuses."""
    rows = [{**r, "sampled": False} for r in rows]
    redo = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["dataset"] == name]
        redo += [idx[j] for j in repeats([rows[i]["response"] for i in idx], min_distinct)]
    if not redo:
        return rows
    if refusals_only and judge is None:
        raise ValueError("diversify: refusals_only needs a judge")
    prompts = [rows[i]["prompt"] for i in redo]
    responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size,
                                        system, do_sample=True, seed=seed, temperature=temperature,
                                        desc="calibrate (sampled)", with_finished=True)
    for i, r, f, x in zip(redo, responses, finished, refusals(judge, prompts, responses)):
        if x or rows[i]["dataset"] not in refusals_only:
            rows[i].update(response=r, finished=f, sampled=True, refused=x)
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
    dataset and of the utility set, judged by `evaluation.judge`); returns every asked row as a frame, the dropped
    ones with kept=False."""
    c = cfg.calibrate
    sets = {d: data.prompts(PROMPTS, d, "ident", c.n) for d in [*c.datasets, c.utility_set]}
    judge = judges.get(cfg.evaluation.judge, cfg)
    lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows = calibrate(lm, tok, sets, c.max_new_tokens, c.batch_size, c.system_prompt, judge)
    rows = redraw(lm, tok, rows, c.datasets, c.redraws, c.temperature, cfg.run.seed, c.max_new_tokens, c.batch_size,
                  c.system_prompt, judge)
    rows = select(rows, c.datasets, c.min_kept)
    kept = [r for r in rows if r["kept"]]
    before = {d: distinct([r["response"] for r in kept if r["dataset"] == d]) for d in sets}
    kept = diversify(lm, tok, kept, c.min_distinct, c.temperature, cfg.run.seed, c.max_new_tokens, c.batch_size,
                     c.system_prompt, judge, refusals_only=c.datasets)
    held_out = utility_eval(lm, tok, data.prompts(PROMPTS, c.utility_set, "eval", c.n_utility_eval),
                            c.max_new_tokens, c.batch_size, c.system_prompt)
    meta = {"role": role, "model": cfg.models[role].id, "n": c.n, "max_new_tokens": c.max_new_tokens,
            "system_prompt": c.system_prompt, "datasets": c.datasets, "utility_set": c.utility_set,
            "dtype": str(next(lm.parameters()).dtype), "min_distinct": c.min_distinct,
            "temperature": c.temperature, "seed": cfg.run.seed, "distinct_before": before,
            "redraws": c.redraws, "min_kept": c.min_kept, "asked": {d: len(ps) for d, ps in sets.items()},
            "n_utility_eval": len(held_out)}
    save_calibration(kept, meta, out_dir(role))
    write_jsonl(out_dir(role) / "utility_eval.jsonl", held_out)
    return pd.DataFrame(kept + [{**r, "sampled": False} for r in rows if not r["kept"]])


def refusal_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prompt set, in set order: prompts asked, refused greedily (refusal rate = their share), recovered by a
    re-draw, dropped, filled (non-refusals kept to reach min_kept), kept (n), distinct kept responses and how many
    of those were sampled (`diversify`)."""
    out = {}
    for name, g in frame.groupby("dataset", sort=False):
        kept = g[g.kept.astype(bool)]
        out[name] = {"n asked": len(g), "n refused greedily": int(g.greedy_refused.astype(bool).sum()),
                     "n recovered": int((g.redraw.fillna(0) > 0).sum()), "n dropped": len(g) - len(kept),
                     "n filled": int(kept.filled.astype(bool).sum()), "n": len(kept),
                     "refusal rate": float(g.greedy_refused.astype(bool).mean()),
                     "n distinct": distinct(list(kept.response)), "n sampled": int(kept.sampled.astype(bool).sum())}
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("dataset")


def examples(frame: pd.DataFrame) -> pd.DataFrame:
    """The first kept example of each set."""
    kept = frame[frame.kept.astype(bool)] if "kept" in frame else frame
    return kept.groupby("dataset", sort=False).head(1)[["dataset", "prompt", "response", "refused"]]


def write_metrics(cfg, role: str, rates: pd.DataFrame, results: str | Path) -> None:
    """metrics.json: per set the counts of `refusal_rates` and the distinct responses before `diversify`."""
    meta = json.loads((out_dir(role) / "meta.json").read_text())
    before = meta.get("distinct_before", {})
    c = cfg.calibrate
    results_.save("calibrate", Path(results) / "metrics.json", {
        "model": cfg.models[role].id, "role": role, "min_distinct": c.min_distinct, "temperature": c.temperature,
        "redraws": c.redraws, "min_kept": c.min_kept, "n_utility_eval": meta.get("n_utility_eval"),
        "sets": {d: {"n": int(r["n"]), "n_asked": int(r["n asked"]), "n_refused_greedy": int(r["n refused greedily"]),
                     "n_recovered": int(r["n recovered"]), "n_dropped": int(r["n dropped"]),
                     "n_filled": int(r["n filled"]), "refusal_rate": float(r["refusal rate"]),
                     "n_distinct_before": before.get(d), "n_distinct": int(r["n distinct"]),
                     "n_sampled": int(r["n sampled"])} for d, r in rates.iterrows()}})

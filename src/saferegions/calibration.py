"""Calibration examples: the model's own responses to identification prompts, safety ones kept only where they
refuse (Wei et al.'s safety data are refusals; docs/methods.md §2), and repeated refusal sentences re-answered.
The calibrate stage makes them once per model; the identify stage tops them up for a method that asks for more
(`methods.context.Context.top_up`) by the same rule."""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from . import chat, evaluation
from .io import write_json, write_jsonl


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

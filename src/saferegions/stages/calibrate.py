"""The calibrate stage: per model, the model's own greedy responses to the identification prompts.

Calibration examples = (ident prompt, the model's own greedy response), produced once per model here and shared
by every method of the identify stage, so five methods cost one generation pass (docs/methods.md §2, shared
conventions). `methods.context.load_calibration` reads them back.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import chat, config, data, judges, models, plots  # noqa: F401  (config, plots: re-exported for the notebook)
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
    return [{"dataset": n, "prompt": p, "response": r, "refused": bool(judge.refused(r)) if judge else None,
             "finished": f} for n, p, r, f in zip(names, prompts, responses, finished)]


def save_calibration(rows: list[dict], meta: dict, out: str | Path) -> None:
    out = Path(out)
    write_jsonl(out / "calibration.jsonl", rows)
    write_json(out / "meta.json", meta)


def run(cfg, role: str) -> pd.DataFrame:
    """Generate and save the calibration examples of model `role` (first `calibrate.n` ident prompts of each
    dataset and of the utility set, keyword-judged); returns them as a frame."""
    c = cfg.calibrate
    sets = {d: data.prompts(PROMPTS, d, "ident", c.n) for d in [*c.datasets, c.utility_set]}
    judge = judges.KeywordJudge.from_config(cfg.judges.keyword)
    lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    rows = calibrate(lm, tok, sets, c.max_new_tokens, c.batch_size, c.system_prompt, judge)
    meta = {"role": role, "model": cfg.models[role].id, "n": c.n, "max_new_tokens": c.max_new_tokens,
            "system_prompt": c.system_prompt, "datasets": c.datasets, "utility_set": c.utility_set,
            "dtype": str(next(lm.parameters()).dtype)}
    save_calibration(rows, meta, out_dir(role))
    return pd.DataFrame(rows)


def refusal_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prompt set: keyword-judge refusal rate and number of examples, in set order."""
    return frame.groupby("dataset", sort=False).refused.agg(["mean", "size"]).rename(
        columns={"mean": "refusal rate", "size": "n"})


def examples(frame: pd.DataFrame) -> pd.DataFrame:
    """The first example of each set."""
    return frame.groupby("dataset", sort=False).head(1)[["dataset", "prompt", "response", "refused"]]


def write_metrics(cfg, role: str, rates: pd.DataFrame, results: str | Path) -> None:
    write_json(Path(results) / "metrics.json", {"model": cfg.models[role].id, "role": role, "sets": {
        d: {"n": int(r["n"]), "refusal_rate": float(r["refusal rate"])} for d, r in rates.iterrows()}})

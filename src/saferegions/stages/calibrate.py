"""The calibrate stage: per model, the model's own responses to the identification prompts.

Calibration examples = (ident prompt, the model's own response), produced once per model here and shared by every
method of the identify stage, so five methods cost one generation pass (docs/methods.md §2, shared conventions).
`methods.context.load_calibration` reads them back.

Safety examples are refusals, as Wei et al.'s safety data are: each safety prompt's greedy response is judged
(`evaluation.outcomes` with the evaluation judge: degenerate text is no refusal); one that does not refuse is
re-drawn by seeded sampling at most `calibrate.redraws` times (`calibration.redraw`), and the prompt is dropped if none refuses
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
from pathlib import Path

import pandas as pd

from .. import config, data, judges, models, plots  # noqa: F401  (config, plots: for the notebook)
from .. import results as results_
from ..calibration import calibrate, distinct, diversify, redraw, save_calibration, select, utility_eval
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..io import write_jsonl

PROMPTS = "artifacts/data/prompts.jsonl"


def out_dir(role: str) -> Path:
    return Path("artifacts/calibrate") / role


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

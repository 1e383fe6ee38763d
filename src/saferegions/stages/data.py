"""The data stage: normalize the raw public files in data/ into the prompt tables every later stage reads
(artifacts/data/*.jsonl), and count what they hold.

`saferegions.data` does the reading, splitting and writing; this module runs it with the stage's params and
derives the counts the notebook shows and metrics.json records.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import config, plots, results  # noqa: F401  (re-exported: the notebook parses params and draws with them)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..data import BENIGN_SETS, SAFETY_SETS, _norm, build, registry

RAW, OUT, RESULTS = Path("data"), Path("artifacts/data"), Path("results/data")


def build_tables(cfg) -> dict[str, list[dict]]:
    """Every table of the stage, written to artifacts/data/ and returned as the rows written."""
    return build(RAW, OUT, seed=cfg.run.seed, **vars(cfg.data))


def registry_files() -> dict[str, int]:
    """How many registry files data/ holds, of how many, and how many the loaders require (the rest are
    optional: copied only when the mirror has them)."""
    entries = registry()
    return {"present": sum((RAW / e["file"]).is_file() for e in entries), "total": len(entries),
            "required": sum(not e.get("optional") for e in entries)}


def set_sizes(prompts: pd.DataFrame) -> pd.DataFrame:
    """Prompts per set (rows, safety then benign sets) and split (columns)."""
    sizes = prompts.pivot_table(index="dataset", columns="split", values="id", aggfunc="count", fill_value=0)
    return sizes.reindex(list(SAFETY_SETS + BENIGN_SETS))


def leaked_eval_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """Evaluation prompts whose text equals an identification prompt of any set: there must be none, or an
    evaluation number would be measured on a prompt a region was found with."""
    ident = set(prompts[prompts.split == "ident"].prompt.map(_norm))
    return prompts[(prompts.split == "eval") & prompts.prompt.map(_norm).isin(ident)]


def categories_per_set(prompts: pd.DataFrame) -> pd.Series:
    """Distinct harm categories per safety set (a set without categories counts one)."""
    safety = prompts[prompts.dataset.isin(SAFETY_SETS)].assign(category=lambda d: d.category.replace("", "(none)"))
    return safety.groupby("dataset").category.nunique().reindex(list(SAFETY_SETS))


def write_metrics(sizes: pd.DataFrame, tables: dict[str, list[dict]]) -> None:
    """results/data/metrics.json: prompts per set and split, and the sizes of the other tables."""
    results.save("data", RESULTS / "metrics.json", {
        "sets": {d: {s: int(n) for s, n in row.items()} for d, row in sizes.to_dict("index").items()},
        "utility_rows": len(tables["utility"]), "alignment_pairs": len(tables["pairs"]),
        "judge_rows": len(tables["judge"]),
    })

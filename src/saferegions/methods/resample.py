"""Prompt bootstrap of the weight-level methods' overlap (stage `overlap`, docs/methods.md §3.3): how much the
pairwise IoU of the resamplable methods' regions (`methods.resamplable`: SNIP, Wanda) moves when each dataset's calibration examples are resampled."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import chat, regions
from ..overlap import count, plan
from ..regions import PackedRegion
from . import Resolves, get, resamplable
from .context import examples

RESOLVES = Resolves.SCORES   # re-identifies with every resamplable method's score: DVC deps on their code


def bootstrap_ious(model, tok, calib: dict, method: str, datasets: Sequence[str], n: int | None, q: float,
                   group: str, utility: PackedRegion | None, n_resamples: int, seed: int, batch_size: int = 8,
                   max_length: int = 512, system: str | None = None, progress: bool = True) -> list[dict]:
    """Resample each dataset's calibration examples with replacement, re-identify (the method's own scores and
    top-q selection, as `identify`), and recompute every pairwise IoU: one row per (resample, pair), raw and —
    with the stored utility region held fixed — refined (via the identity). Percentiles of these rows are the
    bootstrap interval over prompts."""
    datasets = list(datasets)
    if len(datasets) < 2:
        raise ValueError("bootstrap needs at least two datasets to form a pair")
    method_entry = get(method)
    if method_entry.scores is None:
        raise ValueError(f"method {method!r} has no per-example score to resample; resamplable: "
                         f"{', '.join(resamplable())}")
    missing = [d for d in datasets if d not in calib]
    if missing:
        raise ValueError(f"no calibration examples for {missing}")
    rng = np.random.default_rng(seed)
    rows = []
    for r in tqdm(range(n_resamples), desc=f"bootstrap {method}", disable=not progress):
        found = []
        for d in datasets:
            prompts, responses, finished = examples(calib[d])
            k = min(n or len(prompts), len(prompts))
            pick = rng.integers(0, len(prompts), k)
            ps, rs = [prompts[i] for i in pick], [responses[i] for i in pick]
            fs = [finished[i] for i in pick] if finished is not None else None
            batches = list(chat.response_batches(tok, ps, rs, batch_size, max_length, system, fs))
            region = regions.top_fraction(method_entry.score(model, batches), q, group)
            found.append(regions.pack(region))
            del region
        u = "_utility" if utility is not None else None
        m = count(found + ([utility] if u else []), datasets + ([u] if u else []), plan(datasets, minus=u))
        for a, b in itertools.combinations(datasets, 2):
            row = {"resample": r, "method": method, "pair": f"{a}–{b}", "raw": m.multiway([a, b])}
            if utility is not None:
                row["refined"] = m.refined(a, b, "_utility")
            rows.append(row)
    return rows

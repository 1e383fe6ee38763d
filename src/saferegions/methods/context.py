"""What every identification runner reads (`Context`: model, calibration examples, params) and the pieces
runners share: calibration loading, provenance of refined regions, and the weight-level recipe of SNIP and
Wanda (docs/methods.md §2, shared conventions). A runner (`methods.Method.runner`) turns a Context into
(dataset, kind, Region) items:

- ``<utility_set>.utility``: the region found on the utility set (the set that refinement subtracts);
- ``<dataset>.raw``: the region found on one identification dataset;
- ``<dataset>.refined``: raw minus utility (docs/methods.md §3.5), at the method's own granularity;
- NLSR only: the same three with a ``.lora`` suffix, over LoRA entries.

Every region lives in one parameter space, `models.eligible_weights` (docs/methods.md §3.1), so later stages
compare all methods with the same IoU code.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import chat, data, regions
from ..io import read_jsonl
from ..regions import Region


def load_calibration(folder: str | Path) -> tuple[dict[str, tuple[list[str], list[str], list[bool]]], dict]:
    """({set: (prompts, responses, finished)}, meta) from a `calibrate` artifact folder (rows written before
    `finished` existed count as finished, the old behaviour)."""
    folder = Path(folder)
    if not (folder / "calibration.jsonl").exists():
        raise FileNotFoundError(f"no calibration examples in {folder}: run the calibrate stage first")
    sets: dict[str, tuple[list[str], list[str], list[bool]]] = {}
    for r in read_jsonl(folder / "calibration.jsonl"):
        ps, rs, fs = sets.setdefault(r["dataset"], ([], [], []))
        ps.append(r["prompt"])
        rs.append(r["response"])
        fs.append(r.get("finished", True))
    return sets, json.loads((folder / "meta.json").read_text())


def examples(entry: tuple) -> tuple[list[str], list[str], list[bool] | None]:
    """(prompts, responses, finished) of a calibration entry; finished None (all ended) for a 2-tuple."""
    prompts, responses, *rest = entry
    return prompts, responses, rest[0] if rest else None


@dataclass
class Context:
    """Everything a method needs; `details` collects method-specific diagnostics for the notebook."""
    model: object
    tok: object
    role: str
    model_id: str
    calib: dict[str, tuple]     # {set: (prompts, responses[, finished])}, as `load_calibration` returns
    datasets: list[str]
    utility_set: str
    cfg: object                 # config.IdentifyCfg
    seed: int = 0
    system: str | None = None
    prompts_path: str = "artifacts/data/prompts.jsonl"
    pairs_path: str = "artifacts/data/pairs.jsonl"
    judge: object = None        # judges.KeywordJudge (layer sweep)
    details: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)   # method-level numbers for metrics.json
    max_new_tokens: int = 16    # calibrate settings, for the examples `top_up` adds
    gen_batch_size: int = 32

    def __post_init__(self):
        missing = [d for d in [*self.datasets, self.utility_set] if d not in self.calib]
        if missing:
            raise ValueError(f"calibration examples lack {missing}; re-run the calibrate stage")

    def top_up(self, names: list[str], n: int) -> None:
        """Extend the calibration examples of `names` to n with the next ident prompts (calibrate took the first
        calibrate.n), answered greedily with the calibrate settings in one batched pass: a method that needs more
        examples than the others (neurons) pays for them alone. Sets with fewer ident prompts keep what exists."""
        need = {}
        for name in names:
            have = self.calib[name][0]
            if len(have) >= n:
                continue
            found = data.prompts(self.prompts_path, name, "ident", n)
            if found[:len(have)] != have:
                raise ValueError(f"calibration examples of {name!r} are not the first ident prompts of "
                                 f"{self.prompts_path}; re-run the calibrate stage")
            if len(found) > len(have):
                need[name] = found[len(have):]
        if not need:
            return
        flat = [p for ps in need.values() for p in ps]
        answers = iter(zip(*chat.generate(self.model, self.tok, flat, self.max_new_tokens,
                                          self.gen_batch_size, self.system, desc="calibrate (top-up)",
                                          with_finished=True)))
        self.calib = dict(self.calib)                     # the caller's examples stay as they were
        for name, ps in need.items():
            prompts, responses, finished = examples(self.calib[name])
            new = [next(answers) for _ in ps]
            self.calib[name] = (prompts + ps, responses + [r for r, _ in new],
                                (finished or [True] * len(prompts)) + [f for _, f in new])

    def batches(self, name: str, n: int | None = None) -> list[dict]:
        prompts, responses, finished = examples(self.calib[name])
        n = n or len(prompts)
        return list(chat.response_batches(self.tok, prompts[:n], responses[:n], self.cfg.batch_size,
                                          self.cfg.max_length, self.system, finished and finished[:n]))

    def meta(self, method: str, dataset: str, kind: str, n: int | None = None, **extra) -> dict:
        available = len(self.calib[dataset][0])
        return {"method": method, "model": self.model_id, "role": self.role, "dataset": dataset, "kind": kind,
                "n": min(n, available) if n else available, "seed": self.seed, **extra}


def refined_meta(raw: Region, utility: Region, **refinement) -> dict:
    return {**raw.meta, "kind": "refined",
            "refinement": {"utility_dataset": utility.meta["dataset"], **refinement}}


# ---------------------------------------------------------------- weight-level methods (§2.1)


def weight_method(ctx: Context, method: str, score, n: int | None = None) -> Iterator[tuple[str, str, Region]]:
    """Top-q per matrix of each dataset's scores; refined = raw \\ top-p of the utility scores (Wei et al.'s
    S(p, q)). Scores are computed one set at a time and dropped, so memory holds one score tensor set."""
    c = ctx.cfg
    sel = {"q": c.q, "p": c.p, "group": c.group}
    util = regions.top_fraction(score(ctx.batches(ctx.utility_set, n)), c.p, c.group,
                                meta=ctx.meta(method, ctx.utility_set, "utility", n, **sel))
    yield ctx.utility_set, "utility", util
    for d in ctx.datasets:
        raw = regions.top_fraction(score(ctx.batches(d, n)), c.q, c.group,
                                   meta=ctx.meta(method, d, "raw", n, **sel))
        refined = regions.difference(raw, util)
        refined.meta = refined_meta(raw, util, p=c.p, q=c.q, rule="top_q(safety) \\ top_p(utility)")
        yield d, "raw", raw
        yield d, "refined", refined

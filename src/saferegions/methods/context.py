"""What every identification runner reads (`Context`: model, calibration examples, params) and the pieces
runners share: calibration loading, provenance of refined regions, and the weight-level recipe of SNIP and
Wanda (docs/methods.md §2, shared conventions). A runner (`methods.Method.runner`) turns a Context into
(dataset, kind, Region) items:

- ``<utility_set>.utility``: the region found on the utility set (the set that refinement subtracts);
- ``<dataset>.raw``: the region found on one identification dataset;
- ``<dataset>.refined``: raw minus utility (docs/methods.md §3.5), at the method's own granularity;
- NLSR only: the same three with a ``.lora`` suffix, over LoRA entries;
- weight-level methods, for `identify.split_half_datasets`: ``<dataset>.half0.raw`` / ``<dataset>.half1.raw``,
  the raw region from each half of that dataset's examples (the overlap stage's within-dataset noise ceiling).

Every region lives in one parameter space, `models.eligible_weights` (docs/methods.md §3.1), so later stages
compare all methods with the same IoU code.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import chat, data, distributed, regions
from ..checkpoints import unit
from ..io import read_jsonl
from ..regions import Region, RegionKind
from .removal import ablation


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


def load_utility_eval(folder: str | Path) -> tuple[list[str], list[str]] | None:
    """(held-out utility prompts, the model's greedy answers) that the calibrate stage stored, or None."""
    path = Path(folder) / "utility_eval.jsonl"
    if not path.exists():
        return None
    rows = read_jsonl(path)
    return [r["prompt"] for r in rows], [r["response"] for r in rows]


def split_halves(n: int) -> tuple[list[int], list[int]]:
    """Disjoint halves covering range(n): even and odd positions (both halves see early and late prompts)."""
    return list(range(0, n, 2)), list(range(1, n, 2))


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
    judge: object = None        # the evaluation judge (`judges.get`; layer sweep)
    details: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)   # method-level numbers for metrics.json
    max_new_tokens: int = 16    # calibrate settings, for the examples `top_up` adds
    gen_batch_size: int = 32
    utility_eval: tuple | None = None   # (prompts, intact greedy answers): `load_utility_eval`, for the p/q sweep
    utility: object = None      # evaluation.utility_score (set by the identify stage; the library keeps out of it)
    split_half: list[str] = field(default_factory=list)   # datasets that also get half0/half1 raw regions
    asked: dict[str, int] = field(default_factory=dict)   # ident prompts calibrate asked per set (kept or not)
    refusals: object = None     # prompts -> the refusal rows among the model's answers (calibrate's rule), or None
    checkpoints: object = None  # `checkpoints.Checkpoints` of this run (the identify stage's), or None: no resume
    launch: object = None       # how the identify stage re-launches this run on FSDP2 ranks (run.distributed: fsdp;
                                # model and tok are then None here), or None: it runs in this process

    def __post_init__(self):
        missing = [d for d in [*self.datasets, self.utility_set] if d not in self.calib]
        if missing:
            raise ValueError(f"calibration examples lack {missing}; re-run the calibrate stage")

    def top_up(self, names: list[str], n: int) -> None:
        """Extend the calibration examples of `names` to n with the next ident prompts (those after the ones
        calibrate asked), answered with the calibrate settings in one batched pass (a safety set keeps only the
        refusals `refusals` finds, as calibrate does): a method that needs more examples than the others (neurons)
        pays for them alone. Sets with fewer ident prompts or refusals keep what exists."""
        need = {}
        for name in names:
            have = self.calib[name][0]
            if len(have) >= n:
                continue
            asked = self.asked.get(name, len(have))
            found = data.prompts(self.prompts_path, name, "ident", asked + n - len(have))
            rest = iter(found[:asked])
            if not all(p in rest for p in have):       # `have` is a subsequence of the first `asked` prompts
                raise ValueError(f"calibration examples of {name!r} are not among the first ident prompts of "
                                 f"{self.prompts_path}; re-run the calibrate stage")
            if len(found) > asked:
                need[name] = found[asked:]
        if not need:
            return
        safety = {k: ps for k, ps in need.items() if self.refusals is not None and k != self.utility_set}
        plain = [p for k, ps in need.items() if k not in safety for p in ps]
        answers = iter(zip(*chat.generate(self.model, self.tok, plain, self.max_new_tokens, self.gen_batch_size,
                                          self.system, desc="calibrate (top-up)", with_finished=True))) if plain \
            else iter(())
        refused = {r["prompt"]: (r["response"], r["finished"])
                   for r in self.refusals([p for ps in safety.values() for p in ps])} if safety else {}
        self.calib = dict(self.calib)                     # the caller's examples stay as they were
        for name, ps in need.items():
            prompts, responses, finished = examples(self.calib[name])
            new = [(p, *refused[p]) for p in ps if p in refused] if name in safety else \
                [(p, *next(answers)) for p in ps]
            self.calib[name] = (prompts + [p for p, _, _ in new], responses + [r for _, r, _ in new],
                                (finished or [True] * len(prompts)) + [f for _, _, f in new])

    def unit(self, name: str, compute):
        """`compute()`, or its value saved by an earlier, killed run of the same identification (`checkpoints`).
        A runner wraps each dataset's expensive work in one unit that returns all it produces (regions, details,
        metrics), so a resumed run ends as an uninterrupted one. The ranks of a sharded model run every forward
        together, so there a unit is read back only where every rank kept it."""
        if self.checkpoints is None or not distributed.active():
            return unit(self.checkpoints, name, compute)
        value = self.checkpoints.load(name)
        if not distributed.every_rank(value is not None):
            value = compute()
            self.checkpoints.save(name, value)
        return value

    def batches(self, name: str, n: int | None = None, subset: list[int] | None = None) -> list[dict]:
        """Response batches of the first n examples of `name` (only positions `subset` of those, if given)."""
        prompts, responses, finished = examples(self.calib[name])
        idx = list(range(min(n or len(prompts), len(prompts))))
        idx = [idx[i] for i in subset] if subset is not None else idx
        pick = lambda xs: [xs[i] for i in idx]   # noqa: E731
        return list(chat.response_batches(self.tok, pick(prompts), pick(responses), self.cfg.batch_size,
                                          self.cfg.max_length, self.system, finished and pick(finished)))

    def halves(self, name: str, n: int | None = None) -> tuple[list[int], list[int]]:
        """`split_halves` of the examples `batches(name, n)` uses."""
        return split_halves(min(n or len(self.calib[name][0]), len(self.calib[name][0])))

    def meta(self, method: str, dataset: str, kind: str, n: int | None = None, **extra) -> dict:
        available = len(self.calib[dataset][0])
        return {"method": method, "model": self.model_id, "role": self.role, "dataset": dataset, "kind": kind,
                "n": min(n, available) if n else available, "seed": self.seed, **extra}


def refined_meta(raw: Region, utility: Region, **refinement) -> dict:
    return {**raw.meta, "kind": RegionKind.REFINED,
            "refinement": {"utility_dataset": utility.meta["dataset"], **refinement}}


# ---------------------------------------------------------------- weight-level methods (§2.1)


def weight_method(ctx: Context, method: str, score, n: int | None = None,
                  p: float | None = None) -> Iterator[tuple[str, str, Region]]:
    """Top-q per matrix of each dataset's scores; refined = raw \\ top-p of the utility scores (Wei et al.'s
    S(p, q)). Scores are computed one set at a time and dropped, so memory holds one score tensor set (two for
    the sweep dataset). Also: half0/half1 raw regions for `ctx.split_half` datasets, and the p/q sweep
    (`pq_sweep`) on `identify.pq_dataset` when the grid is set and utility answers exist; its points go to
    `ctx.metrics`. `p`: the method's own top-p (None = identify.p). On an FSDP2-sharded model (`distributed.shard`)
    the scores are local shards and every region holds this rank's masks, selected as one process would
    (`regions.top_fraction_sharded`)."""
    c = ctx.cfg
    top_fraction = regions.top_fraction_sharded if distributed.sharded(ctx.model) else regions.top_fraction
    p = c.p if p is None else p
    sel = {"q": c.q, "p": p, "group": c.group}
    do_sweep = bool(c.pq_grid_q and c.pq_grid_p and ctx.utility_eval and ctx.utility and c.pq_dataset in ctx.datasets)

    def utility_unit():
        scores = score(ctx.batches(ctx.utility_set, n))
        util_meta = ctx.meta(method, ctx.utility_set, RegionKind.UTILITY, n, **sel)
        return {"util": top_fraction(scores, p, c.group, meta=util_meta),
                "utils": {pp: top_fraction(scores, pp, c.group) for pp in c.pq_grid_p} if do_sweep else {}}

    def half_unit(d, i, half):
        return top_fraction(score(ctx.batches(d, n, half)), c.q, c.group,
                            meta=ctx.meta(method, d, RegionKind.half(i), len(half), half=i, **sel))

    def raw_unit(d):
        scores = score(ctx.batches(d, n))
        return {"raw": top_fraction(scores, c.q, c.group, meta=ctx.meta(method, d, RegionKind.RAW, n, **sel)),
                "raws": {q: top_fraction(scores, q, c.group) for q in c.pq_grid_q}
                if do_sweep and d == c.pq_dataset else {}}

    first = ctx.unit(f"{ctx.utility_set}.utility", utility_unit)
    util, utils = first["util"], first["utils"]
    yield ctx.utility_set, RegionKind.UTILITY, util
    for d in ctx.datasets:
        if d in ctx.split_half:
            for i, half in enumerate(ctx.halves(d, n)):
                yield d, RegionKind.half(i), ctx.unit(f"{d}.half{i}", lambda: half_unit(d, i, half))
        found = ctx.unit(f"{d}.raw", lambda: raw_unit(d))
        raw, raws = found["raw"], found["raws"]
        refined = regions.difference(raw, util)
        refined.meta = refined_meta(raw, util, p=p, q=c.q, rule="top_q(safety) \\ top_p(utility)")
        yield d, RegionKind.RAW, raw
        yield d, RegionKind.REFINED, refined
        if raws:
            prompts, answers = ctx.utility_eval
            intact, points = ctx.unit(f"{d}.pq_sweep", lambda: pq_sweep(
                ctx.model, ctx.tok, ctx.utility, raws, utils, prompts, answers, c.batch_size, ctx.system))
            best = pq_pick(points, c.min_utility_ratio)
            ctx.metrics.update({"pq_sweep": points, "pq_sweep_dataset": d, "pq_intact_utility": intact,
                                "pq_n_prompts": len(prompts), "pq_min_utility_ratio": c.min_utility_ratio,
                                "pq_pick": best and {"q": best["q"], "p": best["p"]},
                                "pq_used": {"q": c.q, "p": p,
                                            "meets_rule": pq_meets(points, c.q, p, c.min_utility_ratio)}})
            del raws, utils


# ---------------------------------------------------------------- the SNIP/Wanda p/q sweep
# How large a refined region is and how much utility survives its removal at each point of a small (q, p) grid,
# so the default p/q can be one whose refined region leaves the model usable: ablating the refined region keeps
# utility >= identify.min_utility_ratio of the intact model's, on held-out utility prompts answered by the intact model.


def pq_sweep(model, tok, utility, raws: dict, utils: dict, prompts: list[str], answers: list[str], batch_size: int,
             system: str | None = None) -> tuple[float, list[dict]]:
    """(intact utility, [{q, p, density, utility, utility_ratio}]) for every q of `raws` ({q: raw Region}) and
    p of `utils` ({p: utility Region}); the refined region raw \\ utility is removed for one pass of `utility`
    (`evaluation.utility_score`: teacher-forced likelihood of the intact model's greedy answers)."""
    intact = utility(model, tok, prompts, answers, batch_size, system)
    points = []
    for q, raw in sorted(raws.items()):
        for p, util in sorted(utils.items()):
            refined = regions.difference(raw, util)
            with ablation(model, refined):
                u = utility(model, tok, prompts, answers, batch_size, system)
            points.append({"q": q, "p": p, "density": density(refined), "utility": u,
                           "utility_ratio": u / intact if intact else float("nan")})
    return intact, points


def density(region: Region) -> float:
    """The region's density; for a region of local shards (a rank of a sharded model), that of all ranks' shards."""
    if not distributed.active():
        return region.density
    size, numel = distributed.all_reduce(torch.tensor([region.size, region.numel])).tolist()
    return size / numel if numel else 0.0


def pq_pick(points: list[dict], min_ratio: float) -> dict | None:
    """The rule: the point with the largest refined region among those whose removal keeps utility_ratio >=
    min_ratio (ties: smaller p, then smaller q); None when no point meets it."""
    ok = [pt for pt in points if pt["utility_ratio"] >= min_ratio]
    return max(ok, key=lambda pt: (pt["density"], -pt["p"], -pt["q"])) if ok else None


def pq_meets(points: list[dict], q: float, p: float, min_ratio: float) -> bool | None:
    """Whether the grid point (q, p) meets the rule (None: not on the grid)."""
    for pt in points:
        if abs(pt["q"] - q) < 1e-12 and abs(pt["p"] - p) < 1e-12:
            return pt["utility_ratio"] >= min_ratio
    return None

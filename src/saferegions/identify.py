"""Identification orchestration (stages `calibrate` and `identify`): one function per method of paper 1
(METHODS §2) that turns (model, tokenizer, calibration examples, params) into Regions.

Every region lives in one parameter space, `models.eligible_weights` (METHODS §3.1), so later stages compare
all methods with the same IoU code; neuron and layer regions also keep their native units in `Region.units`,
and NLSR keeps its LoRA-space region beside the base-weight projection. A method yields, per prompt set:

- ``<utility_set>.utility``: the region found on the utility set (the set that refinement subtracts);
- ``<dataset>.raw``: the region found on one identification dataset;
- ``<dataset>.refined``: raw minus utility (METHODS §3.5), at the method's own granularity;
- NLSR only: the same three with a ``.lora`` suffix, over LoRA entries.

Calibration examples = (ident prompt, the model's own greedy response), produced once per model by
`calibrate` and shared by every method, so five methods cost one generation pass.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


from . import chat, data, regions
from .hooks import one_thread, single_thread
from .io import read_jsonl, write_json, write_jsonl
from .methods import layers, neurons, nlsr, snip, wanda
from .models import component, layer_index
from .regions import Region

METHODS = ("snip", "wanda", "neuron", "layer", "nlsr")
DESCRIPTIONS = {
    "snip": "**SNIP** (Wei et al. 2024): I = |W| ⊙ Σ_s |∂L_s/∂W|, L_s = cross-entropy on the response tokens of "
            "calibration example s; region = top-q per matrix; refined = top-q(safety) \\ top-p(utility).",
    "wanda": "**Wanda** (Wei et al. 2024): I_ij = |W_ij| · ‖X_j‖₂ over response-token inputs; region = top-q per "
             "matrix; refined = top-q(safety) \\ top-p(utility).",
    "neuron": "**Safety neurons** (SN-Tune detector): per prompt, the top fraction of attention (q/k/v/o) and FFN "
              "neurons by the change their deactivation makes to the sub-layer output, intersected over prompts; "
              "refined = safety neurons \\ utility neurons; projected to rows/columns of the weights (§3.2).",
    "layer": "**SafeLayer** (Shen Li et al. 2025): where the last-token cosine similarity of normal–malicious "
             "prompt pairs parts from same-type pairs (step 1), refined by the over-rejection sweep (step 2); "
             "refined = safety layers \\ layers found with the utility set as the 'malicious' side.",
    "nlsr": "**NLSR** (Yi et al. 2025): one safety LoRA (harmful → refusal), expo-rescaled; per dataset the "
            "ActSVD low-rank projection on that dataset's activations, top keep_frac |W| per LoRA matrix; "
            "refined = safety \\ utility on LoRA entries; projected to base weights by |ΔW| (§3.2).",
}


# ---------------------------------------------------------------- calibration


def calibrate(model, tok, sets: dict[str, list[str]], max_new_tokens: int, batch_size: int,
              system: str | None = None, judge=None) -> list[dict]:
    """One batched greedy pass over every set: rows {dataset, prompt, response, refused}."""
    names = [name for name, ps in sets.items() for _ in ps]
    prompts = [p for ps in sets.values() for p in ps]
    responses = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system, desc="calibrate")
    return [{"dataset": n, "prompt": p, "response": r, "refused": bool(judge.refused(r)) if judge else None}
            for n, p, r in zip(names, prompts, responses)]


def save_calibration(rows: list[dict], meta: dict, out: str | Path) -> None:
    out = Path(out)
    write_jsonl(out / "calibration.jsonl", rows)
    write_json(out / "meta.json", meta)


def load_calibration(folder: str | Path) -> tuple[dict[str, tuple[list[str], list[str]]], dict]:
    """({set: (prompts, responses)}, meta) from a `calibrate` artifact folder."""
    folder = Path(folder)
    if not (folder / "calibration.jsonl").exists():
        raise FileNotFoundError(f"no calibration examples in {folder}: run the calibrate stage first")
    sets: dict[str, tuple[list[str], list[str]]] = {}
    for r in read_jsonl(folder / "calibration.jsonl"):
        ps, rs = sets.setdefault(r["dataset"], ([], []))
        ps.append(r["prompt"])
        rs.append(r["response"])
    return sets, json.loads((folder / "meta.json").read_text())


# ---------------------------------------------------------------- context


@dataclass
class Context:
    """Everything a method needs; `details` collects method-specific diagnostics for the notebook."""
    model: object
    tok: object
    role: str
    model_id: str
    calib: dict[str, tuple[list[str], list[str]]]
    datasets: list[str]
    utility_set: str
    cfg: object                 # config.IdentifyCfg
    seed: int = 0
    system: str | None = None
    prompts_path: str = "artifacts/data/prompts.jsonl"
    pairs_path: str = "artifacts/data/pairs.jsonl"
    judge: object = None        # judges.KeywordJudge (layer sweep)
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [d for d in [*self.datasets, self.utility_set] if d not in self.calib]
        if missing:
            raise ValueError(f"calibration examples lack {missing}; re-run the calibrate stage")

    def batches(self, name: str, n: int | None = None) -> list[dict]:
        prompts, responses = self.calib[name]
        n = n or len(prompts)
        return list(chat.response_batches(self.tok, prompts[:n], responses[:n], self.cfg.batch_size,
                                          self.cfg.max_length, self.system))

    def meta(self, method: str, dataset: str, kind: str, n: int | None = None, **extra) -> dict:
        available = len(self.calib[dataset][0])
        return {"method": method, "model": self.model_id, "role": self.role, "dataset": dataset, "kind": kind,
                "n": min(n, available) if n else available, "seed": self.seed, **extra}


def _refined_meta(raw: Region, utility: Region, **refinement) -> dict:
    return {**raw.meta, "kind": "refined",
            "refinement": {"utility_dataset": utility.meta["dataset"], **refinement}}


# ---------------------------------------------------------------- weight-level methods (§2.1)


def _weight_method(ctx: Context, method: str, score, n: int | None = None) -> Iterator[tuple[str, str, Region]]:
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
        refined.meta = _refined_meta(raw, util, p=c.p, q=c.q, rule="top_q(safety) \\ top_p(utility)")
        yield d, "raw", raw
        yield d, "refined", refined


def run_snip(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    n = ctx.cfg.snip.n
    yield from _weight_method(ctx, "snip", lambda b: snip.snip_scores(ctx.model, b, progress=False), n)


def run_wanda(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    yield from _weight_method(ctx, "wanda", lambda b: wanda.wanda_scores(ctx.model, b, progress=False))


# ---------------------------------------------------------------- neurons (§2.2)


@one_thread
def _neuron_region(ctx: Context, units: dict, meta: dict) -> Region:
    units = {str(l): u for l, u in units.items()}
    return Region(neurons.to_weight_masks(ctx.model, units), meta, {"neurons": units})


def run_neuron(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    c = ctx.cfg.neuron
    sel = {"attn_frac": c.attn_frac, "ffn_frac": c.ffn_frac, "min_prompt_frac": c.min_prompt_frac,
           "qk_mode": c.qk_mode, "attn_rank": c.attn_rank}

    def units(name):
        return neurons.identify(ctx.model, ctx.batches(name), c.attn_frac, c.ffn_frac, c.min_prompt_frac,
                                c.qk_mode, c.chunk, c.attn_rank)

    u_units = units(ctx.utility_set)
    util = _neuron_region(ctx, u_units, ctx.meta("neuron", ctx.utility_set, "utility", **sel))
    yield ctx.utility_set, "utility", util
    for d in ctx.datasets:
        s_units = units(d)
        raw = _neuron_region(ctx, s_units, ctx.meta("neuron", d, "raw", **sel))
        refined = _neuron_region(ctx, neurons.refine(s_units, u_units),
                                 _refined_meta(raw, util, rule="safety neurons \\ utility neurons"))
        yield d, "raw", raw
        yield d, "refined", refined


# ---------------------------------------------------------------- layers (§2.3)


@one_thread
def _layer_region(ctx: Context, ids, meta: dict) -> Region:
    ids = sorted(int(i) for i in ids)
    return Region(layers.to_weight_masks(ctx.model, ids), meta, {"layers": ids})


def run_layer(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """Step 1 per dataset against one fixed set of normal prompts; step 2 sweeps are memoised across datasets
    (a candidate range's refusal count does not depend on the dataset). The normal side is the *last* n ident
    prompts of `normal_set`, disjoint from the utility calibration prompts (its first n) when the two sets
    coincide, so the utility run compares two samples of the same distribution."""
    c = ctx.cfg.layer
    n = len(ctx.calib[ctx.datasets[0]][0])
    normal = data.prompts(ctx.prompts_path, c.normal_set, "ident")[-n:]
    overrej = data.prompts(ctx.prompts_path, c.overrej_set, "ident", c.n_overrej)
    states = lambda ps: layers.last_token_states(ctx.model, ctx.tok, ps, ctx.cfg.batch_size)  # noqa: E731
    xn = states(normal)
    cache: dict = {}
    sel = {"normal_set": c.normal_set, "overrej_set": c.overrej_set, "n_overrej": len(overrej),
           "alpha": c.alpha, "jump": c.jump, "grow": c.grow, "sweep_radius": c.sweep_radius, "pairs": c.pairs}

    def find(name: str) -> list[int]:
        stats = layers.cosine_stats(xn, states(ctx.calib[name][0]), c.pairs, ctx.seed)
        info = {"gap": [(a + b) / 2 - m for a, b, m in zip(stats["nn_mean"], stats["mm_mean"], stats["nm_mean"])]}
        try:
            s, e = layers.gap_range(stats, c.jump, c.grow)
        except ValueError as err:           # the rule found no range: an empty region, reported as such
            ctx.details[name] = {**info, "step1": None, "best": None, "note": str(err)}
            return []
        if c.sweep_radius == 0:             # step 1 only: the single candidate needs no generations
            ctx.details[name] = {**info, "step1": [s, e], "best": [s, e], "note": "step 1 only (sweep_radius 0)"}
            return list(range(s, e))
        sweep = layers.overrejection_sweep(ctx.model, ctx.tok, overrej, s, e, judge=_refusals(ctx.judge),
                                           alpha=c.alpha, radius=c.sweep_radius, max_new_tokens=c.max_new_tokens,
                                           scale_o_proj=c.scale_o_proj, batch_size=ctx.cfg.batch_size,
                                           cache=cache)
        ctx.details[name] = {**info, "step1": [s, e], "best": list(sweep["best"]), "table": sweep["table"],
                             "baseline_refusals": sweep["baseline"]}
        return list(range(*sweep["best"]))

    u_ids = find(ctx.utility_set)
    util = _layer_region(ctx, u_ids, ctx.meta("layer", ctx.utility_set, "utility", **sel))
    yield ctx.utility_set, "utility", util
    for d in ctx.datasets:
        ids = find(d)
        raw = _layer_region(ctx, ids, ctx.meta("layer", d, "raw", **sel))
        refined = _layer_region(ctx, set(ids) - set(u_ids), _refined_meta(raw, util, rule="layers \\ utility layers"))
        yield d, "raw", raw
        yield d, "refined", refined


def _refusals(judge):
    from .judges import KeywordJudge
    judge = judge or KeywordJudge()
    return lambda responses: [judge.refused(r) for r in responses]


# ---------------------------------------------------------------- NLSR (§2.4)


def run_nlsr(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """One safety LoRA per model (fixed across datasets), trained on the first steps × batch_size alignment
    pairs; the base-weight projection is the Region, the LoRA-space region is kept as `<kind>.lora`."""
    c = ctx.cfg.nlsr
    pairs = read_jsonl(ctx.pairs_path)[:c.steps * c.batch_size]
    peft_model, losses = nlsr.train_safety_lora(ctx.model, ctx.tok, [r["prompt"] for r in pairs],
                                                [r["response"] for r in pairs], c.lora_r, c.lora_alpha, c.dropout,
                                                c.steps, c.lr, c.batch_size, ctx.seed, c.max_length, progress=False)
    nlsr.expo_rescale(peft_model, c.expo_alpha)
    ctx.details["lora_loss"] = losses
    sel = {"lora_r": c.lora_r, "lora_alpha": c.lora_alpha, "steps": c.steps, "lr": c.lr, "n_pairs": len(pairs),
           "expo_alpha": c.expo_alpha, "rank_ratio": c.rank_ratio, "keep_frac": c.keep_frac}

    def base(lora: Region, projected, meta) -> Region:
        return Region(nlsr.to_base_masks(peft_model, lora, projected), {**meta, "space": "eligible"})

    def find(name: str, kind: str):
        lora, projected = nlsr.identify(peft_model, ctx.batches(name), c.rank_ratio, c.keep_frac, progress=False)
        lora.meta = {**ctx.meta("nlsr", name, kind, **sel), "space": "lora", "selection": lora.meta["selection"]}
        return lora, projected

    u_lora, u_proj = find(ctx.utility_set, "utility")
    yield ctx.utility_set, "utility", base(u_lora, u_proj, u_lora.meta)
    yield ctx.utility_set, "utility.lora", u_lora
    for d in ctx.datasets:
        lora, projected = find(d, "raw")
        r_lora = nlsr.refine(lora, u_lora)
        r_lora.meta = {**_refined_meta(lora, u_lora, rule="LoRA safety \\ LoRA utility"), "space": "lora"}
        yield d, "raw", base(lora, projected, lora.meta)
        yield d, "raw.lora", lora
        yield d, "refined", base(r_lora, projected, r_lora.meta)
        yield d, "refined.lora", r_lora


RUNNERS = {"snip": run_snip, "wanda": run_wanda, "neuron": run_neuron, "layer": run_layer, "nlsr": run_nlsr}


# ---------------------------------------------------------------- run + summaries


def profile(region: Region) -> tuple[dict[int, float], dict[str, float]]:
    """Density per decoder layer and per component (q/k/v/o/gate/up/down...) of a base-space region."""
    counts: dict = defaultdict(lambda: [0, 0])
    comps: dict = defaultdict(lambda: [0, 0])
    for name, m in region.masks.items():
        k, n = int(m.count_nonzero()), m.numel()
        for table, key in ((counts, layer_index(name)), (comps, component(name))):
            table[key][0] += k
            table[key][1] += n
    return ({l: a / b for l, (a, b) in sorted(counts.items()) if l is not None},
            {c: a / b for c, (a, b) in comps.items() if c is not None})


def _units_summary(region: Region) -> dict:
    u = region.units or {}
    if "layers" in u:
        return {"layers": u["layers"], "n_units": len(u["layers"])}
    if "neurons" in u:
        per = defaultdict(int)
        for layer in u["neurons"].values():
            for unit, idx in layer.items():
                per[unit] += len(idx)
        return {"n_units": sum(per.values()), **{f"n_{k}": v for k, v in per.items()}}
    return {}


def region_path(out: str | Path, dataset: str, kind: str) -> Path:
    return Path(out) / f"{dataset}.{kind}.safetensors"


def run(method: str, ctx: Context, out: str | Path) -> list[dict]:
    """Run one method, save every region as it is produced (bool masks are dropped right after packing), and
    return one summary row per region: size, density, per-layer and per-component density, native units."""
    if method not in RUNNERS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    rows = []
    for dataset, kind, region in RUNNERS[method](ctx):
        with single_thread():
            regions.save(region, region_path(out, dataset, kind))
            size, numel = region.size, region.numel
            row = {"dataset": dataset, "kind": kind, "size": size, "numel": numel, "density": size / numel,
                   **_units_summary(region)}
            if not kind.endswith(".lora"):
                row["by_layer"], row["by_component"] = profile(region)
        rows.append(row)
    return rows


def metrics(rows: list[dict], method: str, role: str, model_id: str, details: dict) -> dict:
    """results/identify/<model>-<method>/metrics.json: sizes and densities per dataset, raw and refined."""
    out = {"method": method, "model": model_id, "role": role, "datasets": {}}
    for r in rows:
        entry = {"size": r["size"], "density": r["density"], **{k: r[k] for k in ("n_units",) if k in r}}
        if r["kind"] == "utility":
            out["utility"] = {"dataset": r["dataset"], **entry}
        elif r["kind"] in ("raw", "refined"):
            out["datasets"].setdefault(r["dataset"], {})[r["kind"]] = entry
        elif r["kind"].endswith(".lora") and r["kind"] != "utility.lora":
            out["datasets"].setdefault(r["dataset"], {})[r["kind"].replace(".", "_")] = entry
    if "lora_loss" in details:
        out["lora_loss_first"], out["lora_loss_last"] = details["lora_loss"][0], details["lora_loss"][-1]
    return out



# ---------------------------------------------------------------- tables for the notebook


def summary_frame(rows: list[dict]):
    """One row per saved region: dataset, kind, size, density and native-unit counts."""
    import pandas as pd
    cols = [c for c in ("dataset", "kind", "size", "numel", "density", "n_units", "n_ffn", "n_q", "n_k", "n_v",
                        "n_o", "layers") if any(c in r for r in rows)]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])


def profile_frame(rows: list[dict], kind: str, axis: str):
    """dataset × layer (axis="by_layer") or dataset × component ("by_component") densities of one kind."""
    import pandas as pd
    table = pd.DataFrame({r["dataset"]: r[axis] for r in rows if r["kind"] == kind}).T
    if axis == "by_component":
        order = [c for c in ("q", "k", "v", "o", "gate", "up", "down", "gate_up") if c in table.columns]
        table = table[order]
    return table


def layer_frames(details: dict):
    """(per-dataset step-1 / step-2 ranges, long-form gap curves) from the layer method's details."""
    import pandas as pd
    ranges = pd.DataFrame([{"dataset": d, "step-1 range": v["step1"], "sweep best": v["best"],
                            "baseline refusals": v.get("baseline_refusals"), "note": v.get("note", "")}
                           for d, v in details.items()])
    gaps = pd.DataFrame([{"dataset": d, "layer": i, "gap": g} for d, v in details.items()
                         for i, g in enumerate(v["gap"])])
    return ranges, gaps

"""Identification orchestration (stages `calibrate` and `identify`): one function per method of paper 1
(docs/methods.md §2) that turns (model, tokenizer, calibration examples, params) into Regions.

Every region lives in one parameter space, `models.eligible_weights` (docs/methods.md §3.1), so later stages compare
all methods with the same IoU code; neuron and layer regions also keep their native units in `Region.units`,
and NLSR keeps its LoRA-space region beside the base-weight projection. A method yields, per prompt set:

- ``<utility_set>.utility``: the region found on the utility set (the set that refinement subtracts);
- ``<dataset>.raw``: the region found on one identification dataset;
- ``<dataset>.refined``: raw minus utility (docs/methods.md §3.5), at the method's own granularity;
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
from .config import LAYER_MIN_PROMPTS
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


# ---------------------------------------------------------------- context


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
    """`identify.neuron.n` prompts per set (beyond calibrate.n they are answered here, `Context.top_up`): the
    strict intersection shrinks with every prompt, so 2 prompts leave a region far denser than SN-Tune's < 1%.
    Metrics get the weight-space density of the intersection over the first k prompts, k = 1, 2, 4, …, n, so
    the notebook shows whether it has stabilised at n."""
    c = ctx.cfg.neuron
    names = [ctx.utility_set, *ctx.datasets]
    if c.n:
        ctx.top_up(names, c.n)
    sel = {"attn_frac": c.attn_frac, "ffn_frac": c.ffn_frac, "min_prompt_frac": c.min_prompt_frac,
           "qk_mode": c.qk_mode, "attn_rank": c.attn_rank}
    curves = ctx.metrics.setdefault("neuron_density_vs_n", {})

    def units(name):
        scores = neurons.neuron_scores(ctx.model, ctx.batches(name, c.n), c.qk_mode, c.chunk)
        n = next(iter(scores.values()))["q"].shape[0]
        ks = sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
        curves[name] = {k: neurons.density_after(ctx.model, scores, k, c.attn_frac, c.ffn_frac, c.min_prompt_frac,
                                                 c.attn_rank) for k in ks}
        ctx.metrics["calibration_n"] = min(n, ctx.metrics.get("calibration_n", n))
        return neurons.select_neurons(scores, c.attn_frac, c.ffn_frac, c.min_prompt_frac, c.attn_rank)

    u_units = units(ctx.utility_set)
    util = _neuron_region(ctx, u_units, ctx.meta("neuron", ctx.utility_set, "utility", c.n, **sel))
    yield ctx.utility_set, "utility", util
    for d in ctx.datasets:
        s_units = units(d)
        raw = _neuron_region(ctx, s_units, ctx.meta("neuron", d, "raw", c.n, **sel))
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
    (a candidate range's refusal count does not depend on the dataset). Each side holds `identify.layer.n`
    distinct prompts (no responses needed, so they come from the ident split, not the calibration examples): 2 per
    side would make the 500 "random pairs" one same-type pair repeated. The "M" side is a set's first n prompts,
    the normal side the *last* n of `normal_set`, disjoint from the utility side (its first n) when the two sets
    coincide and hold >= 2n prompts, so the utility run compares two samples of the same distribution."""
    c = ctx.cfg.layer
    sizes: list[int] = []

    def side(name: str, last: bool = False) -> list[str]:
        ps = data.prompts(ctx.prompts_path, name, "ident")
        ps = list(dict.fromkeys(ps[-c.n:] if last else ps[:c.n]))       # pairs only from distinct prompts
        if len(ps) < LAYER_MIN_PROMPTS:
            raise ValueError(f"SafeLayer needs >= {LAYER_MIN_PROMPTS} distinct prompts per side; {name!r} has "
                             f"{len(ps)} ident prompts")
        sizes.append(len(ps))
        return ps

    normal = side(c.normal_set, last=True)
    overrej = data.prompts(ctx.prompts_path, c.overrej_set, "ident", c.n_overrej)
    states = lambda ps: layers.last_token_states(ctx.model, ctx.tok, ps, ctx.cfg.batch_size)  # noqa: E731
    xn = states(normal)
    cache: dict = {}
    sel = {"normal_set": c.normal_set, "overrej_set": c.overrej_set, "n_overrej": len(overrej),
           "alpha": c.alpha, "jump": c.jump, "grow": c.grow, "sweep_radius": c.sweep_radius, "pairs": c.pairs}

    def find(name: str) -> list[int]:
        stats = layers.cosine_stats(xn, states(side(name)), c.pairs, ctx.seed)
        ctx.metrics["prompts_per_side"] = min(sizes)
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
    util = _layer_region(ctx, u_ids, {**ctx.meta("layer", ctx.utility_set, "utility", **sel), "n": sizes[-1]})
    yield ctx.utility_set, "utility", util
    for d in ctx.datasets:
        ids = find(d)
        raw = _layer_region(ctx, ids, {**ctx.meta("layer", d, "raw", **sel), "n": sizes[-1]})
        refined = _layer_region(ctx, set(ids) - set(u_ids), _refined_meta(raw, util, rule="layers \\ utility layers"))
        yield d, "raw", raw
        yield d, "refined", refined


def _refusals(judge):
    from .judges import KeywordJudge
    judge = judge or KeywordJudge()
    return lambda responses: [judge.refused(r) for r in responses]


# ---------------------------------------------------------------- NLSR (§2.4)


def run_nlsr(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """One safety LoRA per model (fixed across datasets), trained on alignment pairs until the loss on one fixed
    held-out batch (the first `heldout` pairs, never trained on) stops falling, or for `steps` steps. Then, if
    `seed_check`, a second LoRA from init seed + 1 (same pairs, same order) gives `seed_iou`: the IoU of the two
    LoRAs' raw regions on the first dataset beside its chance level. Near chance, the region is set by the random
    init, not by the data. The base-weight projection is the Region, the LoRA-space region is `<kind>.lora`."""
    c = ctx.cfg.nlsr
    pairs = read_jsonl(ctx.pairs_path)
    held, pool = pairs[:c.heldout], pairs[c.heldout:c.heldout + c.steps * c.batch_size]
    if not pool:
        raise ValueError(f"{ctx.pairs_path} has {len(pairs)} pairs: none left to train on after {c.heldout} held out")

    def train(init_seed: int):
        return nlsr.train_safety_lora(
            ctx.model, ctx.tok, [r["prompt"] for r in pool], [r["response"] for r in pool], c.lora_r, c.lora_alpha,
            c.dropout, c.steps, c.lr, c.batch_size, ctx.seed, c.max_length, progress=False,
            heldout=([r["prompt"] for r in held], [r["response"] for r in held]), eval_every=c.eval_every,
            patience=c.patience, min_delta=c.min_delta, init_seed=init_seed)

    peft_model, hist = train(ctx.seed)
    nlsr.expo_rescale(peft_model, c.expo_alpha)
    ctx.details["lora_loss"], ctx.details["lora_heldout"] = hist["train_loss"], hist["heldout"]
    ctx.metrics.update({"train_steps": hist["steps"], "best_step": hist["best_step"], "heldout_n": len(held),
                        "heldout_loss_before": hist["heldout_loss_before"],
                        "heldout_loss_after": hist["heldout_loss_after"]})
    sel = {"lora_r": c.lora_r, "lora_alpha": c.lora_alpha, "steps": hist["steps"], "lr": c.lr, "n_pairs": len(pool),
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
    first = None
    for d in ctx.datasets:
        lora, projected = find(d, "raw")
        r_lora = nlsr.refine(lora, u_lora)
        r_lora.meta = {**_refined_meta(lora, u_lora, rule="LoRA safety \\ LoRA utility"), "space": "lora"}
        raw = base(lora, projected, lora.meta)
        first = first or (d, raw, lora)
        yield d, "raw", raw
        yield d, "raw.lora", lora
        yield d, "refined", base(r_lora, projected, r_lora.meta)
        yield d, "refined.lora", r_lora
    peft_model.unload()                                  # the base model back, for the second LoRA
    if c.seed_check and first:
        d, raw, lora = first
        other, hist2 = train(ctx.seed + 1)
        nlsr.expo_rescale(other, c.expo_alpha)
        lora2, proj2 = nlsr.identify(other, ctx.batches(d), c.rank_ratio, c.keep_frac, progress=False)
        raw2 = Region(nlsr.to_base_masks(other, lora2, proj2), {})
        other.unload()
        ctx.metrics.update({"seed_iou_dataset": d, "seed_iou_seeds": [ctx.seed, ctx.seed + 1],
                            "seed_iou": regions.iou(raw, raw2),
                            "seed_iou_chance": regions.chance_iou(raw.density, raw2.density),
                            "seed_iou_lora": regions.iou(lora, lora2),
                            "seed_iou_lora_chance": regions.chance_iou(lora.density, lora2.density),
                            "seed2_train_steps": hist2["steps"],
                            "seed2_heldout_loss_after": hist2["heldout_loss_after"]})


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


def metrics(rows: list[dict], method: str, role: str, model_id: str, details: dict,
            extra: dict | None = None) -> dict:
    """results/identify/<model>-<method>/metrics.json: sizes and densities per dataset, raw and refined, plus the
    method's own numbers (`Context.metrics`: NLSR training and seed IoU, neuron density vs n, SafeLayer prompts
    per side)."""
    out = {"method": method, "model": model_id, "role": role, "datasets": {}, **(extra or {})}
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

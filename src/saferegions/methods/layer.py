"""SafeLayer (docs/methods.md §2.3): "safety layers" are where normal and malicious prompts' last-token states part.

Step 1 (`layer_cosine`, `gap_range`): per-layer cosine similarity of N-N, M-M and N-M prompt pairs; the range
starts where the same-type vs cross-type gap first jumps and ends where it stops growing. Step 2
(`overrejection_sweep`): scale the candidate layers' projection weights by α and keep the range that makes the
model refuse the most borderline-benign prompts. Ranges are half-open layer ids [start, end), layer ℓ being
decoder block ℓ (0-based). The region's native units are layer ids.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .. import data
from ..chat import _prefilled_batch, generate, render
from ..hooks import one_thread, scaled_weights
from ..models import block_modules, component, eligible_weights, input_device, layer_index
from ..regions import Region, RegionKind
from . import LAYER_MIN_PROMPTS
from .context import Context, refined_meta
from .removal import Granularity

PAIR_TYPES = ("nn", "mm", "nm")


@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], batch_size: int = 8,
                      template: str | None = None) -> torch.Tensor:
    """[layers, prompts, hidden] fp32: each block's hidden state at the last prompt token (HF's
    `hidden_states[1:]`, so the last entry is after the final norm, as in the reference). One batched forward
    per batch with left padding equals the reference's one-token generation at step 0. The batch's shared prefix
    (the system turn, about half of a Qwen prompt) runs once from a KV cache, and no vocabulary projection runs:
    16 prompts per side cost what 8 did."""
    texts = [template.format(prompt=p) for p in prompts] if template else render(tok, prompts)
    device = input_device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [tok(t, add_special_tokens=template is not None)["input_ids"] for t in texts[start:start + batch_size]]
        ids, mask, cache = _prefilled_batch(model, rows, tok.pad_token_id, device)   # [prefix][pads][own tokens]
        k = cache.get_seq_length() if cache is not None else 0
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hs = model(input_ids=ids[:, k:], attention_mask=mask, position_ids=positions[:, k:], past_key_values=cache,
                   output_hidden_states=True, use_cache=cache is not None, logits_to_keep=1).hidden_states[1:]
        out.append(torch.stack([h[:, -1].float().cpu() for h in hs]))
    return torch.cat(out, dim=1)


def _pairs(n_a: int, n_b: int, count: int, same: bool, seed: int) -> torch.Tensor:
    """[count, 2] random index pairs; within one pool the two prompts differ (like random.sample(pool, 2))."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(n_a, (count,), generator=g)
    if not same:
        return torch.stack([i, torch.randint(n_b, (count,), generator=g)], 1)
    j = torch.randint(n_a - 1, (count,), generator=g)
    return torch.stack([i, j + (j >= i)], 1)


def layer_cosine(model, tok, normal_prompts: list[str], malicious_prompts: list[str], pairs: int = 500,
                 seed: int = 0, batch_size: int = 8, template: str | None = None) -> dict:
    """Per layer, mean and std (population) of the cosine similarity over `pairs` random N-N, M-M and N-M
    pairs, read from Gram matrices of the unit-normalised last-token states. Also returns the pairs drawn."""
    if min(len(normal_prompts), len(malicious_prompts)) < 2:
        raise ValueError("need at least two normal and two malicious prompts")
    xn = last_token_states(model, tok, normal_prompts, batch_size, template)
    xm = last_token_states(model, tok, malicious_prompts, batch_size, template)
    return cosine_stats(xn, xm, pairs, seed)


def cosine_stats(normal_states: torch.Tensor, malicious_states: torch.Tensor, pairs: int = 500,
                 seed: int = 0) -> dict:
    """`layer_cosine` from precomputed [layers, prompts, hidden] states, so one set of normal-prompt states
    serves every malicious dataset."""
    if min(normal_states.shape[1], malicious_states.shape[1]) < 2:
        raise ValueError("need at least two normal and two malicious prompts")
    xn = torch.nn.functional.normalize(normal_states.float(), dim=-1)
    xm = torch.nn.functional.normalize(malicious_states.float(), dim=-1)
    grams = {"nn": xn @ xn.transpose(1, 2), "mm": xm @ xm.transpose(1, 2), "nm": xn @ xm.transpose(1, 2)}
    stats = {"pairs": {}}
    for offset, kind in enumerate(PAIR_TYPES):
        g = grams[kind]
        idx = _pairs(g.shape[1], g.shape[2], pairs, kind != "nm", seed + offset)
        sims = g[:, idx[:, 0], idx[:, 1]]                       # [layers, pairs]
        stats[f"{kind}_mean"] = sims.mean(1).tolist()
        stats[f"{kind}_std"] = sims.std(1, correction=0).tolist()
        stats["pairs"][kind] = idx.tolist()
    return stats


def gap_range(stats: dict, jump: float = 0.001, grow: float = 1e-4) -> tuple[int, int]:
    """[start, end) by the automated rule: gap_ℓ = mean(N-N, M-M) − N-M; start = first layer whose gap exceeds
    the previous layer's by > `jump`; the range continues while the gap grows by > `grow` per layer."""
    nn_, mm, nm = (torch.tensor(stats[f"{k}_mean"]) for k in PAIR_TYPES)
    gap = (nn_ + mm) / 2 - nm
    rise = gap[1:] - gap[:-1]                                   # rise[ℓ-1] = gap_ℓ − gap_{ℓ-1}
    jumps = (rise > jump).nonzero().flatten()
    if len(jumps) == 0:
        raise ValueError(f"the N-M gap never jumps by > {jump} between layers; no safety-layer range found")
    start = int(jumps[0]) + 1
    end = start + 1
    while end < len(gap) and rise[end - 1] > grow:
        end += 1
    return start, end


def layer_weight_names(model, layers, include_o: bool = True) -> list[str]:
    """The projection weights (q, k, v, o, gate, up, down; experts and shared experts too) of those blocks."""
    layers = set(layers)
    return [n for n in eligible_weights(model)
            if layer_index(n) in layers and (include_o or component(n) != "o")]


@torch.no_grad()
def overrejection_sweep(model, tok, prompts: list[str], start: int, end: int, *, judge, alpha: float = 1.1,
                        radius: int = 3, max_new_tokens: int = 16, scale_o_proj: bool = True,
                        sweep_start: bool = False, batch_size: int = 16, cache: dict | None = None) -> dict:
    """Refusals R_o on `prompts` (greedy, `judge(responses) -> [refused]`) with layers [s, e) scaled by α.
    Candidates: e within ±`radius` of the step-1 end; s fixed at the step-1 start, or also ±`radius` when
    `sweep_start` ((2r+1)² generations instead of 2r+1). `scale_o_proj=False` reproduces the published
    numbers' o_proj bug. Weights are restored bit-exactly after every candidate. Best = most refusals, ties to
    the narrower, then earlier range. `cache` (a dict the caller keeps) memoises refusal counts per range, so
    sweeps for several datasets with the same prompts and settings generate each candidate once.
    Returns {"baseline": unscaled refusals, "table": [{start, end, refusals}], "best": (s, e)}."""
    n_layers = len(block_modules(model))
    cache = {} if cache is None else cache

    def refusals(s: int, e: int) -> int:
        if (s, e) not in cache:
            with scaled_weights(model, layer_weight_names(model, range(s, e), scale_o_proj), alpha):
                responses = generate(model, tok, prompts, max_new_tokens, batch_size, desc="over-rejection")
                cache[s, e] = int(sum(judge(responses)))
        return cache[s, e]

    starts = range(max(0, start - radius), start + radius + 1) if sweep_start else [start]
    table = [{"start": s, "end": e, "refusals": refusals(s, e)}
             for s in starts for e in range(max(s + 1, end - radius), min(n_layers, end + radius) + 1)]
    if not table:
        raise ValueError(f"no candidate range around [{start}, {end}) within {n_layers} layers")
    best = max(table, key=lambda r: (r["refusals"], -(r["end"] - r["start"]), -r["start"]))
    return {"baseline": refusals(0, 0), "table": table, "best": (best["start"], best["end"])}


def to_weight_masks(model, layers) -> dict[str, torch.Tensor]:
    """Layer ℓ → all elements of block ℓ's projection matrices (docs/methods.md §3.2; norms excluded)."""
    layers = {int(l) for l in layers}
    return {n: torch.full(p.shape, layer_index(n) in layers, dtype=torch.bool)
            for n, p in eligible_weights(model).items()}


# ---------------------------------------------------------------- granularity


class Layers(Granularity):
    """Layer regions (`units["layers"]`): their blocks' projection weights scaled by `layer_alpha`; control = as
    many random layers."""

    name = "layers"

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        return scaled_weights(model, layer_weight_names(model, region.units["layers"]), layer_alpha)

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        n = len(block_modules(model))
        ids = sorted(random.Random(seed).sample(range(n), len(region.units["layers"])))
        meta = {"method": "random", "seed": seed, "reference": region.meta, "granularity": self.name}
        return Region(to_weight_masks(model, ids), meta, {"layers": ids})

    def units_summary(self, region: Region) -> dict:
        return {"layers": region.units["layers"], "n_units": len(region.units["layers"])}


# ---------------------------------------------------------------- runner (identify stage, docs/methods.md §2.3)


@one_thread
def _layer_region(ctx: Context, ids, meta: dict) -> Region:
    ids = sorted(int(i) for i in ids)
    return Region(to_weight_masks(ctx.model, ids), meta, {"layers": ids})


def run(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """Step 1 per dataset against one fixed set of normal prompts; step 2 sweeps are memoised across datasets
    (a candidate range's refusal count does not depend on the dataset). Each side holds `identify.layer.n`
    distinct prompts (no responses needed, so they come from the ident split, not the calibration examples): 2 per
    side would make the 500 "random pairs" one same-type pair repeated. The "M" side is a set's first n prompts,
    the normal side the *last* n of `normal_set`, disjoint from the utility side (its first n) when the two sets
    coincide and hold >= 2n prompts, so the utility run compares two samples of the same distribution."""
    c = ctx.cfg.layer

    def side(name: str, last: bool = False) -> list[str]:
        ps = data.prompts(ctx.prompts_path, name, "ident")
        ps = list(dict.fromkeys(ps[-c.n:] if last else ps[:c.n]))       # pairs only from distinct prompts
        if len(ps) < LAYER_MIN_PROMPTS:
            raise ValueError(f"SafeLayer needs >= {LAYER_MIN_PROMPTS} distinct prompts per side; {name!r} has "
                             f"{len(ps)} ident prompts")
        return ps

    normal = side(c.normal_set, last=True)
    sizes = [len(normal)]
    overrej = data.prompts(ctx.prompts_path, c.overrej_set, "ident", c.n_overrej)
    states = lambda ps: last_token_states(ctx.model, ctx.tok, ps, ctx.cfg.batch_size)  # noqa: E731
    xn = states(normal)
    cache: dict = {}
    sel = {"normal_set": c.normal_set, "overrej_set": c.overrej_set, "n_overrej": len(overrej),
           "alpha": c.alpha, "jump": c.jump, "grow": c.grow, "sweep_radius": c.sweep_radius, "pairs": c.pairs}

    def layers(name: str) -> dict:
        """{"ids": the layers found on set `name`, "details": the notebook's record of how, "size": prompts}."""
        ps = side(name)
        stats = cosine_stats(xn, states(ps), c.pairs, ctx.seed)
        info = {"gap": [(a + b) / 2 - m for a, b, m in zip(stats["nn_mean"], stats["mm_mean"], stats["nm_mean"])]}
        found = {"size": len(ps)}
        try:
            s, e = gap_range(stats, c.jump, c.grow)
        except ValueError as err:           # the rule found no range: an empty region, reported as such
            return {**found, "ids": [], "details": {**info, "step1": None, "best": None, "note": str(err)}}
        if c.sweep_radius == 0:             # step 1 only: the single candidate needs no generations
            return {**found, "ids": list(range(s, e)),
                    "details": {**info, "step1": [s, e], "best": [s, e], "note": "step 1 only (sweep_radius 0)"}}
        sweep = overrejection_sweep(ctx.model, ctx.tok, overrej, s, e, judge=_refusals(ctx.judge, overrej),
                                           alpha=c.alpha, radius=c.sweep_radius, max_new_tokens=c.max_new_tokens,
                                           scale_o_proj=c.scale_o_proj, batch_size=ctx.cfg.batch_size,
                                           cache=cache)
        return {**found, "ids": list(range(*sweep["best"])),
                "details": {**info, "step1": [s, e], "best": list(sweep["best"]), "table": sweep["table"],
                            "baseline_refusals": sweep["baseline"]}}

    def find(name: str) -> list[int]:
        found = ctx.unit(f"{name}.layers", lambda: layers(name))
        sizes.append(found["size"])
        ctx.metrics["prompts_per_side"] = min(sizes)
        ctx.details[name] = found["details"]
        return found["ids"]

    u_ids = find(ctx.utility_set)
    util = _layer_region(ctx, u_ids, {**ctx.meta("layer", ctx.utility_set, RegionKind.UTILITY, **sel), "n": sizes[-1]})
    yield ctx.utility_set, RegionKind.UTILITY, util
    for d in ctx.datasets:
        ids = find(d)
        raw = _layer_region(ctx, ids, {**ctx.meta("layer", d, RegionKind.RAW, **sel), "n": sizes[-1]})
        refined = _layer_region(ctx, set(ids) - set(u_ids), refined_meta(raw, util, rule="layers \\ utility layers"))
        yield d, RegionKind.RAW, raw
        yield d, RegionKind.REFINED, refined


def _refusals(judge, prompts: list[str]):
    """`overrejection_sweep`'s judge: which responses to `prompts` refuse (the keyword judge when none is given)."""
    from ..judges.keyword import KeywordJudge
    judge = judge or KeywordJudge()
    return lambda responses: judge.judge(prompts, responses).refused.tolist()


def diagnostics(ctx: Context, cfg) -> dict:
    """Identify-notebook items: prompts per side, whether step 2 ran, the step-1 range and the sweep's pick per
    dataset, and the gap curves."""
    import pandas as pd
    c, m = cfg.identify.layer, ctx.metrics
    n = m["prompts_per_side"]
    text = [f"prompts per side: {n} ({n * (n - 1) // 2} distinct same-type pairs behind the {c.pairs} random pairs)"]
    if c.sweep_radius == 0:
        text.append("step 2 (over-rejection sweep) is off (identify.layer.sweep_radius 0; paper scale 3), so the "
                    "regions are the step-1 ranges. Why: its generations do not fit the CPU budget. Radius 1 means up "
                    f"to 3 candidate ranges per set, each {c.n_overrej} prompts x {c.max_new_tokens} greedy tokens: "
                    f"up to {3 * (len(ctx.datasets) + 1) + 1} generations here (13 for the default five sets, where "
                    "ranges repeat), an estimated 60-90 s more on the 2-core machine")
    ranges = pd.DataFrame([{"dataset": d, "step-1 range": v["step1"], "sweep best": v["best"],
                            "baseline refusals": v.get("baseline_refusals"), "note": v.get("note", "")}
                           for d, v in ctx.details.items()])
    gaps = pd.DataFrame([{"dataset": d, "layer": i, "gap": g} for d, v in ctx.details.items()
                         for i, g in enumerate(v["gap"])])
    return {"text": text, "tables": [ranges],
            "curves": [{"file": "layer_gap.png", "frame": gaps, "x": "layer", "y": "gap", "hue": "dataset",
                        "title": "SafeLayer step 1: same-type minus cross-type cosine", "xlabel": "layer",
                        "ylabel": "gap"}]}

"""SN-Tune-style safety neurons (docs/methods.md §2.2), computed with plain forward hooks.

Importance of a neuron N for a prompt = Σ_t ‖h_¬N(t) − h(t)‖₂ over its response tokens (label ≠ −100), where
h is the output of the neuron's own sub-layer: the MLP output for FFN units, the attention output (o_proj
output) for q/k/v/o neurons. Units, all in native index spaces:

- ``ffn`` i: intermediate unit i, i.e. input dim i of down_proj (a_i = act(gate_i)·up_i);
- ``q``/``k``/``v`` j: output dim j of q_proj/k_proj/v_proj (before RoPE and any q/k norm);
- ``o`` j: input dim j of o_proj (per-head attention output z_j).

FFN, o and v have exact closed forms; q/k change the softmax and are ablated in chunks of dims by re-running
the attention module alone on its captured inputs (``qk_mode="ablate"``, exact), or approximated as in PLND
(``qk_mode="plnd"``, see `_qk_plnd`). MoE: routed experts are not scored; qwen2_moe's shared expert is the FFN
(its output before the sigmoid shared-expert gate); routed-only MoE families (mixtral, olmoe, qwen3_moe) get
attention neurons only (empty ``ffn``).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from .. import generation_cache
from ..hooks import (capture_calls, capture_inputs, capture_outputs, edit_output, scale_output_dims,
                     zero_input_dims)
from ..hooks import one_thread
from ..models import (Part, arch_of, block_modules, component, eligible_weights, input_device, layer_index,
                      part)
from ..regions import Region, RegionKind
from .context import Context, refined_meta
from .removal import Granularity

UNITS = ("ffn", "q", "k", "v", "o")
ATTN_UNITS = ("q", "k", "v", "o")
QK_MODES = ("ablate", "plnd")
NEURON_PARTS = (Part.ATTENTION, Part.MLP, Part.SHARED_EXPERT)   # routed experts have no neurons here


def _forward(model, batch):
    """One forward as generation sees it: left padding, position ids counted over real tokens, no cache."""
    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=mask,
                 position_ids=(mask.long().cumsum(-1) - 1).clamp_min(0), use_cache=False)


def _response_mask(batch) -> torch.Tensor:
    return (batch["labels"] != -100).float() if "labels" in batch else batch["attention_mask"].float()


def _group_gram(attn) -> torch.Tensor:
    """Gram of o_proj columns within each KV group: [Hkv, G, D, G, D] (G query heads share a KV head)."""
    D, G = attn.head_dim, attn.num_key_value_groups
    W = attn.o_proj.weight.float()
    W = W.view(W.shape[0], -1, G, D)                    # query head h = g·G + r, column h·D + d
    return torch.einsum("ngrd,ngse->grdse", W, W)


def _v_scores(z, attn, gram, resp) -> torch.Tensor:
    """Zeroing v dim (g, d) removes z_{h,d} for every query head h of group g, so the o_proj output moves by
    Σ_r z_{gG+r,d} W_o[:, (gG+r)D+d]; its norm² is a quadratic form in the group Gram (exact, GQA-aware)."""
    B, T = resp.shape
    D, G = attn.head_dim, attn.num_key_value_groups
    z = z.float().reshape(B, T, -1, G, D)
    diag = torch.einsum("grdsd->gdrs", gram)            # same d on both sides
    sq = torch.einsum("btgrd,gdrs,btgsd->btgd", z, diag, z)
    return (sq.clamp_min(0).sqrt() * resp[..., None, None]).sum(1).reshape(B, -1)


def _tile(x, B: int, C: int):
    """Repeat every batch-shaped tensor C times along dim 0 (copy-major: row c·B + b is sample b)."""
    if torch.is_tensor(x):
        return x.repeat(C, *[1] * (x.ndim - 1)) if x.ndim >= 2 and x.shape[0] == B else x
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(v, B, C) for v in x)
    if isinstance(x, dict):
        return {k: _tile(v, B, C) for k, v in x.items()}
    return x


def _qk_ablate(attn, args, kwargs, resp, chunk: int) -> dict:
    """Exact q/k importance: re-run the attention module on its captured inputs with `chunk` copies of the
    batch, copy c having output dim j_c of q_proj (k_proj) zeroed, and measure the attention-output change."""
    B, T = resp.shape
    base = attn(*args, **kwargs)[0].float()
    out = {}
    for comp, proj in (("q", attn.q_proj), ("k", attn.k_proj)):
        n, parts = proj.out_features, []
        for start in range(0, n, chunk):
            dims = torch.arange(start, min(start + chunk, n), device=base.device)
            C = len(dims)
            keep = torch.ones(C, n, dtype=proj.weight.dtype, device=base.device)
            keep[torch.arange(C, device=base.device), dims] = 0

            def drop(y, keep=keep, C=C):
                return (y.view(C, B, *y.shape[1:]) * keep[:, None, None, :]).view_as(y)

            with edit_output(proj, drop):
                y = attn(*_tile(args, B, C), **_tile(kwargs, B, C))[0].float()
            d = (y.view(C, B, T, -1) - base).norm(dim=-1)           # [C, B, T]
            parts.append((d * resp).sum(-1).T)
        out[comp] = torch.cat(parts, 1)
    return out


def _mask_bias(mask, T: int, device) -> torch.Tensor:
    """Additive [B|1, 1, T, T] bias from whatever mask the attention received (None = plain causal)."""
    low = torch.finfo(torch.float32).min
    if mask is None:
        return torch.full((T, T), low, device=device).triu(1)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, low)[..., :T]
    return mask.float().clamp_min(low)[..., :T]


def _qk_plnd(attn, q, k, v, kwargs, resp, chunk: int) -> dict:
    """PLND approximation (Zhao et al. 2024): removing dim j of query head h subtracts scaling·q_j(t)·k_j(s)
    from its scores, with q, k taken *after* RoPE (and q/k norm), and the post-RoPE dim j is credited to
    q_proj/k_proj output dim j. The softmax change is exact given that; it is propagated through V and W_o so
    scores share the output-norm scale of the other units. Removing k dim (g, j) kills the same product in
    every head of group g, so its change is the sum over those heads. One pass per head dim covers all heads
    (≈ head_dim re-computations instead of (Hq+Hkv)·head_dim). Ignores clip_qkv (olmoe)."""
    B, T = resp.shape
    D, G = attn.head_dim, attn.num_key_value_groups
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k, v = (x.float().reshape(B, T, -1, D).transpose(1, 2) for x in (q, k, v))
    cos, sin = (t.float() for t in kwargs["position_embeddings"])
    q, k = rope(q, k, cos, sin)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)    # as repeat_kv: head h uses KV head h // G
    Hq, Hkv = q.shape[1], q.shape[1] // G
    bias = _mask_bias(kwargs.get("attention_mask"), T, q.device)
    cap = getattr(attn, "attn_logit_softcapping", None)

    def probs(s):
        return torch.softmax((torch.tanh(s / cap) * cap if cap else s) + bias, dim=-1)

    S = q @ k.transpose(-1, -2) * attn.scaling
    A = probs(S)
    gram = _group_gram(attn)                                        # [Hkv, G, D, G, D]
    gq = torch.stack([gram[:, r, :, r, :] for r in range(G)], 1)   # [Hkv, G, D, D]
    q_out = torch.zeros(B, Hq, D, device=q.device)
    k_out = torch.zeros(B, Hkv, D, device=q.device)
    for start in range(0, D, chunk):
        js = list(range(start, min(start + chunk, D)))
        qj = q[..., js].permute(3, 0, 1, 2)[..., None]              # [c, B, Hq, T, 1]
        kj = k[..., js].permute(3, 0, 1, 2)[..., None, :]           # [c, B, Hq, 1, T]
        dz = (probs(S - qj * kj * attn.scaling) - A) @ v            # [c, B, Hq, T, D]
        dz = dz.view(len(js), B, Hkv, G, T, D)
        q_sq = torch.einsum("cbgrtd,grde,cbgrte->cbgrt", dz, gq, dz)
        k_sq = torch.einsum("cbgrtd,grdse,cbgste->cbgt", dz, gram, dz)
        q_sum = (q_sq.clamp_min(0).sqrt() * resp[:, None, None]).sum(-1)          # [c, B, Hkv, G]
        q_out[:, :, js] = q_sum.reshape(len(js), B, Hq).permute(1, 2, 0)
        k_out[:, :, js] = (k_sq.clamp_min(0).sqrt() * resp[:, None]).sum(-1).permute(1, 2, 0)
    return {"q": q_out.reshape(B, -1), "k": k_out.reshape(B, -1)}


@torch.no_grad()
def neuron_scores(model, batches, qk_mode: str = "ablate", chunk: int = 16) -> dict:
    """{layer: {unit: fp32 CPU tensor [n_prompts, n_units]}}: per-prompt importance, summed over response
    tokens. `batches` as from `chat.response_batches` (left-padded, labels −100 off the response)."""
    if qk_mode not in QK_MODES:
        raise ValueError(f"qk_mode must be one of {QK_MODES}, got {qk_mode!r}")
    a, blocks = arch_of(model), block_modules(model)
    attns = {l: a.attention_of(b) for l, b in enumerate(blocks)}
    ffns = {l: m for l, b in enumerate(blocks) if (m := a.ffn_of(b)) is not None}
    down_norm = {l: m.down_proj.weight.float().norm(dim=0) for l, m in ffns.items()}
    o_norm = {l: a.o_proj.weight.float().norm(dim=0) for l, a in attns.items()}
    grams = {l: _group_gram(a) for l, a in attns.items()}
    device = input_device(model)
    parts = {l: {u: [] for u in UNITS} for l in attns}
    for batch in batches:
        batch = {key: val.to(device) for key, val in batch.items()}
        resp = _response_mask(batch)
        B, T = resp.shape

        def ffn_reduce(l, a):   # exact: a_i(t)·W_down[:, i] is the MLP-output change
            return (a.float().reshape(B, T, -1).abs() * resp[..., None]).sum(1) * down_norm[l]

        def o_reduce(l, z):     # exact: z_j(t)·W_o[:, j] is the attention-output change
            o = (z.float().abs() * resp[..., None]).sum(1) * o_norm[l]
            return o, _v_scores(z, attns[l], grams[l], resp)

        with ExitStack() as stack:
            downs = {l: m.down_proj for l, m in ffns.items()}
            ffn_in = stack.enter_context(capture_inputs(downs, ffn_reduce))
            o_in = stack.enter_context(capture_inputs({l: a.o_proj for l, a in attns.items()}, o_reduce))
            calls = stack.enter_context(capture_calls(attns))
            if qk_mode == "plnd":
                srcs = {(l, c): a.get_submodule(f"{c}_norm" if hasattr(a, f"{c}_norm") else f"{c}_proj")
                        for l, a in attns.items() for c in "qk"}
                srcs.update({(l, "v"): a.v_proj for l, a in attns.items()})
                states = stack.enter_context(capture_outputs(srcs))
            _forward(model, batch)
        for l, attn in attns.items():
            (o, v), = o_in[l]
            (args, kwargs), = calls[l]
            if qk_mode == "ablate":
                qk = _qk_ablate(attn, args, kwargs, resp, chunk)
            else:
                q, k, v_states = (states[l, c][0] for c in "qkv")
                qk = _qk_plnd(attn, q, k, v_states, kwargs, resp, chunk)
            ffn = ffn_in[l][0] if l in ffns else torch.zeros(B, 0, device=device)
            for unit, s in (("ffn", ffn), ("q", qk["q"]), ("k", qk["k"]), ("v", v), ("o", o)):
                parts[l][unit].append(s.float().cpu())
    return {l: {u: torch.cat(p[u]) for u in UNITS} for l, p in parts.items()}


def _keep(scores: torch.Tensor, frac: float, min_prompt_frac: float) -> torch.Tensor:
    """Units in the per-prompt top-`frac` set for at least `min_prompt_frac` of the prompts."""
    P, N = scores.shape
    if N == 0:
        return torch.zeros(0, dtype=torch.bool)
    top = scores.topk(max(1, int(frac * N)), dim=1).indices
    counts = torch.zeros(N).index_add_(0, top.flatten(), torch.ones(top.numel()))
    return counts >= max(1, math.ceil(min_prompt_frac * P - 1e-9))


def select_neurons(scores: dict, attn_frac: float = 0.06, ffn_frac: float = 0.18,
                   min_prompt_frac: float = 1.0, attn_rank: str = "joint") -> dict:
    """{layer: {unit: sorted indices}}. Per prompt and layer, keep the top `attn_frac` of the q/k/v/o neurons
    and the top `ffn_frac` of FFN units; a neuron is in the region when it is in the top set for
    ≥ `min_prompt_frac` of prompts (1.0 = SN-Tune's intersection). `attn_rank="joint"` ranks q, k, v, o
    together (SN-Tune's one attention count per layer); "per_unit" takes the fraction of each matrix."""
    if not 0 < min_prompt_frac <= 1:
        raise ValueError(f"min_prompt_frac must be in (0, 1], got {min_prompt_frac}")
    if attn_rank not in ("joint", "per_unit"):
        raise ValueError(f"attn_rank must be 'joint' or 'per_unit', got {attn_rank!r}")
    units, total = {}, 0
    for l, s in scores.items():
        if attn_rank == "joint":
            attn = _keep(torch.cat([s[u] for u in ATTN_UNITS], 1), attn_frac, min_prompt_frac)
            pieces = dict(zip(ATTN_UNITS, attn.split([s[u].shape[1] for u in ATTN_UNITS])))
        else:
            pieces = {u: _keep(s[u], attn_frac, min_prompt_frac) for u in ATTN_UNITS}
        pieces["ffn"] = _keep(s["ffn"], ffn_frac, min_prompt_frac)
        units[l] = {u: pieces[u].nonzero().flatten().tolist() for u in UNITS}
        total += sum(len(v) for v in units[l].values())
    if total == 0:
        n = next(iter(scores.values()))["q"].shape[0]
        raise ValueError(f"no neuron is in the top set of ≥ {min_prompt_frac:.0%} of the {n} prompts "
                         f"(attn_frac={attn_frac}, ffn_frac={ffn_frac}); lower min_prompt_frac or raise the "
                         "fractions")
    return units


def identify(model, batches, attn_frac: float = 0.06, ffn_frac: float = 0.18, min_prompt_frac: float = 1.0,
             qk_mode: str = "ablate", chunk: int = 16, attn_rank: str = "joint") -> dict:
    """Scores + selection in one call: the neuron region of a prompt set in native units."""
    scores = neuron_scores(model, batches, qk_mode, chunk)
    return select_neurons(scores, attn_frac, ffn_frac, min_prompt_frac, attn_rank)


def weight_density(model, units: dict) -> float:
    """Fraction of the eligible weights `to_weight_masks(model, units)` selects, counted from shapes without
    building masks: an FFN unit is a row of gate and up and a column of down, q/k/v a row, o a column."""
    units = {int(l): u for l, u in units.items()}
    picked = total = 0
    for name, p in eligible_weights(model).items():
        total += p.numel()
        u, comp = units.get(layer_index(name)), component(name)
        if u and part(name) in NEURON_PARTS:
            key = "ffn" if comp in ("gate", "up", "down") else comp
            picked += len(u.get(key, [])) * p.shape[0 if comp in ("down", "o") else 1]
    return picked / total


def density_after(model, scores: dict, k: int, attn_frac: float = 0.06, ffn_frac: float = 0.18,
                  min_prompt_frac: float = 1.0, attn_rank: str = "joint") -> float:
    """`weight_density` of the neurons selected from the first k prompts' scores (0.0 when none is kept): the
    curve over k shows whether the intersection has stabilised."""
    first = {l: {u: s[:k] for u, s in per.items()} for l, per in scores.items()}
    try:
        return weight_density(model, select_neurons(first, attn_frac, ffn_frac, min_prompt_frac, attn_rank))
    except ValueError:          # select_neurons refuses an empty region
        return 0.0


def refine(safety_units: dict, utility_units: dict) -> dict:
    """Set difference per layer and unit type (RSN-Tune: safety minus foundation neurons)."""
    def diff(l, u):
        return sorted(set(safety_units[l].get(u, [])) - set(utility_units.get(l, {}).get(u, [])))
    return {l: {u: diff(l, u) for u in UNITS} for l in safety_units}


def to_weight_masks(model, units: dict) -> dict[str, torch.Tensor]:
    """Project neurons to bool masks over every eligible weight (docs/methods.md §3.2): FFN unit i → row i of gate/up
    and column i of down; q/k/v output dim j → row j of that matrix; o neuron j (input dim j of o_proj, the
    unit SN-Tune deactivates) → column j of o_proj. Routed experts are never selected."""
    units = {int(l): u for l, u in units.items()}
    masks = {}
    for name, p in eligible_weights(model).items():
        mask = torch.zeros(p.shape, dtype=torch.bool)
        u, comp = units.get(layer_index(name)), component(name)
        if u and part(name) in NEURON_PARTS:
            idx = lambda key: torch.as_tensor(u.get(key, []), dtype=torch.long)  # noqa: E731
            if comp in ("gate", "up"):
                mask[idx("ffn"), :] = True
            elif comp == "down":
                mask[:, idx("ffn")] = True
            elif comp in ("q", "k", "v"):
                mask[idx(comp), :] = True
            elif comp == "o":
                mask[:, idx("o")] = True
        masks[name] = mask
    return masks


def unit_counts(model) -> dict:
    """{layer: {unit: number of neurons of that type}} in the native index spaces of the module docstring."""
    out, a = {}, arch_of(model)
    for l, block in enumerate(block_modules(model)):
        attn, ffn = a.attention_of(block), a.ffn_of(block)
        out[l] = {"ffn": ffn.down_proj.in_features if ffn is not None else 0, "o": attn.o_proj.in_features,
                  **{c: getattr(attn, f"{c}_proj").out_features for c in ("q", "k", "v")}}
    return out


def random_units(model, units: dict, seed: int) -> dict:
    """A chance control: per layer and unit type, as many uniformly random neurons as `units` holds."""
    g = torch.Generator().manual_seed(seed)
    counts = unit_counts(model)
    return {l: {u: sorted(torch.randperm(counts[int(l)][u], generator=g)[:len(idx)].tolist()) if idx else []
                for u, idx in per.items()} for l, per in units.items()}


@contextmanager
def deactivate(model, units: dict):
    """Zero the selected neurons with hooks (validation: does the behaviour change without them?)."""
    a, blocks = arch_of(model), block_modules(model)
    named = {str(l): {c: [int(i) for i in idx] for c, idx in u.items()} for l, u in units.items()}
    with ExitStack() as stack:
        stack.enter_context(generation_cache.edit(f"neurons deactivated {generation_cache.digest(named)}"))  # hooks
        for l, u in units.items():
            attn = a.attention_of(blocks[int(l)])
            for comp in ("q", "k", "v"):
                if u.get(comp):
                    stack.enter_context(scale_output_dims(getattr(attn, f"{comp}_proj"), u[comp], 0.0))
            if u.get("o"):
                stack.enter_context(zero_input_dims(attn.o_proj, u["o"]))
            if u.get("ffn"):
                ffn = a.ffn_of(blocks[int(l)])
                if ffn is None:
                    raise NotImplementedError(f"layer {l} has routed experts only; no FFN neurons there")
                stack.enter_context(zero_input_dims(ffn.down_proj, u["ffn"]))
        yield


# ---------------------------------------------------------------- granularity


class Neurons(Granularity):
    """Neuron regions (`units["neurons"]`): deactivated with hooks; control = as many random neurons per layer
    and unit type."""

    name = "neurons"

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        return deactivate(model, region.units["neurons"])

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        units = random_units(model, region.units["neurons"], seed)
        meta = {"method": "random", "seed": seed, "reference": region.meta, "granularity": self.name}
        return Region(to_weight_masks(model, units), meta, {"neurons": units})

    def units_summary(self, region: Region) -> dict:
        per: dict[str, int] = {}
        for layer in region.units["neurons"].values():
            for unit, idx in layer.items():
                per[unit] = per.get(unit, 0) + len(idx)
        return {"n_units": sum(per.values()), **{f"n_{k}": v for k, v in per.items()}}


# ---------------------------------------------------------------- runner (identify stage, docs/methods.md §2.2)


@one_thread
def _neuron_region(ctx: Context, units: dict, meta: dict) -> Region:
    units = {str(l): u for l, u in units.items()}
    return Region(to_weight_masks(ctx.model, units), meta, {"neurons": units})


def run(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """`identify.neuron.n` prompts per set (beyond calibrate.n they are answered here, `Context.top_up`): the
    strict intersection shrinks with every prompt, so 2 prompts leave a region far denser than SN-Tune's < 1%.
    Metrics get the weight-space density of the intersection over the first k prompts, k = 1, 2, 4, …, n, so
    the notebook shows whether it has stabilised at n."""
    c = ctx.cfg.neuron
    names = [ctx.utility_set, *ctx.datasets]
    if c.n:
        def topped_up():
            ctx.top_up(names, c.n)
            return {name: ctx.calib[name] for name in names}
        ctx.calib = {**ctx.calib, **ctx.unit("top_up", topped_up)}
    sel = {"attn_frac": c.attn_frac, "ffn_frac": c.ffn_frac, "min_prompt_frac": c.min_prompt_frac,
           "qk_mode": c.qk_mode, "attn_rank": c.attn_rank}
    curves = ctx.metrics.setdefault("neuron_density_vs_n", {})

    def select(name):
        scores = neuron_scores(ctx.model, ctx.batches(name, c.n), c.qk_mode, c.chunk)
        n = next(iter(scores.values()))["q"].shape[0]
        ks = sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
        curve = {k: density_after(ctx.model, scores, k, c.attn_frac, c.ffn_frac, c.min_prompt_frac, c.attn_rank)
                 for k in ks}
        return {"n": n, "curve": curve,
                "units": select_neurons(scores, c.attn_frac, c.ffn_frac, c.min_prompt_frac, c.attn_rank)}

    def units(name):
        found = ctx.unit(f"{name}.neurons", lambda: select(name))
        curves[name] = found["curve"]
        ctx.metrics["calibration_n"] = min(found["n"], ctx.metrics.get("calibration_n", found["n"]))
        return found["units"]

    u_units = units(ctx.utility_set)
    util = _neuron_region(ctx, u_units, ctx.meta("neuron", ctx.utility_set, RegionKind.UTILITY, c.n, **sel))
    yield ctx.utility_set, RegionKind.UTILITY, util
    for d in ctx.datasets:
        s_units = units(d)
        raw = _neuron_region(ctx, s_units, ctx.meta("neuron", d, RegionKind.RAW, c.n, **sel))
        refined = _neuron_region(ctx, refine(s_units, u_units),
                                 refined_meta(raw, util, rule="safety neurons \\ utility neurons"))
        yield d, RegionKind.RAW, raw
        yield d, RegionKind.REFINED, refined


def diagnostics(ctx: Context, cfg) -> dict:
    """Identify-notebook items: how the density of the intersection falls with the number of prompts, beside
    SN-Tune's published figure."""
    import pandas as pd
    m = ctx.metrics
    curve = pd.DataFrame([{"set": s, "prompts n": n, "density": v} for s, per in m["neuron_density_vs_n"].items()
                          for n, v in per.items()])
    text = (f"calibration prompts per set: {m['calibration_n']}. Region density (intersection over all of them, "
            "fraction of eligible weights): " + ", ".join(f"{s} {list(per.values())[-1]:.2%}" for s, per in
                                                          m["neuron_density_vs_n"].items())
            + "; SN-Tune reports safety neurons at < 1% of parameters")
    table = curve.pivot(index="prompts n", columns="set", values="density").style.format("{:.3%}")
    return {"text": [text], "tables": [table],
            "curves": [{"file": "neuron_density_vs_n.png", "frame": curve, "x": "prompts n", "y": "density",
                        "hue": "set", "title": "Safety neurons: density of the intersection over the first n prompts "
                        "(SN-Tune: < 1%)", "xlabel": "prompts n", "ylabel": "density (fraction of eligible weights)"}]}

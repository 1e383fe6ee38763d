"""NLSR safety region over LoRA weights (docs/methods.md §2.4; Yi et al. 2025, code xinykou/NLSR), and its projection
to base-weight masks (§3.2).

Pipeline, for a chat model without an alignment LoRA (project default):
1. `train_safety_lora`: one LoRA on harmful -> refusal pairs (response-only CE), fixed across datasets, trained
   until the loss on a fixed held-out batch stops falling (early stopping) or for a set number of steps.
2. `expo_rescale`: every lora_A / lora_B weight <- 2α·W, so the update B·A scales by (2α)².
3. `lowrank_project` (per dataset, ActSVD): for each LoRA matrix W [d_out, d_in] with inputs X over the
   response tokens, V = top-q right singular vectors of Y = X Wᵀ, q = ⌊min(d_out, d_in)·rank_ratio⌋;
   W <- V Vᵀ W. Computed exactly (no `svd_lowrank`, which is randomised) from a fp64 Gram matrix of size
   min(d_out, d_in)² = r², whichever side is the rank r:
   - d_out <= d_in (lora_A): accumulate G = Yᵀ Y, V = top-q eigenvectors of G;
   - d_out >  d_in (lora_B): accumulate C = Xᵀ X, then Yᵀ Y = (W C^½)(W C^½)ᵀ, so V = the top-q left
     singular vectors of the d_out × r matrix W C^½ (never forms the d_out × d_out Gram, 14336² on 8B FFNs).
4. `magnitude_region`: top keep_frac of |W| per projected LoRA matrix.

**Naming.** LoRA regions and projected weights are keyed by the PeftModel's parameter names, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`; `base_name` maps one to the base
weight it updates (`model.layers.0.self_attn.q_proj.weight`, as `models.eligible_weights` names it).

**Which positions count**: those whose label is not -100 (as in wanda.py: the positions of response tokens).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
import re
import types

import torch
from tqdm.auto import tqdm

from .. import overlap, regions
from .. import chat
from ..hooks import capture_inputs, single_thread
from ..io import read_jsonl
from ..arch import linear_targets
from ..models import eligible_weights, input_device
from ..regions import Region, RegionKind
from .context import Context, refined_meta

# The seven projections of every decoder block (shared experts included); fused MoE experts are not Linear
# modules and get no LoRA (their base masks stay empty). The block-list anchor keeps lm_head etc. out.
TARGET_MODULES = linear_targets()
_LORA = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")


def lora_weights(peft_model) -> dict[str, tuple[torch.nn.Linear, torch.nn.Parameter]]:
    """{parameter name: (module, weight)} of every lora_A / lora_B Linear of the active adapter."""
    pattern = re.compile(rf"\.lora_[AB]\.{re.escape(peft_model.active_adapter)}$")
    out = {f"{n}.weight": (m, m.weight) for n, m in peft_model.named_modules()
           if pattern.search(n) and isinstance(m, torch.nn.Linear)}
    if not out:
        raise ValueError("model has no LoRA matrices for its active adapter")
    return out


def lora_model(model, r: int, alpha: float, dropout: float, weights: dict[str, torch.Tensor] | None = None):
    """peft's LoRA on every `TARGET_MODULES` projection of `model` (injected into it), with the LoRA matrices
    set to `weights` ({`lora_weights` name: tensor}, as a checkpoint holds them) when given, in eval mode."""
    from peft import LoraConfig, get_peft_model   # imported here: peft takes ~3 s to import
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES,
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    if weights is not None:
        peft_model.eval()
        with torch.no_grad():
            for name, (_, w) in lora_weights(peft_model).items():
                w.copy_(weights[name])
    return peft_model


def base_name(lora_name: str) -> str:
    """`base_model.model.<base module>.lora_A.<adapter>.weight` -> `<base module>.weight`."""
    if not _LORA.search(lora_name):
        raise ValueError(f"{lora_name!r} is not a LoRA weight name")
    return _LORA.sub(".weight", lora_name.removeprefix("base_model.model."))


def _position_ids(attn: torch.Tensor) -> torch.Tensor:
    return (attn.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first real token


# ---------------------------------------------------------------- 1. train


def train_safety_lora(model, tokenizer, prompts: list[str], responses: list[str], r: int = 8,
                      alpha: float = 32, dropout: float = 0.05, steps: int = 200, lr: float = 1e-4,
                      batch_size: int = 4, seed: int = 0, max_length: int = 512, progress: bool = True, *,
                      heldout: tuple[list[str], list[str]] | None = None, eval_every: int = 10, patience: int = 0,
                      min_delta: float = 0.0, init_seed: int | None = None):
    """(PeftModel, history): a LoRA on all block projections, AdamW (no weight decay, the HF Trainer default) on
    response-only CE, cycling over the pairs (reshuffled each pass) for at most `steps` steps. peft injects the
    LoRA into `model` itself (`unload()` gives it back); the returned model is in eval mode.

    `heldout` (prompts, responses) is ONE fixed batch, scored in eval mode before training, every `eval_every`
    steps and after the last, so "before" and "after" compare the same examples. With `patience` > 0 training
    stops after `patience` evaluations in a row that do not beat the best held-out loss by more than
    `min_delta`, and the best trained weights (never the untrained B = 0) are restored: after Adam's first step
    every |B| entry has the same size, so a barely trained LoRA's region is set by A's random init.
    `init_seed` (default `seed`) seeds the LoRA init and dropout; the batches follow `seed`, so two init seeds
    see the same data.

    history: train_loss per step, heldout [[step, loss], ...], steps run, best_step, heldout_loss_before,
    heldout_loss_after (of the returned weights; None without `heldout`)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need as many responses as prompts, and at least one pair")
    if patience and heldout is None:
        raise ValueError("early stopping (patience > 0) needs a held-out batch")
    torch.manual_seed(seed if init_seed is None else init_seed)  # lora_A init and dropout
    peft_model = lora_model(model, r, alpha, dropout)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = input_device(peft_model)
    g = torch.Generator().manual_seed(seed)

    def cycle():
        while True:
            order = torch.randperm(len(prompts), generator=g).tolist()
            yield from chat.response_batches(tokenizer, [prompts[i] for i in order],
                                             [responses[i] for i in order], batch_size, max_length)

    def loss_of(batch):
        attn = batch["attention_mask"].to(device)
        loss = chat.response_loss(peft_model, batch["input_ids"].to(device), batch["labels"],
                                  attention_mask=attn, position_ids=_position_ids(attn))
        if loss is None:
            raise ValueError(f"a safety-LoRA batch has no response token within max_length={max_length}")
        return loss

    held = None
    if heldout is not None:
        (held,) = chat.response_batches(tokenizer, *heldout, len(heldout[0]), max_length)

    @torch.no_grad()
    def evaluate():
        peft_model.eval()
        try:
            return loss_of(held).item()
        finally:
            peft_model.train()

    hist = {"train_loss": [], "heldout": [], "steps": 0, "best_step": None, "heldout_loss_before": None,
            "heldout_loss_after": None}
    ref, best, best_state, stale = math.inf, math.inf, None, 0   # ref: best held-out loss, untrained included
    peft_model.train()
    try:
        if held is not None:
            ref = hist["heldout_loss_before"] = evaluate()
            hist["heldout"].append([0, ref])
        bar = tqdm(zip(range(steps), cycle()), total=steps, desc="safety LoRA", disable=not progress,
                   leave=False)
        for step, batch in bar:
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist["train_loss"].append(loss.item())
            hist["steps"] = step + 1
            bar.set_postfix(loss=f"{hist['train_loss'][-1]:.4f}")
            if held is None or ((step + 1) % eval_every and step + 1 < steps):
                continue
            h = evaluate()
            hist["heldout"].append([step + 1, h])
            stale = 0 if h < ref - min_delta else stale + 1
            ref = min(ref, h)
            if patience and h < best:
                best, hist["best_step"] = h, step + 1
                best_state = [p.detach().clone() for p in params]
            if patience and stale >= patience:
                break
    finally:
        peft_model.eval()
    if held is not None and patience:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        hist["heldout_loss_after"] = best
    elif held is not None:
        hist["heldout_loss_after"], hist["best_step"] = hist["heldout"][-1][1], hist["steps"]
    return peft_model, hist


# ---------------------------------------------------------------- 2. expo


@torch.no_grad()
def expo_rescale(peft_model, alpha: float = 0.9):
    """In place: W <- αW + αW = 2α·W for every LoRA matrix (expo-lora.py), so B·A scales by (2α)².
    α = 0.5 is the identity. Returns the model."""
    for _, w in lora_weights(peft_model).values():
        w.mul_(2 * alpha)
    return peft_model


# ---------------------------------------------------------------- 3. low-rank projection


def _top_subspace(w: torch.Tensor, gram: torch.Tensor, q: int) -> torch.Tensor:
    """V [d_out, q]: top-q right singular vectors of Y = X Wᵀ, from G = YᵀY (d_out <= d_in) or C = XᵀX."""
    d_out, d_in = w.shape
    if d_out <= d_in:
        _, vecs = torch.linalg.eigh(gram)                      # ascending eigenvalues
        return vecs[:, d_out - q:]
    evals, vecs = torch.linalg.eigh(gram)
    m = w @ (vecs * evals.clamp(min=0).sqrt())                 # M Mᵀ = W C Wᵀ = YᵀY
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :q]


@torch.no_grad()
def lowrank_project(peft_model, batches, rank_ratio: float = 0.8,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """{LoRA parameter name: W_proj = V Vᵀ W (fp32, CPU)} with V the top-q output directions of this data
    (module docstring). The adapter is not modified: regions for every dataset reuse the same LoRA."""
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio={rank_ratio} outside (0, 1]")
    loras = lora_weights(peft_model)
    w64 = {n: w.detach().double() for n, (_, w) in loras.items()}
    state = {"mask": None}

    def reduce(name, x):                                       # fp64 Gram of this call's response rows
        x = x.reshape(-1, x.shape[-1])[state["mask"]].double()
        w = w64[name]
        if w.shape[0] <= w.shape[1]:
            x = x @ w.T                                        # Y
        return x.T @ x

    grams = {n: None for n in loras}
    device = input_device(peft_model)
    was_training = peft_model.training
    peft_model.eval()                                          # no LoRA dropout
    try:
        with capture_inputs({n: m for n, (m, _) in loras.items()}, reduce) as store:
            for batch in tqdm(batches, desc="nlsr project", disable=not progress, leave=False):
                attn = batch["attention_mask"].to(device)
                state["mask"] = (batch["labels"] != -100).reshape(-1).to(device)
                peft_model.get_base_model()(input_ids=batch["input_ids"].to(device), attention_mask=attn,
                                            position_ids=_position_ids(attn), use_cache=False,
                                            logits_to_keep=1)
                for n, parts in store.items():                 # fold per batch: memory stays r² per matrix
                    if parts:
                        s = torch.stack(parts).sum(0)
                        grams[n] = s if grams[n] is None else grams[n] + s
                        parts.clear()
    finally:
        state["mask"] = None
        peft_model.train(was_training)
    missing = [n for n, gm in grams.items() if gm is None]
    if missing:
        raise RuntimeError(f"no inputs reached {missing[0]} (adapter disabled or merged, or no batches?)")
    projected = {}
    for n, w in w64.items():
        q = math.floor(min(w.shape) * rank_ratio)
        v = _top_subspace(w, grams[n], q)
        projected[n] = (v @ (v.T @ w)).float().cpu()
    return projected


# ---------------------------------------------------------------- 4. regions


def magnitude_region(projected: dict[str, torch.Tensor], keep_frac: float = 0.2, meta: dict | None = None):
    """Top keep_frac of |W| per projected LoRA matrix (sparsity_ratio_low.py keeps |W| > 0.8-quantile)."""
    scores = {n: w.abs() for n, w in projected.items()}
    return regions.top_fraction(scores, keep_frac, group="matrix", largest=True,
                                meta={"method": "nlsr", "space": "lora", **(meta or {})})


def identify(peft_model, batches, rank_ratio: float = 0.8, keep_frac: float = 0.2, progress: bool = True):
    """(Region over LoRA entries, projected weights): the projected weights are what `to_base_masks` needs."""
    projected = lowrank_project(peft_model, batches, rank_ratio, progress)
    region = magnitude_region(projected, keep_frac, meta={"rank_ratio": rank_ratio, "keep_frac": keep_frac})
    return region, projected


def refine(safety_region, utility_region):
    """Safety \\ utility on LoRA entries (§2.4, §3.5)."""
    return regions.difference(safety_region, utility_region)


# ---------------------------------------------------------------- 5. base-weight masks (§3.2)


def _is_peft(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def _base_eligible(model) -> dict[str, torch.nn.Parameter]:
    """`eligible_weights` of the base model under its own names (peft renames wrapped weights
    `<module>.base_layer.weight`; LoRA parameters are not base weights)."""
    base = model.get_base_model() if _is_peft(model) else model
    params = [(n.replace(".base_layer.", "."), p) for n, p in base.named_parameters() if ".lora_" not in n]
    view = types.SimpleNamespace(config=base.config, named_parameters=lambda: iter(params))
    return eligible_weights(view)


@torch.no_grad()
def to_base_masks(model_or_peft, lora_region, projected: dict[str, torch.Tensor],
                  scale: float | None = None) -> dict[str, torch.Tensor]:
    """{eligible base weight name: bool mask}: per base matrix with a LoRA, the top-f entries of |ΔW_R|,
    ΔW_R = (M_B ⊙ B)(M_A ⊙ A)·scale, f = the LoRA region's overall density; all False without a LoRA.

    scale defaults to the adapter's lora_alpha / r (1.0 for a plain model); being a positive constant it
    never changes the selection. Entries with ΔW_R = 0 are never selected (tie-breaking among zeros would
    pick the lowest indices in every region alike), so a matrix whose ΔW_R has fewer than int(f·numel)
    non-zeros gets all of them and a density below f.
    """
    if scale is None:
        scale = 1.0
        if _is_peft(model_or_peft):
            cfg = model_or_peft.peft_config[model_or_peft.active_adapter]
            scale = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    pairs: dict[str, dict[str, str]] = {}
    for n in lora_region.masks:
        pairs.setdefault(base_name(n), {})["A" if ".lora_A." in n else "B"] = n
    eligible = _base_eligible(model_or_peft)
    unknown = sorted(set(pairs) - set(eligible))
    if unknown:
        raise ValueError(f"LoRA on weights that are not eligible base weights: {unknown[:3]}")
    f = lora_region.density

    def mask(name, p):
        if name not in pairs:
            return torch.zeros(p.shape, dtype=torch.bool)
        a, b = pairs[name]["A"], pairs[name]["B"]
        delta = ((projected[b] * lora_region.masks[b]) @ (projected[a] * lora_region.masks[a])).abs_() * scale
        if delta.shape != p.shape:
            raise ValueError(f"ΔW for {name} has shape {tuple(delta.shape)}, weight {tuple(p.shape)}")
        return regions.top_fraction({name: delta}, f, group="matrix").masks[name] & (delta > 0)
    with single_thread():
        return dict(zip(eligible, regions.per_matrix(mask, eligible.items())))


# ---------------------------------------------------------------- runner (identify stage, docs/methods.md §2.4)


def run(ctx: Context) -> Iterator[tuple[str, str, Region]]:
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
        return train_safety_lora(
            ctx.model, ctx.tok, [r["prompt"] for r in pool], [r["response"] for r in pool], c.lora_r, c.lora_alpha,
            c.dropout, c.steps, c.lr, c.batch_size, ctx.seed, c.max_length, progress=False,
            heldout=([r["prompt"] for r in held], [r["response"] for r in held]), eval_every=c.eval_every,
            patience=c.patience, min_delta=c.min_delta, init_seed=init_seed)

    made = {}

    def trained():
        made["model"], hist = train(ctx.seed)
        expo_rescale(made["model"], c.expo_alpha)
        return {"weights": {n: w for n, (_, w) in lora_weights(made["model"]).items()}, "history": hist}

    safety_lora = ctx.unit("lora", trained)
    hist = safety_lora["history"]
    peft_model = made["model"] if made else \
        lora_model(ctx.model, c.lora_r, c.lora_alpha, c.dropout, safety_lora["weights"])
    ctx.details["lora_loss"], ctx.details["lora_heldout"] = hist["train_loss"], hist["heldout"]
    ctx.metrics.update({"train_steps": hist["steps"], "best_step": hist["best_step"], "heldout_n": len(held),
                        "heldout_loss_before": hist["heldout_loss_before"],
                        "heldout_loss_after": hist["heldout_loss_after"]})
    sel = {"lora_r": c.lora_r, "lora_alpha": c.lora_alpha, "steps": hist["steps"], "lr": c.lr, "n_pairs": len(pool),
           "expo_alpha": c.expo_alpha, "rank_ratio": c.rank_ratio, "keep_frac": c.keep_frac}

    def base(lora: Region, projected, meta) -> Region:
        return Region(to_base_masks(peft_model, lora, projected), {**meta, "space": "eligible"})

    def project(name: str, kind: str):
        lora, projected = identify(peft_model, ctx.batches(name), c.rank_ratio, c.keep_frac, progress=False)
        lora.meta = {**ctx.meta("nlsr", name, kind, **sel), "space": "lora", "selection": lora.meta["selection"]}
        return lora, projected

    def find(name: str, kind: str):
        return ctx.unit(f"{name}.{kind}.lora", lambda: project(name, kind))

    def seed_check(d: str, raw: Region, lora: Region) -> dict:
        """A second LoRA from init seed + 1 (same pairs, same order): its raw region on `d` against the first's."""
        other, hist2 = train(ctx.seed + 1)
        expo_rescale(other, c.expo_alpha)
        lora2, proj2 = identify(other, ctx.batches(d), c.rank_ratio, c.keep_frac, progress=False)
        raw2 = Region(to_base_masks(other, lora2, proj2), {})
        other.unload()
        return {"seed_iou_dataset": d, "seed_iou_seeds": [ctx.seed, ctx.seed + 1],
                "seed_iou": overlap.iou(raw, raw2), "seed_iou_chance": overlap.chance_iou(raw.density, raw2.density),
                "seed_iou_lora": overlap.iou(lora, lora2),
                "seed_iou_lora_chance": overlap.chance_iou(lora.density, lora2.density),
                "seed2_train_steps": hist2["steps"], "seed2_heldout_loss_after": hist2["heldout_loss_after"]}

    u_lora, u_proj = find(ctx.utility_set, RegionKind.UTILITY)
    yield ctx.utility_set, RegionKind.UTILITY, base(u_lora, u_proj, u_lora.meta)
    yield ctx.utility_set, RegionKind.UTILITY_LORA, u_lora
    first = None
    for d in ctx.datasets:
        lora, projected = find(d, RegionKind.RAW)
        r_lora = refine(lora, u_lora)
        r_lora.meta = {**refined_meta(lora, u_lora, rule="LoRA safety \\ LoRA utility"), "space": "lora"}
        raw = base(lora, projected, lora.meta)
        first = first or (d, raw, lora)
        yield d, RegionKind.RAW, raw
        yield d, RegionKind.RAW_LORA, lora
        yield d, RegionKind.REFINED, base(r_lora, projected, r_lora.meta)
        yield d, RegionKind.REFINED_LORA, r_lora
    peft_model.unload()                                  # the base model back, for the second LoRA
    if c.seed_check and first:
        ctx.metrics.update(ctx.unit("seed_check", lambda: seed_check(*first)))


def diagnostics(ctx: Context, cfg) -> dict:
    """Identify-notebook items: the safety LoRA's training (held-out loss on one fixed batch) and whether its
    region is a property of the data (IoU of two LoRA init seeds vs chance)."""
    import pandas as pd
    m, losses = ctx.metrics, ctx.details["lora_loss"]
    text = [f"safety LoRA: {m['train_steps']} steps (best held-out at step {m['best_step']}); train loss first "
            f"{losses[0]:.3f}, last {losses[-1]:.3f}; held-out loss on the same {m['heldout_n']} pairs "
            f"{m['heldout_loss_before']:.3f} -> {m['heldout_loss_after']:.3f}"]
    if "seed_iou" in m:
        text.append(f"two LoRA init seeds {m['seed_iou_seeds']} on {m['seed_iou_dataset']}: IoU {m['seed_iou']:.3f} "
                    f"(chance {m['seed_iou_chance']:.3f}, {m['seed_iou'] / m['seed_iou_chance']:.2f}x) over base "
                    f"weights, {m['seed_iou_lora']:.3f} (chance {m['seed_iou_lora_chance']:.3f}) over LoRA entries. "
                    "At 1x the region is set by the LoRA's random init, not by the data")
    return {"text": text, "tables": [pd.DataFrame(ctx.details["lora_heldout"], columns=["step", "held-out loss"])],
            "curves": []}

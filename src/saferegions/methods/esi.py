"""ESI: judge-guided safety importance of every weight (docs/methods.md §4.1-§4.5; paper 2, SafeWeights-ACL code).

    ESI_i = |g_i| · σ_W,   g = Σ_prompts ∂S_x/∂θ (signed, summed, |·| after),   σ_W = std of all of W.

S_x is a judge's "safe" score of the model's own greedy response to harmful prompt x. The response is
discrete, so the reference code makes S differentiable in two halves joined by a first-order chain rule:

1. judge side: the response, tokenized by the judge, becomes soft tokens p_g (near one-hot), fed to the judge
   as p_g · E_judge; backprop gives G = ∂(−safe)/∂(z or p_g)            [T_g × V_g]
2. vocabulary transfer: G_L = G · M, M maps each judge token to the target tokens it re-tokenizes into
3. target side: p̃ = (Gumbel-)softmax(response logits / 0.3); loss = −Σ G_L · p̃ with G_L held fixed, so
   backprop puts ≈ +∂safe/∂θ into the weights' gradients (G_L is a linearisation of −safe around p_g).

The reference's quirks are switches (`VARIANTS`): "faithful" reproduces them, "fixed" repairs them.
The soft judges (step 1's S) are in `judges.soft`, the vocabulary transfer (step 2's M) in `judges.transfer`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import regions as R
from ..checkpoints import Checkpoints, digest, model_identity, unit
from ..chat import render
from ..judges.transfer import coverage_counts, transfer_matrix
from ..models import arch_of, component, input_device, is_expert, layer_index, param_count
from ..hooks import grad_only_for

TAU = 0.3
OFF_LOGIT = -17.0  # z entries of the tokens not present: softmax(z) is one-hot up to e^-17
REFUSAL = "I'm sorry, but I can't assist with that."
VARIANTS = {
    "faithful": dict(bos_align=False, guard_grad_wrt="logits", gumbel=True, accum_dtype="model",
                     judge_sees_prompt=False),
    "fixed": dict(bos_align=True, guard_grad_wrt="probs", gumbel=False, accum_dtype="fp32",
                  judge_sees_prompt=False),
}
COMPONENT_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "router", "other")
CHECKPOINT_EVERY = 16   # prompts between resume checkpoints of the running gradient sums (`esi_gradients`)


# ---------------------------------------------------------------- the gradient


def resolve_switches(variant: str = "faithful", **overrides) -> dict:
    """The variant's switches, with any switch given explicitly (not None) taking precedence."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cfg = dict(VARIANTS[variant])
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown ESI switch {key!r}; valid: {sorted(cfg)}")
        if value is not None:
            cfg[key] = value
    if cfg["guard_grad_wrt"] not in ("logits", "probs"):
        raise ValueError(f"guard_grad_wrt must be 'logits' or 'probs', got {cfg['guard_grad_wrt']!r}")
    if cfg["accum_dtype"] not in ("model", "fp32"):
        raise ValueError(f"accum_dtype must be 'model' or 'fp32', got {cfg['accum_dtype']!r}")
    return cfg


def eligible_esi(model, exclude_router: bool = True) -> dict[str, torch.nn.Parameter]:
    """ESI candidates (§4.3): every weight except biases, embeddings, norms and (by default) MoE routers.
    lm_head is a candidate when untied (a tied one is the embedding and is listed under its name)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith((".bias", "norm.weight", "ln_f.weight")) or "embed" in name:
            continue
        if exclude_router and component(name) == "router":
            continue
        out[name] = p
    if not out:
        raise ValueError("no ESI-eligible weights found")
    return out


@torch.no_grad()
def respond(model, tokenizer, prompts: list[str], max_new_tokens: int, system: str | None,
            batch_size: int = 1, progress: bool = False) -> list[tuple[torch.Tensor, int]]:
    """(prompt + greedy response ids [S], prompt length) per prompt: step 1 of §4.2, without gradients.

    The response ends at the first EOS (kept), as when each prompt is generated alone. batch_size 1 is the
    reference; larger batches (left-padded) are much faster on a GPU and may differ in rare near-ties."""
    texts = render(tokenizer, prompts, system)
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="esi generate", disable=not progress,
                      leave=False):
        chunk = texts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", add_special_tokens=False, padding=len(chunk) > 1,
                        padding_side="left")
        gen = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        width = enc["input_ids"].shape[1]
        for row, mask in zip(gen.cpu(), enc["attention_mask"].cpu(), strict=True):
            prompt, new = row[:width][mask.bool()], row[width:].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            out.append((torch.cat([prompt, torch.tensor(new[:end], dtype=row.dtype)]), len(prompt)))
    return out


def respond_sets(model, tokenizer, sets: dict[str, list[str]], max_new_tokens: int, system: str | None,
                 batch_size: int = 1, progress: bool = True, *, checkpoint: str | Path | None = None,
                 key: dict | None = None) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """`respond` to every set's prompts in one pass, split back by set. `checkpoint`: a directory where the
    responses are kept (keyed by `key`, the model and the arguments), so a re-run after a kill skips generation."""
    flat = [p for ps in sets.values() for p in ps]
    if not flat:
        return {name: [] for name in sets}
    store = checkpoint and Checkpoints(checkpoint, {**(key or {}), **model_identity(model), "prompts": digest(flat),
                                                    "system": system, "settings": [max_new_tokens, batch_size]})
    out = unit(store, "responses", lambda: respond(model, tokenizer, flat, max_new_tokens, system, batch_size,
                                                   progress))
    ends = np.cumsum([0] + [len(ps) for ps in sets.values()])
    return {name: out[a:b] for name, a, b in zip(sets, ends[:-1], ends[1:])}


def judge_gradient(soft_judge, response: str, cfg: dict,
                   prompt: str | None = None) -> tuple[torch.Tensor, float]:
    """(G, safe): G = ∂(−safe)/∂z or ∂(−safe)/∂p_g, fp32 [T_g × V_g] (step 3 of §4.2), with the special
    tokens around the text (a guard's BOS, a BERT judge's [CLS] ... [SEP]) dropped when `bos_align`, so row t
    lines up with the target's response token t; without it (faithful) [CLS] shifts every row by one, as BOS
    does."""
    tok, E = soft_judge.vocab_tokenizer, soft_judge.embedding_matrix
    max_length = getattr(soft_judge, "max_length", None)
    ids = tok(response, add_special_tokens=True, truncation=max_length is not None,
              max_length=max_length)["input_ids"]
    if not ids:
        return torch.zeros(0, E.shape[0]), float("nan")
    z = torch.full((len(ids), E.shape[0]), OFF_LOGIT, device=E.device)
    z[torch.arange(len(ids), device=z.device), torch.tensor(ids, device=z.device)] = 0.0
    with torch.enable_grad():
        z.requires_grad_(True)
        p = torch.softmax(z, -1)
        if cfg["guard_grad_wrt"] == "probs":
            p = p.detach().requires_grad_(True)
        leaf = z if cfg["guard_grad_wrt"] == "logits" else p
        safe = soft_judge.safe_score(p.to(E.dtype) @ E, prompt if cfg["judge_sees_prompt"] else None)
        (G,) = torch.autograd.grad(-safe, leaf)
    G = G.float()
    if cfg["bos_align"]:
        special = set(tok.all_special_ids)
        text = [i for i, t in enumerate(ids) if t not in special]
        G = G[text[0]:text[-1] + 1] if text else G[:0]
    return G, float(safe.detach())


def transfer(G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """G_L = G · M in fp32 (T × V_t): dense @ sparse."""
    return G.float() @ M.to(G.device)


def response_probs(logits: torch.Tensor, gumbel: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """p̃ = softmax((logits + Gumbel noise) / τ) (faithful: F.gumbel_softmax's soft sample, but seeded by
    `generator`) or softmax(logits / τ) (fixed: deterministic)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if gumbel:
        noise = -torch.empty(logits.shape, dtype=logits.dtype).exponential_(generator=generator).log()
        logits = logits + noise.to(logits.device)
    return torch.softmax(logits / TAU, -1)


def target_loss(model, ids: torch.Tensor, prompt_len: int, G_L: torch.Tensor, gumbel: bool,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """−Σ_{t<T′} Σ_v G_L[t, v] · p̃[t, v] (step 5), the rows aligned by position; None if T′ = 0.

    Logits only at positions prompt_len−1 … end−2 (those predicting the response tokens)."""
    device = input_device(model)
    positions = torch.arange(prompt_len - 1, ids.shape[0] - 1)
    T = min(len(positions), G_L.shape[0])
    if T == 0:
        return None
    out = model(input_ids=ids[None].to(device), logits_to_keep=positions[:T].to(device), use_cache=False)
    p = response_probs(out.logits[0], gumbel, generator)
    return -(G_L[:T].to(device, p.dtype).detach() * p).sum()


def refusal_loglik(model, tokenizer, prompt: str, system: str | None, refusal: str = REFUSAL) -> torch.Tensor:
    """Ablation objective: S = log p(refusal string | rendered prompt), no judge."""
    device = input_device(model)
    p_ids = tokenizer(render(tokenizer, [prompt], system)[0], add_special_tokens=False)["input_ids"]
    r_ids = arch_of(model).refusal_ids(tokenizer, refusal)
    ids = torch.tensor(p_ids + r_ids, device=device)
    positions = torch.arange(len(p_ids) - 1, len(ids) - 1, device=device)
    logits = model(input_ids=ids[None], logits_to_keep=positions, use_cache=False).logits[0].float()
    return -F.cross_entropy(logits, ids[len(p_ids):], reduction="sum")


@contextlib.contextmanager
def _accumulators(params: dict[str, torch.nn.Parameter], accum_dtype: str):
    """Yield a function returning {name: fp32 CPU Σ grad}: `.grad` accumulation in the model dtype ('model',
    the reference) or fp32 buffers filled by post-accumulate-grad hooks that free `.grad` ('fp32').
    bf16 / fp16 weights always accumulate in fp32: summed in their own dtype, small per-prompt gradients
    fall below the running sum's resolution and are lost."""
    handles, acc = [], {}
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in params.values()):
        accum_dtype = "fp32"
    if accum_dtype == "fp32":
        acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}

        def hook_for(buf):
            def hook(p):
                g, p.grad = p.grad, None
                buf.add_(g)
            return hook
        handles = [p.register_post_accumulate_grad_hook(hook_for(acc[n])) for n, p in params.items()]

    class Sums:
        def __call__(self):
            if accum_dtype == "fp32":
                return {n: acc[n].cpu() for n in params}
            return {n: p.grad.float().cpu() if p.grad is not None else torch.zeros(p.shape)
                    for n, p in params.items()}

        def state(self) -> dict[str, torch.Tensor]:
            """The running sums as they are (fp32 buffers, or the `.grad`s that exist), for a checkpoint."""
            if accum_dtype == "fp32":
                return acc
            return {n: p.grad for n, p in params.items() if p.grad is not None}

        @torch.no_grad()
        def restore(self, state: dict[str, torch.Tensor]) -> None:
            for n, t in state.items():
                if accum_dtype == "fp32":
                    acc[n].copy_(t)
                else:
                    params[n].grad = t.to(params[n].device, params[n].dtype)
    try:
        yield Sums()
    finally:
        for h in handles:
            h.remove()


OBJECTIVES = ("judge", "refusal_likelihood", "response_likelihood")


def prompt_losses(model, tokenizer, soft_judge, prompts: list[str], max_new_tokens: int = 256,
                  variant: str = "faithful", seed: int = 42,
                  system: str | None = "You are a helpful assistant.", objective: str = "judge",
                  progress: bool = True, *, transfer_M: torch.Tensor | None = None, gen_batch_size: int = 1,
                  records: list | None = None, generated: list[tuple[torch.Tensor, int]] | None = None,
                  generator: torch.Generator | None = None, start: int = 0, **switches):
    """Yield, per prompt, the scalar whose backward puts ±∂S_x/∂θ into the weights' gradients (None where the
    response has no token to score); S_x per `objective`:

    - 'judge': the soft judge's safe score of the greedy response (§4.2);
    - 'refusal_likelihood': log p(stock refusal | prompt), no judge and no generation (an ablation);
    - 'response_likelihood': log p(the model's own greedy response | prompt), no judge: the language-model
      objective of the null profile (on benign prompts, docs/methods.md §4.4).

    Responses are generated first (`respond`, `gen_batch_size` at a time) unless `generated` gives them.
    `switches` override the variant's (`resolve_switches`). `records`: see `esi_gradients`. `generator` (the
    Gumbel noise; default: seeded with `seed`) and `start` (prompts before it are skipped) resume a run."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cfg = resolve_switches(variant, **switches)
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    if objective == "judge":
        if transfer_M is None:
            V_t = model.get_output_embeddings().weight.shape[0]
            transfer_M = transfer_matrix(soft_judge.vocab_tokenizer, tokenizer,
                                         (soft_judge.embedding_matrix.shape[0], V_t))
        transfer_M = transfer_M.to(soft_judge.embedding_matrix.device)
    if objective != "refusal_likelihood":
        if generated is None:
            generated = respond(model, tokenizer, prompts, max_new_tokens, system, gen_batch_size, progress)
        elif len(generated) != len(prompts):
            raise ValueError(f"generated has {len(generated)} responses for {len(prompts)} prompts")
    for i, prompt in enumerate(tqdm(prompts, desc="esi", disable=not progress, leave=False)):
        if i < start:
            continue
        if objective == "refusal_likelihood":
            yield refusal_loglik(model, tokenizer, prompt, system)
            continue
        ids, prompt_len = generated[i]
        if objective == "response_likelihood":
            yield response_loglik(model, ids, prompt_len)
            continue
        response = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
        G, safe = judge_gradient(soft_judge, response, cfg, prompt)
        G_L = transfer(G, transfer_M)
        if records is not None:
            hits, n = coverage_counts(G_L, ids[prompt_len:], tokenizer.all_special_ids)
            records.append({"prompt": prompt, "response": response, "safe": safe,
                            "judge_tokens_reached": hits, "response_tokens": n})
        yield target_loss(model, ids, prompt_len, G_L, cfg["gumbel"], generator)


def response_loglik(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor | None:
    """log p(ids[prompt_len:] | ids[:prompt_len]) summed over the response tokens; None for an empty response."""
    if ids.shape[0] <= prompt_len:
        return None
    device = input_device(model)
    positions = torch.arange(prompt_len - 1, ids.shape[0] - 1, device=device)
    logits = model(input_ids=ids[None].to(device), logits_to_keep=positions, use_cache=False).logits[0].float()
    return -F.cross_entropy(logits, ids[prompt_len:].to(device), reduction="sum")


def esi_gradients(model, tokenizer, soft_judge, prompts: list[str], max_new_tokens: int = 256,
                  variant: str = "faithful", seed: int = 42,
                  system: str | None = "You are a helpful assistant.", objective: str = "judge",
                  progress: bool = True, *, bos_align: bool | None = None, guard_grad_wrt: str | None = None,
                  gumbel: bool | None = None, accum_dtype: str | None = None,
                  judge_sees_prompt: bool | None = None, exclude_router: bool = True,
                  transfer_M: torch.Tensor | None = None, gen_batch_size: int = 1,
                  records: list | None = None,
                  generated: list[tuple[torch.Tensor, int]] | None = None,
                  checkpoint: str | Path | None = None, every: int = CHECKPOINT_EVERY,
                  key: dict | None = None) -> dict[str, torch.Tensor]:
    """g = Σ_prompts ∂S/∂θ for every `eligible_esi` weight, {name: fp32 CPU tensor} (signed; |·| is taken by
    `esi_scores`), S per `objective` (`prompt_losses`).

    All responses are generated first (`respond`, `gen_batch_size` prompts at a time), then one forward and
    backward per prompt. `transfer_M` (from `transfer_matrix`) is built here when not given. `records`, if a
    list, receives {prompt, response, safe, judge_tokens_reached, response_tokens} per prompt (safe = the
    judge's score of the hard response; the counts are `coverage_counts`).
    `generated` (the output of `respond` for these prompts) skips generation: greedy responses do not depend
    on the variant or the judge, so one generation pass serves every region computed on the same prompts.
    `checkpoint`: a directory where the responses and, every `every` prompts (0 = never), the running sums, the
    Gumbel generator's state and the records so far are kept, so a re-run after a kill resumes there and ends as
    an uninterrupted run; `key` names what the arguments and the model do not (the judge). It is removed on
    completion."""
    switches = dict(bos_align=bos_align, guard_grad_wrt=guard_grad_wrt, gumbel=gumbel, accum_dtype=accum_dtype,
                    judge_sees_prompt=judge_sees_prompt)
    cfg = resolve_switches(variant, **switches)
    params = eligible_esi(model, exclude_router)
    store = saved = None
    if checkpoint is not None:
        store = Checkpoints(checkpoint, {**(key or {}), "prompts": digest(prompts), "objective": objective,
                                         "switches": cfg, "seed": seed, "max_new_tokens": max_new_tokens,
                                         "system": system, "exclude_router": exclude_router,
                                         "gen_batch_size": gen_batch_size, **model_identity(model)})
        if generated is None and objective != "refusal_likelihood":
            generated = store.unit("responses", lambda: respond(model, tokenizer, prompts, max_new_tokens, system,
                                                                gen_batch_size, progress))
        saved = store.load("sums")
    generator = torch.Generator().manual_seed(seed)
    start = saved["done"] if saved else 0
    losses = prompt_losses(model, tokenizer, soft_judge, prompts, max_new_tokens, variant, seed, system, objective,
                           progress, transfer_M=transfer_M, gen_batch_size=gen_batch_size, records=records,
                           generated=generated, generator=generator, start=start, **switches)
    with grad_only_for(model, params.values()), _accumulators(params, cfg["accum_dtype"]) as sums:
        if saved:
            print(f"resuming ESI gradients from {checkpoint} after {start} of {len(prompts)} prompts")
            sums.restore(saved["sums"])
            generator.set_state(saved["rng"])
            if records is not None:
                records.extend(saved["records"])
        for i, loss in enumerate(losses, start):
            if loss is not None:
                loss.backward()
            if store and every and (i + 1) % every == 0 and i + 1 < len(prompts):
                store.save("sums", {"done": i + 1, "sums": sums.state(), "rng": generator.get_state(),
                                    "records": list(records or [])})
        grads = sums()
    if store:
        store.remove()
    return grads


# ---------------------------------------------------------------- scores and regions


def tensor_std(p: torch.Tensor) -> float:
    """σ_W: unbiased std of all entries of the tensor, in fp32 (on the current weights)."""
    return float(p.detach().float().std()) if p.numel() > 1 else 0.0


def esi_scores(grads: dict[str, torch.Tensor], model, score: str = "esi") -> dict[str, torch.Tensor]:
    """Per weight, non-negative fp32: 'esi' |g|·σ_W, 'grad' |g|, 'grad_std_mag' |g|·σ_W·|θ| (§4.1)."""
    if score not in ("esi", "grad", "grad_std_mag"):
        raise ValueError(f"score must be 'esi', 'grad' or 'grad_std_mag', got {score!r}")
    params = dict(model.named_parameters())
    out = {}
    for name, g in grads.items():
        s = g.float().abs()
        if score != "grad":
            s = s * tensor_std(params[name])
        if score == "grad_std_mag":
            s = s * params[name].detach().float().abs().cpu()
        out[name] = s
    return out


def esi_region(scores: dict[str, torch.Tensor], model, ratio: float = 0.01, largest: bool = True,
               resort_k: float | None = None) -> R.Region:
    """Global top-k with k = int(ratio × ALL parameters of the model, embeddings included) (§4.3).

    `resort_k` keeps the top fraction of that top-k: the top int(resort_k·k) of a top-k are the global top
    int(resort_k·k), so it is selected directly."""
    k = int(ratio * param_count(model))
    if resort_k is not None:
        k = int(resort_k * k)
    k = min(k, sum(s.numel() for s in scores.values()))  # only tiny models have fewer candidates than k
    meta = {"method": "esi", "ratio": ratio, "resort_k": resort_k, "n_params": param_count(model), "k": k}
    return R.top_k_global(scores, k, largest, meta)


def bottom_region(scores: dict[str, torch.Tensor], model, ratio: float = 0.01) -> R.Region:
    """The bottom-k control: the k smallest ESI scores."""
    return esi_region(scores, model, ratio, largest=False)


def random_region(region: R.Region, seed: int = 0, mode: str = "per_matrix_matched") -> R.Region:
    """The random control (project default: per matrix, as many entries as `region`, without replacement)."""
    return R.random_like(region, seed, mode)


# ---------------------------------------------------------------- architecture aggregation


def _parts(name: str, t: torch.Tensor):
    """(component, slice) views of a tensor: fused experts' gate_up [E, 2I, H] = gate rows :I, up rows I:."""
    comp = component(name)
    if comp == "gate_up":
        half = t.shape[1] // 2
        return [("gate", t[:, :half]), ("up", t[:, half:])]
    if comp is None:
        comp = "lm_head" if "lm_head" in name else "other"
    return [(comp, t)]


def architecture_profile(grads: dict[str, torch.Tensor], model,
                         region: R.Region | None = None) -> pd.DataFrame:
    """One row per weight matrix (fused gate_up split in two): layer, component, expert flag, mean|g|, σ_W
    (of the stored tensor, as in the scores), score = mean|g|·σ_W, esi_sum = Σ|g|·σ_W, region_count (§4.4)."""
    params = dict(model.named_parameters())
    rows = []
    for name, g in grads.items():
        sigma = tensor_std(params[name])
        mask = region.masks.get(name) if region is not None else None
        g_parts = _parts(name, g.float().abs())
        m_parts = _parts(name, mask) if mask is not None else [(c, None) for c, _ in g_parts]
        for (comp, ga), (_, m) in zip(g_parts, m_parts, strict=True):
            rows.append({"name": name, "layer": layer_index(name), "component": comp,
                         "expert": is_expert(name), "numel": ga.numel(), "mean_abs_grad": float(ga.mean()),
                         "sigma": sigma,
                         "score": float(ga.mean()) * sigma, "esi_sum": float(ga.sum()) * sigma,
                         "region_count": int(m.count_nonzero()) if m is not None else np.nan})
    return pd.DataFrame(rows)


def layer_component_table(profile: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Layer × component sums of `value` (rows without a layer, e.g. lm_head, are left out)."""
    df = profile.dropna(subset=["layer"]).astype({"layer": int})
    table = df.pivot_table(index="layer", columns="component", values=value, aggfunc="sum", fill_value=0)
    return table[[c for c in COMPONENT_ORDER if c in table.columns]]


# ---------------------------------------------------------------- perturbation


@contextlib.contextmanager
def perturb(model, region: R.Region, noise_ratio: float = 0.38, seed: int = 0):
    """θ ← θ + ε·σ_W·noise_ratio, ε ~ N(0, 1), at the region's entries (§4.5); the original values are saved
    (only those entries) and written back on exit, bit-identically, also after an exception."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    saved = []
    try:
        with torch.no_grad():
            for name, mask in region.masks.items():
                idx = torch.nonzero(mask.reshape(-1)).view(-1)
                if idx.numel() == 0:
                    continue
                flat = params[name].data.view(-1)
                idx = idx.to(flat.device)
                sigma = tensor_std(params[name])
                saved.append((flat, idx, flat[idx].clone()))
                eps = torch.randn(idx.numel(), generator=g).to(flat.device)
                flat[idx] = (flat[idx].float() + eps * (sigma * noise_ratio)).to(flat.dtype)
        yield
    finally:
        with torch.no_grad():
            for flat, idx, values in saved:
                flat[idx] = values

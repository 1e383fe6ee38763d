"""Wanda importance of every eligible weight (docs/methods.md §2.1; Sun et al. 2023 as used by Wei et al. 2024).

    I_Wanda(W)_ij = |W_ij| · ‖X_j‖₂,   ‖X_j‖₂² = (1/n_samples) Σ_samples Σ_{t ∈ response} x_{t,j}²

where x_t is the input of the weight's linear map at position t. **Which positions count**: those whose
label is not -100, i.e. the positions *of* response tokens (the reference's `tar.ne(-100)` mask on the
unshifted labels). The hidden state at such a position carries the response token itself and predicts the next
one; the last prompt position (which predicts the first response token) is excluded and the final response
token (the end-of-turn token, which predicts nothing the loss reads) is included. Dividing by samples
rather than tokens is a constant factor and changes no ranking.

Inputs are captured with forward hooks that are removed on exit, also after an exception.
- `nn.Linear` weights (q/k/v/o, gate/up/down, shared experts): hook on the Linear module.
- Fused MoE experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]; no nn.Linear):
  a pre-hook on the experts module reads the hidden states and the router's top-k choice. Expert e's
  gate_up input is exactly the hidden states of the (response) tokens routed to e; its down_proj input is
  exactly act(gate) * up of those tokens, recomputed with the module's own weights and gate function. So
  the expert norms are per-expert and exact, at the price of recomputing the experts' first projection.

One forward pass per batch under torch.no_grad; left-padded rows get position ids counted from their first
real token, so a padded row is the same computation as the unpadded sample. Scores are raw, non-negative,
fp32 and on CPU.

FSDP2-sharded models (`distributed.shard`): rank r runs batches r, r + W, ... (a rank out of batches runs a
forward that counts no position, since every rank must join each forward's all-gathers); the squared-norm sums
and the sample count are all-reduced, and each rank scores its local shard of W (dim-0 rows; for fused experts,
its experts).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..distributed import local
from ..hooks import registered
from ..models import Part, eligible_weights, input_device, part, resident
from ..regions import Region
from .context import Context, weight_method

def _owner(model, name: str):
    """(module, kind) owning parameter `name`: kind "linear" for an nn.Linear weight, else the fused experts
    attribute ("gate_up_proj" / "down_proj")."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if isinstance(module, torch.nn.Linear) and attr == "weight":
        return module, "linear"
    if part(name) is Part.EXPERT and hasattr(module, "_apply_gate"):
        if getattr(module, "is_transposed", False) or not getattr(module, "has_gate", True):
            raise ValueError(f"{module_name}: transposed or gate-less expert layouts are not supported")
        return module, attr
    raise ValueError(f"{name} is neither an nn.Linear weight nor a fused experts weight")


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x reshaped to [tokens, features] with only the counted (response) positions kept."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] != mask.numel():
        raise RuntimeError(f"hooked input has {x.shape[0]} rows but the batch has {mask.numel()} positions")
    return x[mask]


def _sq_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x * x).sum(0)


def wanda_scores(model, batches: Iterable[dict], weights: dict[str, torch.nn.Parameter] | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """{name: fp32 CPU tensor shaped like the weight} with I_ij = |W_ij| · ‖X_j‖₂ (see the module docstring)
    over every sample of `batches` ({input_ids, attention_mask, labels}, as `chat.response_batches` yields).
    `weights` defaults to `models.eligible_weights(model)`. On a sharded model each rank gets the scores of its
    local shards (module docstring)."""
    weights = resident(dict(weights) if weights is not None else eligible_weights(model))
    sharded = any(distributed.is_sharded(p) for p in weights.values())
    device = input_device(model)
    state = {"mask": None}           # flat [B*S] bool mask of the counted positions of the current batch
    sumsq: dict[str, torch.Tensor] = {}
    linears, experts = {}, {}        # module -> name; experts module -> {attr: name}
    for name, p in weights.items():
        module, kind = _owner(model, name)
        if kind == "linear":
            sumsq[name] = torch.zeros(p.shape[-1], dtype=torch.float32, device=p.device)
            linears[module] = name
        else:
            sumsq[name] = torch.zeros(p.shape[0], p.shape[-1], dtype=torch.float32, device=p.device)
            experts.setdefault(module, {})[kind] = name

    def linear_hook(name):
        def hook(module, args, output):
            sumsq[name].add_(_sq_sum(_rows(args[0], state["mask"])))
        return hook

    def experts_hook(names):
        def hook(module, args, kwargs):
            hidden = args[0] if len(args) > 0 else kwargs["hidden_states"]
            top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden = _rows(hidden, state["mask"])
            top_k = top_k.reshape(-1, top_k.shape[-1])[state["mask"]]
            for e in range(module.gate_up_proj.shape[0]):
                x = hidden[(top_k == e).any(-1)]
                if x.shape[0] == 0:
                    continue
                if "gate_up_proj" in names:
                    sumsq[names["gate_up_proj"]][e].add_(_sq_sum(x))
                if "down_proj" in names:
                    h = module._apply_gate(F.linear(x, module.gate_up_proj[e]))
                    sumsq[names["down_proj"]][e].add_(_sq_sum(h))
        return hook

    def install(handles):
        handles += [m.register_forward_hook(linear_hook(n)) for m, n in linears.items()]
        handles += [m.register_forward_pre_hook(experts_hook(n), with_kwargs=True) for m, n in experts.items()]
    if sharded:
        batches = list(batches)
        ranks, r = distributed.world_size(), distributed.rank()
        rounds = -(-len(batches) // ranks)        # every rank runs this many forwards
        batches = [(batches[i], True) if i < len(batches) else (batches[0], False)
                   for i in range(r, rounds * ranks, ranks)] if batches else []
    else:
        batches = ((b, True) for b in batches)
    n_samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), registered(install):
            for batch, counted in tqdm(batches, desc="wanda", disable=not progress, leave=False):
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                attn = batch.get("attention_mask")
                attn = torch.ones_like(ids) if attn is None else attn.to(device)
                state["mask"] = (labels != -100).reshape(-1) & counted
                position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                      logits_to_keep=1)
                n_samples += ids.shape[0] if counted else 0
    finally:
        state["mask"] = None
        model.train(was_training)
    if sharded:
        n_samples = int(distributed.all_reduce(torch.tensor(n_samples)))
        sumsq = {name: distributed.all_reduce(s) for name, s in sumsq.items()}
    if n_samples == 0:
        raise ValueError("wanda_scores got no samples")
    scores = {}
    for name, p in weights.items():
        norm = sumsq.pop(name).div_(n_samples).sqrt_()
        w = local(p.detach())
        if norm.dim() == 1:
            norm = norm[None, :]                  # broadcast over output rows
        else:
            start = distributed.row_offset(p)    # this rank's experts
            norm = norm[start:start + w.shape[0], None, :]
        scores[name] = (w.abs().float() * norm).cpu()
    return scores


def run(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """Identify-stage runner: top-q per matrix of Wanda scores, refined with `identify.wanda.p`."""
    yield from weight_method(ctx, "wanda", lambda b: wanda_scores(ctx.model, b, progress=False), p=ctx.cfg.wanda.p)

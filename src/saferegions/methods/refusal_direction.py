"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single direction"): the
validation's positive control, an edit known to remove refusal (docs/methods.md §3.4).

- Direction: r = mean(x⁺) − mean(x⁻), the difference in means of the residual stream (the input of decoder block
  l) at a post-instruction position of the chat-templated prompt, over harmful (x⁺) and harmless (x⁻) prompts;
  one candidate per (layer, position), accumulated in float64 as the reference does.
- Directional ablation: x ← x − r̂ r̂ᵀ x on the input of every block and on the output of every block's attention
  and MLP, at every position, so no layer reads or writes r̂ (the reference's hooks). Hooks are removed on exit,
  so the model is untouched afterwards.
- Selection: among the candidates, the one whose ablation makes the model comply most often on held-out harmful
  selection prompts (the evaluation's own judge), where the reference minimises a refusal-token score and filters
  by KL on harmless prompts; the stage reports the degenerate rate and utility beside it instead.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .. import chat, generation_cache
from ..hooks import capture_inputs, edit_input, edit_output
from ..models import arch_of, input_device


def _batches(tok, texts: list[str], batch_size: int):
    """Left-padded token batches of already rendered texts (position -1 is every row's last real token)."""
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            yield tok(texts[start:start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side


@torch.no_grad()
def mean_activations(model, tok, texts: list[str], positions: list[int], batch_size: int = 16) -> torch.Tensor:
    """[len(positions), layers, hidden] float64: the mean input of each decoder block at each (negative) position
    of the rendered `texts`."""
    if not texts:
        raise ValueError("mean_activations needs at least one prompt")
    blocks = dict(enumerate(arch_of(model).blocks(model)))
    device = input_device(model)
    idx = torch.tensor(positions)
    total = None
    for batch in _batches(tok, texts, batch_size):
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with capture_inputs(blocks, reduce=lambda _, x: x[:, idx.to(x.device)].double().sum(0).cpu()) as store:
            model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                  use_cache=False, logits_to_keep=1)
        sums = torch.stack([store[i][0] for i in range(len(blocks))], 1)    # [positions, layers, hidden]
        total = sums if total is None else total + sums
    return total / len(texts)


def directions(model, tok, harmful: list[str], harmless: list[str], positions: list[int],
               system: str | None = None, batch_size: int = 16) -> torch.Tensor:
    """[positions, layers, hidden] float64: mean(harmful) − mean(harmless) block inputs, prompts in the model's
    chat template with the generation prompt (the post-instruction tokens are its last positions)."""
    return (mean_activations(model, tok, chat.render(tok, harmful, system), positions, batch_size)
            - mean_activations(model, tok, chat.render(tok, harmless, system), positions, batch_size))


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x − (x·û) û along the last dimension, computed in x's dtype on x's device."""
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


@contextmanager
def ablated(model, direction: torch.Tensor):
    """Directional ablation of `direction` (any norm) from the residual stream: every block's input, attention
    output and MLP output. The hooks are removed on exit, also after an exception."""
    norm = direction.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the direction to ablate must be finite and non-zero")
    unit = (direction.double() / norm).float()
    a = arch_of(model)
    fn = lambda x: project_out(x, unit)   # noqa: E731
    with ExitStack() as stack:
        name = f"refusal direction ablated {generation_cache.digest(unit.tolist())}"
        stack.enter_context(generation_cache.edit(name))   # hooks: the generation store keys on this name
        for block in a.blocks(model):
            stack.enter_context(edit_input(block, fn))
            stack.enter_context(edit_output(a.attention_of(block), fn))
            stack.enter_context(edit_output(getattr(block, a.mlp), fn))
        yield


def candidates(n_layers: int, layer_fracs: list[float], positions: list[int]) -> list[tuple[int, int]]:
    """(layer, position) candidates: each fraction of the depth rounded to a block index, deduplicated."""
    layers = sorted({min(n_layers - 1, max(0, round(f * n_layers))) for f in layer_fracs})
    return [(layer, p) for layer in layers for p in positions]


def select(model, diffs: torch.Tensor, positions: list[int], pairs: list[tuple[int, int]], comply_rate) -> tuple:
    """(layer, position, direction, {"layer/position": rate}) of the candidate whose ablation maximises
    `comply_rate()` (called inside the ablation; ties go to the earlier candidate)."""
    rates = {}
    best = None
    for layer, pos in pairs:
        d = diffs[positions.index(pos), layer]
        with ablated(model, d):
            rates[f"{layer}/{pos}"] = r = float(comply_rate())
        if best is None or r > best[0]:
            best = (r, layer, pos, d)
    return best[1], best[2], best[3], rates

"""SNIP importance of every eligible weight (docs/methods.md §2.1; Lee et al. 2019 as used by Wei et al. 2024).

    I_SNIP(W) = |W| ⊙ Σ_s |∂L_s/∂W|,   L_s = mean cross-entropy over the response tokens of sample s.

The absolute value is taken per sample, so every sample gets its own backward pass. Unlike the reference code
(one decoder layer at a time, every sample re-run for each layer), one forward/backward per sample scores all
layers at once: a post-accumulate-grad hook on each scored weight adds |grad| into an fp32 accumulator and
frees `.grad` immediately, so peak memory is about weights + one fp32 score buffer + one sample's activations.

Cost-saving details that do not change the result:
- each sample is run alone with its padding stripped (RoPE attention only sees relative positions, so a
  left-padded row and its unpadded copy are the same computation);
- the lm_head (vocabulary projection) runs only at the positions that predict a response token
  (`logits_to_keep`), which is all the loss reads;
- only the scored weights require grad, so no other weight gradient is computed.

Forward and backward run in the model's dtype; accumulation is fp32 (trap T3). Scores are raw and
non-negative (trap T1): direction is chosen at selection time.

FSDP2-sharded models (`distributed.shard`): every rank runs every sample (data replicated, not split). FSDP2's
reduce-scatter then averages the ranks' identical gradients of that one sample, so each rank receives its shard
of ∂L_s/∂W itself and takes |·| before samples are added: the same per-sample score as one process, each rank
holding the scores of its local shard. (Splitting samples over ranks would need the unreduced gradient of each
sample: the default reduce-scatter sums g over ranks before any |·|, a different score.) The gain is memory,
not speed.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .. import chat
from ..distributed import is_sharded, local
from ..hooks import grad_only_for
from ..models import eligible_weights, input_device, resident
from ..regions import Region
from .context import Context, weight_method


def iter_samples(batches: Iterable[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [S], labels [S]) for every row of every batch, padding (attention_mask == 0) removed."""
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        for i in range(ids.shape[0]):
            keep = mask[i].bool() if mask is not None else torch.ones_like(ids[i], dtype=torch.bool)
            yield ids[i][keep], labels[i][keep]


def snip_scores(model, batches: Iterable[dict], weights: dict[str, torch.nn.Parameter] | None = None,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """{name: fp32 CPU tensor shaped like the weight} with I = |W| ⊙ Σ_s |∂L_s/∂W| over every sample of
    `batches` ({input_ids, attention_mask, labels} with labels -100 outside the response, as
    `chat.response_batches` yields). `weights` defaults to `models.eligible_weights(model)`. On a sharded model
    each rank gets the scores of its local shards (module docstring)."""
    weights = resident(dict(weights) if weights is not None else eligible_weights(model))
    device = input_device(model)
    sharded = any(is_sharded(p) for p in weights.values())
    acc = {name: torch.zeros(local(p).shape, dtype=torch.float32, device=p.device) for name, p in weights.items()}

    def accumulate(buf: torch.Tensor):
        def hook(p: torch.nn.Parameter) -> None:
            g, p.grad = p.grad, None
            buf.add_(g.abs_())   # g is ours alone now (autograd only hands over unshared buffers)
        return hook

    handles = []
    with grad_only_for(model, weights.values()):
        try:
            for name, p in weights.items():
                if not sharded:   # FSDP2 sets the sharded grad after its reduce-scatter, outside autograd
                    handles.append(p.register_post_accumulate_grad_hook(accumulate(acc[name])))
            samples = tqdm(iter_samples(batches), desc="snip", disable=not progress, leave=False)
            for input_ids, labels in samples:
                loss = chat.response_loss(model, input_ids[None].to(device), labels[None])
                if loss is None:
                    continue
                loss.backward()
                for name, p in weights.items() if sharded else ():
                    if p.grad is not None:
                        acc[name].add_(local(p.grad).abs())
                        p.grad = None
        finally:
            for h in handles:
                h.remove()
    scores = {}
    for name, p in weights.items():
        scores[name] = acc.pop(name).mul_(local(p.detach()).abs()).cpu()
    return scores


def run(ctx: Context) -> Iterator[tuple[str, str, Region]]:
    """Identify-stage runner: top-q per matrix of SNIP scores on `identify.snip.n` examples per set, refined with
    `identify.snip.p`."""
    c = ctx.cfg.snip
    yield from weight_method(ctx, "snip", lambda b: snip_scores(ctx.model, b, progress=False), c.n, c.p)

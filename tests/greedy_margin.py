"""Greedy decoding takes an argmax of fp32 logits, so "the same tokens" across batch shapes (1 vs N rows,
padded or not, a cached prefix), kernels (row-split vs F.linear) or CPUs (AVX2, AVX-512 and AMX sum in
different orders) holds only where no step is a near-tie. Tests that compare such generations exactly first
check that every greedy step of the reference (each prompt alone, plain HF generate) leads by more than
MARGIN: then no rounding can flip a token, and the exact comparison stays as strict as before.

MARGIN: the tiny models' logits (|z| < 1) differ by <= 2e-7 between those batch shapes, kernels and ISAs
(<= 2e-6 with the ESI tests' 10x sharpened lm_head, |z| < 7), measured on AMX, AVX-512 and AVX2; 1e-4 leaves
a factor of 50 to 500. The smallest gap of the prompts the tests use is 4.6e-4. Prompts that fall under it
fail on every CPU alike: pick other prompts rather than loosen the check."""
from __future__ import annotations

import torch

from saferegions import chat

MARGIN = 1e-4


@torch.no_grad()
def min_greedy_margin(model, tokenizer, prompts: list[str], max_new_tokens: int,
                      system: str | None = None) -> float:
    """Smallest gap between the two largest scores over every greedy step of every prompt, each generated
    alone (chat template, no special tokens added: as chat.generate and methods.esi.respond encode it)."""
    gaps = []
    for text in chat.render(tokenizer, prompts, system):
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        gaps += [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    return min(gaps)

"""Chat-template rendering, batched left-padded greedy generation, response-only training batches and loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import generation_cache
from .models import input_device


def render(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Each prompt as a single user turn in the model's own chat template, generation prompt on."""
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def _by_length(texts: list[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))


def shared_prefix(rows: list[list[int]]) -> int:
    """Tokens every row starts with (the chat template's system turn), leaving each row at least one of its own."""
    k = 0
    limit = min(len(r) for r in rows) - 1
    while k < limit and all(r[k] == rows[0][k] for r in rows):
        k += 1
    return k


def _prefilled_batch(model, rows: list[list[int]], pad: int, device):
    """Input ids, attention mask and a KV cache holding the rows' shared prefix, computed once and repeated.

    Layout per row: [prefix][pads][own tokens]. generate() derives positions from the attention mask, so a row's
    own tokens sit at the positions they would have after left padding; only the part after the cache is run."""
    from transformers import DynamicCache
    k = shared_prefix(rows)
    width = max(len(r) for r in rows) - k
    ids = [r[:k] + [pad] * (width - len(r) + k) + r[k:] for r in rows]
    mask = [[1] * k + [0] * (width - len(r) + k) + [1] * (len(r) - k) for r in rows]
    cache = None
    if k:
        cache = DynamicCache(config=model.config)
        model(torch.tensor([rows[0][:k]], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rows))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device), cache


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             system: str | None = None, do_sample: bool = False, seed: int = 0, desc: str = "generate",
             with_finished: bool = False, **sample_kwargs):
    """Responses in prompt order. Prompts are batched longest-first to limit padding; greedy by default.
    A batch's shared prefix (the system turn: ~20 of ~45 tokens for Qwen) is run once and its cache reused.
    `with_finished` also returns, per response, whether the model ended it (an EOS) rather than
    `max_new_tokens` cutting it off: only an ended response may be trained to end (`response_batches`).
    Each batch is first asked of the generation store in use (`generation_cache`), and generated only if a row
    misses."""
    texts = render(tokenizer, prompts, system)
    order = _by_length(texts)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tokens: list[list[int] | None] = [None] * len(texts)
    eos = eos_ids(model, tokenizer)
    device = input_device(model)
    store = generation_cache.Lookup(model, tokenizer, prompt_ids, generation_cache.Decoding(
        max_new_tokens, do_sample, seed if do_sample else None, batch_size if do_sample else None, sample_kwargs))
    if do_sample:
        torch.manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        found = store.get(idx)
        if any(f is None for f in found):   # the whole batch, as without the store
            ids, mask, cache = _prefilled_batch(model, [prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 pad_token_id=tokenizer.pad_token_id, **sample_kwargs)
            new = out[:, ids.shape[1]:].tolist()
            store.put(idx, new)
            found = [f if f is not None else row for f, row in zip(found, new)]
        for i, row in zip(idx, found):
            tokens[i] = row
    responses = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    finished = [any(t in eos for t in row) for row in tokens]
    return (responses, finished) if with_finished else responses


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the generation config's EOS id(s) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def response_batches(tokenizer, prompts: list[str], responses: list[str], batch_size: int = 8,
                     max_length: int = 512, system: str | None = None, finished: list[bool] | None = None):
    """Yield {input_ids, attention_mask, labels} with labels = -100 on prompt and padding positions, so
    losses and activation statistics use response tokens only (Wei et al.'s default).

    A response ends with the EOS token only where `finished` says the model ended it (`generate(...,
    with_finished=True)`): a greedy response cut off at max_new_tokens did not end, and a loss on an EOS
    there would teach the model to stop mid-sentence. None = all finished (dataset responses, e.g. alignment
    pairs)."""
    texts = render(tokenizer, prompts, system)
    eos = tokenizer.eos_token or ""
    ends = [True] * len(responses) if finished is None else list(finished)
    if len(ends) != len(responses):
        raise ValueError(f"{len(ends)} finished flags for {len(responses)} responses")
    rows = []
    for t, r, end in zip(texts, responses, ends):
        p_ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r + (eos if end else ""), add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_length]
        labels = ([-100] * len(p_ids) + r_ids)[:max_length]
        rows.append((ids, labels))
    pad = tokenizer.pad_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, lab) in enumerate(chunk):  # left padding, as in generation
            input_ids[j, width - len(ids):] = torch.tensor(ids)
            labels[j, width - len(lab):] = torch.tensor(lab)
            mask[j, width - len(ids):] = 1
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def response_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> torch.Tensor | None:
    """Mean next-token cross-entropy over the labelled tokens of a batch (None if it has none): the model's own
    `labels=` loss, but the vocabulary projection (a fifth of a 0.5B model's FLOPs) runs only on the columns
    that predict a labelled token (`logits_to_keep`); position t predicts token t+1."""
    targets = labels[:, 1:].to(input_ids.device)
    cols = (targets != -100).any(0).nonzero().squeeze(1)
    if cols.numel() == 0:
        return None
    logits = model(input_ids=input_ids, logits_to_keep=cols, use_cache=False, **model_kwargs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, cols].flatten(), ignore_index=-100)

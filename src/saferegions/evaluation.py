"""Generation → judged outcomes: refusal rate / ASR on prompt sets, and utility scores (GSM8K exact match,
SST-2 accuracy). Library code: it takes models, prompts and judges, and reads no params and writes no files."""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from . import chat


def respond_and_judge(model, tokenizer, prompts: list[str], judge_list: dict, max_new_tokens: int,
                      batch_size: int, system: str | None = None, desc: str = "generate"):
    """Greedy responses and every judge's verdicts on them."""
    responses = chat.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              system=system, desc=desc)
    return responses, {name: j.judge(prompts, responses) for name, j in judge_list.items()}


def asr(verdicts) -> float:
    """Attack success rate: fraction of harmful prompts whose response complied."""
    return float(np.mean(verdicts.complied)) if len(verdicts.complied) else float("nan")


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace("$", ""))
    return found[-1].replace(",", "").rstrip(".") if found else None


def gsm8k_exact_match(responses: list[str], answers: list[str]) -> float:
    """The last number in the response equals the reference answer."""
    hits = [last_number(r) == a.replace(",", "") for r, a in zip(responses, answers)]
    return float(np.mean(hits)) if hits else float("nan")


def sst2_accuracy(responses: list[str], answers: list[str]) -> float:
    """The first of 'positive'/'negative' mentioned in the response matches the label."""
    def label(r: str):
        r = r.lower()
        pos, neg = r.find("positive"), r.find("negative")
        if pos < 0 and neg < 0:
            return None
        return "positive" if neg < 0 or (0 <= pos < neg) else "negative"
    hits = [label(r) == a for r, a in zip(responses, answers)]
    return float(np.mean(hits)) if hits else float("nan")


def refusal_table(model, tokenizer, sets: dict[str, list[str]], judge_list: dict, max_new_tokens: int,
                  batch_size: int, system: str | None = None, desc: str = "generate"):
    """Generate once over all sets (batched across sets), then judge per set.

    Returns (generations: list of row dicts, metrics: {set: {"refusal_rate": r, "n": n, ...per judge}})."""
    names = [name for name, ps in sets.items() for _ in ps]
    prompts = [p for ps in sets.values() for p in ps]
    responses, verdicts = respond_and_judge(model, tokenizer, prompts, judge_list, max_new_tokens, batch_size,
                                            system, desc)
    first = next(iter(judge_list))
    rows = [{"dataset": n, "prompt": p, "response": r, **{f"complied_{j}": bool(v.complied[i])
             for j, v in verdicts.items()}} for i, (n, p, r) in enumerate(zip(names, prompts, responses))]
    metrics = {}
    for name in sets:
        idx = np.array([n == name for n in names])
        metrics[name] = {"n": int(idx.sum()),
                         "refusal_rate": float(1 - verdicts[first].complied[idx].mean()),
                         **{f"refusal_rate_{j}": float(1 - v.complied[idx].mean()) for j, v in verdicts.items()}}
    return rows, metrics


@torch.no_grad()
def utility_score(model, tok, prompts: list[str], answers: list[str], batch_size: int = 8,
                  system: str | None = None) -> float:
    """exp(mean token log-likelihood) of `answers` given `prompts` (the appended end-of-turn token excluded:
    truncated greedy answers never produced it): the geometric-mean probability the model gives to those answers,
    1 / perplexity. Cheap (one teacher-forced forward, no generation), and it falls when an edit breaks the model,
    which a keyword judge alone would score as "complied"."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in chat.response_batches(tok, prompts, answers, batch_size, system=system):
        labels = batch["labels"]
        labels[:, -1] = -100                     # left padding: every row ends with its appended eos
        cols = (labels != -100).any(0).nonzero()
        if not len(cols):
            continue
        k = labels.shape[1] - int(cols.min()) + 1   # the last k positions predict every answer token
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=k, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = labels[:, -(k - 1):].to(device)
        valid = target != -100
        picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
        total += float(picked[valid].sum())
        count += int(valid.sum())
    return math.exp(total / count) if count else float("nan")

"""Validation of identified regions (stage `validate`): ablate a region, measure ASR and utility, and compare
with a random region of the same size at the same granularity.

- Ablation, at each method's own granularity: weight-level regions (SNIP, Wanda, NLSR's base projection) are
  zeroed; neurons are deactivated with hooks; layer regions have their blocks' projection weights scaled by
  `layer_alpha` (0 = the blocks contribute nothing but the residual stream).
- Random control: the same count per weight matrix (`regions.random_like`), per layer and neuron type
  (`neurons.random_units`), or the same number of layers.
- ASR: keyword judge on greedy responses to held-out (eval split) harmful prompts.
- Utility: exp(mean log-likelihood) of the *unablated* model's greedy answers to held-out Alpaca prompts,
  i.e. the geometric-mean probability the ablated model gives to what the intact model says (1 / perplexity).
  Cheap (one teacher-forced forward, no generation), and it falls when an ablation breaks the model, which a
  keyword judge alone would score as "complied".
Every manager restores the model bit-exactly on exit, so one loaded model serves all conditions.
"""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch

from . import chat, regions
from .hooks import scaled_weights, zeroed_weights
from .methods import layers, neurons
from .models import block_modules
from .regions import Region

WEIGHT_METHODS = ("snip", "wanda", "nlsr")


def ablation(model, method: str, region: Region, layer_alpha: float = 0.0):
    """Context manager that removes `region` from `model` at the method's granularity."""
    if method in WEIGHT_METHODS:
        return zeroed_weights(model, region.masks)
    if method == "neuron":
        return neurons.deactivate(model, region.units["neurons"])
    if method == "layer":
        return scaled_weights(model, layers.layer_weight_names(model, region.units["layers"]), layer_alpha)
    raise ValueError(f"unknown method {method!r}")


def random_control(model, method: str, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
    """A random region of the same size and granularity (docs/methods.md §3.4)."""
    meta = {"method": "random", "seed": seed, "reference": region.meta}
    if method in WEIGHT_METHODS:
        return regions.random_like(region, seed, mode)
    if method == "neuron":
        units = neurons.random_units(model, region.units["neurons"], seed)
        return Region(neurons.to_weight_masks(model, units), meta, {"neurons": units})
    if method == "layer":
        n = len(block_modules(model))
        ids = sorted(random.Random(seed).sample(range(n), len(region.units["layers"])))
        return Region(layers.to_weight_masks(model, ids), meta, {"layers": ids})
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def utility_score(model, tok, prompts: list[str], answers: list[str], batch_size: int = 8,
                  system: str | None = None) -> float:
    """exp(mean token log-likelihood) of `answers` given `prompts` (the appended end-of-turn token excluded:
    truncated greedy answers never produced it)."""
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


def measure(model, tok, harmful: list[str], util_prompts: list[str], util_answers: list[str], judge,
            max_new_tokens: int, batch_size: int, system: str | None = None, desc: str = "validate"):
    """(ASR, utility, responses) of the model as it is now (inside or outside an ablation)."""
    responses = chat.generate(model, tok, harmful, max_new_tokens, batch_size, system, desc=desc)
    asr = float(np.mean([not judge.refused(r) for r in responses])) if responses else float("nan")
    return asr, utility_score(model, tok, util_prompts, util_answers, batch_size, system), responses


def compare(model, tok, method: str, region: Region, seed: int, harmful, util_prompts, util_answers, judge,
            cfg, system: str | None = None) -> tuple[dict, list[dict]]:
    """{asr_region, asr_random, utility_region, utility_random} and the generations behind them."""
    out, gens = {}, []
    control = random_control(model, method, region, seed, cfg.random_mode)
    for tag, r in (("region", region), ("random", control)):
        with ablation(model, method, r, cfg.layer_alpha):
            asr, util, responses = measure(model, tok, harmful, util_prompts, util_answers, judge,
                                           cfg.max_new_tokens, cfg.batch_size, system, desc=f"{method} {tag}")
        out[f"asr_{tag}"], out[f"utility_{tag}"] = asr, util
        out[f"size_{tag}"] = r.size
        gens += [{"ablation": tag, "prompt": p, "response": s} for p, s in zip(harmful, responses)]
    return out, gens


def run_model(model, tok, role: str, methods: list[str], datasets: list[str], region_dir, harmful: list[str],
              util_prompts: list[str], judge, cfg, seed: int = 0, system: str | None = None):
    """Every (method, dataset) condition for one model: ({method: {dataset: 4 numbers}}, reference, rows,
    generations). `region_dir(method)` is the folder of that method's regions; the unablated model's greedy
    answers to `util_prompts` define the utility reference."""
    from .identify import region_path
    answers = chat.generate(model, tok, util_prompts, cfg.max_new_tokens, cfg.batch_size, system,
                            desc="utility answers")
    asr0, util0, resp0 = measure(model, tok, harmful, util_prompts, answers, judge, cfg.max_new_tokens,
                                 cfg.batch_size, system, desc="unablated")
    reference = {"asr": asr0, "utility": util0, "n_harmful": len(harmful), "n_utility": len(util_prompts)}
    gens = [{"model": role, "method": None, "dataset": None, "ablation": "none", "prompt": p, "response": r}
            for p, r in zip(harmful, resp0)]
    out, rows = {}, []
    for method in methods:
        for i, d in enumerate(datasets):
            region = regions.load(region_path(region_dir(method), d, cfg.variant))
            vals, g = compare(model, tok, method, region, seed + i, harmful, util_prompts, answers, judge, cfg,
                              system)
            out.setdefault(method, {})[d] = {k: vals[k] for k in ("asr_region", "asr_random", "utility_region",
                                                                  "utility_random")}
            rows.append({"model": role, "method": method, "dataset": d, "density": region.density, **vals})
            gens += [{"model": role, "method": method, "dataset": d, **x} for x in g]
    return out, reference, rows, gens

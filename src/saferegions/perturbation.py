"""ESI's perturbation check (docs/methods.md §4.5): Gaussian noise scaled to each matrix's spread on the top-k, the
bottom-k or a random region of the top-k's per-matrix counts (or on none), sampled responses to the same held-out
harmful prompts, and ASR(top) − ASR(random) paired on (seed, prompt)."""
from __future__ import annotations

import contextlib

from . import chat, evaluation, evidence
from . import regions as R
from .methods import esi

PERTURB_CONDITIONS = ("none", "topk", "bottomk", "random")
CONDITION_KEYS = {"none": "none", "topk": "top", "bottomk": "bottom", "random": "random"}   # metrics.json names


def perturbation(model, tok, top: R.Region, bottom: R.Region, prompts: list[str], judge, e, role: str = "",
                 progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Outcomes of sampled responses to the same `prompts` with noise on no weights, the top-k, the bottom-k and a
    random region of the top-k's per-matrix counts (`e.perturb_conditions`), for each seed (noise, random region
    and sampling share the seed). Returns (rows per seed × condition, generations, {condition: Evaluation pooled
    over seeds, in the same (seed, prompt) order for every condition: paired})."""
    rows, gens, pooled = [], [], {}
    for seed in range(e.perturb_seeds):
        regions = {"none": None, "topk": top, "bottomk": bottom, "random": esi.random_region(top, seed, e.random_mode)}
        for cond in e.perturb_conditions:
            region = regions[cond]
            ctx = esi.perturb(model, region, e.noise_ratio, seed) if region is not None else contextlib.nullcontext()
            with ctx:
                responses = chat.generate(model, tok, prompts, e.perturb_max_new_tokens, e.perturb_batch_size,
                                          e.system_prompt, do_sample=True, seed=seed, desc=f"{role} {cond}",
                                          temperature=e.temperature, top_p=e.top_p)
            ev = evaluation.Evaluation(list(prompts), responses, evaluation.outcomes(responses, judge, prompts))
            rows.append({"model": role, "seed": seed, "condition": cond, "asr": float(ev.complied.mean()),
                         "degenerate_rate": float(ev.degenerate.mean()),
                         "size": region.size if region is not None else 0, "n": len(prompts)})
            gens += [{"model": role, "seed": seed, "condition": cond, "prompt": p, "response": r,
                      "outcome": o.value, "complied": o == evaluation.Outcome.COMPLIED}
                     for p, r, o in zip(prompts, responses, ev.outcomes)]
            prev = pooled.get(cond)
            pooled[cond] = ev if prev is None else evaluation.Evaluation(
                prev.prompts + ev.prompts, prev.responses + ev.responses, prev.outcomes + ev.outcomes)
    return rows, gens, pooled


def perturbation_metrics(pooled: dict) -> dict:
    """{condition: rate_record} and "top_vs_random": ASR(top) − ASR(random), paired on (seed, prompt), McNemar."""
    out = {CONDITION_KEYS[c]: evaluation.rate_record(ev) for c, ev in pooled.items()}
    if "topk" in pooled and "random" in pooled:
        out["top_vs_random"] = evidence.paired_proportions(pooled["topk"].complied,
                                                           pooled["random"].complied).as_dict()
    return out

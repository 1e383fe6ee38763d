"""The report's plain tables: stage status, regions found, wall time per stage and the deviations from the
papers (fixed ones and every params key that differs from paper scale)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import config
from ..results import MATRIX_STAGES, NOT_RUN, STAGES, MetricsError, read_json


def stage_status(results: dict) -> list[dict]:
    return [{"stage": s, "status": "ran" if results.get(s) is not None else NOT_RUN,
             "items": len(results[s]) if s in MATRIX_STAGES and results.get(s) else None} for s in STAGES]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def region_summary(results: dict) -> list[dict]:
    """Mean region density per (model, method), raw and refined, from the identify metrics."""
    out = []
    for m in (results.get("identify") or {}).values():
        ds = m.datasets
        out.append({"model": m.role, "method": m.method, "datasets": len(ds),
                    "density_raw": _mean(v.raw.density for v in ds.values()),
                    "density_refined": _mean(v.refined.density for v in ds.values())})
    return out


def timings(root: str | Path = ".") -> list[dict]:
    """One row per timing.json under results/ (matrix items separately), report excluded."""
    rows = []
    for f in sorted((Path(root) / "results").glob("**/timing.json")):
        t = read_json(f)
        stage = f.relative_to(Path(root) / "results").parts[0]
        if stage == "report":
            continue
        secs = t.get("wall_seconds") if isinstance(t, dict) else None
        if isinstance(secs, bool) or not isinstance(secs, (int, float)):
            raise MetricsError(f"{f}: wall_seconds missing or not a number")
        item = f.parent.name if f.parent.name != stage else ""
        rows.append({"stage": stage, "item": item, "wall_seconds": float(secs)})
    return rows


def stage_totals(rows: list[dict]) -> list[dict]:
    order = {s: i for i, s in enumerate(STAGES)}
    tot: dict = {}
    for r in rows:
        t = tot.setdefault(r["stage"], {"stage": r["stage"], "wall_seconds": 0.0, "runs": 0})
        t["wall_seconds"] += r["wall_seconds"]
        t["runs"] += 1
    return sorted(tot.values(), key=lambda t: order.get(t["stage"], len(order)))


# ---------------------------------------------------------------- deviations


# Documented deviations from the papers (docs/methods.md, README); the param-level ones come from `param_deviations`.
DOCUMENTED = [
    ("both", "docs/methods.md §1", "Neither paper's tables or figures were available: every number not tagged [paper] in "
     "docs/methods.md is a reference-code or project default, named as a params key."),
    ("paper 1", "docs/design.md §4, README", "HEx-PHI and SORRY-Bench are gated / not redistributable: CatQA and "
     "SALAD-Bench base questions substitute for them among the ten identification sets."),
    ("both", "docs/methods.md §6.1", "Model ids of both papers are unknown; the paper profile uses Llama-3.x, Qwen2.5, "
     "Gemma-2, Mistral (+ an MoE), and base ('unaligned') vs instruct ('aligned') pairing is our reading."),
    ("both", "docs/methods.md §6.2", "The embedded default runs quantized-then-dequantized community GGUF conversions "
     "(Qwen2.5-Coder-0.5B with an untied lm_head, SmolLM2-135M), not the official weights."),
    ("paper 1", "docs/methods.md §2.2", "'SafeNeuron' is read as SN-Tune's safety-neuron detector, with per-layer top "
     "fractions instead of absolute counts and closed forms for FFN / o_proj neurons."),
    ("paper 1", "docs/methods.md §2.3", "SafeLayer is made dataset-dependent by using each dataset as the 'malicious' "
     "side; the range is read off the cosine gap by an automated rule, not by eye."),
    ("paper 1", "docs/methods.md §2.4", "NLSR on chat models without a LoRA: one safety LoRA is trained first "
     "(harmful → refusal), then projected per dataset; LoRA regions are projected to base weights by |ΔW|."),
    ("paper 1", "docs/methods.md §2.1", "SNIP scores all layers with one backward per sample and fp32 accumulation "
     "(the reference reruns every sample per layer in bf16); same ranking, 1/L of the compute."),
    ("paper 1", "docs/methods.md §3.2-3.4", "The projection of neurons / layers to parameter masks, the IoU scope and "
     "the chance baselines are our rules (paper 1's are unknown)."),
    ("paper 2", "docs/methods.md §4.2", "ESI reference-code quirks (BOS misalignment, gradient w.r.t. near-one-hot "
     "logits, Gumbel noise, bf16 accumulation) are switches; the judge this run used is named in its own row "
     "(Llama-Guard-3-8B on hub runs only)."),
    ("paper 2", "docs/methods.md §4.6", "SET / SPA step counts are unknown in the code: 100 / 1,000 optimizer steps "
     "from the abstract; 'within 1%' is read as an absolute ASR increase ≤ 1 point; SPA tasks GSM8K and SST-2 "
     "(paper: GSM8K, AGNews, MedicalQA)."),
    ("paper 2", "docs/methods.md §4.6", "The masked AdamW keeps optimizer state only for trainable entries (identical "
     "trajectories, far less memory)."),
    ("both", "docs/methods.md §5", "ASR is judged offline by a keyword judge and a learned MiniLM judge; the papers' "
     "GPT-4o rubric is optional and Llama-Guard-3 is used on hub runs only."),
]


def documented_deviations(results: dict | None = None, cfg=None) -> list[dict]:
    """The fixed deviations, plus the ESI judge this run actually used (read from its metrics)."""
    rows = [{"paper": p, "source": s, "deviation": d} for p, s, d in DOCUMENTED]
    esi = (results or {}).get("esi")
    if esi and cfg is not None:
        rows.append({"paper": "paper 2", "source": "results/esi/metrics.json",
                     "deviation": "ESI judge in this run: " + "; ".join(
                         f"{role}: {esi_judge_name(m.judge, cfg)}, judge token coverage "
                         f"{_nan(m.judge_token_coverage):.2f}" for role, m in sorted(esi.models.items()))})
    return rows


def _nan(x) -> float:
    return float("nan") if x is None else x


def esi_judge_name(judge: str, cfg) -> str:
    if judge == "learned":
        return (f"the learned judge ({cfg.models[cfg.judges.learned.encoder].id} embeddings + a logistic head, "
                "WordPiece token transfer of docs/methods.md §5.7)")
    if judge == "guard" and cfg.judges.llama_guard is not None:
        return cfg.judges.llama_guard.id
    return judge


def param_deviations(cfg) -> list[dict]:
    """Every params key of every parsed section that differs from its dataclass default (the paper-scale
    value), via `config.deviations`."""
    rows = []
    for name, section in vars(cfg).items():
        if dataclasses.is_dataclass(section):
            rows += [{"section": name, **r} for r in config.deviations(section, name)]
    return rows



"""The report stage: every paper claim beside this run's number, every figure, every deviation, provenance.

It only reads files other stages wrote (results/<stage>/metrics.json, figures, timing.json; models/*
manifests; data.dvc, the dataset registry), so it loads no model and runs in seconds. Reading and checking
the metrics is `saferegions.results` (the README generator reads them too); a stage that did not run is
reported as "not run". The verdict of every claim, and the words that sum them up, are made here only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
from collections import Counter
from pathlib import Path

import yaml

from .. import config, plots  # noqa: F401  (re-exported: the notebook parses params and draws with them)
from ..io import sha256_file, write_json
from ..results import MATRIX_STAGES, NOT_RUN, STAGES, MetricsError, load_results, read_json  # noqa: F401

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "datasets", "gguf",
            "numpy", "pandas", "matplotlib", "seaborn", "papermill", "nbconvert", "dvc")
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
LOW_TO_MODERATE = 0.5   # [inference] "low to moderate" IoU read as a mean pairwise IoU below 0.5
RESULTS = Path("results/report")


def stage_status(results: dict) -> list[dict]:
    return [{"stage": s, "status": "ran" if results.get(s) is not None else NOT_RUN,
             "items": len(results[s]) if s in MATRIX_STAGES and results.get(s) else None} for s in STAGES]


# ---------------------------------------------------------------- claims


def _row(cid, paper, claim, paper_value, stage, this_run=NOT_RUN, value=None, verdict=NOT_RUN):
    return {"id": cid, "paper": paper, "claim": claim, "paper_value": paper_value, "this_run": this_run,
            "value": value, "verdict": verdict, "stage": stage}


def _all_any(flags: list[bool]) -> str:
    if not flags:
        return "n/a"
    if all(flags):
        return "consistent"
    return "mixed" if any(flags) else "not consistent"


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _is_mlp(comp: str) -> bool:
    return any(k in comp for k in ("mlp", "gate", "up", "down", "expert", "w1", "w2", "w3"))


def _is_v(comp: str) -> bool:
    return comp in ("v", "v_proj") or comp.endswith("v_proj")


def _families(results: dict) -> dict:
    models = (results.get("models") or {}).get("models", {})
    return {role: str(v.get("family", "")) for role, v in models.items() if isinstance(v, dict)}


def claims(results: dict, cfg=None) -> list[dict]:
    """One row per paper claim (docs/methods.md §1), with this run's number and a verdict under a stated reading.

    Verdicts are 'consistent', 'mixed' (some models/methods/tasks agree), 'not consistent', 'not run', or
    'n/a' (the number exists but the claim cannot be judged from it, e.g. ASR already 0 before SET); the setup
    row of paper 1 says 'paper scale' or 'reduced'."""
    rows = []
    P1, P2 = "2602.17696", "2604.08297"

    # Setup premise of paper 2: an aligned model refuses harmful prompts, an unaligned one does not.
    r = _row("setup_aligned_vs_unaligned", P2, "Aligned LLMs refuse harmful requests; unaligned ones do not "
             "(premise of SET and SPA)", "aligned refusal rate > unaligned", "baseline")
    base = results.get("baseline")
    if base:
        from ..data import SAFETY_SETS
        rates = {role: _mean(v["refusal_rate"] for d, v in sets.items() if d in SAFETY_SETS)
                 for role, sets in base["models"].items() if any(d in SAFETY_SETS for d in sets)}
        text = "mean refusal rate on the safety sets: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(rates.items()))
        if "aligned" in rates and "unaligned" in rates:
            gap = rates["aligned"] - rates["unaligned"]
            r.update(this_run=text, value=gap, verdict="consistent" if gap > 0 else "not consistent")
        elif rates:
            r.update(this_run=text, verdict="n/a")
    rows.append(r)

    # Paper 1's scale: four methods, four families with varying sizes, ten datasets.
    ident = results.get("identify")
    r = _row("setup_paper1_scale", P1, "Four identification methods (weights to layers), four LLM families with "
             "varying sizes, ten safety identification datasets", "4 methods, 4 families × sizes, 10 datasets",
             "identify")
    if ident:
        fam = _families(results)
        methods = sorted({m["method"] for m in ident.values()})
        roles = sorted({m["role"] for m in ident.values()})
        families = sorted({fam.get(x) or x for x in roles})
        n_sets = [len(m["datasets"]) for m in ident.values()]
        full = len(methods) >= 4 and len(families) >= 4 and len(roles) > len(families) and min(n_sets) >= 10
        r.update(this_run=f"{len(methods)} methods ({', '.join(methods)}); {len(roles)} model(s) of {len(families)} "
                          f"famil{'y' if len(families) == 1 else 'ies'} ({', '.join(families)}); {min(n_sets)}–{max(n_sets)} datasets per method",
                 value=float(min(n_sets)), verdict="paper scale" if full else "reduced")
    rows.append(r)

    # Paper 1, the definition: modifying a safety region changes safety behaviour (validate).
    r = _row("p1_region_affects_safety", P1, "Safety regions are parameter subsets whose modification directly "
             "influences safety behaviour", "ablating a region raises ASR more than a random region of equal size",
             "validate")
    val = results.get("validate")
    if val:
        per = {}
        for model, methods in val.items():
            for method, sets in methods.items():
                per[f"{model}/{method}"] = _mean(v["asr_region"] - v["asr_random"] for v in sets.values())
        r.update(this_run="ASR(region) − ASR(random): " + ", ".join(f"{k} {v:+.2f}" for k, v in per.items()),
                 value=_mean(per.values()), verdict=_all_any([v > 0 for v in per.values()]))
    rows.append(r)

    # Paper 1, finding 1 and 2 (overlap).
    ov = results.get("overlap")
    r1 = _row("p1_low_overlap", P1, "Regions identified from different datasets show only low to moderate "
              "overlap (IoU)", f"low to moderate (no number given; read as mean IoU < {LOW_TO_MODERATE})", "overlap")
    r2 = _row("p1_refined_overlap_drops", P1, "The overlap drops significantly once regions are refined with "
              "utility datasets", "refined IoU < raw IoU (size of the drop not given)", "overlap")
    if ov:
        # IoU of empty regions is undefined (null): shown, but left out of the verdicts.
        raw = {f"{m}/{k}": v["raw"] for m, methods in ov.items() for k, v in methods.items()
               if v["raw"]["mean_iou"] is not None and v["refined"]["mean_iou"] is not None}
        ref = {f"{m}/{k}": v["refined"] for m, methods in ov.items() for k, v in methods.items()
               if f"{m}/{k}" in raw}
        r1.update(this_run="mean IoU (chance): " + ", ".join(
                      f"{k} {v['mean_iou']:.3f} ({v['chance_iou']:.3f})" for k, v in raw.items()) + "".join(
                      f", {m}/{k} undefined (empty regions)" for m, methods in ov.items() for k in methods
                      if f"{m}/{k}" not in raw),
                  value=_mean(v["mean_iou"] for v in raw.values()),
                  verdict=_all_any([v["mean_iou"] < LOW_TO_MODERATE for v in raw.values()]))
        r2.update(this_run="raw → refined IoU: " + ", ".join(
                      f"{k} {raw[k]['mean_iou']:.3f} → {ref[k]['mean_iou']:.3f}" for k in raw),
                  value=_mean(ref[k]["mean_iou"] - raw[k]["mean_iou"] for k in raw),
                  verdict=_all_any([ref[k]["mean_iou"] < raw[k]["mean_iou"] for k in raw]))
    rows += [r1, r2]

    # Paper 2, ESI.
    esi = results.get("esi")
    fam = _families(results)
    r_val = _row("p2_esi_perturbation", P2, "ESI quantifies how individual parameters affect safety",
                 "perturbing the top-k ESI weights raises ASR more than random or bottom-k weights "
                 "[inference: the paper's perturbation validation]", "esi")
    r_dense = _row("p2_esi_dense_components", P2, "Dense LLMs: many safety-critical parameters are in value "
                   "matrices (V) and MLPs of middle layers", "largest ESI component share is V or an MLP matrix "
                   "(the layer part is read from the ESI figures)", "esi")
    r_moe = _row("p2_esi_moe_late_mlp", P2, "MoE LLMs: safety-critical parameters shift to late-layer MLPs "
                 "(experts)", "largest ESI component share is an MLP/expert matrix (layer part: ESI figures)", "esi")
    if esi:
        gaps = {m: v["asr_topk"] - max(v["asr_random"], v["asr_bottomk"]) for m, v in esi.items()}
        r_val.update(this_run="ASR top/random/bottom: " + ", ".join(
                         f"{m} {v['asr_topk']:.2f}/{v['asr_random']:.2f}/{v['asr_bottomk']:.2f}"
                         for m, v in esi.items()),
                     value=_mean(gaps.values()), verdict=_all_any([g > 0 for g in gaps.values()]))
        for row, moe in ((r_dense, False), (r_moe, True)):
            sel = {m: v for m, v in esi.items() if (fam.get(m, "") in MOE_FAMILIES) == moe}
            if not sel:
                row.update(this_run=f"{NOT_RUN} (no {'MoE' if moe else 'dense'} model in this run)")
                continue
            texts, flags, shares = [], [], []
            for m, v in sel.items():
                share = v["component_share"]
                top = max(share, key=share.get)
                keep = sum(s for c, s in share.items() if _is_mlp(c) or (not moe and _is_v(c)))
                shares.append(keep)
                flags.append(_is_mlp(top) or (not moe and _is_v(top)))
                texts.append(f"{m}: top {top} ({share[top]:.2f}), {'MLP' if moe else 'V+MLP'} share {keep:.2f}")
            row.update(this_run="; ".join(texts), value=_mean(shares), verdict=_all_any(flags))
    rows += [r_val, r_dense, r_moe]

    # Paper 2, SET.
    r = _row("p2_set_halves_asr", P2, "SET reduces the ASR of unaligned LLMs by over 50% with a 100-iteration "
             "update on 1% of the weights, preserving performance", "relative ASR reduction > 50%; 1% trainable; "
             "100 steps", "set")
    st = results.get("set")
    if st:
        s = st["set"]
        steps = getattr(getattr(cfg, "set", None), "max_steps", None)
        others = ", ".join(f"{a} {v['asr_before']:.2f} → {v['asr_after']:.2f}" for a, v in st.items() if a != "set")
        text = (f"ASR {s['asr_before']:.2f} → {s['asr_after']:.2f}, trainable {100 * s['trainable_fraction']:.2f}%"
                f", utility after {s['utility_after']:.3f}" + (f", {steps} steps" if steps else "")
                + (f"; other arms: {others}" if others else ""))
        if s["asr_before"] > 0:
            red = (s["asr_before"] - s["asr_after"]) / s["asr_before"]
            r.update(this_run=f"{text} (−{100 * red:.0f}%)", value=red,
                     verdict="consistent" if red > 0.5 else "not consistent")
        else:
            r.update(this_run=text, verdict="n/a")
    rows.append(r)

    # Paper 2, SPA.
    r = _row("p2_spa_within_1pct", P2, "SPA keeps the safety degradation of aligned LLMs within 1% after "
             "1,000-iteration instruction fine-tuning", "ASR increase ≤ 1 point [inference: absolute]", "spa")
    sp = results.get("spa")
    if sp:
        drift = {t: arms["spa"]["asr_after"] - arms["spa"]["asr_before"] for t, arms in sp.items()}
        full = {t: arms["full"]["asr_after"] - arms["full"]["asr_before"] for t, arms in sp.items() if "full" in arms}
        steps = getattr(getattr(cfg, "spa", None), "max_steps", None)
        r.update(this_run="ASR change (SPA / full FT), task score: " + ", ".join(
                     f"{t} {100 * drift[t]:+.1f} / {('%+.1f' % (100 * full[t])) if t in full else '–'} pts, "
                     f"{sp[t]['spa']['task_score']:.3f}" for t in sp) + (f"; {steps} steps" if steps else ""),
                 value=max(drift.values()), verdict=_all_any([d <= 0.01 for d in drift.values()]))
    rows.append(r)
    return rows


def region_summary(results: dict) -> list[dict]:
    """Mean region density per (model, method), raw and refined, from the identify metrics."""
    out = []
    for item, m in (results.get("identify") or {}).items():
        ds = m["datasets"]
        out.append({"model": m["role"], "method": m["method"], "datasets": len(ds),
                    "density_raw": _mean(v["raw"]["density"] for v in ds.values()),
                    "density_refined": _mean(v["refined"]["density"] for v in ds.values())})
    return out


# ---------------------------------------------------------------- figures, timing


def figures(root: str | Path = ".") -> dict[str, list[Path]]:
    """{stage: [png, ...]} for every stage that wrote figures (results/<stage>[/<item>]/figures/*.png)."""
    res = Path(root) / "results"
    out = {}
    for stage in STAGES:
        pngs = sorted((res / stage).glob("figures/*.png")) + sorted((res / stage).glob("*/figures/*.png"))
        pngs = [p for p in pngs if not any(part.startswith(".") for part in p.relative_to(res).parts)]  # temp files
        if pngs:
            out[stage] = pngs
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
                         f"{role}: {esi_judge_name(m['judge'], cfg)}, judge token coverage "
                         f"{m.get('judge_token_coverage', float('nan')):.2f}" for role, m in sorted(esi.items()))})
    return rows


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


# ---------------------------------------------------------------- provenance


# What the report reads besides results/: its code (checked against dvc.yaml by tests/test_report.py).
REPORT_CODE = ("notebooks/10_report.ipynb", "src/saferegions/stages/report.py", "src/saferegions/results.py",
               "src/saferegions/config.py", "src/saferegions/plots.py", "src/saferegions/data.py",
               "src/saferegions/io.py", "src/saferegions/registry/datasets.json")


def input_files(root: str | Path = ".") -> list[str]:
    """The results files the report reads (metrics and timing of every stage that ran), relative to root."""
    root = Path(root)
    out = []
    for stage in STAGES:
        base = root / "results" / stage
        for name in ("metrics.json", "timing.json"):
            found = sorted(base.glob(f"*/{name}")) if stage in MATRIX_STAGES else [base / name]
            out += [f.relative_to(root).as_posix() for f in found
                    if f.exists() and not f.parent.name.startswith(".")]
    return out


def input_digests(root: str | Path = ".") -> dict:
    """sha256 of everything the report read: results files, its code and the params sections it gets.

    These are exactly its DVC deps, so they stay true for the committed results. A git commit or a dvc.lock
    digest cannot: the commit that holds the results is made after the report ran, and dvc.lock is rewritten
    by the very run that writes this file (the report cannot depend on it)."""
    root = Path(root)
    files = input_files(root) + [c for c in REPORT_CODE if (root / c).exists()]
    params = None
    if (root / "params.yaml").exists():
        canon = json.dumps(config.stage_params("report", root / "params.yaml"), sort_keys=True, default=str)
        params = hashlib.sha256(canon.encode()).hexdigest()
    return {"files": {f: sha256_file(root / f) for f in files}, "params_sha256": params}


def _hub_revision(model_id: str) -> str | None:
    """The commit of a hub model in the local HF cache (what a hub run loaded), if any."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.exists() else None


def provenance(root: str | Path = ".", cfg=None) -> dict:
    root = Path(root)
    # inputs / data / models are pinned by the report's DVC deps; python, platform, packages and hub
    # revisions describe the environment the report ran in.
    out: dict = {"inputs": input_digests(root), "python": platform.python_version(),
                 "platform": platform.platform()}
    out["packages"] = {}
    for p in PACKAGES:
        try:
            out["packages"][p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out["packages"][p] = None
    dvc_file = root / "data.dvc"
    data_out = ((yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}])[0] if dvc_file.exists() else {}
    out["data"] = {"data.dvc": {k: data_out.get(k) for k in ("md5", "nfiles", "size")}, "files": []}
    from ..data import registry
    out["data"]["files"] = [{"file": e["file"], "sha256": e["sha256"], "license": e.get("license")}
                            for e in registry()]
    models = {}
    roles = getattr(cfg, "models", None) or {}
    for role, m in roles.items():
        entry = {"id": m.id, "mirror": m.offline}
        manifest = root / "models" / (m.offline or "") / "saferegions-manifest.json"
        if m.offline and manifest.exists():
            man = json.loads(manifest.read_text())
            entry.update(source="offline mirror", weights_sha256=man.get("files", {}).get("model.safetensors"),
                         gguf_sha256=man.get("gguf_sha256"), manifest_sha256=sha256_file(manifest))
        else:
            entry.update(source="hub", revision=_hub_revision(m.id))
        models[role] = entry
    judge = getattr(getattr(cfg, "judges", None), "llama_guard", None)
    if judge is not None:
        models["judges.llama_guard"] = {"id": judge.id, "mirror": judge.offline, "source": "hub",
                                        "revision": _hub_revision(judge.id)}
    out["models"] = models
    return out


# ---------------------------------------------------------------- reading of the run, outputs


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    """How many claims got each verdict, the most frequent first."""
    return dict(Counter(r["verdict"] for r in rows).most_common())


def summary(rows: list[dict], totals: list[dict], n_deviations: int) -> str:
    """'Reading this run' in Markdown: how many claims were measured, each claim's verdict, the wall time and
    what the params deviations mean for the verdicts. The one place verdicts are put into words."""
    counts = verdict_counts(rows)
    checked = [r for r in rows if r["verdict"] != NOT_RUN]
    lines = [f"{len(checked)} of {len(rows)} claims could be measured in this run "
             f"({', '.join(f'{n} {v}' for v, n in counts.items())})."]
    for r in rows:
        lines.append(f"- **{r['claim']}** ({r['paper']}): {r['verdict']}"
                     + (f" — {r['this_run']}." if r["verdict"] != NOT_RUN else "."))
    if totals:
        slow = max(totals, key=lambda t: t["wall_seconds"])
        lines.append(f"\nThe stages took {sum(t['wall_seconds'] for t in totals):.0f} s in all; the slowest was "
                     f"`{slow['stage']}` ({slow['wall_seconds']:.0f} s).")
    if n_deviations:
        lines.append(f"{n_deviations} params differ from the paper-scale defaults, so read every verdict above as "
                     f"a statement about this scaled-down run.")
    return "\n".join(lines)


def write_outputs(rows: list[dict], results: dict, totals: list[dict], prov: dict, out: Path = RESULTS) -> None:
    """claims.json (the whole table, claim and paper value in words), metrics.json (what `dvc metrics show` /
    `dvc exp show` can tabulate: a number and a verdict per claim) and provenance.json."""
    write_json(out / "claims.json", {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows})
    write_json(out / "metrics.json", {
        "claims": {r["id"]: {"value": r["value"], "verdict": r["verdict"]} for r in rows},
        "verdicts": verdict_counts(rows),
        "stages_run": sum(s["status"] != NOT_RUN for s in stage_status(results)),
        "wall_seconds_total": round(float(sum(t["wall_seconds"] for t in totals)), 1),
    })
    write_json(out / "provenance.json", prov)

"""Stage `esi` (notebook 07_esi; paper 2, docs/methods.md §4): ESI regions of each model role, what they overlap with,
where they sit, and whether perturbing them changes safety more than perturbing other weights.

Per role (`run_role`):
1. one greedy generation pass over every prompt set the role needs (`methods.esi.respond`); greedy responses do
   not depend on the judge or the variant, so all judge-guided regions on a set share it;
2. the **primary** region: global top `top_frac` of the ESI score from (`variant`, `judges[0]`, `objectives[0]`)
   on `dataset`, and its bottom-k (the controls SET and SPA read from artifacts/esi/<role>/);
3. **comparison** regions, each one setting away from the primary (`plan`): the other variant, every further
   judge and objective; IoU with the primary beside its chance value (docs/methods.md §3.4);
4. beyond the paper: one region per dataset of `datasets`, their pairwise and multi-way IoU, and their IoU with
   paper 1's SNIP/Wanda regions of the same dataset and model in paper 1's tensor space (`method_overlap`);
5. the layer × component profile of the primary gradient (`methods.esi.architecture_profile`); for the roles
   of `architecture_models`, the architecture claim against a null objective (`methods.esi_architecture`);
6. perturbation (§4.5): Gaussian noise at top-k, bottom-k and random-k entries (and none), sampled responses to
   held-out harmful prompts, ASR by `evaluation.judge`; the model is restored bit-exactly after each.
Gradients, scores and bool masks of a 0.5B model are ~2.5 GB each, so every region is packed (int32 indices at
1% density) as soon as it is selected and each gradient set is dropped before the next is computed.
"""
from __future__ import annotations

import contextlib
import enum
import itertools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import config, data, evaluation, evidence, judges, models, overlap, plots, results   # noqa: F401 (config, plots: notebook)
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from .. import regions as R
from ..io import atomic_path, write_jsonl  # noqa: F401  (write_jsonl: re-exported for the notebook)
from ..methods import esi, esi_architecture
from ..perturbation import PERTURB_CONDITIONS, perturbation, perturbation_metrics  # noqa: F401  (the notebook)

CHECKPOINTS = Path("artifacts/checkpoints/esi")   # resume state of each role's passes (not a DVC output)


class Purpose(enum.Enum):
    """What an ESI region is computed for."""
    PRIMARY = "primary"          # the role's top-k region: bottom-k, profile and perturbation come from it
    COMPARISON = "comparison"    # another variant, judge or objective, compared with the primary by IoU
    DATASET = "dataset"          # the primary settings on another dataset (cross-dataset overlap)


@dataclass(frozen=True)
class Spec:
    """One ESI region to compute: `name` says how it differs from the primary."""
    name: str
    dataset: str
    variant: str
    judge: str | None          # None for the refusal_likelihood objective (no judge)
    objective: str
    purpose: Purpose = Purpose.COMPARISON


def other_variant(variant: str) -> str:
    return "fixed" if variant == "faithful" else "faithful"


def plan(e, role: str) -> list[Spec]:
    """The primary region, then the comparison regions, then the other datasets' regions (`e`: EsiCfg)."""
    def spec(name, dataset=e.dataset, variant=e.variant, judge=e.judge, objective=e.objective,
             purpose=Purpose.COMPARISON):
        return Spec(name, dataset, variant, judge if objective == "judge" else None, objective, purpose)

    other = other_variant(e.variant)
    specs = [spec("primary", purpose=Purpose.PRIMARY), spec(other, variant=other)]
    specs += [spec(f"judge={j}", judge=j, objective="judge") for j in e.judges[1:]]
    specs += [spec(o, objective=o) for o in e.objectives[1:]]
    dataset_roles = e.models if e.dataset_models is None else e.dataset_models
    if role in dataset_roles:
        specs += [spec(f"dataset={d}", dataset=d, purpose=Purpose.DATASET) for d in e.datasets if d != e.dataset]
    return specs


def plan_table(e) -> pd.DataFrame:
    """Every region each role computes, in order (the first of each role is the primary)."""
    return pd.DataFrame([{"role": role, "region": s.name, "dataset": s.dataset, "variant": s.variant,
                          "judge": s.judge, "objective": s.objective} for role in e.models for s in plan(e, role)])


# ---------------------------------------------------------------- judges


# `esi.judges` names -> the judge kind each one is the differentiable form of
SOFT_JUDGE_KINDS = {"learned": judges.JudgeKind.LEARNED, "guard": judges.JudgeKind.LLAMA_GUARD}


def needed_judges(e) -> list[str]:
    """The soft judges some role's plan uses: each is loaded once for all roles."""
    return sorted({s.judge for role in e.models for s in plan(e, role) if s.judge})



def load_soft_judges(cfg, names, learned_path: str | Path = "artifacts/baseline/learned_judge.safetensors",
                     models_root: str | Path = "models") -> dict:
    """{name: soft judge} for 'learned' (the baseline stage's encoder + logistic head) and 'guard'
    (`judges.llama_guard`, a Llama-Guard-style causal LM), each built by `judges.get`."""
    out = {}
    for name in names:
        kind = SOFT_JUDGE_KINDS[name]
        if kind is judges.JudgeKind.LEARNED:
            out[name] = judges.LearnedSoftJudge(judges.get(kind, cfg, models_root, head=learned_path))
        else:
            guard = judges.get(kind, cfg, models_root)
            unsafe = "unsafe" if cfg.esi.guard_score == "safe_minus_unsafe" else None
            out[name] = judges.GuardSoftJudge(guard.model, guard.tokenizer, "safe", unsafe)
    return out


# ---------------------------------------------------------------- regions


def restrict(region: R.Region | R.PackedRegion, names) -> R.PackedRegion:
    """The region on a subset of its tensors (e.g. paper 1's space, without lm_head), packed."""
    p = region if isinstance(region, R.PackedRegion) else R.pack(region)
    missing = [n for n in names if n not in p.data]
    if missing:
        raise ValueError(f"region lacks tensors {missing[:3]} of the comparison space")
    return R.PackedRegion({n: p.data[n] for n in names}, {n: p.shapes[n] for n in names}, p.meta, p.units)


def component_shares(profile: pd.DataFrame, value: str) -> dict[str, float]:
    """Share of `value` (e.g. region_count, esi_sum) per component, in `esi.COMPONENT_ORDER`, summing to 1."""
    sums = profile.groupby("component")[value].sum()
    total = float(sums.sum())
    return {c: float(sums[c]) / total if total else float("nan") for c in esi.COMPONENT_ORDER if c in sums}


def pairwise_iou(regions: dict[str, R.PackedRegion]) -> tuple[pd.DataFrame, dict]:
    """Dataset × dataset IoU table, and the summary: mean/sd of the off-diagonal pairs, their chance value
    at the regions' mean density, and the multi-way IoU of all of them with its chance value."""
    names = list(regions)
    frame = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        frame.loc[a, b] = frame.loc[b, a] = pairs[f"{a}|{b}"] = overlap.iou(regions[a], regions[b])
    f = float(np.mean([r.density for r in regions.values()])) if regions else float("nan")
    vals = list(pairs.values())
    # None = undefined (no pair; a multi-way IoU needs three or more regions): JSON has no NaN.
    summary = {"pairs": pairs, "mean": float(np.mean(vals)) if vals else None,
               "sd": float(np.std(vals)) if vals else None, "chance": overlap.chance_iou(f) if regions else None,
               "multiway": overlap.multiway_iou(list(regions.values())) if len(names) > 2 else None,
               "multiway_chance": overlap.chance_multiway(f, len(names)) if len(names) > 2 else None,
               "density": f if regions else None}
    return frame, summary


def method_overlap(dataset_regions: dict[str, R.PackedRegion], identify_dir: str | Path, methods,
                   kind: str = "raw") -> tuple[list[dict], list[str]]:
    """IoU of each dataset's ESI region with paper 1's `kind` region of the same dataset and method
    (`identify_dir/<method>/<dataset>.<kind>.safetensors`), in paper 1's tensor space; (rows, missing files)."""
    rows, missing = [], []
    for method in methods:
        for d, region in dataset_regions.items():
            path = R.region_path(Path(identify_dir) / method, d, kind)
            if not path.exists():
                missing.append(str(path))
                continue
            other = R.load_packed(path)
            mine = restrict(region, list(other.shapes))
            bad = [n for n in other.shapes if tuple(other.shapes[n]) != tuple(mine.shapes[n])]
            if bad:
                raise ValueError(f"{path}: tensor {bad[0]!r} has another shape than the model's")
            rows.append({"method": method, "dataset": d, "iou": overlap.iou(mine, other),
                         "iou_per_matrix": overlap.iou(mine, other, "per_matrix"),
                         "chance": overlap.chance_iou(mine.density, other.density), "esi_density": mine.density,
                         "method_density": other.density, "esi_share_in_space": mine.size / max(region.size, 1)})
    return rows, missing


# ---------------------------------------------------------------- one role


@dataclass
class RoleResult:
    role: str
    model_id: str
    n_params: int
    k: int
    top: R.PackedRegion
    bottom: R.PackedRegion
    profile: pd.DataFrame
    comparisons: list[dict] = field(default_factory=list)     # one row per non-primary spec
    dataset_regions: dict[str, R.PackedRegion] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)         # primary: prompt, response, safe score
    perturbation: list[dict] = field(default_factory=list)    # one row per (seed, condition)
    generations: list[dict] = field(default_factory=list)
    perturbation_summary: dict = field(default_factory=dict)   # `perturbation_metrics` ({} where not run)
    architecture: esi_architecture.Masses | None = None        # roles of `esi.architecture_models`
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + round(time.perf_counter() - start, 2)


def transfer_for(name: str | None, soft_judges: dict, tok, model, transfers: dict, timings: dict):
    """The judge → target vocabulary transfer matrix, built once per judge (None without a judge)."""
    if name and name not in transfers:
        shape = (soft_judges[name].embedding_matrix.shape[0], model.get_output_embeddings().weight.shape[0])
        with _timed(timings, "transfer matrix"):
            transfers[name] = judges.transfer.transfer_matrix(soft_judges[name].vocab_tokenizer, tok, shape)
    return transfers.get(name)


def compute_regions(model, tok, specs: list[Spec], prompt_sets: dict[str, list[str]], soft_judges: dict, e,
                    timings: dict, transfers: dict, progress: bool = True, checkpoints: Path | None = None):
    """Yield (spec, top region, gradients, scores, records) per spec; the primary's bottom-k is made by the
    caller from its scores. Gradients and scores are yielded for the caller to use and drop. `transfers`: the
    vocabulary transfer matrices built so far, by judge (`transfer_for`). `checkpoints`: resume state (or None)."""
    judged = sorted({s.dataset for s in specs if s.objective == "judge"})
    with _timed(timings, "generate") if judged else contextlib.nullcontext():   # one pass over every judged set
        generated = esi.respond_sets(model, tok, {d: prompt_sets[d] for d in judged}, e.max_new_tokens,
                                     e.system_prompt, e.gen_batch_size, progress,
                                     checkpoint=checkpoints and checkpoints / "responses")
    for spec in tqdm(specs, desc="esi regions", disable=not progress, leave=False):
        judge = soft_judges.get(spec.judge) if spec.judge else None
        M, records = transfer_for(spec.judge, soft_judges, tok, model, transfers, timings), []
        with _timed(timings, "gradients"):
            grads = esi.esi_gradients(model, tok, judge, prompt_sets[spec.dataset], e.max_new_tokens,
                                      spec.variant, system=e.system_prompt, objective=spec.objective,
                                      progress=False, exclude_router=e.exclude_router, transfer_M=M,
                                      gen_batch_size=e.gen_batch_size, records=records,
                                      generated=generated.get(spec.dataset), every=e.checkpoint_every,
                                      checkpoint=checkpoints and checkpoints / spec.name,
                                      key={"judge": spec.judge, "guard_score": e.guard_score})
        with _timed(timings, "select"):
            scores = esi.esi_scores(grads, model, e.score)
            top = esi.esi_region(scores, model, e.top_frac)
        top.meta.update({"spec": spec.name, "dataset": spec.dataset, "variant": spec.variant, "judge": spec.judge,
                         "objective": spec.objective, "score": e.score, "n_prompts": len(prompt_sets[spec.dataset])})
        yield spec, top, grads, scores, records


def run_role(model, tok, role: str, model_id: str, cfg, soft_judges: dict, eval_judge,
             prompts_path: str | Path = "artifacts/data/prompts.jsonl", progress: bool = True,
             checkpoints: Path | None = None) -> RoleResult:
    """Everything the stage computes for one model (module docstring); regions come back packed."""
    e = cfg.esi
    timings: dict[str, float] = {}
    specs = plan(e, role)
    prompt_sets = {d: data.prompts(prompts_path, d, "ident", e.n_prompts) for d in {s.dataset for s in specs}}
    result, transfers = None, {}
    for spec, top, grads, scores, records in compute_regions(model, tok, specs, prompt_sets, soft_judges, e, timings,
                                                             transfers, progress, checkpoints):
        if spec.purpose is Purpose.PRIMARY:
            with _timed(timings, "select"):
                bottom = esi.bottom_region(scores, model, e.top_frac)
                bottom.meta.update(top.meta, selection=bottom.meta["selection"])
            with _timed(timings, "profile"):
                profile = esi.architecture_profile(grads, model, top)
            result = RoleResult(role, model_id, models.param_count(model), top.meta["k"], R.pack(top),
                                R.pack(bottom), profile, records=records)
            result.dataset_regions[spec.dataset] = result.top
            del bottom
        else:
            packed = R.pack(top)
            if spec.purpose is Purpose.DATASET:
                result.dataset_regions[spec.dataset] = packed
            else:
                result.comparisons.append({
                    "model": role, "region": spec.name, "variant": spec.variant, "judge": spec.judge,
                    "objective": spec.objective, "iou": overlap.iou(result.top, packed),
                    "iou_per_matrix": overlap.iou(result.top, packed, "per_matrix"),
                    "chance": overlap.chance_iou(result.top.density, packed.density), "size": packed.size})
        del top, grads, scores
    if role in (e.models if e.architecture_models is None else e.architecture_models):
        result.architecture = architecture_masses(model, tok, soft_judges, e, prompts_path, transfers, timings,
                                                  progress)
    if role in (e.models if e.perturb_models is None else e.perturb_models):
        harmful = [p for s in e.eval_sets for p in data.prompts(prompts_path, s, "eval", e.n_eval)]
        with _timed(timings, "perturbation"):
            result.perturbation, result.generations, pooled = perturbation(
                model, tok, R.unpack(result.top), R.unpack(result.bottom), harmful, eval_judge, e, role,
                progress)
        result.perturbation_summary = perturbation_metrics(pooled)
    result.timings = timings
    return result


def architecture_masses(model, tok, soft_judges: dict, e, prompts_path, transfers: dict, timings: dict,
                        progress: bool = True) -> esi_architecture.Masses:
    """Per-prompt ESI mass per cell under the primary settings on the first `n_mass_prompts` ident prompts of
    `dataset`, and of the null objective on as many ident prompts of `null_dataset`."""
    n = e.n_mass_prompts or e.n_prompts
    harmful = data.prompts(prompts_path, e.dataset, "ident", n, exact=n is not None)
    benign = data.prompts(prompts_path, e.null_dataset, "ident", len(harmful), exact=True)
    judge = e.judge if e.objective == "judge" else None
    M = transfer_for(judge, soft_judges, tok, model, transfers, timings)
    with _timed(timings, "architecture"):
        return esi_architecture.safety_and_null(model, tok, soft_judges.get(judge), harmful, benign, e, M, progress)


def save_role(result: RoleResult, out: str | Path) -> None:
    """artifacts/esi/<role>/{topk,bottomk}.safetensors (the SET/SPA contract), datasets/<set>.safetensors,
    profile.csv, masses.csv (per-prompt ESI mass per cell, where the architecture claim ran)."""
    out = Path(out)
    R.save(result.top, out / "topk.safetensors")
    R.save(result.bottom, out / "bottomk.safetensors")
    for d, region in result.dataset_regions.items():
        R.save(region, out / "datasets" / f"{d}.safetensors")
    with atomic_path(out / "profile.csv") as tmp:
        result.profile.to_csv(tmp, index=False)
    if result.architecture is not None:
        with atomic_path(out / "masses.csv") as tmp:
            result.architecture.frame().to_csv(tmp, index=False)


def judge_token_coverage(records: list[dict]) -> float | None:
    """Share of the primary's response tokens that get a nonzero judge gradient, pooled over its prompts
    (`judges.transfer.coverage_counts`): near 0 means S reaches almost none of what the model said. None without a
    judge."""
    n = sum(r.get("response_tokens", 0) for r in records)
    return sum(r["judge_tokens_reached"] for r in records) / n if n else None


def role_metrics(result: RoleResult, e, method_rows: list[dict] | None = None,
                 dataset_summary: dict | None = None) -> dict:
    """The role's entry of results/esi/metrics.json (the keys the report reads first, then the details)."""
    pert = pd.DataFrame(result.perturbation, columns=["condition", "asr", "seed", "n"])
    asr = pert.groupby("condition").asr.mean()
    comps = {c["region"]: c for c in result.comparisons}
    arch = result.architecture
    out = {
        # per condition: pooled over seeds (None where the condition or the role's perturbation did not run)
        **{f"asr_{c}": float(asr[c]) if c in asr else None for c in PERTURB_CONDITIONS},
        "perturbation": result.perturbation_summary or None,
        "architecture": arch.metrics(result.profile, f"{e.objective} ({e.judge}, {e.variant}) on {e.dataset}",
                                     e.null_dataset) if arch else None,
        "component_share": component_shares(result.profile, "region_count"),
        "faithful_vs_fixed_iou": comps[other_variant(e.variant)]["iou"],
        "component_esi_share": component_shares(result.profile, "esi_sum"),
        "model_id": result.model_id, "n_params": result.n_params, "k": result.k, "top_frac": e.top_frac,
        "density": result.top.density, "variant": e.variant, "judge": e.judge, "objective": e.objective,
        "dataset": e.dataset, "n_prompts": result.top.meta["n_prompts"],
        "mean_safe_score": float(np.mean([r["safe"] for r in result.records])) if result.records else None,
        "judge_token_coverage": judge_token_coverage(result.records),
        "iou_vs_primary": {name: {"iou": c["iou"], "chance": c["chance"]} for name, c in comps.items()},
        "n_eval": int(pert.n.iloc[0]) if len(pert) else 0, "perturb_seeds": int(pert.seed.nunique()),
        "n_mass_prompts": len(arch.safety) if arch else 0,
        "wall_seconds": result.timings,
    }
    if "refusal_likelihood" in comps:
        out["refusal_likelihood_iou"] = comps["refusal_likelihood"]["iou"]
    if dataset_summary is not None:
        out["dataset_iou"] = dataset_summary
    if method_rows:
        out["method_iou"] = {}
        for r in method_rows:
            out["method_iou"].setdefault(r["method"], {})[r["dataset"]] = {"iou": r["iou"], "chance": r["chance"]}
    return out


# ---------------------------------------------------------------- the whole stage


@dataclass
class StageResult:
    """What the stage computed for every role, and the tables the notebook shows."""
    roles: dict[str, RoleResult]
    method_rows: list[dict]                   # ESI vs paper 1's regions, one row per model × method × dataset
    dataset_tables: dict[str, pd.DataFrame]   # role → dataset × dataset IoU (roles with several datasets)
    dataset_summaries: dict[str, dict]
    missing: list[str]                        # paper-1 region files not found
    metrics: dict                             # results/esi/metrics.json

    def rows(self, kind: str) -> pd.DataFrame:
        """All roles' rows of one RoleResult list (records, comparisons, perturbation or generations), each
        with its role under `model` first."""
        return pd.DataFrame([{"model": role, **r} for role, res in self.roles.items() for r in getattr(res, kind)])


def run(cfg, soft_judges: dict, out: str | Path = "artifacts/esi", identify_root: str | Path = "artifacts/identify",
        prompts_path: str | Path = "artifacts/data/prompts.jsonl") -> StageResult:
    """`run_role` for each role of `esi.models`, one model in memory at a time; its regions are saved under
    out/<role>/ at once, then compared across datasets and with paper 1's regions where identify ran."""
    e = cfg.esi
    eval_judge = judges.get(cfg.evaluation.judge, cfg)
    results, method_rows, dataset_tables, dataset_summaries, missing = {}, [], {}, {}, []
    for role in e.models:
        start = time.time()
        lm, tok = models.load(cfg.models[role].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
        res = run_role(lm, tok, role, cfg.models[role].id, cfg, soft_judges, eval_judge, prompts_path,
                       checkpoints=CHECKPOINTS / role)
        save_role(res, Path(out) / role)
        shutil.rmtree(CHECKPOINTS / role, ignore_errors=True)   # its regions are saved: nothing left to resume
        del lm
        if len(res.dataset_regions) > 1:
            dataset_tables[role], dataset_summaries[role] = pairwise_iou(res.dataset_regions)
        ident = Path(identify_root) / role
        if ident.exists():
            rows, miss = method_overlap(res.dataset_regions, ident, e.compare_methods)
            method_rows += [{"model": role, **r} for r in rows]
            missing += miss
        res.timings["total"] = round(time.time() - start, 1)
        results[role] = res
        print(f"{role}: {res.timings}")
    metrics = {role: role_metrics(res, e, [r for r in method_rows if r["model"] == role],
                                  dataset_summaries.get(role))
               for role, res in results.items()}
    return StageResult(results, method_rows, dataset_tables, dataset_summaries, missing, metrics)


def region_table(result: StageResult) -> pd.DataFrame:
    """Size of each role's primary region: parameters, k, density in the ESI space, tensors it touches."""
    return pd.DataFrame({role: {"parameters": res.n_params, "k (top_frac × all)": res.k,
                                "density in the ESI space": res.top.density,
                                "tensors touched": sum(res.top.count(n) > 0 for n in res.top.data)}
                         for role, res in result.roles.items()}).T


def dataset_summary_table(result: StageResult) -> pd.DataFrame:
    """Per role: mean, sd, chance, multi-way IoU and density of its regions from several datasets."""
    return pd.DataFrame({role: {k: v for k, v in s.items() if k != "pairs"}
                         for role, s in result.dataset_summaries.items()}).T


SHARE_MEASURES = {"region_count": "top-k entries", "esi_sum": "summed ESI"}   # profile column → label


def architecture_tables(result: StageResult) -> tuple[dict, pd.DataFrame]:
    """({(role, profile column): layer × component table normalised to sum 1}, component shares per role and
    measure): where the top-k sits by entries and by summed ESI."""
    tables, shares = {}, []
    for role, res in result.roles.items():
        for value, label in SHARE_MEASURES.items():
            cells = esi.layer_component_table(res.profile, value)
            tables[role, value] = cells / cells.values.sum()
            shares += [{"model": role, "measure": label, "component": c, "share": x}
                       for c, x in component_shares(res.profile, value).items()]
    return tables, pd.DataFrame(shares)


def observed_and_chance(rows: pd.DataFrame) -> pd.DataFrame:
    """IoU rows twice, `kind` observed (value = iou) and chance (value = chance), for one bar chart."""
    return pd.concat([rows.assign(kind="observed", value=rows.iou), rows.assign(kind="chance", value=rows.chance)])


def generation_rows(result: StageResult) -> list[dict]:
    """artifacts/esi/generations.jsonl: the perturbed samples, then the primary's greedy ESI responses."""
    return ([g for res in result.roles.values() for g in res.generations]
            + [{"model": role, "condition": "esi_prompt", **r} for role, res in result.roles.items()
               for r in res.records])


def reading(result: StageResult, e) -> str:
    """The plain-language summary of the run per role, with its numbers (markdown)."""
    lines = []
    for role, m in result.metrics.items():
        p = m.get("perturbation") or {}
        rates = ", ".join(f"{c} {p[c]['asr']:.2f} [{p[c]['asr_ci'][0]:.2f}, {p[c]['asr_ci'][1]:.2f}] "
                          f"(degenerate {p[c]['degenerate_rate']:.2f})" for c in ("none", "top", "random", "bottom")
                          if c in p)
        tvr = p.get("top_vs_random")
        a = m.get("architecture")
        lines.append(
            f"* **{role}** (`{m['model_id']}`): "
            + (f"ASR with noise on the region: {rates}, n = {m['n_eval']} held-out prompts × "
               f"{m['perturb_seeds']} seed(s). Top − random: {tvr['effect']:+.2f} "
               f"[{tvr['ci'][0]:+.2f}, {tvr['ci'][1]:+.2f}], McNemar p = {tvr['p']:.3g}. " if tvr else
               "perturbation not run for this role. ")
            + (f"ESI mass share, safety − null, blocks only ({a['n_prompts']} harmful vs {a['n_null_prompts']} "
               f"benign prompts): " + "; ".join(esi_architecture.part_text(k, v) for k, v in a["parts"].items()) + ". "
               if a else "")
            + f"Faithful vs fixed regions overlap with IoU {m['faithful_vs_fixed_iou']:.3f} "
            f"(chance {m['iou_vs_primary'][other_variant(e.variant)]['chance']:.4f})"
            + (f"; the refusal-likelihood objective's region {m['refusal_likelihood_iou']:.3f}"
               if "refusal_likelihood_iou" in m else "")
            + f". Largest component share of the top-k: "
            f"{max(m['component_share'], key=m['component_share'].get)} "
            f"({max(m['component_share'].values()):.0%}).")
        if "dataset_iou" in m:
            d = m["dataset_iou"]
            lines.append(f"  Regions from {len(result.dataset_tables[role])} datasets: mean pairwise IoU "
                         f"{d['mean']:.3f} vs chance {d['chance']:.4f} ({d['mean'] / d['chance']:.0f}× chance).")
        if "method_iou" in m:
            lines.append("  IoU with paper 1's regions: " + "; ".join(
                f"{meth} {ds} {v['iou']:.3f} (chance {v['chance']:.4f})" for meth, per in m["method_iou"].items()
                for ds, v in per.items()) + ".")
    lines.append(f"\nWith {e.n_prompts or 'all'} ESI prompt(s) of ≤ {e.max_new_tokens} tokens and "
                 f"{e.perturb_max_new_tokens}-token sampled answers, these are CPU-scale indications, not the "
                 "paper's numbers; ASR differences of one prompt are 1/n_eval.")
    return "\n".join(lines)


def save_metrics(path, metrics: dict) -> None:
    """results/esi/metrics.json, checked against its record in `saferegions.results` before it is written."""
    results.save("esi", path, metrics)

"""The other stages' results as the report and the README read them: results/<stage>/metrics.json, each
checked against the shape its stage writes.

A stage that did not run (switched off by the profile, or not built yet) reads as None ("not run"); a metrics
file that exists but does not have the shape its stage promises is an error naming the file and the key,
because a summary that silently skipped a broken number would misstate what the run found.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# Pipeline order of the stages whose outputs the report reads (the report itself excluded).
STAGES = ("data", "models", "baseline", "calibrate", "identify", "validate", "overlap", "esi", "set", "spa")
MATRIX_STAGES = ("calibrate", "identify")   # results/<stage>/<item>/...
NOT_RUN = "not run"


class MetricsError(ValueError):
    """A metrics file exists but does not have the shape its stage writes."""


# ---------------------------------------------------------------- reading and checking metrics


def _fail(path, where: str, msg: str):
    raise MetricsError(f"{path}: {where}: {msg}")


def _mapping(path, where: str, value, required=()) -> dict:
    if not isinstance(value, dict) or not value:
        _fail(path, where, f"expected a non-empty mapping, got {value!r:.80}")
    missing = [k for k in required if k not in value]
    if missing:
        _fail(path, where, f"missing key(s) {missing}; has {sorted(value)}")
    return value


def _number(path, where: str, value, lo: float | None = 0.0, hi: float | None = 1.0, none_ok: bool = False):
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, where, f"expected a finite number, got {value!r:.80}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(path, where, f"{value} outside [{lo}, {hi}]")
    return float(value)


def _leaves(path, where: str, entry, keys, **bounds) -> None:
    _mapping(path, where, entry, keys)
    for k in keys:
        _number(path, f"{where}.{k}", entry[k], **bounds)


def check_baseline(m: dict, path="baseline") -> None:
    for role, sets in _mapping(path, "", m, ["models"])["models"].items():
        for d, v in _mapping(path, f"models.{role}", sets).items():
            _leaves(path, f"models.{role}.{d}", v, ["refusal_rate"])


def check_identify(m: dict, path="identify") -> None:
    _mapping(path, "", m, ["method", "role", "datasets"])
    for d, v in _mapping(path, "datasets", m["datasets"]).items():
        for kind in ("raw", "refined"):
            _leaves(path, f"datasets.{d}.{kind}", _mapping(path, f"datasets.{d}", v, [kind])[kind], ["density"])


def check_validate(m: dict, path="validate") -> None:
    """{MODEL: {METHOD: {DATASET: {"region": rate record, "random": rate record, "paired": Estimate, ...}}}} (the
    older flat asr_region / asr_random shape is still read); a top-level "intact" record is the reference."""
    for model, methods in _mapping(path, "", m).items():
        if model == "intact":
            continue
        for method, sets in _mapping(path, model, methods).items():
            for d, v in _mapping(path, f"{model}.{method}", sets).items():
                where = f"{model}.{method}.{d}"
                if "region" not in v:
                    _leaves(path, where, v, ["asr_region", "asr_random", "utility_region", "utility_random"])
                    continue
                _mapping(path, where, v, ["region", "random", "paired"])
                for arm in ("region", "random"):
                    _leaves(path, f"{where}.{arm}", v[arm], ["asr"])
                _estimate(path, f"{where}.paired", v["paired"])


def _estimate(path, where: str, e) -> None:
    """An `evidence.Estimate.as_dict()`: n, effect, ci [low, high] (null where undefined), test, p."""
    _mapping(path, where, e, ["n", "effect", "ci", "test"])
    _number(path, f"{where}.n", e["n"], hi=None)
    _number(path, f"{where}.effect", e["effect"], lo=None, hi=None, none_ok=True)
    if not isinstance(e["ci"], (list, tuple)) or len(e["ci"]) != 2:
        _fail(path, f"{where}.ci", f"expected [low, high], got {e['ci']!r:.80}")


def check_overlap(m: dict, path="overlap") -> None:
    for model, methods in _mapping(path, "", m).items():
        for method, v in _mapping(path, model, methods).items():
            _mapping(path, f"{model}.{method}", v, ["raw", "refined"])
            for kind in ("raw", "refined"):  # null when every region of the method is empty
                _leaves(path, f"{model}.{method}.{kind}", v[kind], ["mean_iou", "chance_iou"], none_ok=True)


def check_esi(m: dict, path="esi") -> None:
    for model, v in _mapping(path, "", m).items():
        keys = ["asr_topk", "asr_random", "asr_bottomk"]
        _mapping(path, model, v, keys)
        for k in keys:   # None: that perturbation condition or role did not run (esi.perturb_conditions / _models)
            _number(path, f"{model}.{k}", v[k], none_ok=True)
        for comp, s in _mapping(path, f"{model}.component_share", v.get("component_share")).items():
            _number(path, f"{model}.component_share.{comp}", s)
        if "faithful_vs_fixed_iou" not in v:
            _fail(path, model, "missing key 'faithful_vs_fixed_iou'")
        _number(path, f"{model}.faithful_vs_fixed_iou", v["faithful_vs_fixed_iou"], none_ok=True)


def check_set(m: dict, path="set") -> None:
    _mapping(path, "", m, ["set"])
    for k, e in (m.get("comparison") or {}).items():
        _estimate(path, f"comparison.{k}", e)
    for arm, v in m.items():
        if arm == "comparison":
            continue
        _leaves(path, arm, v, ["asr_before", "asr_after", "utility_after", "trainable_fraction"], hi=None)
        for k in ("asr_before", "asr_after", "trainable_fraction"):
            _number(path, f"{arm}.{k}", v[k])


def check_spa(m: dict, path="spa") -> None:
    for task, arms in _mapping(path, "", m).items():
        if task == "drift":   # {TASK: {ARM: Estimate}}
            for t, per in _mapping(path, task, arms).items():
                for arm, e in _mapping(path, f"drift.{t}", per).items():
                    _estimate(path, f"drift.{t}.{arm}", e)
            continue
        _mapping(path, task, arms, ["spa"])
        for arm, v in arms.items():
            _leaves(path, f"{task}.{arm}", v, ["asr_before", "asr_after"])
            _leaves(path, f"{task}.{arm}", v, ["task_score"], hi=None)


CHECKS = {"baseline": check_baseline, "identify": check_identify, "validate": check_validate,
          "overlap": check_overlap, "esi": check_esi, "set": check_set, "spa": check_spa}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetricsError(f"{path}: not valid JSON ({e})") from None


def load_results(root: str | Path = ".") -> dict:
    """{stage: metrics} for every stage in STAGES; None where the stage wrote no metrics (not run). Matrix
    stages give {item folder: metrics}. Every file present is checked against its stage's shape."""
    res = Path(root) / "results"
    out: dict = {}
    for stage in STAGES:
        if stage in MATRIX_STAGES:
            files = [f for f in sorted((res / stage).glob("*/metrics.json")) if not f.parent.name.startswith(".")]
            out[stage] = {f.parent.name: read_json(f) for f in files} or None
            for f in files:
                if stage in CHECKS:
                    CHECKS[stage](out[stage][f.parent.name], f)
            continue
        f = res / stage / "metrics.json"
        out[stage] = read_json(f) if f.exists() else None
        if out[stage] is not None and stage in CHECKS:
            CHECKS[stage](out[stage], f)
    return out

"""Write README.md's result blocks (timings, findings) from results/, so the README cannot drift from them.

`python -m saferegions.readme` rewrites the text between `<!-- generated:NAME -->` and
`<!-- /generated:NAME -->`; `--check` only exits 1 when README.md differs from what results/ give
(`make repro` runs the former, a test the latter). Everything is read from files and formatted by fixed
rules, so the same results give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import results
from .results import MATRIX_STAGES, NOT_RUN, STAGES, load_results

ALL_STAGES = STAGES + ("report",)
BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def _f(x, digits: int = 2) -> str:
    """`digits` decimals, one more where that one is exact (0.875 of 8 prompts is not 0.88); '–' for None."""
    if x is None:
        return "–"
    s = f"{x:.{digits + 1}f}"
    return s if float(s) == x and not s.endswith("0") else f"{x:.{digits}f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]


# ---------------------------------------------------------------- timings


def _seconds(path: Path) -> float:
    return float(json.loads(path.read_text())["wall_seconds"])


def timings(root: Path) -> str:
    """One row per stage in pipeline order: its timing.json's wall seconds (matrix items summed, listed)."""
    res, rows, total = root / "results", [], 0.0
    for stage in ALL_STAGES:
        if stage in MATRIX_STAGES:
            items = {f.parent.name: _seconds(f) for f in sorted((res / stage).glob("*/timing.json"))
                     if not f.parent.name.startswith(".")}
        else:
            f = res / stage / "timing.json"
            items = {"": _seconds(f)} if f.exists() else {}
        if not items:
            rows.append([stage, NOT_RUN, ""])
            continue
        secs = sum(items.values())
        total += secs
        rows.append([stage, f"{secs:,.1f}", " · ".join(f"{k} {v:.1f}" for k, v in items.items() if k)])
    rows.append(["**all stages**", f"**{total:,.1f}**", ""])
    return "\n".join(_table(["stage", "wall time (s)", "matrix items (s)"], rows))


# ---------------------------------------------------------------- findings


def _baseline(m: results.BaselineMetrics, res: dict) -> list[str]:
    from .data import BENIGN_SETS, SAFETY_SETS
    rows = []
    for role, sets in m.models.items():
        mean = lambda names: _f(sum(v.refusal_rate for d, v in sets.items() if d in names)  # noqa: E731
                                / max(1, sum(d in names for d in sets)))
        ns = sorted({v.n for v in sets.values()} - {None})
        rows.append([role, mean(SAFETY_SETS), mean(BENIGN_SETS), ", ".join(map(str, ns)) or "–"])
    acc = m.judge.heldout_accuracy if m.judge else None
    return (_table(["model", "refusal rate, safety sets (mean)", "refusal rate, benign sets (mean)",
                    "prompts per set"], rows)
            + ([f"\nLearned judge: held-out accuracy {_f(acc)}."] if acc is not None else []))


def _validate(m: results.ValidateMetrics, res: dict) -> list[str]:
    rows = [[f"{model}/{method}", d, _f(v.region.asr), _f(v.random.asr), _estimate(v.paired), _f(v.utility_ratio),
             _dash(v.n)]
            for model, methods in m.models.items() for method, sets in methods.items() for d, v in sets.items()]
    return _table(["model/method", "region of", "ASR, region zeroed", "ASR, random region",
                   "region − random [95% CI]", "utility ratio", "n"], rows)


def _dash(x) -> str:
    return "–" if x is None else str(x)


def _estimate(e) -> str:
    """'effect [low, high]' of an Estimate record (or a claims.json row); '–' where absent or undefined."""
    if isinstance(e, results.EstimateRecord):
        e = {"effect": e.effect, "ci": e.ci}
    if not e or e.get("effect") is None:
        return "–"
    ci = e.get("ci") or [None, None]
    return f"{_f(e['effect'])} " + ("(no interval)" if None in ci else _interval(ci))


def _interval(ci) -> str:
    """'[low, high]'; '–' where there is none."""
    return "–" if not ci else f"[{_f(ci[0])}, {_f(ci[1])}]"


def _overlap(m: results.OverlapMetrics, res: dict) -> list[str]:
    n_sets = {(v.role, v.method): len(v.datasets) for v in (res.get("identify") or {}).values()}
    iou = lambda v: f"{_f(v.mean_iou, 3)} ({_f(v.chance_iou, 3)})"  # noqa: E731
    rows = [[f"{model}/{method}", n_sets.get((model, method), "–"), iou(v.raw), iou(v.refined)]
            for model, methods in m.models.items() for method, v in methods.items()]
    return _table(["model/method", "datasets", "mean IoU raw (chance)", "mean IoU refined (chance)"], rows)


def _esi(m: results.EsiMetrics, res: dict) -> list[str]:
    rows = []
    for model, v in m.models.items():
        share = sorted(v.component_share.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        rows.append([model, ", ".join(f"{c} {_f(s)}" for c, s in share), _f(v.faithful_vs_fixed_iou, 3),
                     " / ".join(_f(x) for x in (v.asr_none, v.asr_topk, v.asr_bottomk, v.asr_random)),
                     _dash(v.n_eval)])
    return _table(["model", "largest top-k shares", "faithful vs fixed IoU",
                   "ASR none / top-k / bottom-k / random perturbed", "eval prompts"], rows)


def _arrow(before, after) -> str:
    return f"{_f(before)} → {_f(after)}" if before is not None else _f(after)


def _set(m: results.SetMetrics, res: dict) -> list[str]:
    rows = [[arm, _f(100 * v.trainable_fraction) + "%", _arrow(v.asr_before, v.asr_after),
             _arrow(v.benign_refusal_before, v.benign_refusal_after), _arrow(v.utility_before, v.utility_after)]
            for arm, v in m.arms.items()]
    return _table(["arm", "trainable", "ASR", "benign refusal", "utility"], rows)


def _spa(m: results.SpaMetrics, res: dict) -> list[str]:
    rows = [[task, arm, _arrow(v.asr_before, v.asr_after), _arrow(v.task_score_before, v.task_score),
             _arrow(v.task_likelihood_before, v.task_likelihood)]
            for task, per in m.tasks.items() for arm, v in per.arms.items()]
    return _table(["task", "arm", "ASR", "task score", "task likelihood"], rows)


SECTIONS = [("Baseline refusal (baseline)", "baseline", _baseline),
            ("Regions zeroed vs random regions of the same size (validate)", "validate", _validate),
            ("Overlap across datasets (overlap; chance in brackets)", "overlap", _overlap),
            ("ESI (esi)", "esi", _esi),
            ("SET on the unaligned model (set), before → after", "set", _set),
            ("SPA on the aligned model (spa), before → after", "spa", _spa)]


def findings(root: Path) -> str:
    """Headline numbers per stage, then the claims table of results/report/claims.json."""
    res = load_results(root)
    path = root / "results" / "report" / "claims.json"
    claims = json.loads(path.read_text()) if path.exists() else None
    out = []
    for title, stage, fn in SECTIONS:
        m = res.get(stage)
        body = fn(m, res) if m else [NOT_RUN]
        asr = _asr_metric(claims or {}, stage) if m else None
        out += [f"**{title}**", "", *body, *([f"\nASR here: {asr}."] if asr else []), ""]
    out += ["**Each paper claim with its parts beside this run's numbers (report)**", ""]
    out += _claims(claims) if claims is not None else [NOT_RUN]
    return "\n".join(out).rstrip("\n")


def _asr_metric(claims: dict, stage: str) -> str | None:
    """What a stage's "ASR" is, under its real name, from the first of its claims' parts that measures it."""
    for r in claims.values():
        for p in r.get("parts", []) if r.get("stage") == stage else []:
            if "(printed as ASR):" in p["metric"]:
                return p["metric"].replace(" (printed as ASR):", " —")
    return None


def _threshold(p: dict) -> str:
    return f"{p['direction']} {_f(p['threshold'])}" + (f" (margin {_f(p['margin'])})" if p.get("margin") else "")


def _p(p) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _claims(claims: dict) -> list[str]:
    """The claims table (each claim's row, then its parts' rows) and what each part measures."""
    rows, metrics = [], {}
    for cid, r in claims.items():
        if "parts" not in r:
            raise ValueError(f"results/report/claims.json: {cid} has no parts (written before claims had parts): "
                             "re-run the report stage")
        rows.append([f"**{r['claim']}**", r["paper"], r["reason"], "", "", "", "", "", "", f"**{r['verdict']}**"])
        for p in r["parts"]:
            rows.append([f"↳ {p['name']}" + (" (control)" if p["role"] == "control" else ""), "",
                         p["condition"] or "–", _estimate(p), _interval(p["ci_one_flip"]), p["n"],
                         "–" if p.get("mde") is None else f"{p['mde']:.3f}",
                         _p(p["p_holm"]), _threshold(p),
                         p["verdict"] + (f": {p['reason']}" if p["reason"] else "")])
            if p["metric"]:
                metrics.setdefault(p["metric"], []).append(p["name"])
    return (_table(["claim / part", "paper", "condition", "effect [95% CI]", "one-prompt-flip interval", "n",
                    "minimal detectable effect", "p (Holm)", "threshold", "verdict"], rows)
            + ["", "What each part measures:", ""]
            + [f"- {', '.join(dict.fromkeys(names))}: {m}" for m, names in metrics.items()])


GENERATORS = {"timings": timings, "findings": findings}


def render(text: str, root: Path) -> str:
    """`text` with every generated block rewritten; an unknown or missing block is an error."""
    names = [m.group(2) for m in BLOCK.finditer(text)]
    if sorted(names) != sorted(GENERATORS):
        raise ValueError(f"README blocks {names}, expected one each of {sorted(GENERATORS)}")
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)](root) + "\n" + m.group(4), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", type=Path)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what results/ give")
    args = ap.parse_args(argv)
    path = args.root / "README.md"
    old = path.read_text()
    new = render(old, args.root)
    if args.check:
        if new != old:
            print(f"{path} is stale: run `python -m saferegions.readme`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

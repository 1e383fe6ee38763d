"""The report stage: every paper claim beside this run's number, every figure, every deviation, provenance.

It only reads files other stages wrote (results/<stage>/metrics.json through `saferegions.results`, figures,
timing.json; models/* manifests; data.dvc, the dataset registry), so it loads no model and runs in seconds. The
parts are in `saferegions.reporting`: claims (verdicts from `evidence.verdict`), figures, provenance, tables.
"""
from __future__ import annotations

from pathlib import Path

from .. import config, plots, results  # noqa: F401  (config, plots: the notebook parses params and draws)
from ..evidence import PARTS  # noqa: F401  (the claims' pre-registered parts)
from ..io import write_json
from ..reporting.claims import claims, part_rows, preregistered, summary, verdict_counts  # noqa: F401
from ..reporting.figures import figures, forest  # noqa: F401
from ..reporting.provenance import REPORT_CODE, input_files, provenance  # noqa: F401
from ..reporting.tables import (documented_deviations, param_deviations, region_summary,  # noqa: F401
                                stage_status, stage_totals, timings)
from ..results import NOT_RUN, STAGES, load_results  # noqa: F401
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)

RESULTS = Path("results/report")


def part_key(part: dict) -> str:
    """A part's key in metrics.json: its name, and its condition where it has one."""
    return part["name"] + (f" @ {part['condition']}" if part["condition"] else "")


def write_outputs(rows: list[dict], results_: dict, totals: list[dict], prov: dict, out: Path = RESULTS) -> None:
    """claims.json (one record per claim with all its parts, claim and paper value in words), metrics.json (what
    `dvc metrics show` / `dvc exp show` can tabulate: each claim's verdict and each part's numbers) and
    provenance.json."""
    write_json(out / "claims.json", {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows})
    results.save("report", out / "metrics.json", {
        "claims": {r["id"]: {"verdict": r["verdict"], "parts": {part_key(p): {
            "n": p["n"], "effect": p["effect"], "ci_low": (p["ci"] or [None, None])[0],
            "ci_high": (p["ci"] or [None, None])[1], "p": p["p"], "p_holm": p["p_holm"],
            **({"mde": p["mde"]} if p["mde"] is not None else {}), "verdict": p["verdict"]}
            for p in r["parts"]}} for r in rows},
        "verdicts": verdict_counts(rows),
        "stages_run": sum(s["status"] != NOT_RUN for s in stage_status(results_)),
        "wall_seconds_total": round(float(sum(t["wall_seconds"] for t in totals)), 1),
    })
    write_json(out / "provenance.json", prov)

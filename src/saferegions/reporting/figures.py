"""The report's figures: every figure the stages wrote, and the claims' forest plot."""
from __future__ import annotations

import math
from pathlib import Path

from .. import plots
from ..results import STAGES


def forest(rows: list[dict]):
    """One figure: each measured part's effect with its 95% CI as an error bar, the one-prompt-flip interval that
    decides binary parts as a grey band behind it, and its threshold as a red tick, grouped by claim."""
    import matplotlib.pyplot as plt
    plots.style()
    shown = [{"label": f"{r['id']} · {p['name']}" + (f" @ {p['condition']}" if p["condition"] else ""), **p}
             for r in rows for p in r["parts"] if p["effect"] is not None and p["threshold"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.5))
    for i, r in enumerate(shown):
        if r.get("ci_one_flip"):
            ax.plot(r["ci_one_flip"], [i, i], color="0.8", lw=8, solid_capstyle="butt")
        lo, hi = (r["ci"] or [None, None])
        if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
            ax.errorbar(r["effect"], i, xerr=[[r["effect"] - lo], [hi - r["effect"]]], fmt="o", color="C0",
                        capsize=4)
        else:
            ax.plot(r["effect"], i, "o", color="C0", fillstyle="none")
        ax.plot([r["threshold"]] * 2, [i - 0.35, i + 0.35], color="C3", lw=2)
    ax.set_yticks(range(len(shown)), [f"{r['label']} ({r['verdict']})" for r in shown])
    ax.invert_yaxis()
    ax.set(title="Claims' parts: effect with 95% CI (grey: with one prompt flipped; red: threshold)", xlabel="effect")
    return fig



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


"""One house style for every figure; helpers return the figure and save it atomically as PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from .evidence import proportion  # noqa: E402
from .io import atomic_path  # noqa: E402


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _axes(figsize):
    style()
    return plt.subplots(figsize=figsize)


def _labelled(fig, ax, title: str, xlabel: str, ylabel: str, rotate: bool = True):
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if rotate:
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    return fig


def heatmap(table, title: str, xlabel: str, ylabel: str, fmt: str = ".2f", vmin=0.0, vmax=1.0,
            cmap: str = "rocket_r", cbar_label: str = "", figsize=None, annot: bool = True, intervals=None):
    """An annotated heatmap; `intervals` (a frame of [low, high] shaped like `table`) writes each cell's 95%
    interval under its value."""
    if intervals is not None:
        labels = table.copy().astype(object)
        for r in table.index:
            for c in table.columns:
                lo, hi = intervals.loc[r, c]
                labels.loc[r, c] = f"{table.loc[r, c]:{fmt}}\n[{lo:{fmt}}, {hi:{fmt}}]"
        annot, fmt, cell = labels.to_numpy(), "", (1.4, 0.9)
    else:
        cell = (0.7, 0.5) if annot else (0.35, 0.5)
    fig, ax = _axes(figsize or (max(6, cell[0] * table.shape[1] + 2.5), max(3, cell[1] * table.shape[0] + 2)))
    sns.heatmap(table, annot=annot, fmt=fmt, vmin=vmin, vmax=vmax, cmap=cmap, ax=ax,
                cbar_kws={"label": cbar_label}, annot_kws={"fontsize": 10} if intervals is not None else None)
    return _labelled(fig, ax, title, xlabel, ylabel)


def bars(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4.5),
         n: str | None = None):
    """Bars of `y`; where `y` is a rate, `n` names the column of its sample sizes and each bar gets its Wilson
    95% interval (without `n`, seaborn's 95% interval over repeated rows, if any)."""
    if n is not None:
        frame = frame.assign(**{f"{y}_ci": [list(proportion([True] * round(r * k) + [False] * (k - round(r * k))).ci)
                                            for r, k in zip(frame[y], frame[n])]})
        return bar_panels(frame, x, hue, {y: ylabel}, title, figsize=figsize)
    fig, ax = _axes(figsize)
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax)
    return _labelled(fig, ax, title, xlabel, ylabel)


def lines(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4.5)):
    fig, ax = _axes(figsize)
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", ax=ax)
    return _labelled(fig, ax, title, xlabel, ylabel, rotate=False)


PANEL = (6.5, 4.5)   # inches per panel: two panels side by side read well at a notebook's width


def _panels(n: int, panel=PANEL):
    """A grid of `n` panels, at most two per row (wider figures shrink below reading size in a notebook)."""
    style()
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _grouped_bars(ax, frame, x: str, hue: str | None, col: str) -> None:
    """Bars of `col` grouped by x and hue, with the 95% interval in `col`_ci as error bars where that column is
    (without it, seaborn's bars: the mean and its 95% interval over repeated rows)."""
    import numpy as np
    if f"{col}_ci" not in frame:
        sns.barplot(data=frame, x=x, y=col, hue=hue, ax=ax)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        return
    xs = list(dict.fromkeys(frame[x]))
    hues = list(dict.fromkeys(frame[hue])) if hue else [None]
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = frame if h is None else frame[frame[hue] == h]
        pos = np.array([xs.index(v) for v in sub[x]]) + (j - (len(hues) - 1) / 2) * width
        y = sub[col].to_numpy(float)
        lo, hi = (np.array([np.nan if c is None else c[k] for c in sub[f"{col}_ci"]], float) for k in (0, 1))
        ax.bar(pos, y, width, label=None if h is None else str(h), yerr=[y - lo, hi - y], capsize=4, color=f"C{j}")
    ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")


def bar_panels(frame, x: str, hue: str | None, panels: dict[str, str], title: str, refs: dict | None = None,
               ref_label: str = "reference", ylim=(0, 1), figsize=None):
    """One bar panel per column in `panels` ({column: y label}), sharing x and hue. A column `c` with a column
    `c_ci` ([low, high] per row) gets its 95% interval as error bars; `refs` ({column: value}) draws a dashed
    reference line in that panel."""
    fig, axes = _panels(len(panels), (figsize[0] / len(panels), figsize[1]) if figsize else PANEL)
    for ax, (col, label) in zip(axes, panels.items()):
        _grouped_bars(ax, frame, x, hue, col)
        if refs and col in refs:
            ax.axhline(refs[col], ls="--", color="0.3", label=ref_label)
        ax.set(xlabel=x, ylabel=label, ylim=ylim)
        if hue or refs:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def error_bars(frame, x: str, hue: str, panels: dict[str, str], title: str, ylim=(0, 1), figsize=None):
    """One panel per column in `panels` ({column: y label}): grouped bars of `column` with its 95% interval
    `column_ci` ([low, high] per row) as error bars; x and hue as in `bar_panels`."""
    missing = [c for c in panels if f"{c}_ci" not in frame]
    if missing:
        raise ValueError(f"error_bars needs an interval column for {missing} ('<column>_ci')")
    return bar_panels(frame, x, hue, panels, title, ylim=ylim, figsize=figsize)


# ---------------------------------------------------------------- overlap figures


def heatmap_grid(tables: dict, title: str, xlabel: str, ylabel: str, cbar_label: str = "IoU",
                 fmt: str = ".2f", vmin=0.0, vmax=1.0, cmap: str = "rocket_r"):
    """Side-by-side annotated heatmaps ({panel title: square DataFrame}) on one colour scale."""
    style()
    n = len(tables)
    side = max(3.5, 0.55 * max(t.shape[0] for t in tables.values()) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 1, side), squeeze=False)
    for k, (ax, (name, table)) in enumerate(zip(axes[0], tables.items())):
        sns.heatmap(table, annot=table.shape[0] <= 12, fmt=fmt, vmin=vmin, vmax=vmax, cmap=cmap, ax=ax,
                    cbar=k == n - 1, cbar_kws={"label": cbar_label} if k == n - 1 else None, square=True)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel if k == 0 else "")
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def band_lines(frame, x: str, y: str, hue: str, col: str, title: str, xlabel: str, ylabel: str,
               ref: str | None = None, ref_label: str = "chance", logy: bool = False):
    """Mean line with a min–max band over repeated rows (e.g. orderings), one panel per `col` value; `ref`
    names a column drawn dashed in the same colour (e.g. the chance value)."""
    style()
    panels = list(dict.fromkeys(frame[col]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    palette = dict(zip(dict.fromkeys(frame[hue]), sns.color_palette()))
    for ax, p in zip(axes[0], panels):
        sub = frame[frame[col] == p]
        sns.lineplot(data=sub, x=x, y=y, hue=hue, palette=palette, marker="o", errorbar=("pi", 100), ax=ax)
        if ref:
            for h, g in sub.groupby(hue):
                m = g.groupby(x)[ref].mean()
                ax.plot(m.index, m.values, ls="--", color=palette[h], alpha=0.7)
            ax.plot([], [], ls="--", color="0.4", label=ref_label)
            ax.legend(fontsize="small")
        if logy:
            ax.set_yscale("log")
        ax.set(title=f"{col} = {p}", xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

"""One house style for every figure; helpers return the figure and save it atomically as PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

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
            cmap: str = "rocket_r", cbar_label: str = "", figsize=None, annot: bool = True):
    width = 0.7 if annot else 0.35
    fig, ax = _axes(figsize or (max(6, width * table.shape[1] + 2), max(2.5, 0.5 * table.shape[0] + 1.5)))
    sns.heatmap(table, annot=annot, fmt=fmt, vmin=vmin, vmax=vmax, cmap=cmap, ax=ax,
                cbar_kws={"label": cbar_label})
    return _labelled(fig, ax, title, xlabel, ylabel)


def bars(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4)):
    fig, ax = _axes(figsize)
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax)
    return _labelled(fig, ax, title, xlabel, ylabel)


def lines(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4)):
    fig, ax = _axes(figsize)
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", ax=ax)
    return _labelled(fig, ax, title, xlabel, ylabel, rotate=False)


def bar_panels(frame, x: str, hue: str, panels: dict[str, str], title: str, refs: dict | None = None,
               ref_label: str = "reference", ylim=(0, 1), figsize=None):
    """One bar panel per column in `panels` ({column: y label}), sharing x and hue; `refs` ({column: value})
    draws a dashed reference line in that panel."""
    style()
    figsize = figsize or (5 * len(panels), 4)
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, (col, label) in zip(axes[0], panels.items()):
        sns.barplot(data=frame, x=x, y=col, hue=hue, ax=ax)
        if refs and col in refs:
            ax.axhline(refs[col], ls="--", color="0.3", label=ref_label)
        ax.set(xlabel=x, ylabel=label, ylim=ylim)
        ax.legend(fontsize="small")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def error_bars(frame, x: str, hue: str, panels: dict[str, str], title: str, ylim=(0, 1), figsize=None):
    """One panel per column in `panels` ({column: y label}): grouped bars of `column` with its 95% interval
    `column_ci` ([low, high] per row) as error bars; x and hue as in `bar_panels`."""
    import numpy as np
    style()
    xs, hues = list(dict.fromkeys(frame[x])), list(dict.fromkeys(frame[hue]))
    width = 0.8 / len(hues)
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (5 * len(panels), 4), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels.items()):
        for j, h in enumerate(hues):
            sub = frame[frame[hue] == h]
            pos = np.array([xs.index(v) for v in sub[x]]) + (j - (len(hues) - 1) / 2) * width
            y = sub[col].to_numpy(float)
            lo, hi = (np.array([c[k] for c in sub[f"{col}_ci"]], float) for k in (0, 1))
            ax.bar(pos, y, width, label=str(h), yerr=[y - lo, hi - y], capsize=3)
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
        ax.set(xlabel=x, ylabel=label, ylim=ylim)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- stage `overlap`


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

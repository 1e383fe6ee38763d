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


def heatmap(table, title: str, xlabel: str, ylabel: str, fmt: str = ".2f", vmin=0.0, vmax=1.0,
            cmap: str = "rocket_r", cbar_label: str = "", figsize=None, annot: bool = True):
    style()
    width = 0.7 if annot else 0.35
    figsize = figsize or (max(6, width * table.shape[1] + 2), max(2.5, 0.5 * table.shape[0] + 1.5))
    fig, ax = plt.subplots(figsize=figsize)
    sns.heatmap(table, annot=annot, fmt=fmt, vmin=vmin, vmax=vmax, cmap=cmap, ax=ax,
                cbar_kws={"label": cbar_label})
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    return fig


def bars(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4)):
    style()
    fig, ax = plt.subplots(figsize=figsize)
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    return fig


def lines(frame, x: str, y: str, hue: str | None, title: str, xlabel: str, ylabel: str, figsize=(9, 4)):
    style()
    fig, ax = plt.subplots(figsize=figsize)
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


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

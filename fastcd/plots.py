"""PNG figures (matplotlib, Agg backend): head-score heatmaps, matchings and loss curves."""

from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_heatmaps(panels: dict, path: str | os.PathLike, *, title: str = "", marked: dict | None = None) -> str:
    """One heatmap per panel of a ``[layers, heads]`` score matrix; NaN cells (no path) are grey.

    Args:
        panels: ``{name: tensor [n_layers, n_heads]}``.
        marked: ``{name: [Head, ...]}`` heads to outline (the chosen circuit).
    """
    import numpy as np

    plt = _plt()
    n = len(panels)
    if n == 0:
        raise ValueError("panels must hold at least one score matrix")
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.2), squeeze=False)
    for ax, (name, scores) in zip(axes[0], panels.items()):
        s = np.asarray(scores, dtype=float)
        lim = np.nanmax(np.abs(s)) if np.isfinite(s).any() else 1.0
        lim = lim if lim > 0 else 1.0
        cmap = plt.get_cmap("RdBu").with_extremes(bad="#cccccc")
        im = ax.imshow(np.ma.masked_invalid(s), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        for h in (marked or {}).get(name, []):
            ax.add_patch(plt.Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(series: dict, path: str | os.PathLike, *, xlabel: str = "step", ylabel: str = "", title: str = ""):
    """``series = {label: (xs, ys)}`` on one axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
    return os.fspath(path)


LOSS_PARTS = {"ce": "CE", "cka_loss": "sum(1-CKA)", "kd": "KD"}


def loss_series(log: list[dict], prefix: str = "") -> dict:
    """``{label: (steps, values)}`` for each loss part (CE, sum(1-CKA), KD) present in a distillation log."""
    if not log:
        return {}
    steps = [r["step"] for r in log]
    return {f"{prefix}{label}": (steps, [r[key] for r in log]) for key, label in LOSS_PARTS.items() if key in log[0]}

"""PNG figures: head-score heatmaps, the teacher x student CKA matrix, training curves as small multiples, and an
experiment's accuracy, sample-efficiency and lambda plots.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, the global backend is never
switched), writes it when given a path, and returns the Figure. One colour scale per figure, with a labelled
colourbar; small grids carry their values.
"""

from __future__ import annotations

import os

from fastcd.config import ALL_METHODS as METHOD_ORDER  # the order of the method table, also for colours
from fastcd.errors import UsageError
from fastcd.io import atomic_target
from fastcd.stats import mean_ci

METRIC_LABELS = {"prob": "p(answer)", "logprob": "log p(answer)", "logit_diff": "logit difference",
                 "accuracy": "accuracy"}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig, path) -> None:
    if path is not None:  # through a temporary file: a reader never sees half a figure
        ext = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=110, format=ext)


def method_colors() -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i) for i, m in enumerate(METHOD_ORDER)}


def _annotate(ax, values, fmt: str, *, white, max_cells: int = 144) -> None:
    """Write each cell's value when the grid is small enough to read; ``white(x)``: the cell is dark."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size > max_cells:
        return
    for (i, j), x in np.ndenumerate(v):
        if np.isfinite(x):
            text = format(x, fmt)
            text = text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="white" if white(x) else "black")


def head_heatmaps(panels: dict, path: str | os.PathLike | None = None, *, title: str = "",
                  marked: dict | None = None, metric: str = "prob", relative: bool = True, label: str | None = None,
                  marked_label: str = "circuit heads", nan_label: str | None = None):
    """One heatmap per panel of a ``[layers, heads]`` score matrix, all on one symmetric colour scale (a panel of
    1e-4 reads pale beside one of -0.9), one labelled colourbar, circuit heads outlined, NaN cells (no path) grey,
    values written on grids up to 144 cells.

    Args:
        panels: ``{name: tensor [n_layers, n_heads]}``.
        marked: ``{name: [Head, ...]}`` heads to outline.
        metric, relative: what the scores are (for the colourbar label); ``label`` overrides it.
        nan_label: what a grey (NaN) cell means, said in the title when a panel has one.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    if not panels:
        raise UsageError("panels must hold at least one score matrix")
    mats = {k: np.asarray(v, dtype=float) for k, v in panels.items()}
    finite = [np.abs(m[np.isfinite(m)]).max() for m in mats.values() if np.isfinite(m).any()]
    lim = max(finite) if finite and max(finite) > 0 else 1.0
    n = len(mats)
    rows, cols = next(iter(mats.values())).shape
    fig = _figure(max(3.0, 0.28 * cols + 1.2) * n + 1.2, max(2.6, 0.28 * rows + 1.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    cmap = colormaps["RdBu"].with_extremes(bad="#cccccc")
    im = None
    for ax, (name, s) in zip(axes, mats.items()):
        im = ax.imshow(np.ma.masked_invalid(s), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        ax.tick_params(labelsize=6 if s.shape[1] > 16 else 8)
        _annotate(ax, s, ".2f", white=lambda x: abs(x) > 0.6 * lim)  # RdBu is dark at both ends
        for h in (marked or {}).get(name, []):
            ax.add_patch(Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
    what = METRIC_LABELS.get(metric, metric)
    cbar = label or (f"relative change in {what}" if relative else f"change in {what}")
    fig.colorbar(im, ax=list(axes), fraction=0.046, label=cbar)
    import textwrap

    width_chars = int(fig.get_figwidth() * 11)  # about 11 characters of a 9-point title per inch
    grey = nan_label and any(np.isnan(m).any() for m in mats.values())
    lines = ([title] if title else []) + [f"colour: {cbar} when the head is patched"
                                          + (f"; outlined: {marked_label}" if marked else "")
                                          + (f"; grey: {nan_label}" if grey else "")]
    fig.suptitle("\n".join(textwrap.fill(x, width_chars) for x in lines), fontsize=9)
    _save(fig, path)
    return fig


def matching_cells(units: list, students: list, matching) -> list[tuple[int, int]]:
    """The (row, column) cell of each matched pair in a units x students matrix; a row is a (teacher head, role)
    unit, since one teacher head may sit in the circuit at several roles."""
    return [(units.index((p.teacher, p.position)), students.index(p.student)) for p in matching.pairs]


def cka_matrix_plot(cka, rows: list[str], cols: list[str], path: str | os.PathLike | None = None, *,
                    chosen: list[tuple[int, int]] = (), title: str = "", chosen_label: str = "matched"):
    """The teacher x student CKA matrix on a colour scale from 0 to its largest value (labelled), rows named with
    their role (``L0H2 @last``), the matched cells outlined, values written on small matrices."""
    import numpy as np
    from matplotlib.patches import Rectangle

    c = np.asarray(cka, dtype=float)
    top = float(np.nanmax(c)) if np.isfinite(c).any() else 1.0
    fig = _figure(max(4.0, 0.32 * len(cols) + 2.6), max(3.0, 0.34 * len(rows) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(c, cmap="viridis", vmin=0.0, vmax=max(top, 1e-6), aspect="auto")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6 if len(cols) > 24 else 7)
    _annotate(ax, c, ".2f", white=lambda x: x < 0.55 * top, max_cells=120)  # viridis is dark at the low end
    for i, j in chosen:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("student head")
    ax.set_ylabel("teacher unit (head @ role)")
    ax.set_title(title or f"linear CKA, teacher x student (red: {chosen_label})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label=f"linear CKA (0 to max {top:.2f})")
    _save(fig, path)
    return fig


CURVE_PARTS = (("ce", "CE"), ("cka_loss", "sum over pairs of (1 - CKA)"), ("mean_cka", "mean CKA of the pairs"),
               ("kd", "KD"), ("val_ce", "validation CE (answer token)"),
               ("val_accuracy", "validation accuracy"))


def running_mean(ys: list, window: int) -> list:
    """The mean of the last ``window`` values at each point (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def curves_plot(logs: dict, path: str | os.PathLike | None = None, *, title: str = ""):
    """Training curves as small multiples: one panel per loss part (each its own scale) and one for validation
    accuracy, colour by method. ``logs = {method: log}`` or ``{method: [log, log, ...]}`` (several seeds); a key may
    be ``(method, variant)`` (e.g. the matching rule): the variant sets the line style."""
    colors = method_colors()
    runs = [(m, lg) for m, v in logs.items() for lg in (v if v and isinstance(v[0], list) else [v])]
    present = [(k, t) for k, t in CURVE_PARTS if any(k in row for _, lg in runs for row in lg)]
    if not present:
        return None
    method = lambda key: key[0] if isinstance(key, tuple) else key  # noqa: E731
    variants = list(dict.fromkeys(key[1] for key, _ in runs if isinstance(key, tuple)))
    styles = dict(zip(variants, ("-", "--", ":", "-.") * 4))
    style = lambda key: styles[key[1]] if isinstance(key, tuple) else "-"  # noqa: E731
    fig = _figure(3.1 * len(present) + 1.8, 2.9)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, (k, name) in zip(axes, present):
        for key, lg in runs:
            xs = [row["step"] for row in lg if k in row]
            ys = [row[k] for row in lg if k in row]
            c = colors.get(method(key), "C0")
            if xs and not k.startswith("val_") and len(xs) >= 8:  # one batch per point: faint, with its running mean
                ax.plot(xs, ys, color=c, alpha=0.2, lw=0.8, ls=style(key))
                ax.plot(xs, running_mean(ys, max(2, len(ys) // 10)), color=c, alpha=0.9, lw=1.3, ls=style(key))
            elif xs:
                ax.plot(xs, ys, color=c, alpha=0.8, lw=1, ls=style(key), marker="o" if len(xs) < 12 else None, ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        if k in ("val_accuracy", "mean_cka"):
            ax.set_ylim(0, 1.02)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors.get(m, "C0"), label=m) for m in dict.fromkeys(method(k) for k, _ in runs)]
    if len(variants) > 1:
        handles += [Line2D([], [], color="black", ls=styles[v], label=str(v)) for v in variants]
    fig.legend(handles=handles, fontsize=7, loc="outside right center")
    fig.suptitle(title or "training curves (colour = method; each panel its own scale; per-batch values faint, their "
                 "running mean solid)", fontsize=9)
    _save(fig, path)
    return fig


def lr_selection_plot(selection: list[dict], path: str | os.PathLike | None = None):
    """Final validation accuracy against lr (log axis) for every method of an lr selection, the chosen lr ringed;
    None while no tuning run has finished."""
    rows = [r for r in selection if any(g["val_accuracy"] is not None for g in r["grid"])]
    if not rows:
        return None
    colors = method_colors()
    fig = _figure(5.2, 3.2)
    ax = fig.subplots()
    # colour: the method; line style and marker: the setting (n_train, matching), so one method's settings differ
    def shown(r):  # the part of a row's setting its label names
        return ", ".join(f"{k} {v}" if k == "n_train" else str(v) for k, v in r["setting"].items()
                         if k in ("matching", "n_train") and v is not None)

    settings = list(dict.fromkeys(shown(r) for r in rows))
    for r in rows:
        pts = [(g["lr"], g["val_accuracy"]) for g in r["grid"] if g["val_accuracy"] is not None]
        extra = shown(r)
        i = settings.index(extra)
        ax.plot(*zip(*pts), marker="osD^v"[i % 5], ls=("-", "--", ":", "-.")[i % 4], ms=4,
                color=colors.get(r["method"], "C0"), label=r["method"] + (f" ({extra})" if extra else ""))
        if r["chosen"] is not None:
            ax.scatter([r["chosen"]], [dict(pts)[r["chosen"]]], s=110, facecolors="none",
                       edgecolors=colors.get(r["method"], "C0"), lw=1.5)
    ax.set_xscale("log")
    grid = [g["lr"] for r in selection for g in r["grid"]]
    ax.set_xlim(min(grid) / 1.5, max(grid) * 1.5)  # the whole grid, finished or not
    ax.set_xticks(sorted(set(grid)), [f"{x:g}" for x in sorted(set(grid))])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("learning rate (the grid; a missing point: its run has not finished)")
    ax.set_ylabel("final validation accuracy")
    ax.set_title("learning-rate selection on the tuning seeds (ring: chosen)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return fig


def _zoom_limits(rows: list[dict], report: dict) -> tuple[float, float] | None:
    """The y range of every seed, interval and the teacher, with a margin, when it spans under half the 0-1 axis
    (methods near a ceiling: their differences would not show on 0-1); None otherwise."""
    vals = [v for r in rows for v in r["per_seed"]]
    vals += [min(max(r["accuracy"][k], 0.0), 1.0) for r in rows for k in ("lo", "hi")
             if r["accuracy"].get(k) is not None]
    if report.get("teacher_accuracy") is not None:
        vals.append(report["teacher_accuracy"])
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    pad = max(0.01, 0.1 * (hi - lo))
    return (max(0.0, lo - pad), min(1.02, hi + pad)) if hi - lo < 0.5 else None


def accuracy_plot(report: dict, path: str | os.PathLike | None = None):
    """Test accuracy per method, one panel per setting: every seed a dot, the mean with its 95% t-interval; beside
    it a zoomed panel of the same data when every value lies in a band under half the axis."""
    colors = method_colors()
    rows = report["table"]
    groups = list(dict.fromkeys(r["setting"] for r in rows))
    width = max(len([r for r in rows if r["setting"] == g]) for g in groups)
    zooms = {g: _zoom_limits([r for r in rows if r["setting"] == g], report) for g in groups}
    ncols = 2 if any(zooms.values()) else 1
    fig = _figure(ncols * max(6.5, 0.8 * width + 2.5) - (2.0 if ncols == 2 else 0), 3.3 * len(groups) + 0.6)
    grid = fig.subplots(len(groups), ncols, squeeze=False)
    for axs, g in zip(grid, groups):
        rs = [r for r in rows if r["setting"] == g]
        for col, ax in enumerate(axs):
            zoom = zooms[g] if col == 1 else None
            if col == 1 and zoom is None:
                ax.set_axis_off()
                continue
            for i, r in enumerate(rs):
                c = colors.get(r["method"], "C0")
                ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color=c, s=14, alpha=0.6)
                a = r["accuracy"]
                if a.get("lo") is not None:
                    ax.errorbar([i], [a["mean"]], yerr=[[a["mean"] - max(a["lo"], 0.0)],
                                                        [min(a["hi"], 1.0) - a["mean"]]],
                                color=c, capsize=4, marker="_", ms=14)
                else:
                    ax.scatter([i], [a["mean"]], color=c, marker="_", s=200)
            _refs(ax, report)
            ticks = ["\n".join(x for x in (r["method"], r["matching"], None if r["lam"] is None else f"λ={r['lam']}",
                                           "unbiased" if r.get("cka_estimator") == "unbiased" else None,
                                           f"lr={r['own_lr']:g}" if r.get("own_lr") else None) if x) for r in rs]
            ax.set_xticks(range(len(rs)), ticks, fontsize=7)
            ax.set_ylabel(f"test accuracy (n={report['n_test']})" + (" (zoom)" if zoom else ""))
            ax.set_ylim(*(zoom or (0, 1.02)))
            ax.set_title(g + ("\nzoomed: the same data, y axis fitted to it" if zoom else ""), fontsize=8)
            if ax.get_legend_handles_labels()[0] and (col == 1 or not zooms[g]):
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    has_ci = [r["accuracy"].get("lo") is not None for r in rows]
    bar = ("mean and 95% t-interval over seeds (cut at 0 and 1)" if all(has_ci) else
           "mean (one seed: no interval)" if not any(has_ci) else
           "mean, with its 95% t-interval over seeds where there are two or more (cut at 0 and 1)")
    fig.suptitle(f"test accuracy per method\ndots: seeds; bar: {bar}", fontsize=9)
    _save(fig, path)
    return fig


def _refs(ax, report: dict) -> None:
    control = bool(report["config"].get("positive_control"))
    t_label, b_label = ("intact model", "damaged copy (untrained)") if control else ("teacher", "untrained student")
    t, b = report.get("teacher_accuracy"), (report.get("base") or {}).get("accuracy")
    if t is not None:
        ax.axhline(t, color="black", ls="--", lw=1, label=f"{t_label} {t:.2f}")
    if b is not None:
        ax.axhline(b, color="grey", ls=":", lw=1, label=f"{b_label} {b:.2f}")


def variant(setting: dict) -> str | None:
    """A run's matching rule, with the CKA estimator when it is not the default (the line-style key of the
    sweep and curves figures)."""
    rule = setting.get("matching")
    if setting.get("cka_estimator") == "unbiased":
        return f"{rule}, unbiased CKA" if rule else "unbiased CKA"
    return rule


def sweep_plot(report: dict, recs: list[dict], var: str, xlabel: str, path: str | os.PathLike | None = None):
    """Test accuracy against a swept setting (``n_train``: sample efficiency; ``lam``), per method and matching
    rule, mean and 95% t-interval over seeds (in a lambda sweep, each method without the term, e.g. circuit CE, a
    horizontal line at its mean with its interval as a band); None when the setting takes fewer than two values."""

    vals = sorted({r["setting"][var] for r in recs if r["setting"].get(var) not in (None, "auto")})
    if len(vals) < 2:
        return None
    colors = method_colors()
    styles = {"ablation": "-", "cka": "--", "combined": "-.", "identity": ":", None: "-"}
    fig = _figure(8.0, 3.8)
    ax = fig.subplots()
    by: dict = {}
    for r in recs:
        if r["setting"].get(var) not in (None, "auto"):
            per_value = by.setdefault((r["method"], variant(r["setting"])), {})
            per_value.setdefault(r["setting"][var], []).append(r["accuracy"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    for j, ((m, rule), d) in enumerate(sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 99), str(kv[0][1])))):
        xs = sorted(d)
        cis = [mean_ci(d[x]) for x in xs]
        ys = [c["mean"] for c in cis]
        err = [[y - max(c["lo"], 0.0) if c["lo"] is not None else 0 for y, c in zip(ys, cis)],
               [min(c["hi"], 1.0) - y if c["hi"] is not None else 0 for y, c in zip(ys, cis)]]
        shift = [x * (1 + 0.02 * (j - len(by) / 2)) for x in xs]  # spread the error bars a little
        ax.errorbar(shift, ys, yerr=err, marker="o", ms=4, capsize=2, color=colors.get(m, "C0"),
                    ls=styles.get(rule, ":" if rule and "unbiased" in rule else "-"),
                    label=f"{m} ({rule})" if rule else m)
    flat: dict = {}  # methods without the setting (circuit CE in a lambda sweep): a band at their mean and CI
    for r in recs:
        if var == "lam" and r["setting"].get(var) is None:
            flat.setdefault((r["method"], variant(r["setting"])), []).append(r["accuracy"])
    for (m, rule), accs in sorted(flat.items(), key=lambda kv: (order.get(kv[0][0], 99), str(kv[0][1]))):
        c = mean_ci(accs)
        ax.axhline(c["mean"], color=colors.get(m, "C0"), lw=1.2, label=f"{m}{f' ({rule})' if rule else ''}: "
                   f"{c['mean']:.3f} (band: 95% CI)")
        if c["lo"] is not None:
            ax.axhspan(c["lo"], c["hi"], color=colors.get(m, "C0"), alpha=0.15, lw=0)
    _refs(ax, report)
    ax.set_xscale("log")
    ax.set_xticks(vals, [str(v) for v in vals])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test accuracy (n={report['n_test']})")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title(f"test accuracy vs {xlabel}: mean and 95% t-interval over seeds", fontsize=9)
    _save(fig, path)
    return fig


__all__ = ["accuracy_plot", "cka_matrix_plot", "curves_plot", "head_heatmaps", "matching_cells", "method_colors",
           "sweep_plot", "variant"]


def faithfulness_curve_plot(curve: list[dict], record: dict, path: str | os.PathLike | None = None, *,
                            title: str = ""):
    """Faithfulness against circuit size (share of heads): the growing circuits joined by a line, the bisection's
    and the pruned circuit as their own markers (different circuits, not one curve), random circuits of each size
    and roles (mean, whiskers one SD), the target and the paper's 11-15% band."""
    if not curve:
        raise UsageError("faithfulness_curve_plot: the curve is empty")
    fig = _figure(6.8, 4.6)
    ax = fig.add_subplot()
    full = record["full_accuracy"]
    ax.axvspan(11, 15, color="0.92", zorder=0, label="paper's circuit sizes (11-15% of heads)")
    ax.axhline(record["target"], color="0.4", ls="--", lw=1, label=f"target {record['target']:.2f} (on the search "
               "prompts)")
    styles = {"grow": ("o-", "C0", "growing circuit"), "bisect": ("D", "C1", "bisection of the last step"),
              "pruned": ("*", "C2", "pruned (final) circuit")}
    for stage, (fmt, color, label) in styles.items():
        pts = sorted((r for r in curve if r["stage"] == stage), key=lambda r: r["units"])
        if not pts:
            continue
        x = [100 * r["head_share"] for r in pts]
        ax.plot(x, [r["faithfulness"] for r in pts], fmt, color=color, ms=12 if stage == "pruned" else 6,
                label=label + (f": {pts[-1]['units']} units, {pts[-1]['heads']} heads, faithfulness "
                               f"{pts[-1]['faithfulness']:.2f}" if stage == "pruned" else ""))
        for xi, r in zip(x, pts):
            ax.annotate(f"{r['units']}u", (xi, r["faithfulness"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    pts = sorted(curve, key=lambda r: r["head_share"])
    ax.errorbar([100 * r["head_share"] for r in pts], [r["random_accuracy"] / full for r in pts],
                yerr=[(r["random_sd"] or 0) / full for r in pts], fmt="s", color="C3", ms=4, capsize=2,
                label=f"random circuits, same size and roles ({len(pts[0]['random_accuracies'])} per point)")
    ax.set_xlabel(f"circuit size: % of the model's {record['n_heads_total']} heads (label: (head, role) units)")
    ax.set_ylabel(f"faithfulness on {record['n_prompts']} held-out prompts\n(circuit / full accuracy {full:.2f})")
    ax.set_ylim(-0.05, max(1.1, max(r["faithfulness"] for r in curve) + 0.08))
    ax.set_xlim(0, max(16.0, 100 * max(r["head_share"] for r in curve) * 1.1))
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(0.995, 0.1))
    title = title or f"circuit search ({record['protocol']} mean ablation)"
    if not record.get("reached", True):  # the curve ends where the growth stopped, not at a circuit
        title += f"\ntarget not reached: growth stopped at {record['circuit_units']} units"
    ax.set_title(title, fontsize=9, wrap=True)
    _save(fig, path)
    return fig

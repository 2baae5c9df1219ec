"""The figures: pure matplotlib Figures (no global backend switch), one colour scale per figure, the matched
cells found by (head, role)."""


import numpy as np
import pytest
import torch

from fastcd.artifacts import Matching, Pair
from fastcd.models import Head
from fastcd.plots import cka_matrix_plot, curves_plot, head_heatmaps, matching_cells


def test_matching_cells_use_the_role_of_the_unit():
    units = [(Head(0, 2), "last"), (Head(0, 2), "box_label"), (Head(1, 0), "last")]
    students = [Head(0, 0), Head(0, 1), Head(1, 1)]
    m = Matching([Pair(Head(0, 2), Head(1, 1), "box_label"), Pair(Head(0, 2), Head(0, 0), "last")], "given")
    assert matching_cells(units, students, m) == [(1, 2), (0, 0)]  # row by (head, role), not by head


def test_heatmaps_share_one_colour_scale_and_return_the_figure(tmp_path):
    backend = __import__("matplotlib").get_backend()
    panels = {"a": torch.tensor([[1e-4, 0.0], [0.0, 0.0]]), "b": torch.tensor([[-0.87, 0.1], [0.0, float("nan")]])}
    fig = head_heatmaps(panels, tmp_path / "h.png", title="t", marked={"b": [Head(0, 0)]})
    images = [im for ax in fig.axes for im in ax.get_images()]
    clims = {im.get_clim() for im in images}
    assert len(images) == 2 and len(clims) == 1  # one scale for every panel
    assert np.allclose(clims.pop(), (-0.87, 0.87))  # symmetric, set by the largest |score| of the figure
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 1
    assert "relative change in p(answer)" in fig.axes[-1].get_ylabel()
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert __import__("matplotlib").get_backend() == backend  # never switched
    assert "grey" not in fig._suptitle.get_text()  # a NaN cell is explained only where its meaning is given
    fig = head_heatmaps(panels, None, title="t", nan_label="no path to the receivers")
    assert "grey: no path to the receivers" in fig._suptitle.get_text().replace("\n", " ")  # wrapped
    nan_free = {"a": panels["a"]}
    assert "grey" not in head_heatmaps(nan_free, None, nan_label="no path")._suptitle.get_text()


def test_cka_plot_range_and_labels(tmp_path):
    cka = np.array([[0.05, 0.2], [0.1, 0.15]])
    fig = cka_matrix_plot(cka, ["L0H2 @last", "L0H2 @box_label"], ["L0H0", "L0H1"], tmp_path / "c.png",
                          chosen=[(0, 1)])
    ax = fig.axes[0]
    assert ax.get_images()[0].get_clim() == (0.0, 0.2)  # 0 to the largest value, not 0-1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0H2 @last", "L0H2 @box_label"]


def test_curves_are_small_multiples_with_validation_accuracy(tmp_path):
    log = [{"step": s, "ce": 3.0 / s, "cka_loss": 1.0, "mean_cka": 0.5, "val_accuracy": 0.1 * s} for s in (1, 2, 3)]
    fig = curves_plot({"ce+cka": log, "circuit-ce": [{"step": 1, "ce": 2.0}]}, tmp_path / "k.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["CE", "sum over pairs of (1 - CKA)", "mean CKA of the pairs", "validation accuracy"]
    assert curves_plot({"x": [{"step": 1}]}, None) is None
    # (method, variant) keys: colour by method, line style by variant, both in the legend
    run = [{"step": 1, "ce": 2.0}, {"step": 2, "ce": 1.0}]
    fig = curves_plot({("ce+cka", "ablation"): [run], ("ce+cka", "cka"): [run], ("full-ce", "no matching"): [run]},
                      None)
    lines = fig.axes[0].get_lines()
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", ":"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ce+cka", "full-ce", "ablation", "cka",
                                                                 "no matching"]


@pytest.mark.parametrize("n", [0])
def test_no_panels_is_an_error(n):
    with pytest.raises(ValueError, match="at least one score matrix"):
        head_heatmaps({}, None)


def test_per_batch_curves_are_faint_with_their_running_mean_and_validation_is_drawn_as_measured():
    from fastcd.plots import running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    log = [{"step": s, "ce": float(s % 3), **({"val_accuracy": s / 40} if s % 10 == 0 else {})} for s in range(1, 41)]
    fig = curves_plot({"ce+cka": log}, None)
    ce, val = fig.axes
    raw, smooth = ce.get_lines()
    assert raw.get_alpha() < smooth.get_alpha() and list(raw.get_ydata()) == [float(s % 3) for s in range(1, 41)]
    assert list(smooth.get_ydata()) == running_mean([float(s % 3) for s in range(1, 41)], 4)
    assert [ln.get_marker() for ln in val.get_lines()] == ["o"] and len(val.get_lines()[0].get_xdata()) == 4


def test_accuracy_plot_claims_an_interval_only_where_it_draws_one():
    from fastcd.plots import accuracy_plot

    def row(method, per_seed, lo):
        m = sum(per_seed) / len(per_seed)
        return {"setting": "s", "method": method, "matching": None, "lam": None, "per_seed": per_seed,
                "accuracy": {"mean": m, "lo": lo, "hi": None if lo is None else m + 0.05}}

    def title(rows):
        return accuracy_plot({"table": rows, "n_test": 10, "config": {}}, None)._suptitle.get_text()

    one = [row("circuit-ce", [0.5], None), row("ce+cka", [0.6], None)]
    assert "one seed: no interval" in title(one) and "t-interval" not in title(one)
    many = [row("circuit-ce", [0.5, 0.6], 0.4), row("ce+cka", [0.6, 0.7], 0.5)]
    assert "mean and 95% t-interval over seeds" in title(many)
    assert "where there are two or more" in title([many[0], one[1]])


def test_accuracy_plot_zooms_beside_the_full_axis_only_when_the_results_sit_in_a_narrow_band():
    from fastcd.plots import accuracy_plot

    def row(method, per_seed, setting="s"):
        m = sum(per_seed) / len(per_seed)
        return {"setting": setting, "method": method, "matching": None, "lam": None, "per_seed": per_seed,
                "accuracy": {"mean": m, "lo": m - 0.01, "hi": m + 0.01}}

    report = {"n_test": 10, "config": {}, "teacher_accuracy": 0.94, "base": {"accuracy": 0.44}}
    near = [row("circuit-ce", [0.96, 0.98]), row("ce+cka", [0.95, 0.97])]
    full, zoom = accuracy_plot({**report, "table": near}, None).axes
    assert full.get_ylim() == (0, 1.02)
    lo, hi = zoom.get_ylim()
    assert 0.9 < lo < 0.94 and 0.98 < hi <= 1.02  # the teacher line and every seed inside, the base line outside
    assert [c.get_offsets()[:, 1].tolist() for c in zoom.collections[:1]] == [[0.96, 0.98]]  # the same data
    wide = [row("circuit-ce", [0.2, 0.9]), row("ce+cka", [0.5, 0.6])]
    (only,) = [ax for ax in accuracy_plot({**report, "table": wide}, None).axes if ax.axison]
    assert only.get_ylim() == (0, 1.02)
    # one setting narrow, one wide: the wide one's zoom panel is off and its legend stays on the full panel
    axes = accuracy_plot({**report, "table": near + [row("full-ce", [0.1, 0.9], "t")]}, None).axes
    assert [ax.axison for ax in axes] == [True, True, True, False]
    assert axes[2].get_legend() is not None and axes[1].get_legend() is not None and axes[0].get_legend() is None


def test_search_curve_says_when_the_target_was_not_reached():
    from fastcd.plots import faithfulness_curve_plot

    curve = [{"stage": "grow", "units": u, "heads": u, "head_share": u / 100, "faithfulness": 0.5,
              "random_accuracy": 0.3, "random_sd": 0.01, "random_accuracies": [0.3, 0.3]} for u in (8, 16)]
    record = {"full_accuracy": 0.6, "target": 0.85, "n_heads_total": 100, "n_prompts": 64, "protocol": "strict",
              "reached": False, "circuit_units": 16}
    title = faithfulness_curve_plot(curve, record, None, title="t").axes[0].get_title()
    assert title == "t\ntarget not reached: growth stopped at 16 units"
    assert faithfulness_curve_plot(curve, record | {"reached": True}, None, title="t").axes[0].get_title() == "t"


def test_lambda_sweep_draws_the_methods_without_the_term_as_a_band_at_their_mean():
    from fastcd.plots import sweep_plot

    def rec(method, lam, acc, rule="cka"):
        return {"method": method, "setting": {"lam": lam, "matching": rule}, "accuracy": acc}

    recs = [rec("ce+cka", lam, a) for lam, accs in ((0.1, (0.7, 0.8)), (1.0, (0.5, 0.6))) for a in accs]
    recs += [rec("circuit-ce", None, a) for a in (0.8, 0.9, 0.85)]
    report = {"n_test": 10, "config": {}, "teacher_accuracy": 0.94, "base": {"accuracy": 0.44}}
    ax = sweep_plot(report, recs, "lam", "lambda").axes[0]
    (band,) = [line for line in ax.get_lines() if line.get_label().startswith("circuit-ce (cka): 0.850")]
    assert band.get_ydata()[0] == pytest.approx(0.85)
    assert len(ax.patches) == 1  # its 95% interval, shaded
    lo, hi = ax.patches[0].get_y(), ax.patches[0].get_y() + ax.patches[0].get_height()
    assert lo < 0.8 and hi > 0.9  # t-interval over 3 values spanning 0.1 is wider than their range
    # in an n_train sweep a method without the setting is not a flat reference: it is left out
    recs_n = [{**r, "setting": {**r["setting"], "n_train": r["setting"]["lam"]}} for r in recs]
    ax = sweep_plot(report, recs_n, "n_train", "training prompts").axes[0]
    assert not ax.patches and not any(line.get_label().startswith("circuit-ce") for line in ax.get_lines())

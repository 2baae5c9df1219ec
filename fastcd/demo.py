"""``fastcd demo``: the paper's Table 1/2 at small scale, from the shipped checkpoints, on CPU.

Discovery in the teacher, matching into the student base, every distillation method from the same student
base and budget, then full and circuit accuracy per method, the teacher and the untrained student, the share
of trainable parameters and heads, and McNemar p-values. Writes a report folder: ``report.json``,
``summary.md``, ``teacher_circuit.png``, ``student_heads.png``, ``matching.png``, ``curves.png``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch

from fastcd import discover as D
from fastcd.discover import accuracy_per_example, circuit_correct
from fastcd.distillation import (
    METHODS,
    DistillConfig,
    discover_circuit,
    distill,
)
from fastcd.hooks import mean_z
from fastcd.match import MatchInputs, cka_scores, match
from fastcd.models import load_model, load_tokenizer
from fastcd.plots import _plt, head_heatmaps, line_plot, loss_series
from fastcd.pretrain import shipped_checkpoint
from fastcd.stats import mcnemar
from fastcd.tasks import EntityTracking, TheoryOfMind

CHECKPOINTS = {"entity-tracking": ("et-teacher", "et-student"), "tom": ("tom-teacher", "tom-student")}
LABELS = {"full-ce": "Fully distilled, CE", "kd": "Fully distilled, logit KD", "circuit-ce": "Circuit, CE",
          "cka": "Circuit, Align CKA", "ce+rand-cka": "Circuit, CE + Rand CKA", "ce+cka": "Circuit, CE + Align CKA"}


def run_demo(task_name: str = "entity-tracking", *, out: str = "fastcd-demo", teacher: str | None = None,
             student: str | None = None, steps: int = 150, batch_size: int = 32, lr: float = 3e-3, lam: float = 1.0,
             n_train: int = 4096, n_eval: int = 500, n_discovery: int = 256, seeds=(0,),
             methods=METHODS, direction: str = "student_to_teacher", progress: bool = True) -> dict:
    """Run the demo; returns the report dict (also written to ``out/report.json``)."""
    from tqdm import tqdm

    t_start = time.time()
    if task_name not in CHECKPOINTS:
        raise ValueError(f"task must be one of {sorted(CHECKPOINTS)}, got {task_name!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods must be among {METHODS}, got {bad}")
    seeds = tuple(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if n_discovery < 2:
        raise ValueError(f"n_discovery must be an integer >= 2, got {n_discovery!r}")
    for method in methods:  # every run's settings, checked before any model loads or any figure is written
        DistillConfig(method=method, steps=steps, batch_size=batch_size, lr=lr, lam=lam, n_train=n_train,
                      n_eval=n_eval, progress=False).validate()
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} exists and is not a directory")
    t_name, s_name = CHECKPOINTS[task_name]
    teacher_dir = teacher or shipped_checkpoint(t_name)
    student_dir = student or shipped_checkpoint(s_name)
    os.makedirs(out, exist_ok=True)
    task = EntityTracking(n_boxes=7) if task_name == "entity-tracking" else TheoryOfMind()
    tok = load_tokenizer(student_dir)
    t_model = load_model(teacher_dir)
    base = load_model(student_dir)

    # 1. teacher circuit ------------------------------------------------------------------------------
    dpairs = task.pairs(n_discovery, seed=0, split="val")
    t_clean = task.encode([p.clean for p in dpairs], tok)
    t_corrupt = task.encode([p.corrupt for p in dpairs], tok)
    cfg0 = DistillConfig(n_discovery=n_discovery, progress=False)
    circuit = discover_circuit(t_model, task, t_clean, t_corrupt, cfg0)
    src_t = D.make_source(t_model, t_clean, "mean", corrupt=t_corrupt)
    panels, marks = {}, {}
    for role in task.roles:
        panels[f"teacher @{role}"] = D.patch_heads_batched(t_model, t_clean, src_t, metric="prob",
                                                           position=role).scores
        marks[f"teacher @{role}"] = [c.head for c in circuit.heads if c.position == role]
    head_heatmaps(panels, os.path.join(out, "teacher_circuit.png"),
                  title=f"{task_name}: teacher heads, relative p(correct) change under mean ablation", marked=marks)
    # 2. matching into the student base -------------------------------------------------------------------
    inp = MatchInputs(t_model, base, circuit, t_clean, t_clean, t_corrupt, t_corrupt)
    # The paper's rule (Eq. 5): each of the K most ablation-sensitive student heads maps to the teacher
    # circuit unit with the nearest drop. direction="teacher_to_student" instead gives every unit (head, role)
    # its nearest student head, so that every role has a partner (both measured in docs/RESULTS.md).
    matching = match(inp, "ablation", direction=direction)
    src_s = D.make_source(base, t_clean, "mean", corrupt=t_corrupt)
    panels, marks = {}, {}
    for role in task.roles:
        panels[f"student @{role}"] = D.patch_heads_batched(base, t_clean, src_s, metric="prob", position=role).scores
        marks[f"student @{role}"] = [p.student for p in matching.pairs if p.position == role]
    head_heatmaps(panels, os.path.join(out, "student_heads.png"),
                  title=f"{task_name}: student base heads (matched heads outlined)", marked=marks)
    cka, t_heads, s_all = cka_scores(inp)
    _matching_plot(cka, t_heads, s_all, matching, os.path.join(out, "matching.png"))

    # 3. baselines on the test split ------------------------------------------------------------------
    test_pairs = task.pairs(n_eval, seed=0, split="test")
    s_test = task.encode([p.clean for p in test_pairs], tok)
    s_ref = task.encode([p.corrupt for p in test_pairs], tok)
    live_s = [(p.student, p.position) for p in matching.pairs]
    t_live = [(c.head, c.position) for c in circuit.heads]
    t_correct = accuracy_per_example(t_model, s_test)
    t_circ = circuit_correct(t_model, s_test, mean_z(t_model, s_ref.input_ids), t_live)
    b_correct = accuracy_per_example(base, s_test)
    b_circ = circuit_correct(base, s_test, mean_z(base, s_ref.input_ids), live_s)
    rows = {"teacher": _row("Teacher", t_correct, t_circ), "base": _row("Student base (untrained)", b_correct, b_circ)}

    # 4. every method, every seed -------------------------------------------------------------------------
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    curves = {}
    jobs = [(m, s) for s in seeds for m in methods]
    for method, seed in tqdm(jobs, disable=not progress, desc="demo: distillation runs"):
        cfg = DistillConfig(method=method, steps=steps, batch_size=batch_size, lr=lr, lam=lam, n_train=n_train,
                            n_eval=n_eval, seed=seed, progress=False, log_every=5,
                            kd_weight=1.0 if method == "kd" else 0.0)
        res = distill(t_model, load_model(student_dir), task, circuit=circuit, matching=matching, config=cfg,
                      student_tokenizer=tok, teacher_tokenizer=tok)
        runs[method].append({"seed": seed, "metrics": res.metrics, "correct": res.correct,
                             "circuit_correct": res.circuit_correct})
        if seed == seeds[0]:
            curves[method] = res.log
    for m in methods:
        rs = runs[m]
        acc = [r["metrics"]["student_accuracy"] for r in rs]
        circ = [r["metrics"].get("student_circuit_accuracy", float("nan")) for r in rs]
        rows[m] = {"label": LABELS[m], "full": sum(acc) / len(acc), "circuit": sum(circ) / len(circ),
                   "full_per_seed": acc, "circuit_per_seed": circ,
                   "trainable_fraction": rs[0]["metrics"]["trainable_fraction"],
                   "trained_heads_fraction": rs[0]["metrics"].get("trained_heads_fraction", 1.0)}
    # McNemar, CE + Align CKA against each other method, pooled over seeds (every run is tested on the same
    # prompts, so seed s of one method pairs with seed s of the other), Holm-corrected over the family
    tests = {}
    if "ce+cka" in methods:
        ref = sum((r["correct"] for r in runs["ce+cka"]), [])
        for m in methods:
            if m != "ce+cka":
                tests[f"ce+cka vs {m}"] = mcnemar(ref, sum((r["correct"] for r in runs[m]), []))
        tests["ce+cka vs base"] = mcnemar(ref, b_correct * len(seeds))
        if tests:
            from statsmodels.stats.multitest import multipletests

            for t, p in zip(tests.values(), multipletests([t["p_value"] for t in tests.values()], method="holm")[1]):
                t["p_holm"] = float(p)
    _curves_plot(curves, os.path.join(out, "curves.png"), task_name)
    report = {
        "task": task_name, "teacher": os.path.basename(teacher_dir), "student": os.path.basename(student_dir),
        "conditions": {"matching_direction": direction, "steps": steps, "batch_size": batch_size, "lr": lr,
                       "lambda": lam, "n_train": n_train, "n_eval": n_eval, "n_discovery": n_discovery,
                       "seeds": list(seeds),
                       "torch": torch.__version__, "threads": torch.get_num_threads()},
        "circuit": circuit.to_json(), "matching": matching.to_json(), "rows": rows, "mcnemar": tests,
        "wall_time_s": round(time.time() - t_start, 1),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    summary = format_table(report)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    return report


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def _row(label, correct, circ) -> dict:
    return {"label": label, "full": sum(correct) / len(correct), "circuit": sum(circ) / len(circ)}


def format_table(report: dict) -> str:
    """The paper's Table 1/2 shape as markdown."""
    r, c = report["rows"], report["conditions"]
    lines = [f"## {report['task']}: full / circuit accuracy (test split, n={c['n_eval']}, seeds {c['seeds']})", "",
             "| Setting | Full | Circuit | Trainable params | Trained heads |", "|---|---|---|---|---|"]
    for row in r.values():
        tp = f"{row['trainable_fraction']:.1%}" if "trainable_fraction" in row else "-"
        th = f"{row['trained_heads_fraction']:.0%}" if "trained_heads_fraction" in row else "-"
        lines.append(f"| {row['label']} | {row['full']:.3f} | {row['circuit']:.3f} | {tp} | {th} |")
    if report["mcnemar"]:
        lines += ["", f"McNemar (exact, pooled over {len(c['seeds'])} seed(s) on the same test prompts, "
                  "Holm-corrected; b = only CE + Align CKA right, c = only the other right): " + "; ".join(
                      f"{k}: p={v['p_value']:.3g}, Holm {v['p_holm']:.3g} (b={v['b']}, c={v['c']})"
                      for k, v in report["mcnemar"].items())]
    lines += ["", f"Conditions: matching {c.get('matching_direction', '-')}, {c['steps']} steps, "
              f"batch {c['batch_size']}, lr {c['lr']}, lambda {c['lambda']}, "
              f"{c['n_train']} training prompts, torch {c['torch']}, {c['threads']} threads; "
              f"wall time {report['wall_time_s']} s."]
    return "\n".join(lines)


def _matching_plot(cka, t_heads, s_all, matching, path):
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(s_all) + 2), max(2.5, 0.4 * len(t_heads) + 1.5)))
    im = ax.imshow(np.asarray(cka), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(t_heads)), [f"{h} @{role}" for h, role, _ in t_heads])
    ax.set_xticks(range(len(s_all)), [str(h) for h in s_all], rotation=90, fontsize=7)
    rows = [(h, role) for h, role, _ in t_heads]  # a head may sit in the circuit at several roles
    for p in matching.pairs:
        i = rows.index((p.teacher, p.position))
        j = s_all.index(p.student)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("student head")
    ax.set_ylabel("teacher circuit head")
    ax.set_title("CKA teacher x student (red: ablation matching)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves_plot(curves: dict, path: str, task: str):
    series = {}
    for m, log in curves.items():
        series.update(loss_series(log, prefix=f"{m}: "))
    if series:
        line_plot(series, path, ylabel="loss", title=f"{task}: training curves (first seed)")

"""``fastcd demo``: the paper's Table 1/2 at small scale, from the shipped checkpoints, on CPU.

A thin :func:`fastcd.experiment.run_experiment` over a shipped config (``fastcd/demo_configs/TASK.yaml``): the
teacher's circuit, its matching into the student base, every distillation method from the same student base and
budget, full and circuit accuracy per method, the teacher and the untrained student, the share of trainable
parameters and heads, and the tests, all as any experiment writes them (``report.json``, ``summary.md``,
``accuracy.png``, ``curves.png``). The demo adds three figures of its circuit and matching:
``teacher_circuit.png``, ``student_heads.png`` and ``matching.png``.
"""

from __future__ import annotations

import os
from importlib.resources import files

import torch

from fastcd.artifacts import Circuit, Matching
from fastcd.config import TEST_SEED
from fastcd.discover import make_source, patch_heads_batched
from fastcd.errors import UsageError
from fastcd.experiment import run_experiment
from fastcd.experiment_config import ExperimentConfig
from fastcd.loading import load_model, load_tokenizer
from fastcd.match import MatchInputs, cka_scores
from fastcd.plots import cka_matrix_plot, head_heatmaps, matching_cells
from fastcd.pretrain import shipped_checkpoint
from fastcd.report import format_report
from fastcd.tasks import EntityTracking, TheoryOfMind

TASKS = ("entity-tracking", "tom")
FIGURES = ("teacher_circuit.png", "student_heads.png", "matching.png")


def demo_config_path(task: str) -> str:
    """The shipped config of the demo for ``task``."""
    if task not in TASKS:
        raise UsageError(f"task must be one of {list(TASKS)}, got {task!r}")
    return str(files("fastcd") / "demo_configs" / f"{task}.yaml")


def demo_config(task: str = "entity-tracking", **overrides) -> ExperimentConfig:
    """The shipped config with ``overrides`` (fields of :class:`ExperimentConfig`; None keeps the shipped value);
    a shipped checkpoint's name (``et-teacher``) becomes its directory. Validated: a bad value fails here, before
    any model loads."""
    import yaml

    with open(demo_config_path(task), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data.update({k: v for k, v in overrides.items() if v is not None})
    for role in ("teacher", "student"):
        if data[role] in ("et-teacher", "et-student", "tom-teacher", "tom-student"):
            data[role] = shipped_checkpoint(data[role])
    return ExperimentConfig.from_dict(data)


def run_demo(task: str = "entity-tracking", *, out: str = "fastcd-demo", overwrite: bool = False,
             progress: bool = True, **overrides) -> dict:
    """Run (or resume) the demo into ``out``; returns the experiment's report (also ``out/report.json``).
    ``overrides``: experiment fields to change (``steps=20``, ``seeds=[0, 1, 2]``, ``methods=[...]``)."""
    cfg = demo_config(task, **overrides)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"out: {out!r} exists and is not a directory")
    report = run_experiment(cfg, out, overwrite=overwrite, progress=progress)
    circuit_figures(cfg, out)
    return report


def circuit_figures(cfg: ExperimentConfig, out: str) -> list[str]:
    """``teacher_circuit.png`` (each teacher head's effect under mean ablation at each circuit role, the circuit
    outlined), ``student_heads.png`` (the same for the untrained student, the matched heads outlined) and
    ``matching.png`` (teacher unit x student head CKA, the matching outlined), from ``out/shared``."""
    shared = os.path.join(out, "shared")
    circuit = Circuit.load(os.path.join(shared, "circuit.json"))
    matching = Matching.load(os.path.join(shared, f"matching_{cfg.values('matching')[0]}.json"))
    task = EntityTracking(n_boxes=cfg.n_boxes) if cfg.task == "entity-tracking" else TheoryOfMind()
    tok = load_tokenizer(cfg.student, "student")
    teacher, student = load_model(cfg.teacher, what="teacher"), load_model(cfg.student, what="student")
    pairs = task.pairs(cfg.n_discovery, seed=TEST_SEED, split="val")  # the experiment's discovery prompts
    clean, corrupt = task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)
    roles = list(dict.fromkeys(c.position if c.position != "all" else "last" for c in circuit.heads))
    paths = [os.path.join(out, f) for f in FIGURES]
    with torch.no_grad():
        for model, path, who, marked, kw in (
                (teacher, paths[0], "teacher", lambda r: [c.head for c in circuit.heads if c.position in (r, "all")],
                 {}),
                # the untrained student gives the answer a tiny probability: the absolute change in log p reads
                (student, paths[1], "student base", lambda r: [p.student for p in matching.pairs if p.position == r],
                 {"metric": "logprob", "relative": False})):
            src = make_source(model, clean, "mean", corrupt=corrupt)
            panels = {f"{who} @{r}": patch_heads_batched(model, clean, src, position=r, **kw).scores for r in roles}
            head_heatmaps(panels, path, title=f"{cfg.task}: {who} heads under mean ablation",
                          marked={f"{who} @{r}": marked(r) for r in roles},
                          marked_label="circuit heads" if who == "teacher" else "matched student heads", **kw)
        cka, t_heads, s_all = cka_scores(MatchInputs(teacher, student, circuit, clean, clean, corrupt, corrupt))
    units = [(h, role) for h, role, _ in t_heads]  # a head may sit in the circuit at several roles
    cka_matrix_plot(cka, [f"{h} @{role}" for h, role in units], [str(h) for h in s_all], paths[2],
                    chosen_label=f"{matching.method} matching", chosen=matching_cells(units, s_all, matching))
    return paths


def format_demo(report: dict, out: str) -> str:
    """What ``fastcd demo`` prints: the experiment's summary and where it wrote."""
    written = sorted(f for f in os.listdir(out) if f.endswith((".json", ".md", ".png")))
    return format_report(report) + f"\nreport: {out}/ ({', '.join(written)})"

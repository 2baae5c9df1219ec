"""A run's folder: the model card written beside a distilled student (``OUT/student/README.md``: what was distilled
from what, on which task, which heads trained and how, the metrics, and the command that made it) and
:func:`save_result`, which writes the whole folder."""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import asdict

from fastcd import __version__
from fastcd.adapters import save_adapter
from fastcd.io import atomic_target, write_json_atomic
from fastcd.loading import ModelRef
from fastcd.plots import curves_plot
from fastcd.resume import cfg_key


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _acc(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _circ(tc: dict | None) -> str:
    return "-" if not tc else f"{tc['circuit_accuracy']:.3f} (faithfulness {tc['faithfulness']:.2f})"


def _circuit_note(tc: dict | None) -> list[str]:
    if not tc:
        return []
    sd = f" (SD {tc['random_circuit_sd']:.3f})" if tc.get("random_circuit_sd") is not None else ""
    return [f"Teacher circuit: {tc['circuit_size']} of {tc['n_heads_total']} heads, {tc['protocol']} mean ablation, "
            f"{tc['n_prompts']} {tc['split']} prompts; {tc['n_random']} random circuits of its size and roles: "
            f"{tc['random_circuit_accuracy']:.3f}{sd}.", ""]


def model_card(result, cfg, *, task=None, teacher: str | None = None, student: str | None = None,
               command: str | None = None) -> str:
    """Markdown with a YAML header (Hugging Face model-card style) for a :class:`fastcd.pipeline.DistillResult`."""

    m = result.metrics
    task_name = getattr(task, "name", None) or "task"
    task_desc = repr(task) if task is not None else task_name
    lines = ["---", "library_name: transformers", "tags:", "- fastcd", "- circuit-distillation",
             f"- {task_name}", "---", "",
             f"# {student or 'student'} distilled from {teacher or 'a teacher cache'} with fastcd", "",
             f"Circuit distillation (Wadhwa, Amir, Wallace 2025) with fastcd {__version__}, method "
             f"`{cfg.method}`, on {task_desc}, {datetime.date.today().isoformat()}.", "",
             "## Result (one fixed test set of "
             f"{cfg.n_eval} prompts; accuracy = the argmax next token is the answer)", "",
             "| | accuracy | circuit accuracy |", "|---|---|---|",
             f"| teacher | {_acc(m.get('teacher_accuracy'))} | {_circ(m.get('teacher_circuit'))} |",
             f"| student before | {_acc(m.get('student_base_accuracy'))} | - |",
             f"| student after | {_acc(m.get('student_accuracy'))} | {_acc(m.get('student_circuit_accuracy'))} |",
             "", *_circuit_note(m.get("teacher_circuit")),
             f"Trainable: {m.get('trainable_params', 0):,} parameters ({_pct(m.get('trainable_fraction'))} of the "
             f"student), {m.get('trained_heads', '-')} heads ({_pct(m.get('trained_heads_fraction'))}).", ""]
    if result.circuit is not None and result.circuit.heads:
        lines += ["## Teacher circuit", "", "```", str(result.circuit), "```", ""]
    if result.matching is not None:
        lines += ["## Matching (teacher head -> trained student head, at a position role)", "", "```",
                  str(result.matching), "```", ""]
        nf = result.matching.meta.get("noise_floor")
        if nf and nf.get("pairs_within_null"):
            lines += [f"Caveat: {nf['pairs_within_null']} of {len(result.matching)} pairs score at or below "
                      f"{nf['null_p95']:.2f}, what two independent random heads reach at the matching's m = {nf['m']} "
                      f"(biased CKA, null mean {nf['null_mean']:.2f}): those pairs are not distinguishable from "
                      "chance.", ""]
    lam = m.get("lam_effective")
    lines += ["## Training", "",
              f"{m.get('steps_done', cfg.steps)} of {cfg.steps} steps"
              + (f" (early stop at step {m['stopped_early']})" if m.get("stopped_early") else "")
              + f", batch {cfg.batch_size}, lr {cfg.lr} ({cfg.lr_scheduler}, warmup "
              f"{cfg.warmup_steps or cfg.warmup_ratio}),"
              f" lambda {lam if lam is not None else '-'}, CKA estimator {cfg.cka_estimator}, seed {cfg.seed}, "
              f"{cfg.n_train} training prompts, k/v slices {cfg.kv}.", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    lines += ["<details><summary>Full configuration</summary>", "", "```json"]
    lines += [json.dumps(asdict(cfg), indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


__all__ = ["model_card"]


def _name_of(x) -> str | None:
    if x is None:
        return None
    if isinstance(x, ModelRef):
        return x.name
    if isinstance(x, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(x)))
    return getattr(getattr(x, "config", None), "_name_or_path", None) or type(x).__name__


def _command_line() -> str:
    """The command that made the run, for the model card: the CLI's own arguments, or the script that called
    ``fastcd.distill()`` (no path of the machine: the script's file name)."""
    prog = sys.argv[0] if sys.argv else ""
    if prog in ("", "-", "-c"):
        return "fastcd.distill(...) from an interactive session or `python -c`"
    name = os.path.basename(prog)
    if name in ("fastcd", "__main__.py", "cli.py"):
        return " ".join(["fastcd"] + sys.argv[1:])
    return " ".join(["python", name] + sys.argv[1:]) + "   # calls fastcd.distill(...)"


def save_result(result, cfg, tokenizer=None, *, task=None, teacher: str | None = None,
                student: str | None = None, command: str | None = None) -> str:
    """``OUT/student`` (save_pretrained, with a model card ``README.md``), ``OUT/adapter``, ``OUT/matching.json``,
    ``OUT/circuit.json``, ``OUT/log.json``, ``OUT/curves.png`` (when the log has loss values): the same files from
    the API and the CLI."""
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    with atomic_target(os.path.join(out, "student"), directory=True) as tmp:
        result.student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(result, cfg, task=task, teacher=teacher, student=student, command=command))
    if result.matching is not None:
        result.matching.save(os.path.join(out, "matching.json"))
        if not cfg.spec.full_model:  # the trained slices alone: fastcd.adapters.load_adapted(base, OUT/adapter)
            save_adapter(result, os.path.join(out, "adapter"), kv=cfg.kv, base=student)
    if result.circuit is not None and result.circuit.heads:
        result.circuit.save(os.path.join(out, "circuit.json"))
    write_json_atomic({"config": cfg_key(cfg), "metrics": result.metrics, "log": result.log},
                      os.path.join(out, "log.json"))

    curves_plot({cfg.method: result.log}, os.path.join(out, "curves.png"),
                title=f"{getattr(task, 'name', 'task')}: {cfg.method} training curves")
    return out

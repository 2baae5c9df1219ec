"""``fastcd demo``: the paper's Table 1/2 at small scale, from the shipped checkpoints, on CPU.

Discovery in the teacher, matching into the student base, every distillation method from the same student
base and budget, then full and circuit accuracy per method, the teacher and the untrained student, the share
of trainable parameters and heads, and McNemar p-values. Writes a report folder: ``report.json``,
``summary.md``, ``teacher_circuit.png``, ``student_heads.png``, ``matching.png``, ``curves.png``.

Everything that does not change between runs is done once: each model loads once, every prompt set is tokenised
once (batched), the teacher runs once per seed over the training prompts (its labels, KD logits and circuit z
held in memory) and once over the test prompts; each run resets the student to its base weights and goes
through the same training loop as :func:`fastcd.distill` (:func:`fastcd.training.train_loop`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch

from fastcd.cli_args import DemoArgs
from fastcd.config import METHOD_SPECS, METHODS, TEST_SEED, DistillConfig
from fastcd.discover import make_source, patch_heads_batched
from fastcd.discover_policy import default_circuit
from fastcd.errors import UsageError
from fastcd.hooks import mean_z
from fastcd.loading import load_model, load_tokenizer
from fastcd.match import MatchInputs, cka_scores, match, match_random
from fastcd.metrics import accuracy_per_example, circuit_correct
from fastcd.plots import cka_matrix_plot, curves_plot, head_heatmaps, matching_cells
from fastcd.pretrain import shipped_checkpoint
from fastcd.stats import holm, mcnemar
from fastcd.tasks import EntityTracking, TheoryOfMind
from fastcd.teacher_cache import MemoryCache, teacher_signals
from fastcd.training import train_and_evaluate

CHECKPOINTS = {"entity-tracking": ("et-teacher", "et-student"), "tom": ("tom-teacher", "tom-student")}


def _configs(methods, seed, **kw) -> dict:
    """Each method's :class:`DistillConfig` (lambda only where CE and CKA are weighed against each other)."""
    lam = kw.pop("lam")
    return {m: DistillConfig(method=m, seed=seed, progress=False, log_every=5, kd_weight=1.0 if m == "kd" else 0.0,
                             lam=lam if METHOD_SPECS[m].uses_ce and METHOD_SPECS[m].uses_cka else 1.0,
                             **kw).validate() for m in methods}


_D = DemoArgs()  # the defaults live in one place: fastcd.cli_args.DemoArgs (the CLI's flags and this function)


def run_demo(task_name: str = _D.task, *, out: str = _D.out, teacher: str | None = _D.teacher,
             student: str | None = _D.student, steps: int = _D.steps, batch_size: int = _D.batch_size,
             lr: float = _D.lr, lam=_D.lam, n_train: int = _D.n_train, n_eval: int = _D.n_eval,
             n_discovery: int = _D.n_discovery, seeds=tuple(_D.seeds), methods=tuple(_D.methods),
             direction: str = _D.direction, progress: bool = _D.progress) -> dict:
    """Run the demo; returns the report dict (also written to ``out/report.json``). Defaults:
    :class:`fastcd.cli_args.DemoArgs`."""
    from tqdm import tqdm

    t_start = time.time()
    if task_name not in CHECKPOINTS:
        raise UsageError(f"task must be one of {sorted(CHECKPOINTS)}, got {task_name!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"methods must be among {METHODS}, got {bad}")
    seeds = tuple(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise UsageError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must not repeat, got {seeds!r}")
    if n_discovery < 2:
        raise UsageError(f"n_discovery must be an integer >= 2, got {n_discovery!r}")
    kw = dict(steps=steps, batch_size=batch_size, lr=lr, lam=lam, n_train=n_train, n_eval=n_eval)
    _configs(methods, 0, **kw)  # every run's settings, checked before any model loads or any figure is written
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"out: {out!r} exists and is not a directory")
    t_name, s_name = CHECKPOINTS[task_name]
    teacher_dir = teacher or shipped_checkpoint(t_name)
    student_dir = student or shipped_checkpoint(s_name)
    task = EntityTracking(n_boxes=7) if task_name == "entity-tracking" else TheoryOfMind()
    tok = load_tokenizer(student_dir, "student")
    t_model = load_model(teacher_dir, what="teacher")
    base = load_model(student_dir, what="student")
    os.makedirs(out, exist_ok=True)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    timings = {}

    # 1. teacher circuit (the default discovery policy) --------------------------------------------------
    t0 = time.time()
    dpairs = task.pairs(n_discovery, seed=0, split="val")
    t_clean = task.encode([p.clean for p in dpairs], tok)
    t_corrupt = task.encode([p.corrupt for p in dpairs], tok)
    circuit, panels, marks = default_circuit(t_model, task, t_clean, t_corrupt)
    head_heatmaps({f"teacher {k}": v for k, v in panels.items()}, os.path.join(out, "teacher_circuit.png"),
                  title=f"{task_name}: teacher heads under mean ablation",
                  marked={f"teacher {k}": v for k, v in marks.items()})
    # 2. matching into the student base -------------------------------------------------------------------
    inp = MatchInputs(t_model, base, circuit, t_clean, t_clean, t_corrupt, t_corrupt)
    # The paper's rule (Eq. 5): each of the K most ablation-sensitive student heads maps to the teacher
    # circuit unit with the nearest drop. direction="teacher_to_student" instead gives every unit (head, role)
    # its nearest student head, so that every role has a partner (both measured in docs/RESULTS.md).
    matching = match(inp, "ablation", direction=direction)
    src_s = make_source(base, t_clean, "mean", corrupt=t_corrupt)
    roles = [c.position for c in circuit.heads]
    panels = {f"student @{r}": patch_heads_batched(base, t_clean, src_s, metric="logprob", relative=False,
                                                   position=r).scores for r in dict.fromkeys(roles)}
    # the untrained student gives the answer a tiny probability: absolute change in log p reads right there
    head_heatmaps(panels, os.path.join(out, "student_heads.png"), metric="logprob", relative=False,
                  marked_label="matched student heads",
                  title=f"{task_name}: student base heads under mean ablation",
                  marked={f"student @{r}": [p.student for p in matching.pairs if p.position == r]
                          for r in dict.fromkeys(roles)})
    cka, t_heads, s_all = cka_scores(inp)
    units = [(h, role) for h, role, _ in t_heads]  # a head may sit in the circuit at several roles
    cka_matrix_plot(cka, [f"{h} @{role}" for h, role in units], [str(h) for h in s_all],
                    os.path.join(out, "matching.png"), chosen_label="ablation matching",
                    chosen=matching_cells(units, s_all, matching))
    timings["circuit_and_matching_s"] = round(time.time() - t0, 1)

    # 3. the fixed test set, the teacher and the untrained student -----------------------------------------
    test_pairs = task.pairs(n_eval, seed=TEST_SEED, split="test")
    s_test = task.encode([p.clean for p in test_pairs], tok)
    s_ref = task.encode([p.corrupt for p in test_pairs], tok)
    live_s = [(p.student, p.position) for p in matching.pairs]
    t_correct = accuracy_per_example(t_model, s_test)
    t_circ = circuit_correct(t_model, s_test, mean_z(t_model, s_ref.input_ids), [(c.head, c.position)
                                                                                for c in circuit.heads])
    b_correct = accuracy_per_example(base, s_test)
    b_circ = circuit_correct(base, s_test, mean_z(base, s_ref.input_ids), live_s)
    rows = {"teacher": _row("Teacher", t_correct, t_circ), "base": _row("Student base (untrained)", b_correct, b_circ)}

    # 4. every method, every seed: shared prompts and teacher signals per seed -------------------------------
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    curves = {}
    bar = tqdm(total=len(seeds) * len(methods), disable=not progress, desc="demo: distillation runs")
    t0 = time.time()
    for seed in seeds:
        s_train = task.encode(task.generate(n_train, seed=seed, split="train"), tok)
        cache = MemoryCache(teacher_signals(t_model, s_train, matching, logits="kd" in methods))
        for method, cfg in _configs(methods, seed, **kw).items():
            spec = METHOD_SPECS[method]
            base.load_state_dict(base_state)
            m_run = match_random(matching, base, seed=seed) if spec.random_students else matching
            torch.manual_seed(seed)
            run = train_and_evaluate(base, m_run, cfg, seed, s_train, s_test, cache=cache, s_ref=s_ref)
            metrics = {"student_accuracy": run.accuracy, "student_circuit_accuracy": run.circuit_accuracy,
                       "trainable_fraction": run.trainable_fraction,
                       "trained_heads_fraction": run.trained_heads_fraction}
            runs[method].append({"seed": seed, "metrics": metrics, "correct": run.correct,
                                 "circuit_correct": run.circuit_correct})
            if seed == seeds[0]:
                curves[method] = run.log
            bar.update(1)
    bar.close()
    base.load_state_dict(base_state)
    timings["runs_s"] = round(time.time() - t0, 1)
    for m in methods:
        rs = runs[m]
        acc = [r["metrics"]["student_accuracy"] for r in rs]
        circ = [r["metrics"]["student_circuit_accuracy"] for r in rs]
        rows[m] = {"label": METHOD_SPECS[m].label, "full": sum(acc) / len(acc), "circuit": sum(circ) / len(circ),
                   "full_per_seed": acc, "circuit_per_seed": circ,
                   "trainable_fraction": rs[0]["metrics"]["trainable_fraction"],
                   "trained_heads_fraction": rs[0]["metrics"]["trained_heads_fraction"]}
    # McNemar, CE + Align CKA against each other method, pooled over seeds (every run is tested on the same
    # prompts, so seed s of one method pairs with seed s of the other), Holm-corrected over the family
    tests = {}
    if "ce+cka" in methods:
        ref = sum((r["correct"] for r in runs["ce+cka"]), [])
        for m in methods:
            if m != "ce+cka":
                tests[f"ce+cka vs {m}"] = mcnemar(ref, sum((r["correct"] for r in runs[m]), []))
        tests["ce+cka vs base"] = mcnemar(ref, b_correct * len(seeds))
        for t, p in zip(tests.values(), holm(t["p_value"] for t in tests.values())):
            t["p_holm"] = p
    curves_plot(curves, os.path.join(out, "curves.png"), title=f"{task_name}: training curves (seed {seeds[0]})")
    report = {
        "task": task_name, "teacher": os.path.basename(teacher_dir), "student": os.path.basename(student_dir),
        "conditions": {"matching_direction": direction, "steps": steps, "batch_size": batch_size, "lr": lr,
                       "lambda": lam, "n_train": n_train, "n_eval": n_eval, "n_discovery": n_discovery,
                       "seeds": list(seeds),
                       "torch": torch.__version__, "threads": torch.get_num_threads()},
        "circuit": circuit.to_json(), "matching": matching.to_json(), "rows": rows, "mcnemar": tests,
        "wall_time_s": round(time.time() - t_start, 1), "timings": timings,
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
                  "Holm-corrected; a_only = only CE + Align CKA right, b_only = only the other right): " + "; ".join(
                      f"{k}: p={v['p_value']:.3g}, Holm {v['p_holm']:.3g} (a_only={v['a_only']}, b_only={v['b_only']})"
                      for k, v in report["mcnemar"].items())]
    lines += ["", f"Conditions: matching {c.get('matching_direction', '-')}, {c['steps']} steps, "
              f"batch {c['batch_size']}, lr {c['lr']}, lambda {c['lambda']}, "
              f"{c['n_train']} training prompts, torch {c['torch']}, {c['threads']} threads; "
              f"wall time {report['wall_time_s']} s."]
    return "\n".join(lines)

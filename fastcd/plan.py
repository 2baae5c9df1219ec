"""The cost plan of ``fastcd experiment``: what the work still to do will cost on this machine.

The work is counted from the config and what ``OUT`` already holds (runs done, shared records made): runs,
optimizer steps, teacher and student forwards per stage. A short calibration on this machine, in the experiment's
precision, times a teacher and a student forward per prompt and one ce+cka step at each batch size of the grid;
the prediction is count x unit time per stage, and the peak memory is what the calibration held (both models)
plus the teacher cache. ``fastcd experiment CONFIG --plan`` prints it and stops; every run of the experiment
prints it first and keeps it in ``OUT/plan.json``, and the report puts the measured times beside it.
Discovery and matching are counted in prompts but not timed (their cost depends on the method; see
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch

from fastcd.config import METHOD_SPECS

CALIBRATION_PROMPTS = 16
CIRCUIT_EVAL_PROMPTS = 128  # the teacher circuit's faithfulness: the first 128 test prompts
CIRCUIT_EVAL_PASSES = 12  # full model, the circuit, 10 random circuits (fastcd.metrics.faithfulness_record)


def count_work(cfg, done_keys: set, need: dict, n_pool: int, records: dict | None = None) -> dict:
    """Runs, steps and forwards of what is left to do; ``need`` says which shared records are still missing. With
    ``select_lr``, the seeds' runs whose lr is not chosen yet count too (``records``: the finished runs by key)."""
    from fastcd.experiment_config import chosen_lrs

    specs = [s for s in cfg.planned_specs(chosen_lrs(cfg, records or {})) if s["key"] not in done_keys]
    by_batch: dict[int, int] = {}
    eval_prompts = 0
    for s in specs:
        st = s["setting"]
        by_batch[st["batch_size"]] = by_batch.get(st["batch_size"], 0) + st["steps"]
        circuit = cfg.circuit_accuracy and not METHOD_SPECS[s["method"]].full_model
        eval_prompts += cfg.n_test * (2 if circuit else 1)  # accuracy, and circuit accuracy with the means
        if cfg.eval_every:
            eval_prompts += cfg.n_val * (st["steps"] // cfg.eval_every)
    teacher = ((n_pool if need.get("cache") else 0) + (cfg.n_test if need.get("teacher_eval") else 0)
               + (CIRCUIT_EVAL_PASSES * min(cfg.n_test, CIRCUIT_EVAL_PROMPTS) if need.get("circuit_eval") else 0))
    student_base = (2 * cfg.n_test if cfg.circuit_accuracy else cfg.n_test) if specs else 0
    return {"runs": len(specs), "steps": sum(by_batch.values()), "steps_by_batch_size": by_batch,
            "teacher_forward_prompts": teacher, "student_forward_prompts": eval_prompts + student_base,
            "discovery_prompts": cfg.n_discovery if need.get("circuit") else 0,
            "matching_prompts": cfg.n_discovery if need.get("matchings") else 0}


def _per_prompt(model, batch, amp) -> float:
    from fastcd.metrics import accuracy_per_example

    with torch.no_grad(), amp():
        accuracy_per_example(model, batch.index(range(min(2, len(batch)))))  # warm-up
        t = time.perf_counter()
        accuracy_per_example(model, batch, batch_size=len(batch))
    return (time.perf_counter() - t) / len(batch)


def time_steps(student, matching, batch, cache, mixed_precision: str, steps: int, lr: float = 1e-6):
    """Mean seconds of ``steps`` ce+cka steps of ``fastcd.training.train_loop`` on ``batch`` (all of it one batch,
    teacher signals from ``cache``) after one warm-up step; also the last log row and the trainable parameters.
    The slices are merged back into ``student`` (its weights change by the steps taken)."""
    from fastcd.config import DistillConfig
    from fastcd.distillation import CircuitDistiller
    from fastcd.trainable import merge
    from fastcd.training import make_optimizer, train_loop

    cfg = DistillConfig(method="ce+cka", batch_size=len(batch), n_train=len(batch), steps=steps + 1, lr=lr,
                        mixed_precision=mixed_precision, progress=False, log_every=1)
    cd = CircuitDistiller(student, matching, config=cfg)
    opt, _ = make_optimizer(cd, cfg)
    stamps = []

    def stamp(step, log):
        stamps.append(time.perf_counter())

    try:
        log = train_loop(cd, opt, 0, cfg, batch, None, cache, on_step=stamp)
    finally:
        merge(cd.slices)
    return (stamps[-1] - stamps[0]) / steps, log[-1], cd.n_trainable


def calibrate(teacher, student, t_batch, s_batch, batch_sizes, n_pairs: int, amp, mixed_precision: str) -> dict:
    """Seconds per teacher / student forward prompt (batches of CALIBRATION_PROMPTS) and per ce+cka step at each
    batch size (``n_pairs`` heads of the student matched to heads of the teacher at the last token, teacher z from
    its own forward); the student's weights are restored afterwards."""
    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head, get_adapter
    from fastcd.teacher_cache import MemoryCache, teacher_signals

    n = CALIBRATION_PROMPTS
    out = {"teacher_s_per_prompt": _per_prompt(teacher, t_batch.index(range(min(n, len(t_batch)))), amp),
           "student_s_per_prompt": _per_prompt(student, s_batch.index(range(min(n, len(s_batch)))), amp),
           "step_s": {}}
    ts, ss = get_adapter(teacher).spec, get_adapter(student).spec
    k = max(1, min(n_pairs, ts.n_total_heads, ss.n_total_heads))
    pairs = [Pair(Head(i % ts.n_layers, i // ts.n_layers % ts.n_heads),
                  Head(i % ss.n_layers, i // ss.n_layers % ss.n_heads), "last") for i in range(k)]
    matching = Matching(pairs, "calibration")
    state = {k_: v.detach().clone() for k_, v in student.state_dict().items()}
    for b in sorted(batch_sizes):
        m = min(b, len(s_batch))
        with torch.no_grad(), amp():
            cache = MemoryCache(teacher_signals(teacher, t_batch.index(range(m)), matching, batch_size=m))
        sec, _, _ = time_steps(student, matching, s_batch.index(range(m)), cache, mixed_precision, steps=2)
        out["step_s"][b] = sec * b / m  # a grid batch larger than the calibration prompts: scaled
    student.load_state_dict(state)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def predict(work: dict, cal: dict, cache_gib: float) -> dict:
    """Predicted seconds per stage and the peak memory."""
    train = sum(cal["step_s"][b] * n for b, n in work["steps_by_batch_size"].items())
    stages = {"teacher forwards (cache, teacher evaluation, circuit faithfulness)": work["teacher_forward_prompts"]
              * cal["teacher_s_per_prompt"],
              "student evaluation (base, every run, validation)": work["student_forward_prompts"]
              * cal["student_s_per_prompt"],
              "training steps": train}
    return {"seconds": {k: round(v, 1) for k, v in stages.items()}, "total_seconds": round(sum(stages.values()), 1),
            "peak_gib": round(cal["peak_rss_gib"] + cache_gib, 2)}


def format_plan(plan: dict) -> list[str]:
    w, p = plan["work"], plan["predicted"]
    lines = [f"plan: {w['runs']} runs to do, {w['steps']} optimizer steps, {w['teacher_forward_prompts']} teacher "
             f"and {w['student_forward_prompts']} student forward prompts (precision {plan['precision']}); "
             f"predicted {p['total_seconds'] / 60:.1f} min, peak {p['peak_gib']:.1f} GiB"]
    lines += [f"plan:   {k}: {v / 60:.1f} min" for k, v in p["seconds"].items()]
    if w["discovery_prompts"] or w["matching_prompts"]:
        lines.append(f"plan:   not timed: discovery on {w['discovery_prompts']} and matching on "
                     f"{w['matching_prompts']} prompt pairs")
    return lines


def plan_vs_measured(out: str, recs: list[dict]) -> dict | None:
    """The last cost plan (OUT/plan.json) beside the measured time of the runs it planned."""
    path = os.path.join(out, "plan.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        plan = json.load(f)
    if "predicted" not in plan:
        return None
    planned = set(plan.get("planned_runs", []))
    secs = [r.get("seconds", 0.0) for r in recs if r["key"] in planned]
    pred = plan["predicted"]["seconds"]
    return {"made": plan.get("made"), "work": plan["work"], "predicted": plan["predicted"],
            "predicted_runs_seconds": round(sum(v for k, v in pred.items() if not k.startswith("teacher")), 1),
            "measured_runs_seconds": round(sum(secs), 1), "planned_runs_done": len(secs),
            "planned_runs": plan["work"].get("runs", len(planned))}  # with select_lr: also the runs not chosen yet

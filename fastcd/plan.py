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

from fastcd.config import METHOD_SPECS
from fastcd.cost import CALIBRATION_PROMPTS, calibrate, time_steps  # noqa: F401  (the experiment's calibration)
from fastcd.experiment_config import chosen_lrs

CIRCUIT_EVAL_PROMPTS = 128  # the teacher circuit's faithfulness: the first 128 test prompts
LOADED_CPU_SHARE = 0.6  # below it, a calibration ran beside other work (idle: 0.92-0.93; loaded: 0.26-0.45)
CIRCUIT_EVAL_PASSES = 12  # full model, the circuit, 10 random circuits (fastcd.metrics.faithfulness_record)


def count_work(cfg, done_keys: set, need: dict, n_pool: int, records: dict | None = None) -> dict:
    """Runs, steps and forwards of what is left to do; ``need`` says which shared records are still missing. With
    ``select_lr``, the seeds' runs whose lr is not chosen yet count too (``records``: the finished runs by key)."""

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
    share = (plan.get("calibration") or {}).get("cpu_share")
    if share is not None and share < LOADED_CPU_SHARE:
        lines.append(f"plan:   calibrated while other work shared the cores (this process got {share:.0%} of the CPU "
                     "time its threads could use): every time above is too high; on idle cores it predicts better")
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
    if "done_before" in plan:  # every run finished since the plan (with select_lr, the seeds' runs at the chosen lrs
        before = set(plan["done_before"])  # too, whose keys the plan could not know)
        secs = [r.get("seconds", 0.0) for r in recs if r["key"] not in before]
    else:  # a plan made before done_before was recorded: the runs it listed
        secs = [r.get("seconds", 0.0) for r in recs if r["key"] in set(plan.get("planned_runs", []))]
    pred = plan["predicted"]["seconds"]
    return {"made": plan.get("made"), "work": plan["work"], "predicted": plan["predicted"],
            "predicted_runs_seconds": round(sum(v for k, v in pred.items() if not k.startswith("teacher")), 1),
            "measured_runs_seconds": round(sum(secs), 1), "planned_runs_done": len(secs),
            "planned_runs": plan["work"].get("runs", len(plan.get("planned_runs", [])))}  # select_lr: seeds too

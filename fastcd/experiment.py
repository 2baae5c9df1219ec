"""``fastcd experiment CONFIG``: methods x seeds x settings from one YAML/JSON file, sharing what does not change.

Each model is loaded once, every prompt set is tokenised once, the teacher runs once over one training pool
(labels, logits, circuit-head z into an offline cache on disk), the circuit and each matching rule are
computed once, and the untrained student is evaluated once. Every run then resets the student to its base
weights, trains on a seeded subset of the pool and is evaluated on one fixed, seed-independent test set, so
that every comparison is paired on the same prompts. A finished run is appended to ``OUT/runs.jsonl``; a
killed sweep resumes where it stopped, a killed run from its last checkpoint (``OUT/partial``). ``OUT/report.json``,
``OUT/summary.md`` and the figures are rebuilt from the records after every run.

Known-answer mode (``positive_control``): the student is the teacher with chosen circuit heads
re-initialised; matching rule ``identity`` pairs each re-initialised head with its intact self, and the
report says whether the ablation/CKA matching recover that identity.
"""


from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict

import torch

from fastcd.artifacts import Circuit
from fastcd.config import METHOD_SPECS
from fastcd.distillation import make_batch
from fastcd.errors import NotApplicable, UsageError
from fastcd.experiment_config import (
    ExperimentConfig,
    chosen_lrs,
    distill_config_for,
    lr_choices,
)
from fastcd.io import atomic_target, correct_as_bits, experiment_status, read_json, write_json_atomic, write_text_atomic
from fastcd.loading import load_model
from fastcd.plan import calibrate, count_work, format_plan, predict
from fastcd.report import append_record, read_runs, setting_label, write_report
from fastcd.resume import read_checkpoint, restore_training_state, training_state
from fastcd.shared_work import SHARED_RECORDS, SharedWork
from fastcd.teacher_cache import MemoryCache
from fastcd.trainable import (
    reinit_heads,  # noqa: F401  (re-exported)
)
from fastcd.training import BATCH_ORDER, batch_rows, train_and_evaluate


class Experiment:
    """The shared state of one experiment directory; :meth:`run` trains what is missing."""

    def __init__(self, cfg: ExperimentConfig, out: str, *, overwrite: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, out, progress
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"out: {out!r} exists and is not a directory")
        os.makedirs(os.path.join(out, "shared"), exist_ok=True)
        manifest = os.path.join(out, "experiment.json")
        key = cfg.shared_key()
        self.precision = key["precision"]  # "auto" resolved there, from the student's config
        self.work = SharedWork(cfg, out, self.precision, progress)
        experiment_status(f"precision: {self.precision}" + (" (auto)" if cfg.precision == "auto" else ""))
        if os.path.isfile(manifest) and not overwrite:
            with open(manifest) as f:
                recorded = json.load(f)
            old = recorded["shared"]
            diff, where = shared_diff(old, key)
            if diff:
                raise UsageError(f"out: {out!r} holds runs of an experiment that differs in {where}; use "
                                 "another directory, or --overwrite to discard those runs")
        elif overwrite:
            for name in ("runs.jsonl", "report.json", "summary.md"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            import shutil

            shutil.rmtree(os.path.join(out, "shared"), ignore_errors=True)
            shutil.rmtree(os.path.join(out, "partial"), ignore_errors=True)  # runs in flight of the old experiment
            os.makedirs(os.path.join(out, "shared"))
        self.runs_path = os.path.join(out, "runs.jsonl")
        write_json_atomic({"shared": key, "config": asdict(cfg)}, manifest, indent=1)

    # --- records ---------------------------------------------------------------------------------
    def done(self) -> dict[str, dict]:
        return read_runs(self.runs_path)

    def run_one(self, spec: dict) -> dict:
        cfg = self.cfg
        dcfg = distill_config_for(cfg, spec, self.precision)
        s = spec["setting"]
        torch.manual_seed(spec["seed"])
        self.work.student.load_state_dict(self.work.base_state)
        matching = self.work.matching_for(spec)
        per_seed = max(cfg.values("n_train"))  # this seed's own prompts; a smaller n_train takes a seeded subset
        rows = self.work.seed_offset[spec["seed"]] + torch.randperm(
            per_seed, generator=torch.Generator().manual_seed(spec["seed"]))[:s["n_train"]]
        units = None
        if matching is not None and METHOD_SPECS[dcfg.method].uses_cka:
            t_units = matching.meta.get("teacher_units") or [[str(p.teacher), p.position] for p in matching.pairs]
            units = [self.work.unit_index[(h, r)] for h, r in t_units]
        pool = self.work.pool
        view = MemoryCache({"labels": pool["labels"], "logits": pool.get("logits"),
                            "z": None if units is None else pool["z"][units]}, rows)  # this run's rows and units
        s_train = self.work.s_pool.index(rows)
        diag, loop_state, held = {}, {}, {}
        sha = hashlib.sha256(s_train.input_ids.numpy().tobytes()).hexdigest()[:16]
        pairs = None if matching is None else [[str(p.teacher), str(p.student), p.position] for p in matching.pairs]
        targets = None if matching is None else {"pairs": pairs, "teacher_units": matching.meta.get("teacher_units")}
        part = self.partial_path(spec["key"])
        saved = self.read_partial(part, spec["key"], sha, targets)
        before, trained = (saved["seconds"], saved["train_seconds"]) if saved else (0.0, 0.0)  # before a kill

        def prepare(cd, opt, sched):  # a resumed run's state, or the gradient ratio at the start (its own batch)
            held.update(cd=cd, opt=opt, sched=sched)
            if saved is not None:
                restore_training_state(cd, opt, sched, saved)
                diag.update(saved["diag"])
                loop_state.update(saved["loop_state"])
            elif dcfg.method == "ce+cka" and cfg.diagnostics:
                diag.update(cd.gradient_ratio(make_batch(batch_rows(len(s_train), dcfg.batch_size, 0, spec["seed"] + 1),
                                                         s_train, None, view)))

        def checkpoint(step, log):
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < dcfg.steps:
                state = training_state(held["cd"], held["opt"], held["sched"], step=step, log=log, diag=diag,
                                       loop_state=dict(loop_state), key=spec["key"], train_prompts_sha=sha,
                                       matching=targets,
                                       seconds=before + time.time() - t0, train_seconds=trained + time.time() - t0)
                os.makedirs(os.path.dirname(part), exist_ok=True)
                with atomic_target(part) as tmp:
                    torch.save(state, tmp)

        t0 = time.time()
        w = self.work
        run = train_and_evaluate(w.student, matching, dcfg, spec["seed"], s_train, w.s_test, cache=view,
                                 prepare=prepare, eval_batch=w.s_val, desc=f"{spec['method']} seed {spec['seed']}",
                                 means=w.means if cfg.circuit_accuracy else None, amp=w.amp, on_step=checkpoint,
                                 state=loop_state, step=saved["step"] if saved else 0,
                                 log=list(saved["log"]) if saved else None)
        rec = {"key": spec["key"], "method": spec["method"], "seed": spec["seed"], "setting": s,
               "train_prompts_sha": sha,
               "accuracy": run.accuracy, "correct": correct_as_bits(run.correct), "trainable_params": run.n_trainable,
               "trainable_fraction": run.trainable_fraction, "lam_effective": run.lam_effective, "log": run.log,
               "train_seconds": round(run.train_seconds + trained, 1),
               "grad": diag, "trained_heads_fraction": run.trained_heads_fraction}
        if matching is not None:
            rec["trained_heads"] = len(matching.student_heads())
            rec["pairs"] = pairs
            if "teacher_units" in matching.meta:  # the permuted control: where each teacher target was read
                rec["teacher_units"] = matching.meta["teacher_units"]
            if run.circuit_accuracy is not None:  # ablated with the untrained student's means (fixed per experiment)
                rec["circuit_accuracy"] = run.circuit_accuracy
        rec["seconds"] = round(before + time.time() - t0, 1)
        if saved is not None:
            rec["resumed_at_step"] = saved["step"]
        return rec

    # --- a run's checkpoint (OUT/partial/KEY.pt), removed once its record is written ----------------------------
    def partial_path(self, key: str) -> str:
        return os.path.join(self.out, "partial", f"{key}.pt")

    def read_partial(self, path: str, key: str, sha: str, targets: dict | None = None) -> dict | None:
        if not os.path.isfile(path):
            return None
        state = read_checkpoint(path)
        if state.get("key") != key or state.get("train_prompts_sha") != sha or state.get("batch_order") != BATCH_ORDER:
            raise UsageError(f"out: {path} is a checkpoint of another run (its key, training prompts or batch order "
                             "differ); delete it to start that run over")
        if "matching" in state and state["matching"] != targets:  # a run key names the rule, not the pairs it made
            raise UsageError(f"out: {path} is a checkpoint of this run with other matched pairs or teacher targets "
                             f"({state['matching']} there, {targets} now); delete it to start that run over")
        experiment_status(f"run {key}: going on from its checkpoint at step {state['step']}")
        return state

    def specs(self) -> list[dict]:
        """The runs as far as they are known: with ``select_lr``, the seeds' runs appear once their tuning runs
        have chosen an lr."""
        return self.cfg.run_specs(chosen_lrs(self.cfg, self.done()))

    def run(self) -> dict:
        specs = self.specs()
        done = self.done()
        todo = [s for s in specs if s["key"] not in done]
        experiment_status(f"{len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run"
            + (f" (and {self.cfg.n_planned_runs() - len(specs)} after the lr selection)"
               if self.cfg.n_planned_runs() > len(specs) else ""))
        if todo:
            self.plan()
            self.work.prepare()
        while todo:
            self._run_all(todo)
            if self.cfg.select_lr:
                for row in lr_choices(self.cfg, self.done()):
                    if row["chosen"] is not None:
                        experiment_status(
                            f"lr for {row['method']} ({setting_label(row['setting'])}): {row['chosen']:g} (final "
                            "validation accuracy " + ", ".join(f"{g['lr']:g}: {g['val_accuracy']:.3f}"
                                                               for g in row["grid"]) + ")")
            done = self.done()
            todo = [s for s in self.specs() if s["key"] not in done]  # the seeds' runs, once the lr is chosen
        return write_report(self.out, self.cfg)

    def _run_all(self, todo: list[dict]) -> None:
        took = []
        for i, spec in enumerate(todo):
            t0 = time.time()
            try:
                rec = self.run_one(spec)
            except NotApplicable as e:  # recorded, reported, and the sweep goes on
                rec = {"key": spec["key"], "method": spec["method"], "seed": spec["seed"],
                       "setting": spec["setting"], "not_applicable": str(e), "accuracy": float("nan")}
            append_record(self.runs_path, rec)
            if os.path.exists(self.partial_path(spec["key"])):
                os.remove(self.partial_path(spec["key"]))
            took.append(time.time() - t0)
            eta = sum(took) / len(took) * (len(todo) - i - 1)
            experiment_status(f"run {i + 1}/{len(todo)} ({spec['method']}, seed {spec['seed']}, "
                 f"{setting_label(spec['setting'])}): accuracy {rec['accuracy']:.3f} in {took[-1]:.0f} s; "
                 f"ETA {eta / 60:.0f} min")
            write_report(self.out, self.cfg)


    def plan(self) -> dict:
        """Count the work left, calibrate on this machine (both models, in the experiment's precision), predict
        each stage's time and the peak memory; printed, and kept in ``OUT/plan.json`` for the report."""

        cfg = self.cfg
        self.work.prompts()
        need = self.work.need()
        done = set(self.done())
        specs = [s for s in cfg.run_specs(chosen_lrs(cfg, self.done())) if s["key"] not in done]
        plan = {"work": count_work(cfg, done, need, self.work.n_pool, self.done()), "precision": self.precision,
                "planned_runs": [s["key"] for s in specs], "done_before": sorted(done),
                "made": time.strftime("%Y-%m-%d %H:%M:%S")}
        if specs or any(need.values()):
            teacher = load_model(self.work.t_path, dtype=self.work.teacher_dtype())
            student = load_model(self.work.s_path, dtype="float32")
            t0 = time.time()

            n_units = len(Circuit.load(cfg.circuit).heads) if cfg.circuit else cfg.circuit_size  # pairs to align
            cal = calibrate(teacher, student, self.work.t_test, self.work.s_test,
                            {s["setting"]["batch_size"] for s in specs} or {cfg.values("batch_size")[0]},
                            n_units, self.work.amp, "bf16" if self.precision == "bf16" else "no")
            cal["seconds"] = round(time.time() - t0, 1)
            self.work.preloaded = {"teacher": teacher, "student": student}  # prepare() goes on with them
            units = n_units * max(1, len(cfg.positions or []))  # the cached z: float32, [units, pool, d]
            cache_gib = self.work.n_pool * units * self.work.t_spec.d_head * 4 / 2**30
            plan["calibration"], plan["predicted"] = cal, predict(plan["work"], cal, cache_gib)
            for line in format_plan(plan):
                experiment_status(line)
        write_json_atomic(plan, os.path.join(self.out, "plan.json"), indent=1)
        return plan


def shared_diff(old: dict, key: dict) -> tuple[list, str]:
    """The shared fields (:meth:`ExperimentConfig.shared_key`) in which a recorded experiment differs from this one,
    and the words naming them with the first one's two values."""
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if not diff:
        return diff, ""
    hints = {"n_pool": "n_pool is the largest n_train, the pool every run draws its prompts from",
             "pool": "its runs shared one training pool across seeds, where each seed now trains on its own prompts "
                     "(a replication)",
             "precision": "precision: set `precision: float32` in the config to go on in float32"}
    return diff, "".join([f"{diff} (e.g. {diff[0]}: {old.get(diff[0])!r} there, {key.get(diff[0])!r} now)"]
                         + [f" ({hints[k]})" for k in diff if k in hints])


def start_from_records(records: str, out: str, config: ExperimentConfig | None = None) -> list[str]:
    """Start ``out`` from a report folder's records (``records`` holds experiment.json and runs.jsonl, perhaps
    plan.json, with the shared records beside them, as ``docs/*/experiments/NAME`` does), so that the experiment
    runs only what they lack; the teacher cache's tensors are rebuilt. Returns the files copied. ``out`` must hold no
    runs yet; with ``config``, the records must be of an experiment that agrees with it on every shared field.
    Everything is checked before anything is written."""
    if not os.path.isdir(records) or not all(os.path.isfile(os.path.join(records, n))
                                             for n in ("experiment.json", "runs.jsonl")):
        raise UsageError(f"records_from: {records!r} is not a report folder (expected experiment.json and runs.jsonl)")
    if os.path.exists(os.path.join(out, "runs.jsonl")) or os.path.exists(os.path.join(out, "experiment.json")):
        raise UsageError(f"records_from: out={out!r} already holds an experiment; resume it without --records-from")
    if config is not None:
        old = read_json(os.path.join(records, "experiment.json"), "records_from").get("shared", {})
        key = config.shared_key()
        diff, where = shared_diff(old, key)
        if diff:
            raise UsageError(f"records_from: {records!r} holds runs of an experiment that differs from the config in "
                             f"{where}")
    names = [n for n in sorted(os.listdir(records)) if n in SHARED_RECORDS
             or (n.startswith("matching_") and n.endswith(".json"))]
    top = [n for n in ("experiment.json", "runs.jsonl", "plan.json") if os.path.isfile(os.path.join(records, n))]
    texts = {}
    for name, dest in [(n, out) for n in top] + [(n, os.path.join(out, "shared")) for n in names]:
        if name.endswith(".json"):
            read_json(os.path.join(records, name), "records_from")  # a broken record fails here, before any copy
        with open(os.path.join(records, name), encoding="utf-8") as f:
            texts[os.path.join(dest, name)] = f.read()
    os.makedirs(os.path.join(out, "shared"), exist_ok=True)
    return [write_text_atomic(text, path) for path, text in texts.items()]


def run_experiment(config: ExperimentConfig | str | dict, out: str, *, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Run (or resume) an experiment; returns the report (also in ``out/report.json``)."""
    if isinstance(config, str):
        config = ExperimentConfig.from_file(config)
    elif isinstance(config, dict):
        config = ExperimentConfig.from_dict(config)
    return Experiment(config.validate(), out, overwrite=overwrite, progress=progress).run()


__all__ = ["Experiment", "ExperimentConfig", "reinit_heads", "run_experiment", "start_from_records"]

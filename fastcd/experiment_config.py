"""The configuration of ``fastcd experiment``: fields, validation, the grid of runs and each run's
:class:`~fastcd.config.DistillConfig`. Torch-free."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass, field

from fastcd.config import (  # noqa: F401  (TEST_SEED: re-exported)
    ALL_METHODS,
    CKA_ESTIMATORS,
    COMPUTE_PRECISIONS,
    MATCHING_METHODS,
    METHOD_SPECS,
    TEST_SEED,
    parse_lam,
    parse_number,
)
from fastcd.errors import InputFileError, NotApplicable, UsageError  # noqa: F401  (NotApplicable: its old home)
from fastcd.vocab import EXPERIMENT_DISCOVERY

GRID = ("n_train", "lam", "steps", "lr", "batch_size", "matching", "cka_estimator")  # fields that may hold a list
MATCHING_RULES = (*MATCHING_METHODS, "identity")
POOL_SEED = 1234  # seed s trains on prompts drawn with POOL_SEED + s (its own pool)


@dataclass
class ExperimentConfig:
    """One experiment. Fields named in ``GRID`` may be a list: the runs are their product x methods x seeds."""

    teacher: str
    student: str | None = None  # None only with positive_control (the student is the damaged teacher)
    task: str = "entity-tracking"
    n_boxes: int = 5  # training prompts (entity tracking)
    test_boxes: int | None = None  # test prompts (default: n_boxes)
    methods: list = field(default_factory=lambda: ["circuit-ce", "ce+cka", "ce+rand-cka"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    n_train: int | list = 256
    lam: float | str | list = 1.0
    steps: int | list = 100
    lr: float | list = 1e-3
    batch_size: int | list = 16
    matching: str | list = "ablation"
    lam_ratio: float = 1.0
    cka_estimator: str | list = "biased"  # "biased" (the paper's) or "unbiased" (debiased CKA, torch path); a
    # list sweeps both: the runs without a CKA term are shared by every estimator
    full_lr: float | list | None = None  # lr of the full-model methods (full-ce, kd); default: lr. Whole-model
    # AdamW at a head-slice lr (1e-3) wrecks a pretrained model in a few steps; 1e-5 is usual. With select_lr, a
    # list: the full-model methods' grid (as many values as lr: the same tuning budget for every method)
    select_lr: bool = False  # True: lr (a list) is a grid; the tune_seeds run every lr, each method's lr is the
    # one with the best final validation accuracy there (ties: lower validation CE), and the seeds run only it
    tune_seeds: list = field(default_factory=list)  # with select_lr: their runs choose the lr, never tested
    n_test: int = 500
    n_val: int = 0  # >0: validation accuracy every eval_every steps (training curves)
    eval_every: int = 0
    log_every: int = 5
    checkpoint_every: int = 20  # steps between a run's checkpoints (OUT/partial/KEY.pt; a killed run goes on from
    # its last one, exactly); 0: none. Not part of the runs' identity
    n_discovery: int = 32
    discovery: str = "attribution"  # "attribution" (with an exact recheck of the top circuit_size heads), "roles"
    # (position-aware patching at the task's roles) or "auto" (the task's own policy: fastcd.default_circuit)
    circuit_size: int = 12
    circuit: str | None = None  # a circuit JSON to use instead of discovering one
    matching_files: dict = field(default_factory=dict)  # rule -> a matching JSON to use instead of computing it
    circuit_accuracy: bool = True
    positions: list | None = None  # align every matched pair at each of these roles (e.g. [last, box_label])
    positive_control: dict | None = None  # {"reinit": int (top-n circuit heads) | ["L0H2", ...], "seed": 0}
    recovery_rules: list = field(default_factory=lambda: ["ablation", "cka"])
    diagnostics: bool = True
    diagnostics_m: int = 256
    kv: str = "auto"
    teacher_dtype: str | None = None
    micro_batch_size: int = 0  # prompts per forward; the CKA term stays exact over batch_size (gradient caching)
    precision: str = "auto"  # "auto" (bf16 on the CPU for real LMs), "float32" or "bf16": see resolve_precision
    threads: int | None = None

    @classmethod
    def from_file(cls, path: str) -> ExperimentConfig:
        if not os.path.isfile(path):
            raise InputFileError(f"config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
            raise UsageError(f"config: {path!r} is not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}"
                             f": {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UsageError(f"config: {path!r} must hold a mapping of fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"config: unknown field(s) {unknown}; known: {sorted(names)}")
        if "teacher" not in data:
            raise UsageError("config: 'teacher' is required (a model directory, GGUF file or packaged model name)")
        data = dict(data)
        for name in ("lr", "lam", "lam_ratio", "full_lr"):  # parsed as the CLI parses them (config.py)
            v = data.pop(name, None)
            if v is not None:
                parse = parse_lam if name == "lam" else (lambda x, name=name: parse_number(x, name))
                data[name] = [parse(x) for x in v] if isinstance(v, list) else parse(v)
        return cls(**data).validate()

    def values(self, name: str) -> list:
        v = getattr(self, name)
        return list(v) if isinstance(v, (list, tuple)) else [v]

    def validate(self) -> ExperimentConfig:
        from fastcd.tasks.dataset import is_dataset_path
        from fastcd.tasks.registry import TASKS  # at run time: --help reads this module without torch

        if self.task not in TASKS and not is_dataset_path(self.task):
            raise UsageError(f"task must be one of {sorted(TASKS)} or a JSONL file of examples, got {self.task!r}")
        known = ALL_METHODS
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise UsageError(f"methods must be a non-empty list among {known}, got {self.methods!r}")
        if len(set(self.methods)) != len(self.methods):
            raise UsageError(f"methods must not repeat, got {self.methods}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise UsageError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds must not repeat, got {self.seeds}")
        self._check_selection()
        for name in GRID:
            vals = self.values(name)
            if not vals:
                raise UsageError(f"{name} must hold at least one value")
            if len(set(map(str, vals))) != len(vals):
                raise UsageError(f"{name} must not repeat values, got {vals}")
        bs, nt = self.values("batch_size"), self.values("n_train")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in bs + nt) and max(bs) > min(nt):
            raise UsageError(f"batch_size must be <= n_train in every setting (batches are drawn without "
                             f"replacement), got batch_size {max(bs)} with n_train {min(nt)}")
        if self.precision not in COMPUTE_PRECISIONS:
            raise UsageError(f"precision must be one of {COMPUTE_PRECISIONS}, got {self.precision!r}")
        for v in self.values("matching"):
            if v not in MATCHING_RULES:
                raise UsageError(f"matching must be among {MATCHING_RULES}, got {v!r}")
        for v in self.values("cka_estimator"):
            if v not in CKA_ESTIMATORS:
                raise UsageError(f"cka_estimator must be among {CKA_ESTIMATORS}, got {v!r}")
        if "identity" in self.values("matching") and not self.positive_control:
            raise UsageError("matching 'identity' pairs a head with itself: it needs positive_control")
        if self.positive_control is None and self.student is None:
            raise UsageError("student is required (it may be left out only with positive_control)")
        if self.positive_control is not None:
            pc = self.positive_control
            if not isinstance(pc, dict) or set(pc) - {"reinit", "seed"} or "reinit" not in pc:
                raise UsageError(f"positive_control must be {{'reinit': N or [heads], 'seed': S}}, got {pc!r}")
            r = pc["reinit"]
            ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
                isinstance(r, list) and r and all(isinstance(h, str) for h in r))
            if not ok:
                raise UsageError(f"positive_control.reinit must be an integer >= 1 or a list of heads like 'L0H2', "
                                 f"got {r!r}")
        for rule in self.recovery_rules:
            if rule not in ("ablation", "cka", "combined"):
                raise UsageError(f"recovery_rules must be among ('ablation', 'cka', 'combined'), got {rule!r}")
        if self.positions is not None:
            from fastcd.tasks.dataset import DatasetTask

            roles = TASKS[self.task].roles if self.task in TASKS else DatasetTask(self.task).roles
            if not isinstance(self.positions, list) or not self.positions or any(r not in roles
                                                                                 for r in self.positions):
                raise UsageError(f"positions must be a non-empty list of the task's roles {roles}, got "
                                 f"{self.positions!r}")
        if self.discovery not in EXPERIMENT_DISCOVERY:
            raise UsageError(f"discovery must be one of {EXPERIMENT_DISCOVERY}, got {self.discovery!r}")
        if self.discovery == "roles" and self.task_name() != "entity-tracking":
            raise UsageError(f"discovery 'roles' is for entity tracking; use 'attribution' for {self.task_name()}")
        for name, lo in (("n_boxes", 2), ("n_test", 10), ("n_val", 0), ("eval_every", 0), ("log_every", 1),
                         ("checkpoint_every", 0), ("n_discovery", 2), ("circuit_size", 1), ("diagnostics_m", 4)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.test_boxes is not None and (not isinstance(self.test_boxes, int) or self.test_boxes < 2):
            raise UsageError(f"test_boxes must be an integer >= 2, got {self.test_boxes!r}")
        if self.test_boxes is not None and self.task_name() != "entity-tracking":
            raise UsageError(f"test_boxes is for entity tracking (its box count); {self.task_name()} has no boxes")
        if bool(self.n_val) != bool(self.eval_every):
            raise UsageError(f"n_val and eval_every go together (both > 0 for validation curves, or both 0), got "
                             f"n_val={self.n_val}, eval_every={self.eval_every}")
        if not isinstance(self.matching_files, dict):
            raise UsageError("matching_files must map a matching rule to a JSON path")
        for rule, path in self.matching_files.items():
            if rule not in MATCHING_RULES[:3]:
                raise UsageError(f"matching_files: {rule!r} is not a matching rule {MATCHING_RULES[:3]}")
            if not os.path.isfile(path):
                raise InputFileError(f"matching_files[{rule!r}]: no such file {path!r}")
        if self.circuit is not None and not os.path.isfile(self.circuit):
            raise InputFileError(f"circuit: no such file {self.circuit!r}")
        for spec in self.run_specs():  # each run's DistillConfig validates its own fields (steps, lr, lam, ...)
            distill_config_for(self, spec)
        return self

    def shared_key(self) -> dict:
        """The fields every finished run depends on; a rerun into the same OUT must agree on all of them."""
        d = asdict(self)
        for name in GRID + ("methods", "seeds", "threads", "n_val", "eval_every", "log_every", "checkpoint_every",
                            "diagnostics", "diagnostics_m", "full_lr", "select_lr", "tune_seeds", "micro_batch_size"):
            d.pop(name)
        # each seed draws its training rows from its own pool of max(n_train) prompts: a larger n_train in the grid
        # makes other pools, and the finished runs' rows would no longer be a subset of them
        d["n_pool"] = max(self.values("n_train"))
        d["pool"] = "per-seed"
        if self.precision == "auto" and self.teacher:  # what "auto" means for these models (reads their config)
            from fastcd.config import resolve_precision
            from fastcd.loading import spec_of

            d["precision"] = resolve_precision("auto", spec_of(self.student if self.positive_control is None
                                                                else self.teacher).d_model)
        return d

    def task_name(self) -> str:
        """The task's name: ``task`` itself, or the ``task`` field of a JSONL dataset's examples."""
        from fastcd.tasks.dataset import DatasetTask, is_dataset_path

        return DatasetTask(self.task).name if is_dataset_path(self.task) else self.task

    def all_seeds(self) -> list[int]:
        """Every seed that trains (tuning seeds too): each draws its own training prompts into the pool."""
        return sorted(set(self.seeds) | set(self.tune_seeds))

    def _check_selection(self) -> None:
        if not isinstance(self.select_lr, bool):
            raise UsageError(f"select_lr must be true or false, got {self.select_lr!r}")
        if not self.select_lr:
            if self.tune_seeds:
                raise UsageError("tune_seeds are for select_lr: true (they choose each method's lr)")
            if isinstance(self.full_lr, list):
                raise UsageError("full_lr may be a list only with select_lr: true (the full-model methods' lr grid)")
            return
        ts = self.tune_seeds
        if not isinstance(ts, list) or not ts or any(not isinstance(x, int) or isinstance(x, bool) or x < 0
                                                      for x in ts) or len(set(ts)) != len(ts):
            raise UsageError(f"tune_seeds must be a non-empty list of distinct integers >= 0 with select_lr, "
                             f"got {ts!r}")
        if set(ts) & set(self.seeds):
            raise UsageError(f"tune_seeds must not be among seeds (a seed that chose the lr is not a fair test of "
                             f"it), both hold {sorted(set(ts) & set(self.seeds))}")
        if len(self.values("lr")) < 2:
            raise UsageError(f"select_lr needs lr to be a grid of at least 2 values, got {self.lr!r}")
        if isinstance(self.full_lr, list) and len(self.full_lr) != len(self.values("lr")):
            raise UsageError(f"full_lr must hold as many values as lr (the same tuning budget for every method), got "
                             f"{len(self.full_lr)} and {len(self.values('lr'))}")
        if not self.n_val:
            raise UsageError("select_lr chooses on the validation split: set n_val and eval_every (> 0)")

    def run_specs(self, chosen: dict | None = None) -> list[dict]:
        """Every run: ``{"key", "method", "seed", "setting": {grid field: value}}``, in execution order
        (seed-major, so a stopped sweep has whole seeds done). With ``select_lr``: the tuning runs (every lr of
        the grid, ``tune_seeds``), then, for each method whose choice is in ``chosen`` (:func:`lr_choices`), the
        ``seeds`` at that lr only."""
        if not self.select_lr:
            return self._specs(self.seeds)
        return self._specs(self.tune_seeds) + (self._specs(self.seeds, chosen) if chosen else [])

    def planned_specs(self, chosen: dict | None = None) -> list[dict]:
        """:meth:`run_specs` with every lr choice not yet made stood in by a grid value: all the runs the
        experiment will make (for counting its work and cost; the stand-ins' keys are not the final ones)."""
        if not self.select_lr:
            return self.run_specs()
        fill = {tuning_key(s["method"], s["setting"]): s["setting"]["lr"] for s in self._specs(self.tune_seeds)}
        return self.run_specs({**fill, **(chosen or {})})

    def n_planned_runs(self) -> int:
        return len(self.planned_specs())

    def lr_grid(self, method: str) -> list:
        if METHOD_SPECS[method].full_model and self.full_lr is not None:
            return self.values("full_lr")
        return self.values("lr")

    def _specs(self, seeds: list, chosen: dict | None = None) -> list[dict]:
        out, seen = [], set()
        grid = list(itertools.product(*(self.values(n) for n in GRID)))
        for seed in seeds:
            for vals in grid:
                setting = dict(zip(GRID, vals))
                for method in self.methods:
                    s = dict(setting)
                    if METHOD_SPECS[method].full_model:  # no matching: one run per seed
                        s["matching"] = None
                    if not (METHOD_SPECS[method].uses_cka and METHOD_SPECS[method].uses_ce):
                        s["lam"] = None
                    if not METHOD_SPECS[method].uses_cka:
                        s["cka_estimator"] = None
                    if chosen is not None:  # the lr this method's tuning runs chose (the grid's lr is ignored)
                        s["lr"] = chosen.get(tuning_key(method, s))
                        if s["lr"] is None:
                            continue
                    elif METHOD_SPECS[method].full_model and self.full_lr is not None:
                        grid_lrs = self.lr_grid(method)
                        s["lr"] = grid_lrs[self.values("lr").index(setting["lr"]) % len(grid_lrs)]
                    key = _run_key(method, seed, s)
                    if key not in seen:
                        seen.add(key)
                        out.append({"key": key, "method": method, "seed": seed, "setting": s})
        return out


def tuning_key(method: str, setting: dict) -> str:
    """What one lr choice is for: the method and its setting without lr (the choice is per setting)."""
    return json.dumps({"method": method, **{k: v for k, v in setting.items() if k != "lr"}}, sort_keys=True)


def lr_choices(cfg: ExperimentConfig, records: dict) -> list[dict]:
    """The lr selection of ``select_lr`` from the finished runs (``{key: record}``): one row per method and setting,
    ``{"method", "setting" (without lr), "grid": [{"lr", "val_accuracy", "val_ce", "seeds"}], "chosen"}``. A choice is
    made when every lr of the grid has finished on every tuning seed: the highest mean final validation accuracy,
    ties broken by the lower mean final validation CE, then by the smaller lr; ``chosen`` is None until then.
    ``margin``: the chosen lr's validation accuracy minus the best of the others' (0: a tie the CE broke; None while
    pending or with a one-point grid). ``edge``: "highest" or "lowest" when the choice is an end of a grid of two or
    more lrs (the best lr may lie beyond it), else None."""
    rows: dict[str, dict] = {}
    for spec in cfg.run_specs():  # the tuning runs
        s = spec["setting"]
        row = rows.setdefault(tuning_key(spec["method"], s), {
            "method": spec["method"], "setting": {k: v for k, v in s.items() if k != "lr"}, "grid": {}})
        g = row["grid"].setdefault(s["lr"], {"lr": s["lr"], "val_accuracy": None, "val_ce": None, "seeds": []})
        rec = records.get(spec["key"])
        if rec is None or "not_applicable" in rec:
            continue
        val = [r for r in rec["log"] if "val_accuracy" in r]
        if not val:
            raise UsageError(f"run {spec['key']} ({spec['method']}, seed {spec['seed']}) has no validation "
                             "accuracy in its log: it was made without n_val/eval_every and cannot choose an lr")
        g["seeds"].append(spec["seed"])
        g.setdefault("_acc", []).append(val[-1]["val_accuracy"])
        g.setdefault("_ce", []).append(val[-1].get("val_ce", float("inf")))
    out = []
    for row in rows.values():
        grid = list(row["grid"].values())
        for g in grid:
            acc, ce = g.pop("_acc", []), g.pop("_ce", [])
            if acc:
                g["val_accuracy"], g["val_ce"] = sum(acc) / len(acc), sum(ce) / len(ce)
        done = all(len(g["seeds"]) == len(cfg.tune_seeds) for g in grid)
        best = min(grid, key=lambda g: (-g["val_accuracy"], g["val_ce"], g["lr"])) if done else None
        rest = [g for g in grid if g is not best]
        margin = (best["val_accuracy"] - max(g["val_accuracy"] for g in rest)) if best is not None and rest else None
        lrs = sorted(g["lr"] for g in grid)
        edge = None if best is None or len(lrs) < 2 else (
            "highest" if best["lr"] == lrs[-1] else "lowest" if best["lr"] == lrs[0] else None)
        out.append({**row, "grid": grid, "chosen": None if best is None else best["lr"], "margin": margin,
                    "edge": edge})
    return out


def chosen_lrs(cfg: ExperimentConfig, records: dict) -> dict:
    """``{tuning_key: lr}`` for every choice made (see :func:`lr_choices`); empty without ``select_lr``."""
    if not cfg.select_lr:
        return {}
    return {tuning_key(r["method"], r["setting"]): r["chosen"] for r in lr_choices(cfg, records)
            if r["chosen"] is not None}


def _run_key(method: str, seed: int, setting: dict) -> str:
    # the biased estimator (and none) is left out of the key: runs recorded before the estimator became a grid
    # field keep their keys
    setting = {k: v for k, v in setting.items() if not (k == "cka_estimator" and v in (None, "biased"))}
    body = json.dumps({"method": method, "seed": seed, **setting}, sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def distill_config_for(cfg: ExperimentConfig, spec: dict, precision: str = "float32"):
    """The run's DistillConfig; ``precision`` is the experiment's resolved one (bf16: training under autocast)."""
    from fastcd.config import DistillConfig

    s = spec["setting"]
    method = METHOD_SPECS[spec["method"]].runs_as or spec["method"]  # a control trains as its distill() method
    return DistillConfig(method=method, lam=1.0 if s["lam"] is None else s["lam"], lam_ratio=cfg.lam_ratio,
                         cka_estimator=s.get("cka_estimator") or "biased",
                         steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], n_train=s["n_train"],
                         n_eval=cfg.n_test, seed=spec["seed"], kv=cfg.kv, log_every=cfg.log_every,
                         eval_every=cfg.eval_every, n_val=max(cfg.n_val, 1), progress=False,
                         kd_weight=1.0 if method == "kd" else 0.0,
                         mixed_precision="bf16" if precision == "bf16" else "no",
                         micro_batch_size=cfg.micro_batch_size)


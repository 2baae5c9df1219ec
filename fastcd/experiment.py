"""``fastcd experiment CONFIG``: methods x seeds x settings from one YAML/JSON file, sharing what does not change.

Each model is loaded once, every prompt set is tokenised once, the teacher runs once over one training pool
(labels, logits, circuit-head z into an offline cache on disk), the circuit and each matching rule are
computed once, and the untrained student is evaluated once. Every run then resets the student to its base
weights, trains on a seeded subset of the pool and is evaluated on one fixed, seed-independent test set, so
that every comparison is paired on the same prompts. A finished run is appended to ``OUT/runs.jsonl``; a
killed sweep resumes where it stopped. ``OUT/report.json``, ``OUT/summary.md`` and the figures are rebuilt
from the records after every run.

Known-answer mode (``positive_control``): the student is the teacher with chosen circuit heads
re-initialised; matching rule ``identity`` pairs each re-initialised head with its intact self, and the
report says whether the ablation/CKA matching recover that identity.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

GRID = ("n_train", "lam", "steps", "lr", "batch_size", "matching")  # fields that may hold a list of values
MATCHING_RULES = ("ablation", "cka", "combined", "identity")
# runs of these methods do not depend on the matching rule (they train the whole student)
RULE_FREE = ("full-ce", "kd")
EXTRA_METHODS = ("ce+perm-cka",)  # control: the matched student heads, the teacher targets permuted among pairs
POOL_SEED = 1234  # the seed of the training pool every run subsamples
TEST_SEED = 0  # the seed of the test prompts (the same for every run; distill() uses the same)
LABELS = {"full-ce": "Fully distilled, CE", "kd": "Fully distilled, logit KD", "circuit-ce": "Circuit, CE",
          "cka": "Circuit, Align CKA only", "ce+rand-cka": "Circuit, CE + Rand CKA",
          "ce+cka": "Circuit, CE + Align CKA", "ce+perm-cka": "Circuit, CE + CKA to permuted teacher heads"}


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
    cka_estimator: str = "biased"  # "biased" (the paper's) or "unbiased" (debiased CKA, torch path)
    full_lr: float | None = None  # lr of the full-model methods (full-ce, kd); default: lr. Whole-model AdamW
    # at a head-slice lr (1e-3) wrecks a pretrained model in a few steps; 1e-5 is usual
    n_test: int = 500
    n_val: int = 0  # >0: validation accuracy every eval_every steps (training curves)
    eval_every: int = 0
    log_every: int = 5
    n_discovery: int = 32
    discovery: str = "attribution"  # "attribution" (with an exact recheck of the top heads) or "roles"
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
    threads: int | None = None

    @classmethod
    def from_file(cls, path: str) -> ExperimentConfig:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
            raise ValueError(f"config: {path!r} is not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}"
                             f": {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {path!r} must hold a mapping of fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; known: {sorted(names)}")
        if "teacher" not in data:
            raise ValueError("config: 'teacher' is required (a model directory, GGUF file or packaged model name)")
        data = dict(data)
        for name in ("lr", "lam", "lam_ratio", "full_lr"):  # YAML 1.1 reads 3e-3 (no dot) as a string
            v = data.get(name)
            data[name] = [_number(name, x) for x in v] if isinstance(v, list) else _number(name, v)
            if data[name] is None:
                data.pop(name)
        return cls(**data).validate()

    def values(self, name: str) -> list:
        v = getattr(self, name)
        return list(v) if isinstance(v, (list, tuple)) else [v]

    def validate(self) -> ExperimentConfig:
        from fastcd.distillation import METHODS

        if self.task not in ("entity-tracking", "tom"):
            raise ValueError(f"task must be 'entity-tracking' or 'tom', got {self.task!r}")
        known = METHODS + EXTRA_METHODS
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty list among {known}, got {self.methods!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {self.seeds}")
        for name in GRID:
            vals = self.values(name)
            if not vals:
                raise ValueError(f"{name} must hold at least one value")
            if len(set(map(str, vals))) != len(vals):
                raise ValueError(f"{name} must not repeat values, got {vals}")
        for v in self.values("matching"):
            if v not in MATCHING_RULES:
                raise ValueError(f"matching must be among {MATCHING_RULES}, got {v!r}")
        if "identity" in self.values("matching") and not self.positive_control:
            raise ValueError("matching 'identity' pairs a head with itself: it needs positive_control")
        if self.positive_control is None and self.student is None:
            raise ValueError("student is required (it may be left out only with positive_control)")
        if self.positive_control is not None:
            pc = self.positive_control
            if not isinstance(pc, dict) or set(pc) - {"reinit", "seed"} or "reinit" not in pc:
                raise ValueError(f"positive_control must be {{'reinit': N or [heads], 'seed': S}}, got {pc!r}")
            r = pc["reinit"]
            ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
                isinstance(r, list) and r and all(isinstance(h, str) for h in r))
            if not ok:
                raise ValueError(f"positive_control.reinit must be an integer >= 1 or a list of heads like 'L0H2', "
                                 f"got {r!r}")
        for rule in self.recovery_rules:
            if rule not in ("ablation", "cka", "combined"):
                raise ValueError(f"recovery_rules must be among ('ablation', 'cka', 'combined'), got {rule!r}")
        if self.positions is not None:
            from fastcd.tasks.entity_tracking import ROLES as ET_ROLES
            from fastcd.tasks.tom import ROLES as TOM_ROLES

            roles = ET_ROLES if self.task == "entity-tracking" else TOM_ROLES
            if not isinstance(self.positions, list) or not self.positions or any(r not in roles
                                                                                 for r in self.positions):
                raise ValueError(f"positions must be a non-empty list of the task's roles {roles}, got "
                                 f"{self.positions!r}")
        if self.discovery not in ("attribution", "roles"):
            raise ValueError(f"discovery must be 'attribution' or 'roles', got {self.discovery!r}")
        if self.discovery == "roles" and self.task != "entity-tracking":
            raise ValueError("discovery 'roles' is for entity tracking; use 'attribution' for tom")
        for name, lo in (("n_boxes", 2), ("n_test", 10), ("n_val", 0), ("eval_every", 0), ("log_every", 1),
                         ("n_discovery", 2), ("circuit_size", 1), ("diagnostics_m", 4)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.test_boxes is not None and (not isinstance(self.test_boxes, int) or self.test_boxes < 2):
            raise ValueError(f"test_boxes must be an integer >= 2, got {self.test_boxes!r}")
        if bool(self.n_val) != bool(self.eval_every):
            raise ValueError(f"n_val and eval_every go together (both > 0 for validation curves, or both 0), got "
                             f"n_val={self.n_val}, eval_every={self.eval_every}")
        if not isinstance(self.matching_files, dict):
            raise ValueError("matching_files must map a matching rule to a JSON path")
        for rule, path in self.matching_files.items():
            if rule not in MATCHING_RULES[:3]:
                raise ValueError(f"matching_files: {rule!r} is not a matching rule {MATCHING_RULES[:3]}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"matching_files[{rule!r}]: no such file {path!r}")
        if self.circuit is not None and not os.path.isfile(self.circuit):
            raise FileNotFoundError(f"circuit: no such file {self.circuit!r}")
        for spec in self.run_specs():  # each run's DistillConfig validates its own fields (steps, lr, lam, ...)
            _distill_config(self, spec)
        return self

    def shared_key(self) -> dict:
        """The fields every finished run depends on; a rerun into the same OUT must agree on all of them."""
        d = asdict(self)
        for name in GRID + ("methods", "seeds", "threads", "n_val", "eval_every", "log_every", "diagnostics",
                            "diagnostics_m", "full_lr"):
            d.pop(name)
        return d

    def run_specs(self) -> list[dict]:
        """Every run: ``{"key", "method", "seed", "setting": {grid field: value}}``, in execution order
        (seed-major, so a stopped sweep has whole seeds done)."""
        out, seen = [], set()
        grid = list(itertools.product(*(self.values(n) for n in GRID)))
        for seed in self.seeds:
            for vals in grid:
                setting = dict(zip(GRID, vals))
                for method in self.methods:
                    s = dict(setting)
                    if method in RULE_FREE:
                        s["matching"] = None
                        if self.full_lr is not None:
                            s["lr"] = self.full_lr
                    if method not in ("ce+cka", "ce+rand-cka", "ce+perm-cka"):
                        s["lam"] = None
                    key = _run_key(method, seed, s)
                    if key not in seen:
                        seen.add(key)
                        out.append({"key": key, "method": method, "seed": seed, "setting": s})
        return out


class NotApplicable(ValueError):
    """A run that cannot be made for this matching (e.g. a permuted control with a single teacher unit)."""


def _number(name: str, v):
    if isinstance(v, str) and v != "auto":
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{name} must be a number{' or auto' if name == 'lam' else ''}, got {v!r}") from None
    return v


def _run_key(method: str, seed: int, setting: dict) -> str:
    body = json.dumps({"method": method, "seed": seed, **setting}, sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def _distill_config(cfg: ExperimentConfig, spec: dict):
    from fastcd.distillation import DistillConfig

    s = spec["setting"]
    method = "ce+cka" if spec["method"] == "ce+perm-cka" else spec["method"]
    return DistillConfig(method=method, lam=1.0 if s["lam"] is None else s["lam"], lam_ratio=cfg.lam_ratio,
                         cka_estimator=cfg.cka_estimator,
                         steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], n_train=s["n_train"],
                         n_eval=cfg.n_test, seed=spec["seed"], kv=cfg.kv, log_every=cfg.log_every,
                         eval_every=cfg.eval_every, n_val=max(cfg.n_val, 1), progress=False,
                         kd_weight=1.0 if method == "kd" else 0.0).validate()


# ------------------------------------------------------------------------------------------------
# Shared state
# ------------------------------------------------------------------------------------------------
class _CacheView:
    """Rows ``rows`` of the pool's teacher cache and the z units of one matching (teacher side, in order)."""

    def __init__(self, pool: dict, rows: torch.Tensor, units: list[int] | None):
        self.rows = rows
        self.labels = pool["labels"]
        self.logits = pool.get("logits")
        self.z = None if units is None else pool["z"][units]  # [P, N_pool, d]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, idx: torch.Tensor):
        r = self.rows[idx]
        return (None if self.z is None else self.z[:, r], self.labels[r],
                None if self.logits is None else self.logits[r])


def _say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), "experiment:", msg, flush=True)


def _atomic_json(obj, path: str) -> None:
    from fastcd.io import write_json_atomic

    write_json_atomic(obj, path, indent=1)


def reinit_heads(model, heads, *, seed: int = 0) -> None:
    """Re-initialise ``heads``' own slices (q rows, q bias, o columns; k/v too where the head owns its KV group)
    with Gaussian values of the same standard deviation as the weight they sit in, seeded."""
    from fastcd.hooks import Head
    from fastcd.models import get_adapter

    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    own_kv = adapter.spec.group_size == 1
    with torch.no_grad():
        for h in heads:
            h = adapter.spec.check_head(Head.parse(h) if isinstance(h, str) else h, "positive_control.reinit head")
            for sl in adapter.head_slices(h, kv=own_kv):
                w = sl.param
                part = w.narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start)
                std = float(w.float().std())
                part.copy_((torch.randn(part.shape, generator=g) * std).to(w.dtype))


class Experiment:
    """The shared state of one experiment directory; :meth:`run` trains what is missing."""

    def __init__(self, cfg: ExperimentConfig, out: str, *, overwrite: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, out, progress
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"out: {out!r} exists and is not a directory")
        os.makedirs(os.path.join(out, "shared"), exist_ok=True)
        manifest = os.path.join(out, "experiment.json")
        key = cfg.shared_key()
        if os.path.isfile(manifest) and not overwrite:
            with open(manifest) as f:
                old = json.load(f)["shared"]
            # a field that an older fastcd did not write counts as its default value
            defaults = ExperimentConfig(teacher="").shared_key()
            diff = sorted(k for k in set(old) | set(key) if old.get(k, defaults.get(k)) != key.get(k))
            if diff:
                raise ValueError(f"out: {out!r} holds runs of an experiment that differs in {diff} "
                                 f"(e.g. {diff[0]}: {old.get(diff[0])!r} there, {key.get(diff[0])!r} now); use "
                                 "another directory, or --overwrite to discard those runs")
        elif overwrite:
            for name in ("runs.jsonl", "report.json", "summary.md"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            import shutil

            shutil.rmtree(os.path.join(out, "shared"), ignore_errors=True)
            os.makedirs(os.path.join(out, "shared"))
        _atomic_json({"shared": key, "config": asdict(cfg)}, manifest)
        self.runs_path = os.path.join(out, "runs.jsonl")

    # --- records ---------------------------------------------------------------------------------
    def done(self) -> dict[str, dict]:
        return read_runs(self.runs_path)

    def _shared(self, name: str):
        p = os.path.join(self.out, "shared", name)
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
        return None

    def _put_shared(self, name: str, obj) -> None:
        _atomic_json(obj, os.path.join(self.out, "shared", name))

    # --- the pipeline ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything runs share: tokenised prompt sets, circuit, matchings, teacher cache, base evaluation."""
        from fastcd.discover import Circuit
        from fastcd.match import Matching
        from fastcd.models import load_model, load_tokenizer, spec_of
        from fastcd.tasks import EntityTracking, TheoryOfMind, adapt_task

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t_path = cfg.teacher
        s_path = cfg.student if cfg.positive_control is None else cfg.teacher
        t_spec, s_spec = spec_of(t_path), spec_of(s_path)  # config only: a bad path fails here, in seconds
        if cfg.circuit:
            for h in Circuit.load(cfg.circuit).unique_heads():
                t_spec.check_head(h, "circuit head")
        for path in cfg.matching_files.values():
            Matching.load(path).check_models(t_path, s_path)
        self.t_spec, self.s_spec = t_spec, s_spec
        tok = load_tokenizer(s_path)
        t_tok = load_tokenizer(t_path) if t_path != s_path else tok
        mk = (lambda n: EntityTracking(n_boxes=n)) if cfg.task == "entity-tracking" else (lambda n: TheoryOfMind())
        toks = [tok] if t_tok is tok else [tok, t_tok]
        self.task = adapt_task(mk(cfg.n_boxes), toks)
        self.test_task = self.task if (cfg.test_boxes or cfg.n_boxes) == cfg.n_boxes else adapt_task(
            mk(cfg.test_boxes), toks)
        self.tok, self.t_tok = tok, t_tok
        n_pool = max(self.cfg.values("n_train"))
        pool_ex = self.task.generate(n_pool, seed=POOL_SEED, split="train")
        self.s_pool = self.task.encode(pool_ex, tok)
        self.t_pool = self.task.encode(pool_ex, t_tok) if t_tok is not tok else self.s_pool
        test_pairs = self.test_task.pairs(cfg.n_test, seed=TEST_SEED, split="test")
        self.s_test = self.test_task.encode([p.clean for p in test_pairs], tok)
        self.s_ref = self.test_task.encode([p.corrupt for p in test_pairs], tok)
        self.t_test = self.test_task.encode([p.clean for p in test_pairs], t_tok) if t_tok is not tok else self.s_test
        self.s_val = (self.task.encode(self.task.generate(cfg.n_val, seed=TEST_SEED, split="val"), tok)
                      if cfg.n_val else None)
        dpairs = self.task.pairs(cfg.n_discovery, seed=TEST_SEED, split="val")
        self.d_clean = [p.clean for p in dpairs]
        self.d_corrupt = [p.corrupt for p in dpairs]

        rules = [r for r in cfg.values("matching")]
        need = {"circuit": self._shared("circuit.json") is None and not cfg.circuit,
                "matchings": any(self._shared(f"matching_{r}.json") is None for r in rules
                                 if r != "identity" and r not in cfg.matching_files),
                "cache": not self._cache_ok(n_pool),
                "teacher_eval": self._shared("teacher_eval.json") is None,
                "recovery": bool(cfg.positive_control) and self._shared("recovery.json") is None}
        teacher = None
        if any(need.values()):
            _say(f"loading the teacher {t_path} (needed for: {', '.join(k for k, v in need.items() if v)})")
            teacher = load_model(t_path, dtype=cfg.teacher_dtype)
            teacher.eval()
        self.circuit = self._circuit(teacher)
        self.student = load_model(s_path)
        self.student.eval()
        if cfg.positive_control:
            self.reinit = self._reinit_heads()
            reinit_heads(self.student, self.reinit, seed=cfg.positive_control.get("seed", 0))
        self.matchings = {r: self._matching(r, teacher) for r in rules}
        if need["recovery"]:
            self._recovery(teacher)
        self._teacher_cache(teacher, n_pool)
        if need["teacher_eval"]:
            from fastcd.discover import accuracy_per_example

            _say(f"teacher accuracy on the {len(self.t_test)} test prompts")
            tc = accuracy_per_example(teacher, self.t_test)
            self._put_shared("teacher_eval.json", {"correct": _bits(tc), "accuracy": sum(tc) / len(tc)})
        del teacher
        gc.collect()
        self.base_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self._base_eval()
        if cfg.diagnostics:
            self._diagnostics()

    def _circuit(self, teacher):
        from fastcd.discover import Circuit

        cfg = self.cfg
        if cfg.circuit:
            return Circuit.load(cfg.circuit)
        d = self._shared("circuit.json")
        if d is not None:
            return Circuit.from_json(d)
        from fastcd import discover as D

        t0 = time.time()
        clean = self.task.encode(self.d_clean, self.t_tok)
        corrupt = self.task.encode(self.d_corrupt, self.t_tok)
        src = D.make_source(teacher, clean, "mean", corrupt=corrupt)
        if cfg.discovery == "roles":
            circuit, _ = D.circuit_by_roles(teacher, clean, src, self.task.roles, task=self.task.name,
                                            progress=self.progress)
        else:
            _say(f"discovery: attribution patching over {len(clean)} prompts, exact recheck of the top "
                 f"{cfg.circuit_size}")
            with torch.enable_grad():
                res = D.attribution_patching(teacher, clean, src, metric="prob", position="last", batch_size=16,
                                             recheck_top_k=cfg.circuit_size, progress=self.progress)
            circuit = D.circuit_from_scores(res, cfg.circuit_size, task=self.task.name, group="heads",
                                            position="last")
        circuit.meta.update(method=cfg.discovery, n_examples=len(clean), seconds=round(time.time() - t0, 1))
        self._put_shared("circuit.json", circuit.to_json())
        return circuit

    def _reinit_heads(self) -> list:
        from fastcd.hooks import Head

        r = self.cfg.positive_control["reinit"]
        if isinstance(r, int):
            heads = self.circuit.unique_heads()
            if r > len(heads):
                raise ValueError(f"positive_control.reinit={r} but the circuit has only {len(heads)} heads")
            return heads[:r]
        return [self.s_spec.check_head(Head.parse(h), "positive_control.reinit head") for h in r]

    def _match_inputs(self, teacher):
        from fastcd.match import MatchInputs

        t_clean = self.task.encode(self.d_clean, self.t_tok)
        t_corrupt = self.task.encode(self.d_corrupt, self.t_tok)
        s_clean = self.task.encode(self.d_clean, self.tok) if self.tok is not self.t_tok else t_clean
        s_corrupt = self.task.encode(self.d_corrupt, self.tok) if self.tok is not self.t_tok else t_corrupt
        return MatchInputs(teacher, self.student, self.circuit, t_clean, s_clean, t_corrupt, s_corrupt)

    def _matching(self, rule: str, teacher):
        from fastcd.match import Matching, Pair, match

        if rule == "identity":  # every circuit unit (head, role) of a re-initialised head, aligned to itself
            units = {}
            for c in self.circuit.heads:
                units.setdefault(c.head, []).append(c.position if c.position != "all" else "last")
            return Matching([Pair(h, h, role, "reinit") for h in self.reinit
                             for role in dict.fromkeys(units.get(h, ["last"]))], "identity")
        if rule in self.cfg.matching_files:
            return self._at_positions(Matching.load(self.cfg.matching_files[rule]))
        d = self._shared(f"matching_{rule}.json")
        if d is not None:
            return self._at_positions(Matching.from_json(d))
        t0 = time.time()
        _say(f"matching: rule {rule!r}")
        kw = {"progress": self.progress} if rule in ("ablation", "combined") else {}
        m = match(self._match_inputs(teacher), rule, **kw)
        m.meta["seconds"] = round(time.time() - t0, 1)
        self._put_shared(f"matching_{rule}.json", m.to_json())
        return self._at_positions(m)

    def _at_positions(self, m):
        """With ``positions``: every (teacher, student) pair aligned at each listed role (multi-position CKA)."""
        from fastcd.match import Matching, Pair

        if not self.cfg.positions:
            return m
        heads = list(dict.fromkeys((p.teacher, p.student, p.group) for p in m.pairs))
        return Matching([Pair(t, s, role, g) for t, s, g in heads for role in self.cfg.positions],
                        m.method, {**m.meta, "positions": list(self.cfg.positions)})

    def _recovery(self, teacher) -> None:
        """Positive control: does each matching rule pair the re-initialised heads with themselves?"""
        from fastcd.match import match

        out = {"reinit": [str(h) for h in self.reinit]}
        for rule in self.cfg.recovery_rules:
            t0 = time.time()
            _say(f"positive control: recovering the identity with rule {rule!r}")
            kw = {"progress": self.progress} if rule in ("ablation", "combined") else {}
            m = match(self._match_inputs(teacher), rule, **kw)
            ident = [p.teacher == p.student for p in m.pairs]
            re = [p for p in m.pairs if p.teacher in self.reinit]
            out[rule] = {"pairs": [[str(p.teacher), str(p.student), p.position] for p in m.pairs],
                         "identity_share": sum(ident) / len(ident),
                         "reinit_identity": sum(p.teacher == p.student for p in re),
                         "reinit_paired": len(re), "seconds": round(time.time() - t0, 1)}
        self._put_shared("recovery.json", out)

    def _units(self) -> list[tuple[str, str]]:
        """Every (teacher head, role) any run aligns to: the circuit's units and each matching's teacher side."""
        units = [(str(c.head), c.position if c.position != "all" else "last") for c in self.circuit.heads]
        for m in self.matchings.values():
            units += [(str(p.teacher), p.position) for p in m.pairs]
        return list(dict.fromkeys(units))

    def _cache_ok(self, n_pool: int) -> bool:
        d = self._shared("cache.json")
        return d is not None and d["n"] == n_pool and os.path.isdir(os.path.join(self.out, "shared", "cache"))

    def _teacher_cache(self, teacher, n_pool: int) -> None:
        from safetensors.torch import load_file

        from fastcd.distillation import build_teacher_cache
        from fastcd.hooks import Head
        from fastcd.match import Matching, Pair

        units = self._units()
        path = os.path.join(self.out, "shared", "cache")
        need_logits = "kd" in self.cfg.methods
        d = self._shared("cache.json")
        if not (d and d["n"] == n_pool and [tuple(u) for u in d["units"]] == units and d["logits"] >= need_logits
                and os.path.isdir(path)):
            if teacher is None:
                from fastcd.models import load_model

                teacher = load_model(self.cfg.teacher, dtype=self.cfg.teacher_dtype)
            t0 = time.time()
            _say(f"teacher cache: {n_pool} prompts, {len(units)} (head, role) units, logits={need_logits}")
            pseudo = Matching([Pair(Head.parse(h), Head.parse(h), r) for h, r in units], "units")
            build_teacher_cache(teacher, self.t_pool, pseudo, path, logits=need_logits, progress=self.progress,
                                tokenizer=self.t_tok, batch_size=32)
            self._put_shared("cache.json", {"n": n_pool, "units": units, "logits": need_logits,
                                            "seconds": round(time.time() - t0, 1)})
        shards = [load_file(os.path.join(path, s)) for s in sorted(os.listdir(path)) if s.endswith(".safetensors")]
        self.pool = {"labels": torch.cat([s["labels"] for s in shards]),
                     "z": torch.cat([s["z"] for s in shards], dim=1)}
        if need_logits:
            self.pool["logits"] = torch.cat([s["logits"] for s in shards])
        self.unit_index = {u: i for i, u in enumerate(units)}

    def _live(self, matching) -> list:
        return [(p.student, p.position) for p in matching.pairs]

    def _base_eval(self) -> None:
        from fastcd.discover import accuracy_per_example, circuit_correct
        from fastcd.hooks import mean_z

        d = self._shared("base_eval.json") or {}
        changed = False
        if "correct" not in d:
            _say(f"untrained student on the {len(self.s_test)} test prompts")
            c = accuracy_per_example(self.student, self.s_test)
            d.update(correct=_bits(c), accuracy=sum(c) / len(c))
            changed = True
        if self.cfg.circuit_accuracy:
            self.means = mean_z(self.student, self.s_ref.input_ids)
            for rule, m in self.matchings.items():
                if f"circuit_{rule}" not in d:
                    cc = circuit_correct(self.student, self.s_test, self.means, self._live(m))
                    d[f"circuit_{rule}"] = sum(cc) / len(cc)
                    changed = True
        if changed:
            self._put_shared("base_eval.json", d)
        self.base_eval = d

    def _diagnostics(self) -> None:
        """Per pair at the start: CKA on m pool prompts vs a Gaussian null and random student heads."""
        from fastcd.hooks import capture_z
        from fastcd.match import cka_matrix_torch
        from fastcd.models import logits_at

        d = self._shared("diagnostics.json") or {}
        todo = [r for r in self.matchings if r not in d]
        if not todo:
            self.diag = d
            return
        m = min(self.cfg.diagnostics_m, len(self.s_pool))
        _say(f"diagnostics: CKA at the start on {m} pool prompts")
        sub = self.s_pool.index(range(m))
        heads = self.s_spec.all_heads()
        roles = sorted({p.position for mt in self.matchings.values() for p in mt.pairs})
        z = {}  # role -> [n_heads_total, m, d]
        with torch.no_grad(), capture_z(self.student, heads, detach=True) as cache:
            logits_at(self.student, sub.positions["last"], input_ids=sub.input_ids)
            for role in roles:
                pos = sub.positions[role]
                z[role] = torch.stack([cache[h][torch.arange(m), pos].float() for h in heads])
        rng = random.Random(0)
        g = torch.Generator().manual_seed(0)
        for rule in todo:
            mt = self.matchings[rule]
            rows = []
            for p in mt.pairs:
                t = self.pool["z"][self.unit_index[(str(p.teacher), p.position)], :m]
                s = z[p.position][heads.index(p.student)]
                c = float(cka_matrix_torch(s[None], t[None])[0, 0])
                rand = rng.sample(range(len(heads)), min(32, len(heads)))
                c_rand = cka_matrix_torch(z[p.position][rand], t[None])[:, 0]
                null = [float(cka_matrix_torch(torch.randn(m, s.shape[1], generator=g)[None],
                                               torch.randn(m, t.shape[1], generator=g)[None])[0, 0])
                        for _ in range(8)]
                rows.append({"teacher": str(p.teacher), "student": str(p.student), "position": p.position,
                             "cka": c, "random_heads_mean": float(c_rand.mean()),
                             "random_heads_p95": float(torch.tensor(c_rand).quantile(0.95)),
                             "gaussian_null_mean": sum(null) / len(null)})
            d[rule] = {"m": m, "pairs": rows}
        self._put_shared("diagnostics.json", d)
        self.diag = d

    # --- one run ---------------------------------------------------------------------------------
    def _run_matching(self, spec: dict):
        from fastcd.match import Matching, Pair

        rule = spec["setting"]["matching"]
        if rule is None:
            return None
        m = self.matchings[rule]
        if spec["method"] == "ce+rand-cka":  # random student heads over the same teacher units
            pick = random.Random(spec["seed"]).sample(self.s_spec.all_heads(), len(m.pairs))
            return Matching([Pair(p.teacher, s, p.position, p.group) for p, s in zip(m.pairs, pick)], "random",
                            {"seed": spec["seed"], "teacher_side": rule})
        if spec["method"] == "ce+perm-cka":
            # the same student heads at their own positions; each pair's teacher target is another pair's
            # (teacher head, role) unit, with no fixed point. The targets come from the teacher cache, so the
            # teacher unit's role may differ from the student's position (meta["teacher_units"]).
            units = [(p.teacher, p.position) for p in m.pairs]
            n = len(units)
            if len(set(units)) < 2:
                raise NotApplicable(f"ce+perm-cka needs at least two distinct teacher units in matching {rule!r}, "
                                 f"got {units}")
            perm = list(range(n))
            rng = random.Random(spec["seed"])
            for _ in range(10000):
                rng.shuffle(perm)
                if all(units[perm[i]] != units[i] for i in range(n)):
                    break
            else:
                raise NotApplicable(f"ce+perm-cka: no permutation of {units} moves every target")
            return Matching([Pair(units[perm[i]][0], p.student, p.position, p.group) for i, p in enumerate(m.pairs)],
                            "permuted", {"seed": spec["seed"],
                                         "teacher_units": [[str(units[perm[i]][0]), units[perm[i]][1]]
                                                           for i in range(n)]})
        return m

    def run_one(self, spec: dict) -> dict:
        from fastcd.discover import accuracy_per_example, circuit_correct
        from fastcd.distillation import USES_CKA, CircuitDistiller, train_loop
        from fastcd.trainable import merge

        cfg = self.cfg
        dcfg = _distill_config(cfg, spec)
        s = spec["setting"]
        torch.manual_seed(spec["seed"])
        self.student.load_state_dict(self.base_state)
        matching = self._run_matching(spec)
        rows = torch.randperm(len(self.s_pool), generator=torch.Generator().manual_seed(spec["seed"]))[:s["n_train"]]
        units = None
        if matching is not None and dcfg.method in USES_CKA:
            t_units = matching.meta.get("teacher_units") or [[str(p.teacher), p.position] for p in matching.pairs]
            units = [self.unit_index[(h, r)] for h, r in t_units]
        view = _CacheView(self.pool, rows, units)
        s_train = self.s_pool.index(rows)
        cd = CircuitDistiller(self.student, matching if dcfg.method not in RULE_FREE else None, config=dcfg)
        diag = {}
        if dcfg.method in ("ce+cka",) and cfg.diagnostics:
            from fastcd.distillation import _make_batch

            g = torch.Generator().manual_seed(spec["seed"] + 1)
            b = _make_batch(torch.randint(len(s_train), (dcfg.batch_size,), generator=g), s_train, None, view)
            diag = cd.gradient_ratio(b)
        opt = torch.optim.AdamW(cd.trainable_parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)
        gen = torch.Generator().manual_seed(spec["seed"])
        t0 = time.time()
        try:
            log = train_loop(cd, opt, gen, dcfg, s_train, None, view, eval_batch=self.s_val,
                             desc=f"{spec['method']} seed {spec['seed']}")
        finally:
            if cd.slices is not None:
                merge(cd.slices)
        train_s = time.time() - t0
        self.student.eval()
        for p in self.student.parameters():
            p.requires_grad_(False)
        correct = accuracy_per_example(self.student, self.s_test)
        rec = {"key": spec["key"], "method": spec["method"], "seed": spec["seed"], "setting": s,
               "accuracy": sum(correct) / len(correct), "correct": _bits(correct),
               "trainable_params": cd.n_trainable,
               "trainable_fraction": cd.n_trainable / sum(p.numel() for p in self.student.parameters()),
               "lam_effective": cd.lam if dcfg.method in USES_CKA else None, "log": log,
               "train_seconds": round(train_s, 1), "grad": diag}
        if matching is not None:
            n_heads = self.s_spec.n_total_heads
            rec["trained_heads"] = len(matching.student_heads())
            rec["trained_heads_fraction"] = rec["trained_heads"] / n_heads
            rec["pairs"] = [[str(p.teacher), str(p.student), p.position] for p in matching.pairs]
            if "teacher_units" in matching.meta:  # the permuted control: where each teacher target was read
                rec["teacher_units"] = matching.meta["teacher_units"]
            if cfg.circuit_accuracy:
                cc = circuit_correct(self.student, self.s_test, self.means, self._live(matching))
                rec["circuit_accuracy"] = sum(cc) / len(cc)
        else:
            rec["trained_heads_fraction"] = 1.0
        rec["seconds"] = round(time.time() - t0, 1)
        return rec

    def run(self) -> dict:
        specs = self.cfg.run_specs()
        done = self.done()
        todo = [s for s in specs if s["key"] not in done]
        _say(f"{len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run")
        if todo:
            self.prepare()
        took = []
        for i, spec in enumerate(todo):
            t0 = time.time()
            try:
                rec = self.run_one(spec)
            except NotApplicable as e:  # recorded, reported, and the sweep goes on
                rec = {"key": spec["key"], "method": spec["method"], "seed": spec["seed"],
                       "setting": spec["setting"], "not_applicable": str(e), "accuracy": float("nan")}
            _append_record(self.runs_path, rec)
            took.append(time.time() - t0)
            eta = sum(took) / len(took) * (len(todo) - i - 1)
            _say(f"run {i + 1}/{len(todo)} ({spec['method']}, seed {spec['seed']}, "
                 f"{_setting_label(spec['setting'])}): accuracy {rec['accuracy']:.3f} in {took[-1]:.0f} s; "
                 f"ETA {eta / 60:.0f} min")
            write_report(self.out, self.cfg)
        return write_report(self.out, self.cfg)


def read_runs(path: str) -> dict[str, dict]:
    """The finished runs in ``runs.jsonl`` by key; a line cut short by a kill is skipped (that run reruns)."""
    recs = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    _say(f"{path} line {i + 1} is incomplete (a killed write); that run reruns")
                    continue
                recs[r["key"]] = r
    return recs


def _append_record(path: str, rec: dict) -> None:
    """One JSON line, flushed to disk; a line left unfinished by a kill is closed first so it cannot swallow it."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(rec) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _bits(correct) -> str:
    return "".join("1" if c else "0" for c in correct)


def _unbits(s: str) -> list[bool]:
    return [c == "1" for c in s]


def _setting_label(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def mean_ci(values, level: float = 0.95) -> dict:
    """Mean and the t-interval over seeds (no interval from one seed)."""
    from scipy import stats

    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    h = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - h, "hi": mean + h, "sd": sd, "n": n}


def _group_key(setting: dict) -> str:
    s = {k: v for k, v in setting.items() if k not in ("matching", "lam")}
    return _setting_label(s)


def write_report(out: str, cfg: ExperimentConfig | None = None) -> dict:
    """Rebuild ``report.json``, ``summary.md`` and the figures from ``runs.jsonl`` and the shared records."""
    from statsmodels.stats.multitest import multipletests

    exp_path = os.path.join(out, "experiment.json")
    with open(exp_path) as f:
        manifest = json.load(f)
    cfg = cfg or ExperimentConfig.from_dict(manifest["config"])
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    wanted = {s["key"] for s in cfg.run_specs()}
    recs = [r for r in recs if r["key"] in wanted]
    not_applicable = [{k: r[k] for k in ("method", "seed", "setting", "not_applicable")}
                      for r in recs if "not_applicable" in r]
    recs = [r for r in recs if "not_applicable" not in r]

    def shared(name):
        p = os.path.join(out, "shared", name)
        return json.load(open(p)) if os.path.isfile(p) else None

    base, teacher = shared("base_eval.json"), shared("teacher_eval.json")
    # rows: one per (setting without lam/matching, method, matching, lam)
    rows: dict[tuple, list] = {}
    for r in recs:
        s = r["setting"]
        rows.setdefault((_group_key(s), r["method"], s.get("matching"), s.get("lam")), []).append(r)
    table = []
    for (group, method, rule, lam), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]),
                                                                                 str(kv[0][2]), str(kv[0][3]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [r["accuracy"] for r in rs]
        row = {"setting": group, "method": method, "label": LABELS.get(method, method), "matching": rule,
               "lam": lam, "seeds": [r["seed"] for r in rs], "accuracy": mean_ci(acc), "per_seed": acc,
               "trainable_fraction": rs[0]["trainable_fraction"],
               "trained_heads_fraction": rs[0].get("trained_heads_fraction"),
               "lam_effective": [r.get("lam_effective") for r in rs]}
        if "circuit_accuracy" in rs[0]:
            row["circuit_accuracy"] = mean_ci([r["circuit_accuracy"] for r in rs])
        if rs[0].get("grad"):
            row["grad_ratio"] = mean_ci([r["grad"]["ratio"] for r in rs])
            row["grad_cosine"] = mean_ci([r["grad"]["cosine"] for r in rs])
        final_cka = [r["log"][-1].get("mean_cka") for r in rs if r["log"] and "mean_cka" in r["log"][-1]]
        if final_cka:
            row["final_mean_cka"] = mean_ci(final_cka)
        table.append(row)
    # McNemar, pooled over seeds (paired by seed on the one test set), Holm over the family
    tests = []
    for (group, method, rule, lam), rs in rows.items():
        if method != "ce+cka":
            continue
        ref = {r["seed"]: r for r in rs}
        for (g2, m2, r2, l2), rs2 in rows.items():
            if g2 != group or (m2, r2, l2) == (method, rule, lam):
                continue
            if m2 not in RULE_FREE and r2 != rule:
                continue
            other = {r["seed"]: r for r in rs2}
            common = sorted(set(ref) & set(other))
            if not common:
                continue
            a = sum((_unbits(ref[s]["correct"]) for s in common), [])
            b = sum((_unbits(other[s]["correct"]) for s in common), [])
            tests.append({"setting": group, "a": f"ce+cka ({rule}, lam {lam})", "b": _name(m2, r2, l2),
                          "seeds": common, **_mc(a, b)})
        if base is not None:
            common = sorted(ref)
            a = sum((_unbits(ref[s]["correct"]) for s in common), [])
            b = _unbits(base["correct"]) * len(common)
            tests.append({"setting": group, "a": f"ce+cka ({rule}, lam {lam})", "b": "untrained student",
                          "seeds": common, **_mc(a, b)})
    if tests:
        adj = multipletests([t["p_value"] for t in tests], method="holm")[1]
        for t, p in zip(tests, adj):
            t["p_holm"] = float(p)
    specs = cfg.run_specs()
    report = {"config": asdict(cfg), "runs_done": len(recs) + len(not_applicable), "runs_total": len(specs),
              "not_applicable": not_applicable, "table": table,
              "mcnemar": tests, "base": None if base is None else {k: v for k, v in base.items() if k != "correct"},
              "teacher_accuracy": None if teacher is None else teacher["accuracy"],
              "n_test": cfg.n_test, "circuit": shared("circuit.json"), "recovery": shared("recovery.json"),
              "diagnostics": shared("diagnostics.json"), "cache": shared("cache.json"),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    _atomic_json(report, os.path.join(out, "report.json"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(format_report(report) + "\n")
    if recs:
        plot_report(report, recs, out)
    return report


def _mc(a, b) -> dict:
    from fastcd.stats import mcnemar

    t = mcnemar(a, b)
    return {"a_only": t["b"], "b_only": t["c"], "p_value": t["p_value"], "n": len(a)}


def _name(method: str, rule, lam) -> str:
    extra = [x for x in (rule, None if lam is None else f"lam {lam}") if x]
    return method + (f" ({', '.join(extra)})" if extra else "")


def _order(method: str) -> int:
    order = ["full-ce", "kd", "circuit-ce", "cka", "ce+rand-cka", "ce+perm-cka", "ce+cka"]
    return order.index(method) if method in order else 99


def _fmt_ci(c: dict | None, digits: int = 3) -> str:
    if c is None:
        return "-"
    if c.get("lo") is None:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [f"# fastcd experiment: {c['teacher']} -> {c['student'] or c['teacher'] + ' (damaged copy)'}, "
             f"{c['task']}", "",
             f"{report['runs_done']} / {report['runs_total']} runs done. Test set: {report['n_test']} fixed prompts "
             f"(seed-independent, {c.get('test_boxes') or c['n_boxes']} boxes), the same for every run; accuracy is "
             "the mean over seeds with its 95% t-interval.", ""]
    if report.get("teacher_accuracy") is not None:
        lines.append(f"Teacher accuracy {report['teacher_accuracy']:.3f}; untrained student "
                     f"{report['base']['accuracy']:.3f}" + "".join(
                         f"; untrained circuit ({k[8:]}) {v:.3f}" for k, v in report["base"].items()
                         if k.startswith("circuit_")) + ".")
        lines.append("")
    groups = list(dict.fromkeys(r["setting"] for r in report["table"]))
    for g in groups:
        lines += [f"## {g}", "", "| Method | Matching | lambda | Accuracy (95% CI) | per seed | Circuit acc. | "
                  "Trainable params | Trained heads |", "|---|---|---|---|---|---|---|---|"]
        for r in report["table"]:
            if r["setting"] != g:
                continue
            lam = "-" if r["lam"] is None else (f"auto ({_mean_of(r['lam_effective']):.3g})" if r["lam"] == "auto"
                                                 else str(r["lam"]))
            th = "-" if r["trained_heads_fraction"] is None else f"{r['trained_heads_fraction']:.1%}"
            lines.append(f"| {r['label']} | {r['matching'] or '-'} | {lam} | {_fmt_ci(r['accuracy'])} | "
                         f"{' '.join(f'{x:.3f}' for x in r['per_seed'])} | {_fmt_ci(r.get('circuit_accuracy'))} | "
                         f"{r['trainable_fraction']:.2%} | {th} |")
        lines.append("")
    if report["mcnemar"]:
        lines += ["## McNemar (exact, pooled over seeds, Holm-corrected over all comparisons)", "",
                  "| Setting | A | B | seeds | A right, B wrong | A wrong, B right | p | p (Holm) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["mcnemar"]:
            lines.append(f"| {t['setting']} | {t['a']} | {t['b']} | {len(t['seeds'])} | {t['a_only']} | "
                         f"{t['b_only']} | {t['p_value']:.3g} | {t['p_holm']:.3g} |")
        lines.append("")
    grads = [r for r in report["table"] if "grad_ratio" in r]
    if grads:
        lines += ["## Loss balance at the start (one batch per seed, lambda not applied) and the CKA reached", "",
                  "| Setting | Method | Matching | grad(align)/grad(CE) | cosine | mean CKA of the pairs at the end |",
                  "|---|---|---|---|---|---|"]
        for r in grads:
            lines.append(f"| {r['setting']} | {r['method']} | {r['matching']} | {_fmt_ci(r['grad_ratio'])} | "
                         f"{_fmt_ci(r['grad_cosine'])} | {_fmt_ci(r.get('final_mean_cka'))} |")
        cka_only = [r for r in report["table"] if r["method"] == "cka" and "final_mean_cka" in r]
        for r in cka_only:
            lines.append(f"| {r['setting']} | cka (align only) | {r['matching']} | - | - | "
                         f"{_fmt_ci(r.get('final_mean_cka'))} |")
        lines.append("")
    if report.get("diagnostics"):
        lines += ["## Matched pairs at the start: CKA vs random student heads and a Gaussian null", "",
                  "| Matching | pairs | mean CKA | random heads (mean) | Gaussian null | pairs above random p95 |",
                  "|---|---|---|---|---|---|"]
        for rule, d in report["diagnostics"].items():
            ps = d["pairs"]
            above = sum(p["cka"] > p["random_heads_p95"] for p in ps)
            lines.append(f"| {rule} (m={d['m']}) | {len(ps)} | {_mean_of([p['cka'] for p in ps]):.3f} | "
                         f"{_mean_of([p['random_heads_mean'] for p in ps]):.3f} | "
                         f"{_mean_of([p['gaussian_null_mean'] for p in ps]):.3f} | {above} / {len(ps)} |")
        lines.append("")
    if report.get("recovery"):
        rec = report["recovery"]
        lines += [f"## Positive control: re-initialised heads {', '.join(rec['reinit'])}", "",
                  "| Rule | pairs that are the identity (all circuit units) | pairs whose teacher head was "
                  "re-initialised that chose that same head in the student |", "|---|---|---|"]
        for rule, d in rec.items():
            if rule == "reinit":
                continue
            lines.append(f"| {rule} | {d['identity_share']:.0%} | {d['reinit_identity']} / {d['reinit_paired']} |")
        lines.append("")
    for r in report.get("not_applicable", []):
        lines.append(f"Not applicable: {r['method']} seed {r['seed']} ({_setting_label(r['setting'])}): "
                     f"{r['not_applicable']}")
    lines.append(f"torch {report['torch']}, {report['threads']} threads.")
    return "\n".join(lines)


def _mean_of(v) -> float:
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else float("nan")


def plot_report(report: dict, recs: list[dict], out: str) -> list[str]:
    """``accuracy.png`` (per method, each seed a dot, mean with its CI), ``sample_efficiency.png`` and
    ``lambda.png`` (when those vary), ``curves.png`` (one panel per loss part, colour by method)."""
    from fastcd.plots import _plt

    plt = _plt()
    paths = []
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(LABELS)}
    teacher_acc = report.get("teacher_accuracy")
    base_acc = (report.get("base") or {}).get("accuracy")

    control = bool(report["config"].get("positive_control"))
    t_label, b_label = ("intact model", "damaged copy (untrained)") if control else ("teacher", "untrained student")

    def refs(ax):
        if teacher_acc is not None:
            ax.axhline(teacher_acc, color="black", ls="--", lw=1, label=f"{t_label} {teacher_acc:.2f}")
        if base_acc is not None:
            ax.axhline(base_acc, color="grey", ls=":", lw=1, label=f"{b_label} {base_acc:.2f}")

    # accuracy per row, one panel per setting
    rows = report["table"]
    groups = list(dict.fromkeys(r["setting"] for r in rows))
    width = max(len([r for r in rows if r["setting"] == g]) for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.5, 0.75 * width + 2), 3.3 * len(groups) + 0.4),
                             squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rs = [r for r in rows if r["setting"] == g]
        for i, r in enumerate(rs):
            c = colors.get(r["method"], "C0")
            ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color=c, s=14, alpha=0.6)
            a = r["accuracy"]
            if a.get("lo") is not None:
                ax.errorbar([i], [a["mean"]], yerr=[[a["mean"] - max(a["lo"], 0.0)], [min(a["hi"], 1.0) - a["mean"]]],
                            color=c, capsize=4, marker="_", ms=14)
            else:
                ax.scatter([i], [a["mean"]], color=c, marker="_", s=200)
        refs(ax)
        ax.set_xticks(range(len(rs)), [f"{r['method']}\n{r['matching'] or ''}"
                                       + (f"\nλ={r['lam']}" if r["lam"] is not None else "") for r in rs], fontsize=7)
        ax.set_ylabel(f"test accuracy (n={report['n_test']})")
        ax.set_ylim(0, 1.02)
        ax.set_title(g, fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("test accuracy per method\ndots: seeds; bar: mean and 95% t-interval over seeds (cut at 0 and 1)",
                 fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, "accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    styles = {"ablation": "-", "cka": "--", "combined": "-.", "identity": ":", None: "-"}
    for var, fname, xlabel in (("n_train", "sample_efficiency.png", "training prompts (n_train)"),
                               ("lam", "lambda.png", "lambda")):
        vals = sorted({r["setting"][var] for r in recs if r["setting"].get(var) not in (None, "auto")})
        if len(vals) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        by = {}
        for r in recs:
            if r["setting"].get(var) in (None, "auto"):
                continue
            k = (r["method"], r["setting"].get("matching"))
            by.setdefault(k, {}).setdefault(r["setting"][var], []).append(r["accuracy"])
        for j, ((m, rule), d) in enumerate(sorted(by.items(), key=lambda kv: (_order(kv[0][0]), str(kv[0][1])))):
            xs = sorted(d)
            cis = [mean_ci(d[x]) for x in xs]
            ys = [c["mean"] for c in cis]
            err = [[y - max(c["lo"], 0.0) if c["lo"] is not None else 0 for y, c in zip(ys, cis)],
                   [min(c["hi"], 1.0) - y if c["hi"] is not None else 0 for y, c in zip(ys, cis)]]
            shift = [x * (1 + 0.02 * (j - len(by) / 2)) for x in xs]  # spread the error bars a little
            ax.errorbar(shift, ys, yerr=err, marker="o", ms=4, capsize=2, color=colors.get(m, "C0"),
                        ls=styles.get(rule, "-"), label=f"{m} ({rule})" if rule else m)
        refs(ax)
        ax.set_xscale("log")
        ax.set_xticks(vals, [str(v) for v in vals])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test accuracy (n={report['n_test']})")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        ax.set_title(f"test accuracy vs {xlabel}: mean and 95% t-interval over seeds", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out, fname))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    parts = [("ce", "CE"), ("cka_loss", "sum over pairs of (1 - CKA)"), ("mean_cka", "mean CKA of the pairs"),
             ("kd", "KD"), ("val_accuracy", "validation accuracy")]
    present = [(k, t) for k, t in parts if any(k in row for r in recs for row in r["log"])]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(3.4 * len(present) + 1.5, 3.0), squeeze=False)
        for ax, (k, title) in zip(axes[0], present):
            seen = set()
            for r in recs:
                xs = [row["step"] for row in r["log"] if k in row]
                ys = [row[k] for row in r["log"] if k in row]
                if not xs:
                    continue
                m = r["method"]
                ax.plot(xs, ys, color=colors.get(m, "C0"), alpha=0.6, lw=1, label=None if m in seen else m)
                seen.add(m)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        handles = {m: plt.Line2D([], [], color=colors.get(m, "C0"), label=m) for m in
                   dict.fromkeys(r["method"] for r in recs)}
        fig.legend(handles=list(handles.values()), fontsize=7, loc="center right")
        fig.suptitle("training curves, every run and seed (colour = method; each panel its own scale)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.4 * len(present) + 1.5), 1))
        paths.append(os.path.join(out, "curves.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def run_experiment(config: ExperimentConfig | str | dict, out: str, *, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Run (or resume) an experiment; returns the report (also in ``out/report.json``)."""
    if isinstance(config, str):
        config = ExperimentConfig.from_file(config)
    elif isinstance(config, dict):
        config = ExperimentConfig.from_dict(config)
    return Experiment(config.validate(), out, overwrite=overwrite, progress=progress).run()


__all__ = ["Experiment", "ExperimentConfig", "mean_ci", "reinit_heads", "run_experiment", "write_report"]

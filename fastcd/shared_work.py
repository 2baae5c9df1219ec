"""What every run of an experiment reuses, computed once and kept in ``OUT/shared``
(:class:`SharedWork`, held by :class:`fastcd.experiment.Experiment`): the prompt sets, the circuit, each matching,
the recovery report of a positive control, the teacher cache over the training pool, the base evaluation and the
diagnostics."""

from __future__ import annotations

import gc
import json
import os
import random
import time

import torch
from safetensors.torch import load_file

from fastcd.artifacts import Circuit, Matching, Pair
from fastcd.cka import cka_matrix_torch
from fastcd.config import METHOD_SPECS, TEST_SEED
from fastcd.discover_policy import default_circuit
from fastcd.errors import UsageError
from fastcd.experiment_config import POOL_SEED, ExperimentConfig
from fastcd.hooks import Head, capture_z, mean_z
from fastcd.io import correct_as_bits, experiment_status, write_json_atomic
from fastcd.loading import load_model, load_tokenizer, resolve_model, spec_of
from fastcd.match import MatchInputs, match, permuted_matching, random_student_matching
from fastcd.metrics import accuracy_per_example, circuit_correct, faithfulness_record
from fastcd.models import logits_at, shared_prefix
from fastcd.plan import CIRCUIT_EVAL_PROMPTS
from fastcd.tasks import TASKS, DatasetTask, adapt_task
from fastcd.teacher_cache import build_teacher_cache
from fastcd.trainable import reinit_heads

SHARED_RECORDS = ("circuit.json", "teacher_eval.json", "circuit_eval.json", "recovery.json", "cache.json",
                  "base_eval.json", "diagnostics.json")  # and matching_<rule>.json: what SharedWork keeps in OUT/shared


class SharedWork:
    """The shared work of the experiment in ``out`` (config ``cfg``, resolved ``precision``): :meth:`prompts`
    makes the prompt sets (no weights), :meth:`prepare` everything else, loading the models once;
    :meth:`matching_for` gives one run its matching."""

    def __init__(self, cfg: ExperimentConfig, out: str, precision: str, progress: bool = True):
        self.cfg, self.out, self.precision, self.progress = cfg, out, precision, progress
        self.preloaded: dict = {}  # models the plan's calibration loaded, for prepare() to go on with

    def _shared(self, name: str):
        p = os.path.join(self.out, "shared", name)
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
        return None

    def _put_shared(self, name: str, obj) -> None:
        write_json_atomic(obj, os.path.join(self.out, "shared", name), indent=1)

    # --- the pipeline ------------------------------------------------------------------------------
    def amp(self):
        """Autocast bf16 on the CPU when the experiment's precision resolves to bf16 (every frozen forward)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def prepare(self) -> None:
        """Everything runs share: tokenised prompt sets, circuit, matchings, teacher cache, base evaluation.
        Under the experiment's precision: with bf16, the teacher is loaded in bf16, the student keeps float32
        weights, and every forward runs under bf16 autocast."""
        with self.amp():
            if not hasattr(self, "n_pool"):  # the plan may have made them already
                self.prompts()
            self._models()

    def teacher_dtype(self):
        """bf16 for a bf16 experiment, float32 for a float32 one (whatever dtype the checkpoint is stored in)."""
        return self.cfg.teacher_dtype or ("bf16" if self.precision == "bf16" else "float32")

    def need(self) -> dict:
        """Which shared records are still to be made (each needs the teacher)."""
        cfg = self.cfg
        return {"circuit": self._shared("circuit.json") is None and not cfg.circuit,
                "matchings": any(self._shared(f"matching_{r}.json") is None for r in cfg.values("matching")
                                 if r != "identity" and r not in cfg.matching_files),
                "cache": self._serving_rows(self.n_pool) is None,
                "teacher_eval": self._shared("teacher_eval.json") is None,
                "circuit_eval": self._shared("circuit_eval.json") is None,
                "recovery": bool(cfg.positive_control) and self._shared("recovery.json") is None}

    def prompts(self) -> None:
        """Tokenisers, tasks and every prompt set (no model weights)."""

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t_path = resolve_model(cfg.teacher, "teacher")  # resolved and checked once: config, architecture, weights
        s_path = resolve_model(cfg.student, "student") if cfg.positive_control is None else t_path
        t_spec, s_spec = spec_of(t_path), spec_of(s_path)
        if cfg.circuit:
            c = Circuit.load(cfg.circuit)
            c.check_task(cfg.task_name())
            for h in c.unique_heads():
                t_spec.check_head(h, "circuit head")
        for path in cfg.matching_files.values():
            m = Matching.load(path)
            m.check_task(cfg.task_name())
            m.check_models(t_path, s_path)
        self.t_spec, self.s_spec, self.t_path, self.s_path = t_spec, s_spec, t_path, s_path
        tok = load_tokenizer(s_path)
        t_tok = load_tokenizer(t_path) if t_path != s_path else tok
        data = DatasetTask(cfg.task) if cfg.task not in TASKS else None  # your own prompts

        def mk(n_boxes):  # a dataset is one task, whatever the box counts
            if data is not None:
                return data
            return TASKS[cfg.task](**({"n_boxes": n_boxes} if cfg.task == "entity-tracking" else {}))
        toks = [tok] if t_tok is tok else [tok, t_tok]
        self.task = adapt_task(mk(cfg.n_boxes), toks)
        self.test_task = self.task if (cfg.test_boxes or cfg.n_boxes) == cfg.n_boxes else adapt_task(
            mk(cfg.test_boxes), toks)
        self.tok, self.t_tok = tok, t_tok
        # each seed is a replication of the whole procedure: its own training prompts, drawn from its own
        # generator (POOL_SEED + seed), max(n_train) of them; a run with a smaller n_train takes a subset of them
        per_seed = max(self.cfg.values("n_train"))
        pool_ex, self.seed_offset = [], {}
        for seed in self.cfg.all_seeds():
            self.seed_offset[seed] = len(pool_ex)
            pool_ex += self.task.generate(per_seed, seed=POOL_SEED + seed, split="train")
        self.n_pool = len(pool_ex)
        self.s_pool = self.task.encode(pool_ex, tok)
        self.t_pool = self.task.encode(pool_ex, t_tok) if t_tok is not tok else self.s_pool
        test_pairs = self.test_task.pairs(cfg.n_test, seed=TEST_SEED, split="test")
        self.s_test = self.test_task.encode([p.clean for p in test_pairs], tok)
        self.s_ref = self.test_task.encode([p.corrupt for p in test_pairs], tok)
        self.t_test = self.test_task.encode([p.clean for p in test_pairs], t_tok) if t_tok is not tok else self.s_test
        self.t_ref = self.test_task.encode([p.corrupt for p in test_pairs], t_tok) if t_tok is not tok else self.s_ref
        self.s_val = (self.task.encode(self.task.generate(cfg.n_val, seed=TEST_SEED, split="val"), tok)
                      if cfg.n_val else None)
        dpairs = self.task.pairs(cfg.n_discovery, seed=TEST_SEED, split="val")
        self.d_clean = [p.clean for p in dpairs]
        self.d_corrupt = [p.corrupt for p in dpairs]

    def _models(self) -> None:
        """Load the models, then the circuit, matchings, teacher cache and evaluations each run shares."""

        cfg, t_path, s_path, n_pool = self.cfg, self.t_path, self.s_path, self.n_pool
        rules = [r for r in cfg.values("matching")]
        need = self.need()
        pre, self.preloaded = self.preloaded, {}  # the models the plan loaded, if it ran
        teacher = None
        if any(need.values()):
            why = ", ".join(k for k, v in need.items() if v)
            experiment_status(f"loading the teacher {t_path} (needed for: {why})")
            teacher = pre.get("teacher") or load_model(t_path, dtype=self.teacher_dtype())
            teacher.eval()
        self.circuit = self._circuit(teacher)
        # float32 master weights in either precision
        self.student = pre.get("student") or load_model(s_path, dtype="float32")
        del pre
        self.student.eval()
        if cfg.positive_control:
            self.reinit = self._reinit_heads(self.circuit)
            reinit_heads(self.student, self.reinit, seed=cfg.positive_control.get("seed", 0))
        self.matchings = {r: self._matching(r, teacher) for r in rules}
        if need["recovery"]:
            self._recovery(teacher)
        self._teacher_cache(teacher, n_pool)
        if need["teacher_eval"]:
            experiment_status(f"teacher accuracy on the {len(self.t_test)} test prompts")
            tc = accuracy_per_example(teacher, self.t_test)
            self._put_shared("teacher_eval.json", {"correct": correct_as_bits(tc), "accuracy": sum(tc) / len(tc)})
        if need["circuit_eval"]:  # the teacher circuit's faithfulness, with 10 random circuits of its size and roles
            n = min(len(self.t_test), CIRCUIT_EVAL_PROMPTS)
            experiment_status(f"teacher circuit faithfulness on {n} test prompts")
            self._put_shared("circuit_eval.json", faithfulness_record(
                teacher, self.t_test.index(range(n)), self.t_ref.index(range(n)), self.circuit, split="test"))
        del teacher
        gc.collect()
        self.base_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self._base_eval()
        if cfg.diagnostics:
            self._diagnostics()

    def _recorded_circuit(self):
        """The circuit named in the config or recorded in OUT/shared; None when discovery must make it."""
        d = None if self.cfg.circuit else self._shared("circuit.json")
        return Circuit.load(self.cfg.circuit) if self.cfg.circuit else None if d is None else Circuit.from_json(d)

    def _circuit(self, teacher):
        cfg = self.cfg
        circuit = self._recorded_circuit()
        if circuit is not None:
            return circuit

        t0 = time.time()
        clean = self.task.encode(self.d_clean, self.t_tok)
        corrupt = self.task.encode(self.d_corrupt, self.t_tok)
        if cfg.discovery == "attribution":
            experiment_status(f"discovery: attribution patching over {len(clean)} prompts, exact recheck of the top "
                f"{cfg.circuit_size}")
        circuit, _, _ = default_circuit(teacher, self.task, clean, corrupt, method=cfg.discovery,
                                        top_k=cfg.circuit_size if cfg.discovery == "attribution" else None,
                                        position="last", recheck_top_k=cfg.circuit_size, batch_size=16,
                                        progress=self.progress)
        circuit.meta.update(method=cfg.discovery, n_examples=len(clean), seconds=round(time.time() - t0, 1))
        self._put_shared("circuit.json", circuit.to_json())
        return circuit

    def _reinit_heads(self, circuit) -> list:
        r = self.cfg.positive_control["reinit"]
        if isinstance(r, int):
            heads = circuit.unique_heads()
            if r > len(heads):
                raise UsageError(f"positive_control.reinit={r} but the circuit has only {len(heads)} heads")
            return heads[:r]
        return [self.s_spec.check_head(Head.parse(h), "positive_control.reinit head") for h in r]

    def _match_inputs(self, teacher):
        t_clean = self.task.encode(self.d_clean, self.t_tok)
        t_corrupt = self.task.encode(self.d_corrupt, self.t_tok)
        s_clean = self.task.encode(self.d_clean, self.tok) if self.tok is not self.t_tok else t_clean
        s_corrupt = self.task.encode(self.d_corrupt, self.tok) if self.tok is not self.t_tok else t_corrupt
        return MatchInputs(teacher, self.student, self.circuit, t_clean, s_clean, t_corrupt, s_corrupt)

    def _recorded_matching(self, rule: str, circuit, reinit: list):
        """A matching made without the teacher (identity, a file, a record), at the config's positions; else None."""
        if rule == "identity":  # every circuit unit (head, role) of a re-initialised head, aligned to itself;
            units = {}          # with ``positions``, at each of those roles instead
            for c in circuit.heads:
                units.setdefault(c.head, []).append(c.position if c.position != "all" else "last")
            m = Matching([Pair(h, h, role, "reinit") for h in reinit for role in dict.fromkeys(units.get(h, ["last"]))],
                         "identity")
        elif rule in self.cfg.matching_files:
            m = Matching.load(self.cfg.matching_files[rule])
        else:
            d = self._shared(f"matching_{rule}.json")
            m = None if d is None else Matching.from_json(d)
        return None if m is None else self._at_positions(m)

    def _matching(self, rule: str, teacher):
        m = self._recorded_matching(rule, self.circuit, getattr(self, "reinit", []))
        if m is not None:
            return m
        t0 = time.time()
        experiment_status(f"matching: rule {rule!r}")
        kw = {"progress": self.progress} if rule in ("ablation", "combined") else {}
        m = match(self._match_inputs(teacher), rule, **kw)
        m.meta["seconds"] = round(time.time() - t0, 1)
        self._put_shared(f"matching_{rule}.json", m.to_json())
        return self._at_positions(m)

    def _at_positions(self, m):
        """With ``positions``: every (teacher, student) pair aligned at each listed role (multi-position CKA)."""

        if not self.cfg.positions:
            return m
        heads = list(dict.fromkeys((p.teacher, p.student, p.group) for p in m.pairs))
        return Matching([Pair(t, s, role, g) for t, s, g in heads for role in self.cfg.positions],
                        m.method, {**m.meta, "positions": list(self.cfg.positions)})

    def _recovery(self, teacher) -> None:
        """Positive control: does each matching rule pair the re-initialised heads with themselves?"""

        out = {"reinit": [str(h) for h in self.reinit]}
        for rule in self.cfg.recovery_rules:
            t0 = time.time()
            experiment_status(f"positive control: recovering the identity with rule {rule!r}")
            kw = {"progress": self.progress} if rule in ("ablation", "combined") else {}
            m = match(self._match_inputs(teacher), rule, **kw)
            ident = [p.teacher == p.student for p in m.pairs]
            re = [p for p in m.pairs if p.teacher in self.reinit]
            out[rule] = {"pairs": [[str(p.teacher), str(p.student), p.position] for p in m.pairs],
                         "identity_share": sum(ident) / len(ident),
                         "reinit_identity": sum(p.teacher == p.student for p in re),
                         "reinit_paired": len(re), "seconds": round(time.time() - t0, 1)}
        self._put_shared("recovery.json", out)

    @staticmethod
    def _units(circuit, matchings: dict) -> list[tuple[str, str]]:
        """Every (teacher head, role) any run aligns to: the circuit's units and each matching's teacher side."""
        units = [(str(c.head), c.position if c.position != "all" else "last") for c in circuit.heads]
        for m in matchings.values():
            units += [(str(p.teacher), p.position) for p in m.pairs]
        return list(dict.fromkeys(units))

    def _recorded_units(self):
        """:meth:`_units` before the models are loaded, from the circuit and matchings on file; None when one of them
        is still to be made (it needs the teacher)."""
        cfg, circuit = self.cfg, self._recorded_circuit()
        if circuit is None:
            return None
        reinit = self._reinit_heads(circuit) if cfg.positive_control else []
        ms = {r: self._recorded_matching(r, circuit, reinit) for r in cfg.values("matching")}
        return None if None in ms.values() else self._units(circuit, ms)

    def _cache_rows(self, n_pool: int):
        """Which rows of the stored teacher cache make this pool: all of them when it was made for these seeds; in a
        copied directory whose cache holds more seeds, each of this pool's seeds' blocks (a seed's prompts do not
        depend on the other seeds); None when it cannot serve."""
        d, seeds = self._shared("cache.json"), self.cfg.all_seeds()
        if d is None or not os.path.isdir(os.path.join(self.out, "shared", "cache")):
            return None
        cached, per = d.get("seeds") or [], n_pool // len(seeds)
        if cached == seeds and d["n"] == n_pool:
            return slice(None)
        if not (set(seeds) <= set(cached) and d["n"] == per * len(cached)):
            return None
        return torch.cat([torch.arange(cached.index(s) * per, (cached.index(s) + 1) * per) for s in seeds])

    def _serving_rows(self, n_pool: int):
        """The rows of the stored teacher cache that serve this experiment, or None (it must be rebuilt): made for
        its prompts, holding exactly the units its runs align to and, with ``kd``, the teacher's logits."""
        d, rows = self._shared("cache.json"), self._cache_rows(n_pool)
        if rows is None or d["logits"] < ("kd" in self.cfg.methods):
            return None
        units = self._units(self.circuit, self.matchings) if hasattr(self, "matchings") else self._recorded_units()
        return rows if [tuple(u) for u in d["units"]] == units else None

    def _teacher_cache(self, teacher, n_pool: int) -> None:
        units = self._units(self.circuit, self.matchings)
        path = os.path.join(self.out, "shared", "cache")
        need_logits = "kd" in self.cfg.methods
        rows = self._serving_rows(n_pool)
        if rows is None:
            rows = slice(None)
            if teacher is None:
                teacher = load_model(self.cfg.teacher, dtype=self.teacher_dtype())
            t0 = time.time()
            experiment_status(f"teacher cache: {n_pool} prompts, {len(units)} (head, role) units, logits={need_logits}")
            pseudo = Matching([Pair(Head.parse(h), Head.parse(h), r) for h, r in units], "units")
            build_teacher_cache(teacher, self.t_pool, pseudo, path, logits=need_logits, progress=self.progress,
                                tokenizer=self.t_tok, batch_size=32)
            self._put_shared("cache.json", {"n": n_pool, "seeds": self.cfg.all_seeds(), "units": units,
                                            "logits": need_logits,
                                            "seconds": round(time.time() - t0, 1)})
        shards = [load_file(os.path.join(path, s)) for s in sorted(os.listdir(path)) if s.endswith(".safetensors")]
        self.pool = {"labels": torch.cat([s["labels"] for s in shards])[rows],
                     "z": torch.cat([s["z"] for s in shards], dim=1)[:, rows]}
        if need_logits:
            self.pool["logits"] = torch.cat([s["logits"] for s in shards])[rows]
        self.unit_index = {u: i for i, u in enumerate(units)}

    def _base_eval(self) -> None:
        d = self._shared("base_eval.json") or {}
        changed = False
        if "correct" not in d:
            experiment_status(f"untrained student on the {len(self.s_test)} test prompts")
            c = accuracy_per_example(self.student, self.s_test)
            d.update(correct=correct_as_bits(c), accuracy=sum(c) / len(c))
            changed = True
        if self.cfg.circuit_accuracy:
            self.means = mean_z(self.student, self.s_ref.input_ids)
            for rule, m in self.matchings.items():
                if f"circuit_{rule}" not in d:
                    cc = circuit_correct(self.student, self.s_test, self.means, m.circuit_units())
                    d[f"circuit_{rule}"] = sum(cc) / len(cc)
                    changed = True
        if changed:
            self._put_shared("base_eval.json", d)
        self.base_eval = d

    def _diagnostics(self) -> None:
        """Per pair at the start: CKA on m pool prompts vs a Gaussian null and random student heads."""

        d = self._shared("diagnostics.json") or {}
        todo = [r for r in self.matchings if r not in d]
        if not todo:
            self.diag = d
            return
        m = min(self.cfg.diagnostics_m, len(self.s_pool))
        experiment_status(f"diagnostics: CKA at the start on {m} pool prompts")
        sub = self.s_pool.index(range(m))
        heads = self.s_spec.all_heads()
        roles = sorted({p.position for mt in self.matchings.values() for p in mt.pairs})
        z = {}  # role -> [n_heads_total, m, d]
        with torch.no_grad():
            prefix = shared_prefix(self.student, sub.input_ids, [sub.positions[r] for r in roles + ["last"]])
            with capture_z(self.student, heads, detach=True) as cache:  # after the prefix: it sees the suffixes
                logits_at(self.student, sub.positions["last"], input_ids=sub.input_ids, prefix=prefix)
            at = sub.positions if prefix is None else prefix.shift(sub.positions)
            for role in roles:
                pos = at[role]
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
    def matching_for(self, spec: dict):
        rule = spec["setting"]["matching"]
        if rule is None:
            return None
        m = self.matchings[rule]
        if METHOD_SPECS[spec["method"]].random_students:  # the same teacher units, random student heads
            return random_student_matching(m, self.s_spec.all_heads(), spec["seed"], rule)
        if spec["method"] == "ce+perm-cka":  # the same student heads, each with another pair's teacher target
            return permuted_matching(m, spec["seed"], rule)
        return m


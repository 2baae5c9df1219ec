"""``fastcd.distill()``: circuit distillation end to end (discover, match, train the matched heads, evaluate),
with resume that cannot mix runs, saving (``save_pretrained``) and a model card beside the saved student."""

from __future__ import annotations

import gc
import os
import random
import sys
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fastcd.adapters import save_adapter
from fastcd.artifacts import Circuit, Matching, check_provenance, prompts_sha
from fastcd.config import TEST_SEED, DistillConfig, resolve_mixed_precision
from fastcd.discover import default_circuit
from fastcd.distillation import CircuitDistiller, check_vocabularies
from fastcd.errors import UsageError
from fastcd.hooks import mean_z
from fastcd.io import atomic_target, read_json, write_json_atomic
from fastcd.loading import check_model_path, load_model, load_tokenizer, model_identity, spec_of
from fastcd.match import MatchInputs, match, match_random
from fastcd.metrics import accuracy_per_example, circuit_correct, faithfulness_record
from fastcd.models import get_adapter
from fastcd.ranks import broadcast_artifacts, check_ranks_agree, is_rank0, ranked
from fastcd.resume import (
    EARLY,
    announce_resume,
    cfg_key,
    check_checkpoint,
    data_identity,
    fingerprint,
    read_checkpoint,
    save_checkpoint,
    sha,
)
from fastcd.tasks import DatasetTask, get_task
from fastcd.tasks.base import adapt_task
from fastcd.tasks.protocol import check_task
from fastcd.teacher_cache import MemoryCache, TeacherCache, check_cache_vocabulary, teacher_signals
from fastcd.trainable import merge
from fastcd.training import BATCH_ORDER, make_optimizer, train_loop


@dataclass
class DistillResult:
    student: nn.Module
    matching: Matching | None
    circuit: Circuit | None
    metrics: dict
    log: list = field(default_factory=list)
    correct: list = field(default_factory=list)  # per test example, for McNemar
    circuit_correct: list = field(default_factory=list)
    tokenizer: object = None  # the student's tokenizer: save_pretrained writes it beside the weights

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """The trained student and its tokenizer, loadable with AutoModelForCausalLM and AutoTokenizer."""
        self.student.save_pretrained(path, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


def resolve_task(task_or_dataset):
    """A task name (``entity-tracking``, ``tom``), a JSONL file or list of examples
    (:class:`fastcd.tasks.DatasetTask`), or any object that follows :class:`fastcd.tasks.Task`."""
    if isinstance(task_or_dataset, (list, tuple)):  # your own examples (or clean/corrupt pairs)
        return DatasetTask(list(task_or_dataset))
    if isinstance(task_or_dataset, (str, os.PathLike)):
        return get_task(os.fspath(task_or_dataset))
    return check_task(task_or_dataset, "task_or_dataset")


def _name_of(x) -> str | None:
    if x is None:
        return None
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


def distill(teacher, student, task_or_dataset, circuit: Circuit | None = None, matching: Matching | None = None,
            config: DistillConfig | None = None, *, teacher_tokenizer=None, student_tokenizer=None,
            teacher_cache: str | None = None) -> DistillResult:
    """Run circuit distillation end to end.

    Args:
        teacher, student: local HF directories or modules. ``teacher`` may be None with ``teacher_cache``.
        task_or_dataset: ``"entity-tracking"``, ``"tom"`` or a task object: a built-in one
            (``EntityTracking(n_boxes=5)``) or any object that follows :class:`fastcd.tasks.Task`.
        circuit: the teacher circuit; discovered when None with :func:`fastcd.discover.default_circuit`
            (``config.discovery``; the task's default policy).
        matching: teacher->student pairs; computed with ``config.matching_method`` when None.
        config: :class:`DistillConfig`.
        teacher_tokenizer, student_tokenizer: default: loaded from the model directories.
        teacher_cache: an offline teacher cache directory (see :func:`build_teacher_cache`).

    Returns:
        :class:`DistillResult` with the trained student (merged, ready for ``save_pretrained``), the matching,
        the circuit, metrics (student, student circuit and teacher accuracy, trainable share), and the log.
    """

    cfg = (config or DistillConfig()).validate()
    command = _command_line()
    torch.manual_seed(cfg.seed)
    task = resolve_task(task_or_dataset)
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"out: {cfg.out!r} exists and is not a directory")
    for arg, what in ((student, "student"), (teacher, "teacher")):  # paths, architectures, weights: seconds
        if isinstance(arg, (str, os.PathLike)):
            check_model_path(arg, what)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt") if cfg.out else None
    if ckpt_path and os.path.isfile(ckpt_path) and cfg.overwrite:
        os.remove(ckpt_path)
    if cfg.resume and not (ckpt_path and os.path.isfile(ckpt_path)):
        raise UsageError(f"resume: there is no checkpoint to resume in out={cfg.out!r} (ckpt.pt is written every "
                         "save_every steps)")
    teacher_name, student_name = _name_of(teacher), _name_of(student)
    s_tok = student_tokenizer or (load_tokenizer(student, "student") if isinstance(student, (str, os.PathLike))
                                  else None)
    t_tok = teacher_tokenizer or (load_tokenizer(teacher, "teacher") if isinstance(teacher, (str, os.PathLike))
                                  else None)
    if s_tok is None:
        raise UsageError("student_tokenizer is needed when student is a module")
    t_tok = t_tok or s_tok
    # word pools: only words that are single tokens for both tokenizers (says how many were dropped)
    task = adapt_task(task, [s_tok] if t_tok is s_tok else [s_tok, t_tok])
    # checks that need no weights, before any model loads (a 1.5B model takes minutes on a CPU)
    if t_tok is not s_tok:
        check_vocabularies(None, None, t_tok, s_tok)
    if matching is not None:
        matching.check_models(teacher, student)
        roles = set(task.roles) | {"last"}
        for p in matching.pairs:
            if p.position not in roles:
                raise UsageError(f"matching: pair {p.teacher} -> {p.student} is at position {p.position!r}; the "
                                 f"{task.name} task has the roles {sorted(roles)}")
    if teacher_cache is not None and teacher is None:
        check_cache_vocabulary(teacher_cache, s_tok)
    allow = cfg.allow_foreign_artifacts
    for art in (circuit, matching):  # made for this task (a ToM circuit in an entity-tracking run is refused)
        if art is not None:
            art.check_task(task.name, allow)
    ids = {"teacher": model_identity(teacher), "student": model_identity(student)}  # paths only: no weights read
    if circuit is not None:  # ... and with these models
        check_provenance("circuit", circuit.meta.get("provenance"), {"model": ids["teacher"]}, allow)
    if matching is not None:
        check_provenance("matching", matching.meta.get("provenance"), ids, allow)
    if circuit is not None and teacher is not None:
        circuit.check_model(spec_of(teacher), "teacher")
    # the data the run uses (one fixed test set for every method and seed, so that runs compare paired)
    train_ex = task.generate(cfg.n_train, seed=cfg.seed, split="train")
    test_pairs = task.pairs(cfg.n_eval, seed=TEST_SEED, split="test")
    val_ex = task.generate(cfg.n_val, seed=cfg.seed, split="val") if cfg.eval_every else []
    prov = read_json(os.path.join(teacher_cache, "index.json"), "teacher_cache").get("provenance") \
        if teacher_cache else None
    if prov and prov.get("prompts") != prompts_sha(train_ex) and not allow:
        raise UsageError(f"teacher_cache: made from other training prompts than this run's ({prov.get('n_prompts')} "
                         f"there, {len(train_ex)} here, other content or order); rebuild it for this run "
                         "(--build-teacher-cache), or allow_foreign_artifacts=True")
    # what a checkpoint must agree on to be resumed; what needs no weights is checked before any model loads
    identity = {"config": cfg_key(cfg), "task": f"{type(task).__name__}:{sha(vars(task))}",
                "data": data_identity({"train": train_ex, "val": val_ex, "test": test_pairs}),
                "teacher_cache": fingerprint(teacher_cache), "matching": None, **ids}
    state = read_checkpoint(ckpt_path) if ckpt_path and os.path.isfile(ckpt_path) else None
    if state is not None:  # models given as paths are known by their files: checked here too, before they load
        check_checkpoint(state, ckpt_path, identity, cfg, EARLY + tuple(k for k, v in ids.items() if v))
    if cfg.mixed_precision == "auto":  # bf16 on the CPU for real LMs (config only: no weights read yet)
        dev_type = torch.device(cfg.device).type if cfg.device else "cpu"
        cfg = replace(cfg, mixed_precision=resolve_mixed_precision(
            "auto", spec_of(student, "student").d_model, dev_type))
    bf16 = cfg.mixed_precision == "bf16"
    # bf16: a student read from disk keeps float32 master weights; the frozen teacher is loaded in bf16
    student = load_model(student, device=cfg.device, what="student",
                         dtype="float32" if bf16 and isinstance(student, (str, os.PathLike)) else None)
    teacher = None if teacher is None else load_model(
        teacher, dtype=cfg.teacher_dtype or ("bf16" if bf16 and isinstance(teacher, (str, os.PathLike)) else None),
        device=cfg.device, what="teacher")
    dev_type = next(student.parameters()).device.type

    def amp():  # every frozen forward (discovery, matching, evaluation) under the run's autocast
        return torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16)

    if teacher is None and teacher_cache is None:
        raise UsageError("teacher is None: pass a teacher or a teacher_cache")
    if teacher is not None:
        check_vocabularies(teacher, student, t_tok, s_tok)
    s_vocab = get_adapter(student).spec.vocab_size
    if teacher is None:  # the vocabulary hash was checked before loading; now the label ids against the student
        check_cache_vocabulary(teacher_cache, None, s_vocab)
    top = max(s_tok.get_vocab().values())
    if top >= s_vocab:
        raise UsageError(f"student_tokenizer has token ids up to {top}, the student's embedding has "
                         f"{s_vocab} rows: they do not belong together")
    identity.update({k: identity[k] or fingerprint(m) for k, m in (("teacher", teacher), ("student", student))})
    # the models (and a given matching: the random control re-draws its student heads later) before any work
    if state is not None:
        known = matching is not None and not cfg.spec.random_students
        check_checkpoint(state, ckpt_path, {**identity, "matching": sha(matching.to_json()) if known else None}, cfg,
                         ("teacher", "student", "matching"))
    s_train = task.encode(train_ex, s_tok)
    t_train = task.encode(train_ex, t_tok) if teacher is not None else None
    s_test = task.encode([p.clean for p in test_pairs], s_tok)
    s_ref = task.encode([p.corrupt for p in test_pairs], s_tok)

    # --- circuit and matching -------------------------------------------------------------------------
    spec = cfg.spec
    needs_matching = not spec.full_model
    if needs_matching and matching is None and not is_rank0():  # under torchrun: rank 0 discovers and matches
        circuit, matching = broadcast_artifacts(None, None)
    elif needs_matching and matching is None:
        if teacher is None:
            raise UsageError("matching must be given when training from a teacher cache")
        dpairs = task.pairs(cfg.n_discovery, seed=cfg.seed, split="val")
        t_clean = task.encode([p.clean for p in dpairs], t_tok)
        t_corrupt = task.encode([p.corrupt for p in dpairs], t_tok)
        if circuit is None:
            with amp():
                circuit, _, _ = default_circuit(teacher, task, t_clean, t_corrupt, method=cfg.discovery,
                                                top_k=cfg.top_k, path_k=cfg.path_k, progress=cfg.progress)
        if spec.random_students:
            matching = match_random(circuit, student, seed=cfg.seed)
        else:
            inp = MatchInputs(teacher, student, circuit, t_clean, task.encode([p.clean for p in dpairs], s_tok),
                              t_corrupt, task.encode([p.corrupt for p in dpairs], s_tok))
            kw = {"progress": cfg.progress} if cfg.matching_method in ("ablation", "combined") else {}
            with amp():
                matching = match(inp, cfg.matching_method, **kw)
        circuit, matching = broadcast_artifacts(circuit, matching)
    elif spec.random_students and matching is not None and matching.method != "random":
        matching = match_random(matching, student, seed=cfg.seed)
    if matching is not None:
        matching.check_models(teacher, student)
    check_ranks_agree(circuit=circuit, matching=matching)  # every rank trains the same heads

    cache = TeacherCache(teacher_cache, matching if spec.uses_cka else None) if teacher_cache else None
    if cache is not None and len(cache) != cfg.n_train:
        raise UsageError(f"teacher_cache holds {len(cache)} examples, config.n_train is {cfg.n_train}")

    teacher_metrics: dict = {}  # the frozen teacher on the test set (and its circuit's faithfulness), before training
    if teacher is not None:
        t_test = task.encode([p.clean for p in test_pairs], t_tok)
        with amp():
            teacher_metrics["teacher_accuracy"] = sum(accuracy_per_example(teacher, t_test)) / len(t_test)
        if cfg.circuit_eval and circuit is not None:
            t_ref = task.encode([p.corrupt for p in test_pairs], t_tok)
            with amp(), torch.no_grad():
                teacher_metrics["teacher_circuit"] = faithfulness_record(teacher, t_test, t_ref, circuit, split="test")
            circuit.meta["evaluation"] = teacher_metrics["teacher_circuit"]
    if cache is None and teacher is not None and cfg.effective_kd_weight == 0 and not ranked():
        # the cheap path: the frozen teacher runs once over the training prompts (labels and the matched heads' z,
        # in memory) instead of on every step, and is released before training
        with amp(), torch.no_grad():
            cache = MemoryCache(teacher_signals(teacher, t_train, matching if spec.uses_cka else None,
                                                progress=cfg.progress))
        teacher = None
        gc.collect()
    cd = CircuitDistiller(student, None if spec.full_model else matching, teacher=teacher, config=cfg)
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if cfg.batch_size % world or (cfg.micro_batch_size and (cfg.batch_size // world) % cfg.micro_batch_size):
            raise UsageError(f"batch_size={cfg.batch_size} must be divisible by the world size {world}, and the "
                             f"per-device batch by micro_batch_size={cfg.micro_batch_size}")
        if world > 1:
            cd.enable_ddp()
    opt, sched = make_optimizer(cd, cfg)
    step, log, loop_state = 0, [], {}
    ckpt = os.path.join(cfg.out, "ckpt.pt") if cfg.out else None
    base_accuracy = None
    if state is not None:
        identity["matching"] = sha(matching.to_json()) if matching is not None else None
        check_checkpoint(state, ckpt, identity, cfg, ("matching",))
        announce_resume(ckpt, state["step"], cfg.steps)
        with torch.no_grad():
            for p, v in zip(cd.trainable_parameters(), state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        loop_state = dict(state.get("loop_state") or {})
        torch.set_rng_state(state["torch_rng"])  # dropout and any other use of the global generator
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("python_rng") is not None:
            random.setstate(state["python_rng"])
        step, log = state["step"], state["log"]
        if state.get("n_eval") == cfg.n_eval:
            base_accuracy = state.get("base_accuracy")
        cd._lam = state.get("lam")
    identity["matching"] = sha(matching.to_json()) if matching is not None else None
    if base_accuracy is None:  # the untrained student, reported beside the trained one
        was = student.training
        student.eval()
        with amp():
            base_accuracy = sum(accuracy_per_example(student, s_test)) / len(s_test)
        student.train(was)

    def save(step_, log_):
        if ckpt and rank == 0 and cfg.save_every and (step_ % cfg.save_every == 0 or step_ == cfg.steps):
            os.makedirs(cfg.out, exist_ok=True)
            save_checkpoint({"params": [p.detach().clone() for p in cd.trainable_parameters()],
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "loop_state": dict(loop_state), "batch_order": BATCH_ORDER,
                          "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                          "step": step_, "log": log_,
                          "identity": identity, "base_accuracy": base_accuracy, "n_eval": cfg.n_eval,
                          "lam": cd._lam}, cfg.out, identity, step_)

    # accuracy during training is measured on validation prompts, never on the test set
    s_val = task.encode(val_ex, s_tok) if cfg.eval_every else None
    try:
        log = train_loop(cd, opt, cfg.seed, cfg, s_train, t_train, cache, step=step, log=log, world=world, rank=rank,
                         eval_batch=s_val, on_step=save, scheduler=sched, state=loop_state)
    except BaseException:
        if cd.slices is not None:  # leave the student a plain model (no parametrisations) for the caller
            merge(cd.slices)
        raise
    student.eval()
    if cd.slices is not None:
        merge(cd.slices)
    for p in student.parameters():
        p.requires_grad_(False)
    with amp():
        correct = accuracy_per_example(student, s_test)
    metrics = {"method": cfg.method, "student_accuracy": sum(correct) / len(correct),
               "student_base_accuracy": base_accuracy,
               "trainable_params": cd.n_trainable,
               "lam_effective": cd.lam if spec.uses_cka else None,
               "steps_done": log[-1]["step"] if log else step, "stopped_early": loop_state.get("stopped_early"),
               "trainable_fraction": cd.n_trainable / sum(p.numel() for p in student.parameters())}
    circ_correct = []
    if matching is not None:
        live = [(p.student, p.position) for p in matching.pairs]
        with amp():
            means = mean_z(student, s_ref.input_ids.to(next(student.parameters()).device))
            circ_correct = circuit_correct(student, s_test, means, live, batch_size=128)
        metrics["student_circuit_accuracy"] = sum(circ_correct) / len(circ_correct)
        if metrics["student_accuracy"] > 0:
            metrics["student_circuit_faithfulness"] = metrics["student_circuit_accuracy"] / metrics["student_accuracy"]
        s_spec = get_adapter(student).spec
        trained = s_spec.n_total_heads if spec.full_model else len(matching.student_heads())
        metrics["trained_heads"] = trained
        metrics["trained_heads_fraction"] = trained / s_spec.n_total_heads
    metrics.update(teacher_metrics)
    metrics["world_size"] = world
    result = DistillResult(student, matching, circuit, metrics, log, correct, circ_correct, s_tok)
    if cfg.out and rank == 0:
        save_result(result, cfg, s_tok, task=task, teacher=teacher_name, student=student_name,
                    command=command)
    if world > 1:
        torch.distributed.barrier()
    return result


def save_result(result: DistillResult, cfg: DistillConfig, tokenizer=None, *, task=None, teacher: str | None = None,
                student: str | None = None, command: str | None = None) -> str:
    """``OUT/student`` (save_pretrained, with a model card ``README.md``), ``OUT/adapter``, ``OUT/matching.json``,
    ``OUT/circuit.json``, ``OUT/log.json``."""
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    from fastcd.card import model_card

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
    return out


__all__ = ["DistillResult", "distill", "resolve_task", "save_result"]

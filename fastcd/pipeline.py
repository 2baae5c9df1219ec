"""``fastcd.distill()``: circuit distillation end to end (discover, match, train the matched heads, evaluate),
with resume that cannot mix runs, saving (``save_pretrained``) and a model card beside the saved student."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fastcd.artifacts import Circuit, Matching, check_provenance, prompts_sha
from fastcd.card import _command_line, _name_of, save_result
from fastcd.config import BF16_MIN_D_MODEL, TEST_SEED, DistillConfig, resolve_mixed_precision
from fastcd.cost import CALIBRATION_PROMPTS, calibrate, distill_plan, time_plan
from fastcd.discover_policy import default_circuit
from fastcd.distillation import check_vocabularies
from fastcd.errors import UsageError
from fastcd.io import read_json
from fastcd.loading import load_model, load_tokenizer, model_identity, resolve_model, spec_of
from fastcd.match import MatchInputs, match, match_random
from fastcd.metrics import accuracy_per_example, faithfulness_record
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
    restore_training_state,
    save_checkpoint,
    sha,
    training_state,
)
from fastcd.stages import Stages
from fastcd.tasks import DatasetTask, get_task
from fastcd.tasks.base import adapt_task
from fastcd.tasks.protocol import check_task
from fastcd.teacher_cache import MemoryCache, TeacherCache, check_cache_vocabulary, teacher_signals
from fastcd.training import check_gradient_checkpointing, evaluate_run, run_result, train_run


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
        self.student.save_pretrained(path, **kwargs)  # in place: into the caller's directory, as transformers does
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)  # in place: beside the weights


def resolve_task(task_or_dataset):
    """A task name (``entity-tracking``, ``tom``), a JSONL file or list of examples
    (:class:`fastcd.tasks.DatasetTask`), or any object that follows :class:`fastcd.tasks.Task`."""
    if isinstance(task_or_dataset, (list, tuple)):  # your own examples (or clean/corrupt pairs)
        return DatasetTask(list(task_or_dataset))
    if isinstance(task_or_dataset, (str, os.PathLike)):
        return get_task(os.fspath(task_or_dataset))
    return check_task(task_or_dataset, "task_or_dataset")


def distill(teacher, student, task_or_dataset, circuit: Circuit | None = None, matching: Matching | None = None,
            config: DistillConfig | None = None, *, teacher_tokenizer=None, student_tokenizer=None,
            teacher_cache: str | None = None, plan_only: bool = False) -> DistillResult:
    """Run circuit distillation end to end.

    Args:
        teacher, student: local HF directories or modules. ``teacher`` may be None with ``teacher_cache``.
        task_or_dataset: ``"entity-tracking"``, ``"tom"`` or a task object: a built-in one
            (``EntityTracking(n_boxes=5)``) or any object that follows :class:`fastcd.tasks.Task`.
        circuit: the teacher circuit; discovered when None with :func:`fastcd.discover_policy.default_circuit`
            (``config.discovery``; the task's default policy).
        matching: teacher->student pairs; computed with ``config.matching_method`` when None.
        config: :class:`DistillConfig`.
        teacher_tokenizer, student_tokenizer: default: loaded from the model directories.
        teacher_cache: an offline teacher cache directory (see :func:`build_teacher_cache`).
        plan_only: return the run's cost plan (a dict: each stage's work, predicted seconds, peak memory) after
            loading the models and a short calibration, before any work.

    Returns:
        :class:`DistillResult` with the trained student (merged, ready for ``save_pretrained``), the matching,
        the circuit, metrics (student, student circuit and teacher accuracy, trainable share), and the log.
    """

    cfg = (config or DistillConfig()).checked()
    command = _command_line()
    torch.manual_seed(cfg.seed)
    task = resolve_task(task_or_dataset)
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"out: {cfg.out!r} exists and is not a directory")
    # each model argument resolved and checked once (path, architecture, weights: seconds); below, every
    # function takes the ModelRef and neither resolves nor checks it again
    student = resolve_model(student, "student")
    teacher = None if teacher is None else resolve_model(teacher, "teacher")
    dev0 = (next(student.parameters()).device.type if isinstance(student, nn.Module)
            else torch.device(cfg.device).type if cfg.device else "cpu")
    cfg, scaled = cfg.scaled_for(spec_of(student, "student").d_model, dev0)  # CPU defaults for a real LM
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
        cfg = replace(cfg, mixed_precision=resolve_mixed_precision("auto", spec_of(student, "student").d_model, dev0))
    bf16 = cfg.mixed_precision == "bf16"
    # the plan: each stage's work now (no weights read), timed after loading for a real LM (or with plan_only)
    cached = teacher_cache is not None or (teacher is not None and cfg.effective_kd_weight == 0 and not ranked())
    plan = distill_plan(cfg, task, teacher=teacher, student=student, circuit=circuit, matching=matching,
                        cached=cached, scaled=scaled, seq_len=task.encode(train_ex[:1], s_tok).input_ids.shape[1],
                        sample=task.encode([p.clean for p in task.pairs(8, seed=cfg.seed, split="val")], t_tok))
    timed = teacher is not None and (plan_only or spec_of(student, "student").d_model >= BF16_MIN_D_MODEL)
    stages = Stages(None, quiet=not is_rank0())
    if not timed:
        stages.say_plan(plan)
    with stages("load", plan["stages"][0]["what"]):  # bf16: the student keeps float32 master weights
        student = load_model(student, device=cfg.device, what="student",
                             dtype="float32" if bf16 and isinstance(student, (str, os.PathLike)) else None)
        teacher = None if teacher is None else load_model(
            teacher, dtype=cfg.teacher_dtype or ("bf16" if bf16 and isinstance(teacher, (str, os.PathLike)) else None),
            what="teacher", **cfg.teacher_placement)
    dev_type = next(student.parameters()).device.type
    check_gradient_checkpointing(student, cfg.gradient_checkpointing)  # before discovery and matching

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
    with stages("tokenisation", f"{len(train_ex) + len(val_ex) + 2 * len(test_pairs):,} prompts"):
        s_train = task.encode(train_ex, s_tok)
        t_train = task.encode(train_ex, t_tok) if teacher is not None else None
    if timed:  # a short calibration on this machine times the plan
        n_pairs = len(matching.pairs) if matching else len(circuit.heads) if circuit else 9
        with stages("calibration", f"{CALIBRATION_PROMPTS} prompts through each model and 2 training steps"):
            cal = calibrate(teacher, student, t_train.index(range(min(CALIBRATION_PROMPTS, len(t_train)))),
                            s_train.index(range(min(CALIBRATION_PROMPTS, len(s_train)))), [cfg.batch_size], n_pairs,
                            amp, cfg.mixed_precision)
        stages.say_plan(time_plan(plan, cal, cfg.batch_size))
    if plan_only:
        return plan
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
            with amp(), stages("discovery", stages.what("discovery")):
                circuit, _, _ = default_circuit(teacher, task, t_clean, t_corrupt, method=cfg.discovery,
                                                top_k=cfg.top_k, path_k=cfg.path_k, progress=cfg.progress)
        if spec.random_students:
            matching = match_random(circuit, student, seed=cfg.seed)
        else:
            inp = MatchInputs(teacher, student, circuit, t_clean, task.encode([p.clean for p in dpairs], s_tok),
                              t_corrupt, task.encode([p.corrupt for p in dpairs], s_tok))
            kw = {"progress": cfg.progress} if cfg.matching_method in ("ablation", "combined") else {}
            with amp(), stages("matching", stages.what("matching")):
                matching = match(inp, cfg.matching_method, **kw)
            del inp  # it holds the teacher, which leaves memory before training
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
        with amp(), torch.no_grad(), stages("teacher evaluation", stages.what("teacher evaluation")):
            teacher_metrics["teacher_accuracy"] = sum(accuracy_per_example(teacher, t_test)) / len(t_test)
            if cfg.circuit_eval and circuit is not None:
                t_ref = task.encode([p.corrupt for p in test_pairs], t_tok)
                teacher_metrics["teacher_circuit"] = faithfulness_record(teacher, t_test, t_ref, circuit, split="test")
                circuit.meta["evaluation"] = teacher_metrics["teacher_circuit"]
    if cache is None and teacher is not None and cfg.effective_kd_weight == 0 and not ranked():
        # the cheap path: the frozen teacher runs once over the training prompts (labels and the matched heads' z,
        # in memory) instead of on every step, and is released before training
        with amp(), torch.no_grad(), stages("teacher cache", stages.what("teacher cache")):
            cache = MemoryCache(teacher_signals(teacher, t_train, matching if spec.uses_cka else None,
                                                progress=cfg.progress))
        teacher = None
        gc.collect()
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if cfg.batch_size % world or (cfg.micro_batch_size and (cfg.batch_size // world) % cfg.micro_batch_size):
            raise UsageError(f"batch_size={cfg.batch_size} must be divisible by the world size {world}, and the "
                             f"per-device batch by micro_batch_size={cfg.micro_batch_size}")
    ckpt = os.path.join(cfg.out, "ckpt.pt") if cfg.out else None
    identity["matching"] = sha(matching.to_json()) if matching is not None else None
    step, log, loop_state, base_accuracy = 0, [], {}, None
    if state is not None:
        check_checkpoint(state, ckpt, identity, cfg, ("matching",))
        announce_resume(ckpt, state["step"], cfg.steps)
        step, log, loop_state = state["step"], state["log"], dict(state.get("loop_state") or {})
        if state.get("n_eval") == cfg.n_eval:
            base_accuracy = state.get("base_accuracy")
    if base_accuracy is None:  # the untrained student, reported beside the trained one
        was = student.training
        student.eval()
        with amp(), stages("base evaluation", stages.what("base evaluation")):
            base_accuracy = sum(accuracy_per_example(student, s_test)) / len(s_test)
        student.train(was)
    held = {}

    def prepare(cd, opt, sched):  # DDP, and a resumed run's parameters, optimizer, schedule, generators and lambda
        held.update(cd=cd, opt=opt, sched=sched)
        if world > 1:
            cd.enable_ddp()
        if state is not None:
            restore_training_state(cd, opt, sched, state)

    def save(step_, log_):
        if ckpt and rank == 0 and cfg.save_every and (step_ % cfg.save_every == 0 or step_ == cfg.steps):
            os.makedirs(cfg.out, exist_ok=True)
            cd, opt, sched = held["cd"], held["opt"], held["sched"]
            save_checkpoint(training_state(cd, opt, sched, loop_state=dict(loop_state), step=step_, log=log_,
                                           identity=identity, base_accuracy=base_accuracy, n_eval=cfg.n_eval),
                            cfg.out, identity, step_)

    # accuracy during training is measured on validation prompts, never on the test set
    s_val = task.encode(val_ex, s_tok) if cfg.eval_every else None
    with stages("training", stages.what("training")):
        cd, log, train_s = train_run(student, matching, cfg, cfg.seed, s_train, cache=cache, t_train=t_train,
                                     teacher=teacher, prepare=prepare, step=step, log=log, world=world, rank=rank,
                                     eval_batch=s_val, on_step=save, state=loop_state)
    with stages("evaluation", stages.what("evaluation")):
        correct, circ_correct = evaluate_run(student, matching, s_test, s_ref=s_ref, amp=amp)
    run = run_result(cd, matching, log, correct, circ_correct, train_s)
    metrics = {"method": cfg.method, "student_accuracy": run.accuracy, "student_base_accuracy": base_accuracy,
               "trainable_params": run.n_trainable, "lam_effective": run.lam_effective,
               "steps_done": log[-1]["step"] if log else step, "stopped_early": loop_state.get("stopped_early"),
               "trainable_fraction": run.trainable_fraction}
    if matching is not None:
        metrics["student_circuit_accuracy"] = run.circuit_accuracy
        if metrics["student_accuracy"] > 0:
            metrics["student_circuit_faithfulness"] = metrics["student_circuit_accuracy"] / metrics["student_accuracy"]
        metrics["trained_heads"] = run.trained_heads or get_adapter(student).spec.n_total_heads
        metrics["trained_heads_fraction"] = run.trained_heads_fraction
    metrics.update(teacher_metrics)
    metrics["world_size"] = world
    metrics["stages"] = stages.records  # seconds and peak memory per stage, the plan's prediction beside them
    result = DistillResult(student, matching, circuit, metrics, log, correct, circ_correct or [], s_tok)
    if cfg.out and rank == 0:
        with stages("saving", f"the run folder {cfg.out}"):
            save_result(result, cfg, s_tok, task=task, teacher=teacher_name, student=student_name,
                        command=command)
    if world > 1:
        torch.distributed.barrier()
    return result


__all__ = ["DistillResult", "distill", "resolve_task", "save_result"]

"""`fastcd match`: what the command does once its flags are parsed (:func:`run_match`): pair the teacher circuit's
units with student heads by one of :mod:`fastcd.match`'s rules and write the matching JSON, with a plan and a status
line for every stage."""

from __future__ import annotations

import os

from fastcd.artifacts import Circuit, provenance
from fastcd.cost import match_stages, per_prompt_s, simple_plan, weight_bytes
from fastcd.errors import UsageError
from fastcd.loading import check_model_path, load_model, load_tokenizer, model_identity, resolve_model, spec_of
from fastcd.match import MatchInputs, match
from fastcd.stages import Stages
from fastcd.tasks import adapt_task, get_task


def _name(resolved) -> str:
    """A packaged model's name (its prepared directory's last part is 'hf'), else the directory's."""
    return getattr(resolved, "name", None) or os.path.basename(os.path.normpath(resolved))


def run_match(a) -> int:
    """Run ``fastcd match`` for parsed :class:`fastcd.cli_args.MatchArgs` ``a``; checks that need no weights come
    first."""

    if a.impl is not None and a.method not in ("cka", "combined"):
        raise UsageError(f"--impl chooses the CKA scorer of --method cka/combined, not of {a.method!r}")
    if a.ablation_baseline != "student" and a.method != "ablation":
        raise UsageError(f"--ablation-baseline is the ablation rule's (Eq. 4), not --method {a.method}'s")
    circuit = Circuit.load(a.circuit)
    # each model resolved once: config only first, so that a circuit of another model fails before anything loads
    a.teacher = resolve_model(a.teacher, "--teacher", weights=False)
    a.student = resolve_model(a.student, "--student", weights=False)
    circuit.check_model(a.teacher.spec, "--teacher")
    check_model_path(a.teacher, "--teacher")  # then the weights of both, before either loads
    check_model_path(a.student, "--student")
    t_tok, s_tok = load_tokenizer(a.teacher, "--teacher"), load_tokenizer(a.student, "--student")
    name = a.task or circuit.task
    task = get_task(name, **({"n_boxes": a.n_boxes} if name == "entity-tracking" else {}))
    circuit.check_task(task.name)  # a circuit found on another task pairs heads for the wrong mechanism
    if a.align_position is not None:
        roles = tuple(dict.fromkeys(("last", *task.roles)))
        if a.align_position not in roles:
            raise UsageError(f"--align-position must be one of the task's roles {roles}, got {a.align_position!r}")
        if not any(c.position == "all" for c in circuit.heads):
            raise UsageError("--align-position moves the circuit's units found at all positions; this circuit has "
                             "none (each unit already has its role)")
        everywhere = sorted({str(c.head) for c in circuit.heads if c.position == "all"})
        circuit = circuit.aligned_at(a.align_position)
    task = adapt_task(task, [t_tok, s_tok])
    stages = Stages()
    sizes = weight_bytes(a.teacher)[1] + weight_bytes(a.student)[1]
    with stages("load", f"teacher and student ({sizes / 2**30:.2f} GiB)"):
        teacher = load_model(a.teacher, dtype=a.dtype, device=a.device, what="--teacher")
        student = load_model(a.student, dtype=a.dtype, device=a.device, what="--student")
    with stages("tokenisation", f"{a.n_examples} prompt pairs for each model"):
        pairs = task.pairs(a.n_examples, seed=a.seed, split=a.split)
        clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
        inp = MatchInputs(teacher, student, circuit, task.encode(clean, t_tok), task.encode(clean, s_tok),
                          task.encode(corrupt, t_tok), task.encode(corrupt, s_tok))
    with stages("calibration", "a forward of 16 prompts through each model"):
        sec = {"teacher": per_prompt_s(teacher, inp.teacher_clean), "student": per_prompt_s(student, inp.student_clean)}
    stages.say_plan(simple_plan(f"match ({a.method}) {a.teacher} -> {a.student}",
                                match_stages(a, spec_of(student, "--student"), circuit,
                                             (inp.teacher_clean, inp.student_clean)), sizes, sec))
    if a.plan:
        return 0
    kw = {"ablation": {"k": a.top_k, "direction": a.direction, "progress": True, "metric": a.ablation_metric,
                       "student_position": a.student_position, "baseline": a.ablation_baseline},
          "cka": {"impl": a.impl}, "combined": {"weight": a.weight, "impl": a.impl, "progress": True},
          "random": {"seed": a.seed}}[a.method]
    with stages("matching", stages.what("matching")):
        m = match(inp, a.method, **kw)
    m.meta.update(teacher=_name(a.teacher), student=_name(a.student), n_examples=a.n_examples, dtype=a.dtype,
                  **({"aligned_at": a.align_position, "live_everywhere": everywhere} if a.align_position else {}),
                  provenance=provenance(task, {"teacher": model_identity(a.teacher),
                                               "student": model_identity(a.student)}, clean))
    m.save(a.out)
    print(m)
    print(f"wrote {a.out}")
    return 0

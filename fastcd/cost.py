"""What a run will cost on this machine, said before the work, and what each stage cost, said as it ends.

The cost model (shared by ``fastcd experiment --plan`` and the plan that ``distill``/``discover``/``match`` print
first): a short calibration in the run's precision times a teacher and a student forward per prompt (batches of
CALIBRATION_PROMPTS) and one ce+cka step at the batch size; a stage's prediction is its forward prompts (or
patching rows, or steps) times that unit time. A batched patching row reuses the clean prefix before its role's
position in its prompt (:func:`fastcd.discover.patch_heads_batched`), so it costs ROW_COST x the share of the prompt
after that position of a forward prompt (the whole prompt for ablation at every position). Peak
memory is the models' bytes (from the safetensors headers: no weights read) plus the activations the calibration
step held, scaled to the batch. :class:`fastcd.stages.Stages` prints the plan, then one status line as each stage
starts and one as it ends with its seconds and peak memory beside the prediction, and keeps them for the run's log.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import warnings

import torch

from fastcd import zoo
from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller
from fastcd.hooks import memory_budget
from fastcd.loading import spec_of
from fastcd.metrics import accuracy_per_example
from fastcd.models import Head, get_adapter
from fastcd.path_patching import ET_GROUPS
from fastcd.stages import available_gib, peak_rss_gib, reset_peak, rss_gib
from fastcd.teacher_cache import MemoryCache, teacher_signals
from fastcd.trainable import merge
from fastcd.training import make_optimizer, train_loop

CALIBRATION_PROMPTS = 16
REPEAT_BUDGET_S = 0.5  # a calibration forward repeats until this much time is spent (tiny models), the fastest counts
MAX_REPEATS = 5
ROW_COST = 0.7  # a batched row against a forward prompt, per share of the prompt it recomputes (measured on
# Qwen2.5-Coder-1.5B, 7 boxes, 32 prompts, 10,752 rows per role: 2,728 s at box_label (share 0.91), 142 s at
# query_label (0.06), 99 s at the last token (0.02), against 0.40 s per prompt in a 16-prompt forward)
MIN_ROW_SHARE = 0.02
BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_BYTES = {"float32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


def weight_bytes(path_or_module) -> tuple[int, int]:
    """(parameters, bytes as stored) of a model directory (the safetensors headers: no weights read) or module."""
    if isinstance(path_or_module, torch.nn.Module):
        ps = list(path_or_module.parameters())
        return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)

    path = os.fspath(zoo.resolve(os.fspath(path_or_module)))
    n = b = 0
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")] if os.path.isdir(path) else []
    for name in files:
        try:
            with open(os.path.join(path, name), "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            counts = [(math.prod(v["shape"]), BYTES.get(v["dtype"], 4)) for k, v in header.items()
                      if k != "__metadata__"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error):
            size = os.path.getsize(os.path.join(path, name))  # a damaged file: its size stands in (loading names it)
            n, b = n + size // 4, b + size
            continue
        n += sum(c for c, _ in counts)
        b += sum(c * k for c, k in counts)
    if not files:  # a GGUF file or .bin weights: the file size stands for the bytes
        n = b = os.path.getsize(path) if os.path.isfile(path) else 0
    return n, b


def _per_prompt(model, batch, amp) -> float:
    """Seconds per prompt of a no-grad forward over ``batch``: the fastest of as many repeats as fit in
    ``REPEAT_BUDGET_S`` (at most ``MAX_REPEATS``; one for a real LM). A tiny model's forward takes milliseconds,
    where one preempted call would read as many times its cost; the fastest repeat is its idle cost."""
    with torch.no_grad(), amp():
        best, spent = math.inf, 0.0
        for i in range(MAX_REPEATS + 1):  # the first at this shape warms up (allocations, kernel choice): not timed
            t = time.perf_counter()
            accuracy_per_example(model, batch, batch_size=len(batch))
            took = time.perf_counter() - t
            if i:
                best, spent = min(best, took), spent + took
                if spent >= REPEAT_BUDGET_S:
                    break
    return best / len(batch)


def time_steps(student, matching, batch, cache, mixed_precision: str, steps: int, lr: float = 1e-6,
               frozen_cast: bool = True):
    """Seconds of the fastest of ``steps`` ce+cka steps of ``fastcd.training.train_loop`` on ``batch`` (all of it
    one batch, teacher signals from ``cache``) after one warm-up step; also the last log row and the trainable
    parameters. The slices are merged back into ``student`` (its weights change by the steps taken).
    ``frozen_cast``: train_loop's (under autocast, the frozen weights held in its dtype)."""

    cfg = DistillConfig(method="ce+cka", batch_size=len(batch), n_train=len(batch), steps=steps + 1, lr=lr,
                        mixed_precision=mixed_precision, progress=False, log_every=1)
    with warnings.catch_warnings():  # the small-batch CKA note is about training runs, not this timing
        warnings.simplefilter("ignore", UserWarning)
        cd = CircuitDistiller(student, matching, config=cfg)
    opt, _ = make_optimizer(cd, cfg)
    stamps = []

    def stamp(step, log):
        stamps.append(time.perf_counter())

    try:
        log = train_loop(cd, opt, 0, cfg, batch, None, cache, on_step=stamp, frozen_cast=frozen_cast)
    finally:
        merge(cd.slices)
    return min(b - a for a, b in zip(stamps, stamps[1:])), log[-1], cd.n_trainable  # the fastest: see _per_prompt


def calibrate(teacher, student, t_batch, s_batch, batch_sizes, n_pairs: int, amp, mixed_precision: str) -> dict:
    """Seconds per teacher / student forward prompt (batches of CALIBRATION_PROMPTS) and per ce+cka step at each
    batch size (``n_pairs`` heads of the student matched to heads of the teacher at the last token, teacher z from
    its own forward); the student's weights are restored afterwards."""

    n, t0, shares = CALIBRATION_PROMPTS, time.perf_counter(), []

    def timed(fn, *args, **kw):  # fn's result, and the CPU share this process got while it ran
        w, c = time.perf_counter(), time.process_time()
        r = fn(*args, **kw)
        shares.append((time.process_time() - c) / max(1e-9, (time.perf_counter() - w) * torch.get_num_threads()))
        return r

    out = {"teacher_s_per_prompt": timed(_per_prompt, teacher, t_batch.index(range(min(n, len(t_batch)))), amp),
           "student_s_per_prompt": timed(_per_prompt, student, s_batch.index(range(min(n, len(s_batch)))), amp),
           "step_s": {}}
    ts, ss = get_adapter(teacher).spec, get_adapter(student).spec
    k = max(1, min(n_pairs, ts.n_total_heads, ss.n_total_heads))
    pairs = [Pair(Head(i % ts.n_layers, i // ts.n_layers % ts.n_heads),
                  Head(i % ss.n_layers, i // ss.n_layers % ss.n_heads), "last") for i in range(k)]
    matching = Matching(pairs, "calibration")
    state = {k_: v.detach().clone() for k_, v in student.state_dict().items()}
    out["models_gib"] = rss_gib()
    out["peak_rss_gib"] = peak_rss_gib()
    out["step_gib"] = {}
    for b in sorted(batch_sizes):
        m = min(b, len(s_batch))
        with torch.no_grad(), amp():
            cache = MemoryCache(teacher_signals(teacher, t_batch.index(range(m)), matching, batch_size=m))
        before = rss_gib()
        reset_peak()
        sec, _, _ = timed(time_steps, student, matching, s_batch.index(range(m)), cache, mixed_precision, steps=3)
        out["step_s"][b] = sec * b / m  # a grid batch larger than the calibration prompts: scaled
        out["step_gib"][b] = max(0.0, peak_rss_gib() - before) * b / m
        out["peak_rss_gib"] = max(out["peak_rss_gib"], before + out["step_gib"][b])
    student.load_state_dict(state)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    # the CPU time this process got over what its threads could have had, the median over the timed parts: well below
    # 1 when other work shared the cores throughout (the unit times, hence the prediction, are then too high); one
    # part held up (a pause, a burst of other work) leaves the median, as it leaves the fastest repeats, alone
    out["cpu_share"] = round(sorted(shares)[len(shares) // 2], 2)
    return out


# ------------------------------------------------------------------------------------------------
# The plan of one distill / discover / match run
# ------------------------------------------------------------------------------------------------
def discovery_rows(method: str, n: int, n_heads: int, n_roles: int) -> tuple[int, int]:
    """(patching rows, plain forward prompts) of a circuit discovery of ``method`` on ``n`` prompt pairs;
    ``n_roles``: ``len(discovery_roles(...))``, for path patching one per pass of a sender row."""
    if method in ("roles", "path"):
        return n_roles * n_heads * n, 2 * n
    if method == "patching":
        return n_heads * n, 2 * n
    if method == "attribution":
        return 0, 3 * n
    return 0, 0


UNITS = ("teacher", "student", "teacher_rows", "student_rows", "steps")


def row_share(batch, roles) -> float:
    """The mean share of a prompt a batched patching row recomputes over ``roles`` (None or "all": every position,
    the whole prompt): the tokens from the row's position of the role on, averaged over ``batch``."""
    t = batch.input_ids.shape[1]
    shares = []
    for r in roles:
        if r is None or r == "all" or r not in batch.positions:
            shares.append(1.0)
        else:
            shares.append(max(MIN_ROW_SHARE, float((t - batch.positions[r]).float().mean()) / t))
    return sum(shares) / len(shares)


def stage(name: str, what: str, cheaper: str = "", **work) -> dict:
    """One planned stage: its ``work`` in UNITS (teacher / student forward prompts, teacher / student patching
    rows, optimizer steps; none: not timed), a description and the flag that makes it cheaper."""
    return {"stage": name, "what": what, "cheaper": cheaper, "work": {k: int(v) for k, v in work.items() if v}}


def predict_stages(stages: list[dict], cal: dict | None, batch_size: int | None = None) -> None:
    """Fill each stage's ``predicted_s`` from the calibration ``cal`` (None: counts only); a stage's patching rows
    count at ROW_COST x its ``row_share`` (teacher / student) of a forward prompt."""
    if cal is None:
        return
    for st in stages:
        share = st.get("row_share", {})
        unit_s = {"teacher": cal["teacher_s_per_prompt"], "student": cal["student_s_per_prompt"],
                  "teacher_rows": cal["teacher_s_per_prompt"] * ROW_COST * share.get("teacher", 1.0),
                  "student_rows": cal["student_s_per_prompt"] * ROW_COST * share.get("student", 1.0),
                  "steps": cal["step_s"].get(batch_size)}
        if st["work"] and all(unit_s[k] is not None for k in st["work"]):
            st["predicted_s"] = round(sum(n * unit_s[k] for k, n in st["work"].items()), 1)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def discovery_roles(task, method: str, position: str | None = None) -> list:
    """The position roles a discovery ``method`` patches at for ``task`` (None: every position)."""
    if method == "roles":
        return list(getattr(task, "reference_roles", None) or task.roles)
    if method in ("patching", "attribution"):
        return [position or dict(getattr(task, "discovery_defaults", None) or {}).get("position", "last")]
    if method == "path":  # each pass of a sender row at its group's sender position (the fast path starts there):
        # one into the logits, two (record, then patch) into a later group
        return [g.position for g in ET_GROUPS for _ in range(1 if g.receiver_input == "logits" else 2)]
    return [None]


def distill_plan(cfg, task, *, teacher, student, seq_len: int, circuit=None, matching=None, cached: bool,
                 scaled: list[str] = (), sample=None) -> dict:
    """The stages of one ``distill`` run with their work (no weights read: model sizes from the safetensors
    headers), and the peak memory from the models' bytes; :func:`predict_stages` times it after a calibration.
    ``cached``: the teacher's signals come from a cache (given, or built once before training); ``sample``: a few
    discovery prompts encoded for the teacher (where the roles sit: what a patching row recomputes)."""

    s_spec = spec_of(student, "student")
    t_spec = spec_of(teacher, "teacher") if teacher is not None else None
    bf16 = cfg.mixed_precision == "bf16"
    t_n, t_b = weight_bytes(teacher) if teacher is not None else (0, 0)
    s_n, s_b = weight_bytes(student)
    t_dtype = cfg.teacher_dtype or ("bf16" if bf16 and not isinstance(teacher, torch.nn.Module) else None)
    t_mem = t_n * DTYPE_BYTES[t_dtype] if t_dtype else t_b
    s_mem = s_n * 4 if bf16 and not isinstance(student, torch.nn.Module) else s_b
    n, spec = cfg.n_discovery, cfg.spec
    comp = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "float32")
    st = [stage("load", (f"teacher {_count(t_n)} parameters ({t_mem / 2**30:.2f} GiB), " if t_n else "")
                + f"student {_count(s_n)} ({s_mem / 2**30:.2f} GiB); {comp} compute")]
    needs = not spec.full_model
    defaults = dict(getattr(task, "discovery_defaults", None) or {"method": "patching"})
    if needs and matching is None and circuit is None and t_spec is not None:
        method = defaults.get("method", "patching") if cfg.discovery == "auto" else cfg.discovery
        roles = discovery_roles(task, method)
        rows, fw = discovery_rows(method, n, t_spec.n_total_heads, len(roles))
        st.append(stage("discovery", f"{method} on {n} prompt pairs, {rows:,} teacher patching rows",
                        "a saved --circuit, or a smaller --n-discovery", teacher_rows=rows, teacher=fw))
        if sample is not None:
            st[-1]["row_share"] = {"teacher": row_share(sample, roles)}
    if needs and matching is None and t_spec is not None and not spec.random_students:
        if cfg.matching_method == "cka":
            st.append(stage("matching", f"CKA of every student head against the circuit on {n} prompts",
                            "a saved --matching", teacher=n, student=n))
        else:
            units = len({(c.head, c.position) for c in circuit.heads}) if circuit else (cfg.top_k or 3) * 3
            rows = s_spec.n_total_heads * n
            st.append(stage("matching", f"{cfg.matching_method}: {rows:,} student and {units * n:,} teacher "
                            "ablation rows", "a saved --matching, or --matching-method cka", student_rows=rows,
                            teacher_rows=units * n, teacher=n, student=n))
            if sample is not None:  # student heads ablated at every position; teacher units at their roles
                roles = [c.position for c in circuit.heads] if circuit else discovery_roles(task, defaults["method"])
                st[-1]["row_share"] = {"student": 1.0, "teacher": row_share(sample, roles)}
    if t_spec is not None:
        circ = 13 * cfg.n_eval if cfg.circuit_eval and needs else 0  # means, full model, circuit, 10 random circuits
        st.append(stage("teacher evaluation", f"{cfg.n_eval} test prompts" + (f", circuit faithfulness {circ:,} "
                        "prompt passes" if circ else ""), "--no-circuit-eval" if circ else "", teacher=cfg.n_eval
                        + circ))
    live = 0 if cached else cfg.steps * cfg.batch_size
    if cached and teacher is not None:
        st.append(stage("teacher cache", f"the teacher once over {cfg.n_train} training prompts, then released",
                        "a saved --teacher-cache", teacher=cfg.n_train))
    st.append(stage("base evaluation", f"the untrained student on {cfg.n_eval} test prompts", "--n-eval",
                    student=cfg.n_eval))
    val = cfg.n_val * (cfg.steps // cfg.eval_every) if cfg.eval_every else 0
    st.append(stage("training", f"{cfg.steps} steps at batch {cfg.batch_size}" + (
        f", the teacher live on every step ({live:,} prompts)" if live else "") + (
        f", {val:,} validation prompts" if val else ""), "--steps" + ("" if cached else "; a --teacher-cache"),
        steps=cfg.steps, teacher=live, student=val))
    ev = cfg.n_eval * (3 if needs else 1)
    st.append(stage("evaluation", f"the student on {cfg.n_eval} test prompts" + (
        " (accuracy, mean activations, circuit accuracy)" if needs else ""), "--n-eval", student=ev))
    act = cfg.batch_size * seq_len * s_spec.d_model * s_spec.n_layers * 4 * 16  # rough, until calibrated
    patching = 0
    if t_spec is not None and any(x["stage"] in ("discovery", "matching") for x in st):
        d, h, t = t_spec.d_model, t_spec.n_heads, seq_len  # fastcd.hooks.rows_for_budget's per-row bytes
        per_row = (2 if bf16 else 4) * (t * (18 * d + h * t + h * t_spec.d_head) + t_spec.vocab_size)
        patching = min(memory_budget(), 4096 * per_row) + t_spec.n_layers * n * t * d * 4  # + the clean streams
    return {"title": f"{cfg.method}, {cfg.n_train} training prompts", "stages": st, "scaled": list(scaled),
            "models_gib": round((t_mem + s_mem) / 2**30, 2), "patching_gib": round(patching / 2**30, 2),
            "student_gib": round(s_mem / 2**30, 2), "teacher_in_training": not cached and teacher is not None,
            "peak_gib": round(max(t_mem + s_mem + patching, s_mem + act + (0 if cached else t_mem)) / 2**30, 2),
            "available_gib": available_gib(), "seq_len": seq_len}


def discover_stages(a, spec, task, sample=None) -> list[dict]:
    """The stages of ``fastcd discover`` (parsed :class:`fastcd.cli_args.DiscoverArgs` ``a``) on a model of ``spec``
    (``sample``: encoded prompts, for what a patching row recomputes)."""
    n, held = a.n_examples, a.n_heldout
    if a.method == "search":
        units = spec.n_total_heads * len(a.roles or ("last", *[r for r in task.roles if r != "last"]))
        cap = units if getattr(a, "max_units", None) is None else min(units, a.max_units)
        sizes = max(1, math.ceil(math.log(max(cap / 8, 1)) / math.log(2))) + 4  # growth x2 from 8, then bisection
        fw = 3 * n + sizes * (n + 4 * held) + 12 * n + (a.n_random + 2) * held
        return [stage("discovery", f"search over {units:,} (head, role) units on {n} prompts"
                      + (f" growing to at most {cap:,}" if cap < units else "") + f", about {sizes} "
                      f"circuit sizes, the curve and the final record on {held} held-out prompts",
                      "--n-examples, --n-heldout", teacher=fw)]
    else:
        method = task.discovery_defaults.get("method", "patching") if a.method == "auto" else a.method
        roles = discovery_roles(task, method, a.position)
        rows, fw = discovery_rows(method, n, spec.n_total_heads, len(roles))
        st = [stage("discovery", f"{method} on {n} prompt pairs, {rows:,} patching rows", "--n-examples, or "
                    "--method attribution", teacher_rows=rows, teacher=fw)]
        if sample is not None:
            st[0]["row_share"] = {"teacher": row_share(sample, roles)}
    if a.evaluate:
        st.append(stage("evaluation", f"faithfulness on {held} held-out prompts: full model, the circuit and "
                        f"{a.n_random} random circuits", "--n-heldout, --n-random", teacher=(a.n_random + 2) * held))
    return st


def match_stages(a, s_spec, circuit, samples=None) -> list[dict]:
    """The stages of ``fastcd match`` (parsed :class:`fastcd.cli_args.MatchArgs` ``a``; ``samples``: the teacher's
    and the student's encoded prompts, for what a patching row recomputes)."""
    n = a.n_examples
    if a.method == "random":
        return [stage("matching", "random student heads", "")]
    if a.method == "cka":
        return [stage("matching", f"CKA of every student head against the circuit on {n} prompts", "",
                      teacher=n, student=n)]
    units, roles = len({(c.head, c.position) for c in circuit.heads}), list({c.position: 0 for c in circuit.heads})
    by_roles = a.student_position == "roles"
    rows = s_spec.n_total_heads * n * (len(roles) if by_roles else 1)
    st = stage("matching", f"{a.method}: {rows:,} student and {units * n:,} teacher ablation rows on {n} prompts",
               "--n-examples, or --method cka", student_rows=rows, teacher_rows=units * n, teacher=n, student=n)
    if samples is not None:
        st["row_share"] = {"teacher": row_share(samples[0], [c.position for c in circuit.heads]),
                           "student": row_share(samples[1], roles) if by_roles else 1.0}
    return [st]


def simple_plan(title: str, stages: list[dict], model_bytes: int, s_per_prompt: dict) -> dict:
    """A plan for one command whose models are loaded: timed from seconds per prompt (``teacher``/``student``)."""

    predict_stages(stages, {"teacher_s_per_prompt": s_per_prompt["teacher"],
                            "student_s_per_prompt": s_per_prompt["student"], "step_s": {}})
    return {"title": title, "stages": stages, "scaled": [], "available_gib": available_gib(),
            "peak_gib": round((model_bytes + memory_budget()) / 2**30, 2), "timing": "timed on this machine"}


def per_prompt_s(model, batch, amp=None) -> float:
    """Seconds per prompt of a forward of ``model`` on up to CALIBRATION_PROMPTS prompts of ``batch``."""
    from contextlib import nullcontext

    return _per_prompt(model, batch.index(range(min(CALIBRATION_PROMPTS, len(batch)))), amp or nullcontext)


def time_plan(plan: dict, cal: dict, batch_size: int) -> dict:
    """The plan timed by the calibration ``cal``; the peak memory from what the calibration held."""
    predict_stages(plan["stages"], cal, batch_size)
    step = cal["step_gib"].get(batch_size, 0.0)
    train = plan["student_gib"] + step + (plan["models_gib"] - plan["student_gib"] if plan["teacher_in_training"]
                                          else 0.0)
    plan["peak_gib"] = round(max(cal["models_gib"] + plan["patching_gib"], train, cal["peak_rss_gib"]), 2)
    plan["timing"] = f"calibrated in {cal.get('seconds', 0):.0f} s on this machine"
    return plan

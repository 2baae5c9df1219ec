"""The command line's arguments as dataclasses (torch-free): the CLI's parsers are generated from these and from
:class:`fastcd.config.DistillConfig` (``transformers.HfArgumentParser``), so every flag has its help and shown
default, and one flag name means one thing in every command:

- ``--top-k``: a circuit size, or a number of candidate heads (an integer); ``--path-k``: path patching's heads
  per group (four integers); ``--impl``: the CKA implementation (``torch``, ``triton``, ``cpp``, ``python``; each
  operation takes the ones it has, see ``python -m fastcd.info``); ``--n-examples``: prompts; ``--out``: where the
  command writes; ``--seed``/``--seeds``: one seed / several.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fastcd.config import ALL_METHODS, MATCH_METHODS, option, parse_lam
from fastcd.errors import UsageError

DTYPE_CHOICES = ("float32", "bf16", "fp16", "fp32", "bfloat16", "float16")  # fastcd.models.parse_dtype's names

TASKS = ("entity-tracking", "tom")
TASK_HELP = ("the task: entity-tracking, tom, tom-causaltom (tom behind an instruction and 3 solved stories: the "
             "format real LMs answer), or your own as an import path module:TaskClass (a class following "
             "fastcd.tasks.Task, see docs/USAGE.md)")


def int_list(text: str) -> list[int]:
    """One command-line token of a list of integers: ``3`` or ``0,1,2`` (``--seeds 0 1 2`` = ``--seeds 0,1,2``)."""
    import argparse

    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2 or 0 1 2, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """One command-line token of a list of names: ``a`` or ``a,b`` (``--methods a b`` = ``--methods a,b``)."""
    return [x for x in str(text).split(",") if x.strip()]


def flat(values) -> list:
    """``[[0, 1], [2]]`` (one list per token) -> ``[0, 1, 2]``; a flat list stays as it is."""
    out = []
    for v in values:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out
SPLITS = ("train", "val", "test")


@dataclass
class DiscoverArgs:
    model: str = option(None, "local Hugging Face model directory (with its tokenizer), a .gguf file, a prepared "
                       "packaged model name (fastcd models) or a Hugging Face Hub id (org/name)", required=True)
    task: str = option(None, TASK_HELP, required=True)
    out: str = option(None, "circuit JSON path; the heatmap goes beside it as .png", required=True)
    method: str = option("auto", "auto: the task's default (entity-tracking: roles = position-aware patching at the "
                        "reference's three roles; tom: patching at the last token); patching (mean ablation), "
                        "attribution, path (Prakash et al.'s four-group path patching), search (grow (head, role) "
                        "units until --target faithfulness, then prune; writes the faithfulness curve)",
                        choices=("auto", "roles", "patching", "attribution", "path", "search"))
    mode: str = option("mean", "patching/attribution: what replaces a head's z", choices=("mean", "corrupt", "zero"))
    metric: str = option("prob", "what a patch changes", choices=("prob", "logprob", "logit_diff", "accuracy"))
    absolute: bool = option(False, "absolute instead of relative metric change")
    position: str | None = option(None, "patching/attribution: position role to patch at, or all (default: the task's)")
    top_k: int | None = option(None, "circuit size: heads kept by patching/attribution (default 15%% of heads), per "
                              "role for roles (default 3)")
    path_k: list[int] = option([4, 2, 2, 2], "path patching: heads per group (VF PT PD SR)")
    threshold: float = option(0.05, "roles: minimum relative drop to join the circuit")
    recheck_top_k: int = option(0, "attribution: re-score the top k exactly")
    n_examples: int = option(256, "prompts")
    n_boxes: int = option(7, "entity tracking: boxes per prompt")
    seed: int = option(0, "prompt seed")
    split: str = option("val", "prompt split", choices=SPLITS)
    max_batch: int | None = option(None, "rows per forward in batched patching (default: as many as "
                                  "FASTCD_MEMORY_BUDGET, 2G, allows)")
    batch_size: int = option(64, "prompts per forward")
    device: str = option("cpu", "device")
    dtype: str | None = option(None, "model dtype; default: as stored", choices=DTYPE_CHOICES)
    evaluate: bool = option(False, "also report circuit faithfulness on --n-heldout test prompts (--n-random random "
                           "circuits of the same size and roles; always on for --method search)")
    protocol: str = option("strict", "circuit evaluation: strict (the paper's: every head outside the circuit "
                           "mean-ablated at every position) or lenient (every head live away from the roles)",
                           choices=("strict", "lenient"))
    target: float = option(0.85, "search: the faithfulness to reach, in (0, 1]")
    roles: list[str] | None = option(None, "search: the position roles units may sit at (default: every role the task "
                                    "defines), or all: a head live at every position (the paper's ToM circuits)")
    max_units: int | None = option(None, "search: stop growing at this many (head, role) units, target reached or "
                                   "not (default: every unit); the curve up to there is kept")
    n_heldout: int = option(128, "test prompts the faithfulness (and the search's curve) is measured on")
    n_random: int = option(10, "random circuits of the same size and roles for the baseline")
    plan: bool = option(False, "print the plan (each stage's work, predicted time and peak memory; timed by a short "
                        "calibration after the models load) and stop")


@dataclass
class MatchArgs:
    teacher: str = option(None, "teacher: HF directory, .gguf file, prepared model name or Hub id", required=True)
    student: str = option(None, "student: HF directory, .gguf file, prepared model name or Hub id", required=True)
    circuit: str = option(None, "circuit JSON from `fastcd discover`", required=True)
    out: str = option(None, "matching JSON path", required=True)
    task: str | None = option(None, "the task (default: the circuit's); a task of your own as module:TaskClass")
    method: str = option("ablation", "ablation (the paper's rule), cka (one-to-one), combined, random (control)",
                        choices=MATCH_METHODS)
    top_k: int | None = option(None, "ablation: candidate student heads (default: circuit size)")
    direction: str = option("student_to_teacher", "ablation: each candidate student head to its nearest teacher unit "
                           "(the paper's Eq. 5), or each teacher unit to its nearest student head",
                           choices=("student_to_teacher", "teacher_to_student"))
    ablation_metric: str = option("accuracy", "ablation: what an ablation changes, accuracy (the paper's P) or "
                                 "p(answer) (continuous)", choices=("accuracy", "prob"))
    ablation_baseline: str = option("student", "ablation: what a teacher unit's ablated P is measured against: the "
                                    "student's P (Eq. 4 as the paper writes it) or the teacher's own",
                                    choices=("student", "own"))
    student_position: str = option("all", "ablation: where candidate student heads are ablated: all positions, or "
                                   "roles (each teacher (head, role) unit matched among student heads ablated at that "
                                   "same role)", choices=("all", "roles"))
    align_position: str | None = option(None, "the position role where circuit units found at all positions (search "
                                        "--roles all) are matched and aligned, e.g. last (default: they stay at all: "
                                        "CKA over every position)")
    weight: float = option(0.5, "combined: weight of (1 - CKA) against d_abl")
    impl: str | None = option(None, "CKA scorer implementation: cpp, torch, python (default: cpp when built)")
    n_examples: int = option(256, "prompts")
    n_boxes: int = option(7, "entity tracking: boxes per prompt")
    seed: int = option(0, "prompt seed (and the random control's)")
    split: str = option("val", "prompt split", choices=SPLITS)
    device: str = option("cpu", "device")
    dtype: str | None = option(None, "both models' dtype; default: as stored", choices=DTYPE_CHOICES)
    plan: bool = option(False, "print the plan (each stage's work, predicted time and peak memory; timed by a short "
                        "calibration after the models load) and stop")


@dataclass
class DistillArgs:
    student: str = option(None, "student: HF directory, .gguf file, prepared model name or Hub id", required=True)
    task: str = option(None, TASK_HELP, required=True)
    teacher: str | None = option(None, "teacher: HF directory, .gguf file, prepared model name or Hub id (omit with "
                                "--teacher-cache)")
    n_boxes: int = option(7, "entity tracking: boxes per prompt")
    circuit: str | None = option(None, "circuit JSON (default: discover with --discovery)")
    matching: str | None = option(None, "matching JSON (default: match with --matching-method)")
    teacher_cache: str | None = option(None, "offline teacher cache directory")
    build_teacher_cache: str | None = option(None, "precompute the teacher cache into this directory, then train from "
                                            "it")
    cache_shard_size: int = option(1024, "--build-teacher-cache: prompts per cache file; under torchrun each rank "
                                   "computes every world-size-th file")
    cache_only: bool = option(False, "--build-teacher-cache: stop once the cache is written (e.g. a teacher spread "
                              "over the GPUs with --teacher-device-map in one process; train later from the cache "
                              "under torchrun)")
    plan: bool = option(False, "print the plan (each stage's work, predicted time and peak memory; timed by a short "
                        "calibration after the models load) and stop")


@dataclass
class DemoArgs:
    """``fastcd demo``: the shipped config (fastcd/demo_configs/TASK.yaml) with what you change here; unset flags
    keep the config's values."""

    task: str = option("entity-tracking", "the task (its shipped config)", choices=TASKS)
    out: str = option("fastcd-demo", "report folder (resumed when it holds this demo's runs)")
    overwrite: bool = option(False, "discard the runs in --out of another configuration")
    teacher: str | None = option(None, "teacher directory (default: the shipped checkpoint)")
    student: str | None = option(None, "student base directory (default: the shipped checkpoint)")
    steps: int | None = option(None, "optimizer steps per run (config: 150)")
    batch_size: int | None = option(None, "batch, also the CKA batch m (config: 32)")
    lr: float | None = option(None, "learning rate (config: 3e-3)")
    lam: float | str | None = option(None, "CKA weight lambda of the CE + CKA methods, or 'auto' (config: 1.0)",
                                     type=parse_lam)
    n_train: int | None = option(None, "training prompts per seed (config: 4096)")
    n_test: int | None = option(None, "test prompts, one fixed set (config: 500)")
    n_discovery: int | None = option(None, "prompts for discovery and matching (config: 256)")
    seeds: list[int] | None = option(None, "seeds, e.g. --seeds 0 1 2 or 0,1,2 (config: 0)", type=int_list)
    methods: list[str] | None = option(None, f"methods, e.g. --methods ce+cka circuit-ce (or a,b), among "
                                       f"{', '.join(ALL_METHODS)} (config: the six of distill())", type=str_list)
    progress: bool = option(True, "progress bars")


@dataclass
class ExperimentArgs:
    out: str = option(None, "the experiment directory (created; resumed when it exists)", required=True)
    overwrite: bool = option(False, "discard the runs and shared caches in OUT (needed when the shared fields changed)")
    report_only: bool = option(False, "rebuild the report and figures from OUT, run nothing")
    records_from: str | None = option(None, "start a new OUT from a report folder's records (runs.jsonl, "
                                      "experiment.json and the shared *.json beside them, as in docs/*/experiments/"
                                      "NAME): only the runs they lack are run")
    plan: bool = option(False, "print the cost plan (work left, a short calibration on this machine, predicted "
                               "time per stage and peak memory; also in OUT/plan.json) and stop")
    progress: bool = option(True, "progress bars")


@dataclass
class ModelsArgs:
    dtype: str = option("float32", "stored dtype of the converted weights")
    json: bool = option(False, "print the list as JSON")


@dataclass
class ConvertArgs:
    dtype: str = option("float32", "stored dtype: float32, bf16 or fp16")
    overwrite: bool = option(False, "replace OUT if it exists")


@dataclass
class PretrainArgs:
    """A tiny Llama-architecture model trained from scratch on a task (``fastcd pretrain``)."""

    task: str = option("entity-tracking", "the task", choices=TASKS)
    role: str = option("teacher", "which checkpoint this is (names the run)", choices=("teacher", "student"))
    out: str = option("runs/pretrain", "run directory (checkpoints, log.jsonl, final/)")
    seed: int = option(0, "seed")
    n_layers: int = option(4, "decoder layers")
    d_model: int = option(128, "model width")
    n_heads: int = option(4, "attention heads")
    n_kv_heads: int | None = option(None, "key/value heads (GQA; default: n_heads)")
    d_ff: int = option(512, "MLP width")
    steps: int = option(20_000, "optimizer steps (the cosine schedule spans them)")
    batch_size: int = option(64, "sequences per step")
    lr: float = option(1e-3, "peak learning rate")
    warmup: int = option(300, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "final learning rate / peak")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clip")
    queries: int = option(0, "queries per training sequence; 0 = every box / every question")
    min_boxes: int = option(2, "fewest boxes per prompt")
    max_boxes: int = option(7, "most boxes per prompt")
    start_boxes: int = option(2, "curriculum: the largest box count sampled at the start")
    curriculum_threshold: float = option(0.9, "advance when train accuracy at the current top box count exceeds it")
    tom_start_level: int = option(3, "ToM curriculum: 0 short stories with own-container questions, 1 full stories, "
                                 "2 + observed, 3 all question types")
    tom_reverse: float = option(0.0, "ToM: share of follow-up questions asked in reverse ('What contains the "
                               "<drink>?'; training only)")
    tom_reverse_form: str = option("what", "ToM reverse question form", choices=("what", "mirror"))
    init_from: str | None = option(None, "warm start from this model directory (same tokenizer and architecture), "
                                   "e.g. a shipped checkpoint")
    eval_every: int = option(250, "validation period in steps")
    eval_n: int = option(512, "validation prompts")
    save_every: int = option(500, "checkpoint period in steps")
    stop_at_accuracy: float | None = option(None, "stop once val accuracy (on max_boxes prompts) reaches this")
    stop_at_step: int | None = option(None, "stop after this step (the learning-rate schedule still spans steps)")
    threads: int | None = option(None, "torch threads")
    extra: dict = field(default_factory=dict)

    def validate(self) -> PretrainArgs:
        if self.task not in ("entity-tracking", "tom"):
            raise UsageError(f"task must be 'entity-tracking' or 'tom', got {self.task!r}")
        if self.role not in ("teacher", "student"):
            raise UsageError(f"role must be 'teacher' or 'student', got {self.role!r}")
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "steps", "batch_size", "eval_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.tom_start_level not in (0, 1, 2, 3):
            raise UsageError(f"tom_start_level must be 0, 1, 2 or 3, got {self.tom_start_level}")
        if not (2 <= self.min_boxes <= self.start_boxes <= self.max_boxes):
            raise UsageError(
                f"boxes must satisfy 2 <= min_boxes <= start_boxes <= max_boxes, got "
                f"{self.min_boxes}, {self.start_boxes}, {self.max_boxes}"
            )
        if not 0.0 <= self.tom_reverse < 1.0:
            raise UsageError(f"tom_reverse must be in [0, 1), got {self.tom_reverse}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.steps:
            raise UsageError(f"stop_at_step must be in [1, steps={self.steps}], got {self.stop_at_step}")
        if self.tom_reverse_form not in ("what", "mirror"):
            raise UsageError(f"tom_reverse_form must be 'what' or 'mirror', got {self.tom_reverse_form!r}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.init_from is not None and not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise UsageError(f"init_from must be a model directory with a config.json, got {self.init_from!r}")
        return self


__all__ = ["ALL_METHODS", "ConvertArgs", "DemoArgs", "DiscoverArgs", "DistillArgs", "ExperimentArgs", "MatchArgs",
           "ModelsArgs",
           "PretrainArgs"]

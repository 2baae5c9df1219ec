"""The ``fastcd`` command line (also ``python -m fastcd``)."""

from __future__ import annotations

import argparse
import json
import sys


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
                 "min_boxes", "max_boxes", "start_boxes", "eval_every", "eval_n", "save_every", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--n-kv-heads", type=int, default=None)
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "curriculum_threshold"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--stop-at-accuracy", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")


def _run_pretrain(args) -> int:
    from fastcd.pretrain import PretrainConfig, pretrain

    fields = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = pretrain(cfg, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
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
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"fastcd {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Measurements on real pretrained LMs (prepared with `fastcd models prepare NAME`).

Each stage runs in its own process so that its peak RSS is its own; results go to one JSON file (appended per
stage, so a killed run keeps what finished). Not a test: it measures. Example (2 cores, minutes to hours):

    python benchmarks/real_models.py --model qwen2.5-coder-0.5b --stages eval,tom,attribution --out res.json

Stages:
    eval          entity-tracking accuracy at --boxes over --n prompts (test split), full-vocabulary argmax and
                  candidate scoring (argmax among the in-context objects); time per prompt.
    tom           theory-of-mind accuracy for the prompt formats bare / causaltom instruction / 3-shot /
                  both, each scored both ways, per question type.
    attribution   attribution patching over every head at 3 boxes (--n-discovery prompts, mean ablation,
                  metric prob), wall time and the top heads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(name):
    import torch

    import fastcd

    torch.set_grad_enabled(False)
    t = time.time()
    model = fastcd.load_model(name, dtype="float32")
    tok = fastcd.load_tokenizer(name)
    return model, tok, time.time() - t


def stage_eval(args) -> dict:
    from fastcd.discover import accuracy_per_example
    from fastcd.tasks import EntityTracking, adapt_task

    model, tok, t_load = _load(args.model)
    out = {"load_s": round(t_load, 1), "boxes": {}}
    for k in args.boxes:
        task = adapt_task(EntityTracking(n_boxes=k), [tok])
        ex = task.generate(args.n, seed=0, split="test")
        t = time.time()
        batch = task.encode(ex, tok)
        t_tok = time.time() - t
        t = time.time()
        vocab = accuracy_per_example(model, batch, batch_size=args.batch_size)
        t_eval = time.time() - t
        cand = accuracy_per_example(model, batch, batch_size=args.batch_size, scoring="candidates")
        out["boxes"][k] = {"n": args.n, "tokens": int(batch.input_ids.shape[1]), "vocab": sum(vocab) / len(vocab),
                           "candidates": sum(cand) / len(cand), "eval_s": round(t_eval, 1),
                           "tokenize_s": round(t_tok, 3), "dropped": getattr(task, "dropped", {})}
        print(k, out["boxes"][k], flush=True)
    return out


def stage_tom(args) -> dict:
    from fastcd.discover import accuracy_per_example
    from fastcd.tasks import TheoryOfMind, adapt_task

    model, tok, t_load = _load(args.model)
    out = {"load_s": round(t_load, 1), "formats": {}}
    for fmt, kw in (("bare", {}), ("causaltom", {"instruction": "causaltom"}), ("3-shot", {"few_shot": 3}),
                    ("causaltom+3-shot", {"instruction": "causaltom", "few_shot": 3})):
        task = adapt_task(TheoryOfMind(**kw), [tok])
        ex = task.generate(args.n_tom, seed=0, split="test")
        batch = task.encode(ex, tok)
        t = time.time()
        res = {}
        for scoring in ("vocab", "candidates"):
            ok = accuracy_per_example(model, batch, batch_size=args.batch_size, scoring=scoring)
            by = {}
            for e, c in zip(ex, ok):
                by.setdefault(e.meta["question_type"], []).append(c)
            res[scoring] = {"all": sum(ok) / len(ok), **{q: sum(v) / len(v) for q, v in sorted(by.items())}}
        res.update(n=args.n_tom, tokens=int(batch.input_ids.shape[1]), eval_s=round(time.time() - t, 1),
                   dropped=getattr(task, "dropped", {}))
        out["formats"][fmt] = res
        print(fmt, res, flush=True)
    return out


def stage_attribution(args) -> dict:
    import torch

    from fastcd import discover as D
    from fastcd.tasks import EntityTracking, adapt_task

    model, tok, t_load = _load(args.model)
    task = adapt_task(EntityTracking(n_boxes=args.discovery_boxes), [tok])
    pairs = task.pairs(args.n_discovery, seed=0, split="train")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    t = time.time()
    src = D.make_source(model, clean, "mean", corrupt=corrupt, batch_size=args.batch_size)
    with torch.enable_grad():
        res = D.attribution_patching(model, clean, src, metric="prob", batch_size=args.batch_size, progress=True)
    wall = time.time() - t
    return {"load_s": round(t_load, 1), "n": args.n_discovery, "boxes": args.discovery_boxes,
            "heads": int(res.scores.numel()), "wall_s": round(wall, 1), "forwards": res.forwards,
            "top": [(str(h), round(v, 4)) for h, v in res.top(10)]}


STAGES = {"eval": stage_eval, "tom": stage_tom, "attribution": stage_attribution}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a packaged model name (fastcd models) or a model directory")
    p.add_argument("--stages", default="eval,tom,attribution")
    p.add_argument("--out", required=True, help="JSON file; each finished stage is added under its name")
    p.add_argument("--boxes", default="3,5,7")
    p.add_argument("--n", type=int, default=200, help="entity-tracking test prompts per box count")
    p.add_argument("--n-tom", type=int, default=90, help="ToM test prompts per format")
    p.add_argument("--n-discovery", type=int, default=32)
    p.add_argument("--discovery-boxes", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args(argv)
    args.boxes = [int(b) for b in args.boxes.split(",")]
    if args.stage:
        t = time.time()
        res = STAGES[args.stage](args)
        res.update(total_s=round(time.time() - t, 1), peak_rss_mb=round(_peak_mb()))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    for stage in args.stages.split(","):
        if stage not in STAGES:
            p.error(f"--stages: unknown stage {stage!r}; choose from {sorted(STAGES)}")
    for stage in args.stages.split(","):
        proc = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--stage", stage],
                              stdout=subprocess.PIPE, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"stage {stage} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        data = json.load(open(args.out)) if os.path.isfile(args.out) else {}
        data.setdefault(args.model, {})[stage] = {**res, "threads": __import__("torch").get_num_threads(),
                                                  "date": time.strftime("%Y-%m-%d")}
        with open(args.out + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(stage, json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

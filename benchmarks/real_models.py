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
    step          offline teacher cache from --teacher for --matching, then --steps ce+cka steps of --model at
                  --step-batch, --step-boxes boxes: cache time, step time, peak RSS.
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
    from fastcd.metrics import accuracy_per_example
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
    from fastcd.metrics import accuracy_per_example
    from fastcd.tasks import TheoryOfMind, adapt_task

    model, tok, t_load = _load(args.model)
    out = {"load_s": round(t_load, 1), "formats": {}}
    formats = (("bare", {}), ("causaltom", {"instruction": "causaltom"}), ("3-shot", {"few_shot": 3}),
               ("causaltom+3-shot", {"instruction": "causaltom", "few_shot": 3}))
    for fmt, kw in formats:
        if fmt not in args.tom_formats.split(","):
            continue
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
    from fastcd.attribution import attribution_patching
    from fastcd.tasks import EntityTracking, adapt_task

    model, tok, t_load = _load(args.model)
    task = adapt_task(EntityTracking(n_boxes=args.discovery_boxes), [tok])
    pairs = task.pairs(args.n_discovery, seed=0, split="train")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    t = time.time()
    src = D.make_source(model, clean, "mean", corrupt=corrupt, batch_size=args.batch_size)
    with torch.enable_grad():
        res = attribution_patching(model, clean, src, metric="prob", batch_size=args.batch_size, progress=True)
    wall = time.time() - t
    return {"load_s": round(t_load, 1), "n": args.n_discovery, "boxes": args.discovery_boxes,
            "heads": int(res.scores.numel()), "wall_s": round(wall, 1), "forwards": res.forwards,
            "top": [(str(h), round(v, 4)) for h, v in res.top(10)]}


def stage_step(args) -> dict:
    """Build the offline teacher cache (the teacher runs once, then is freed) and time ce+cka steps of the student
    served from it; peak RSS of each part comes from its own process (see main)."""
    import gc
    import statistics
    import tempfile

    import torch

    import fastcd
    from fastcd.artifacts import Matching
    from fastcd.distillation import CircuitDistiller, make_batch
    from fastcd.tasks import EntityTracking, adapt_task
    from fastcd.teacher_cache import TeacherCache, build_teacher_cache

    matching = Matching.load(args.matching)
    s_tok, t_tok = fastcd.load_tokenizer(args.model), fastcd.load_tokenizer(args.teacher)
    task = adapt_task(EntityTracking(n_boxes=args.step_boxes), [s_tok, t_tok])
    ex = task.generate(args.step_batch * 4, seed=0, split="train")
    cache_dir = os.path.join(tempfile.mkdtemp(), "cache")
    teacher = fastcd.load_model(args.teacher, dtype="float32")
    t = time.time()
    build_teacher_cache(teacher, task.encode(ex, t_tok), matching, cache_dir, batch_size=args.step_batch)
    t_cache = time.time() - t
    rss_after_cache = _peak_mb()
    del teacher
    gc.collect()
    student = fastcd.load_model(args.model, dtype="float32")
    s_enc = task.encode(ex, s_tok)
    cache = TeacherCache(cache_dir, matching)
    cfg = fastcd.DistillConfig(method="ce+cka", lam=1.0, batch_size=args.step_batch, impl="torch")
    cd = CircuitDistiller(student, matching, config=cfg)
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-4)
    student.train()
    times = []
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(args.steps):
            idx = torch.randint(len(ex), (args.step_batch,), generator=gen)
            t = time.time()
            loss, parts = cd(make_batch(idx, s_enc, None, cache))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.time() - t)
    return {"teacher": args.teacher, "boxes": args.step_boxes, "batch": args.step_batch,
            "pairs": len(matching.pairs), "cache_prompts": len(ex), "cache_build_s": round(t_cache, 1),
            "peak_rss_mb_through_cache": round(rss_after_cache), "step_s": [round(x, 2) for x in times],
            "step_median_s": round(statistics.median(times[1:] or times), 2), "trainable_params": cd.n_trainable,
            "last_parts": parts}


STAGES = {"eval": stage_eval, "tom": stage_tom, "attribution": stage_attribution, "step": stage_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a packaged model name (fastcd models) or a model directory")
    p.add_argument("--stages", default="eval,tom,attribution")
    p.add_argument("--out", required=True, help="JSON file; each finished stage is added under its name")
    p.add_argument("--boxes", default="3,5,7")
    p.add_argument("--n", type=int, default=200, help="entity-tracking test prompts per box count")
    p.add_argument("--n-tom", type=int, default=90, help="ToM test prompts per format")
    p.add_argument("--tom-formats", default="bare,causaltom,3-shot,causaltom+3-shot")
    p.add_argument("--n-discovery", type=int, default=32)
    p.add_argument("--discovery-boxes", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b", help="step: the teacher that fills the cache")
    p.add_argument("--matching", default=None, help="step: a Matching JSON (teacher -> --model)")
    p.add_argument("--step-boxes", type=int, default=7)
    p.add_argument("--step-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
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
    from fastcd.io import write_json_atomic

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
        write_json_atomic(data, args.out, indent=1)
        print(stage, json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

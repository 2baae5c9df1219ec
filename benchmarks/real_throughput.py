"""Real-model throughput on the CPU: float32 against bf16, measured side by side in one process.

For a prepared model (``fastcd models prepare NAME``, or a converted directory), on entity-tracking prompts:

    evaluation     ``accuracy_per_example`` over --n-eval test prompts: float32; bf16 autocast (float32 weights,
                   what training and fastcd's frozen forwards use); bf16 weights. Time, accuracy, and the paired
                   comparison with float32: prompts only float32 gets right / only bf16 gets right (exact McNemar).
    teacher cache  ``teacher_signals`` (argmax labels and --pairs heads' z at the last token) over --n-cache
                   training prompts, the same three variants: time, labels equal to float32's, z relative error,
                   and each head's CKA between its bf16 z and its float32 z (1 = the same representation).
    ce+cka step    one optimizer step of ``CircuitDistiller`` (the model as its own student, --pairs matched
                   heads, teacher signals from the float32 cache), mixed_precision "no" against "bf16" (autocast,
                   the frozen weights held in bf16 for the steps, as training runs), the same re-casting them at
                   every call (bf16-recast, the plain twin), and bf16 weights with float32 master slices: the
                   fastest of --steps steps after a warm-up.

    prefix reuse   evaluation, the teacher cache, circuit evaluation (strict mean ablation) and a ce+cka training
                   step (--batch of them) of --n-tom
                   theory-of-mind prompts (instruction + 3 shots: one long shared prefix) in bf16 weights with and
                   without shared-prefix reuse (``FASTCD_PREFIX_REUSE``), beside the same number of
                   entity-tracking prompts: seconds per prompt, the ToM/ET cost ratio, and whether the answers
                   (labels, z, circuit correctness) are the same.

One JSON line per stage and variant on stdout (and appended to --out). Attribution timings are not measured here
yet. Not a test: it measures; --quick runs every path at tiny
sizes (CI smoke on SmolLM2: tests/test_real_models.py).

    python benchmarks/real_throughput.py --model qwen2.5-coder-0.5b --out real_throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


VARIANTS = ("float32", "bf16-autocast", "bf16-weights")


def _variant(model, name):
    """(model to run, context) for a variant; bf16-weights casts a copy of the weights once."""
    import contextlib
    import copy

    import torch

    if name == "float32":
        return model, contextlib.nullcontext
    if name == "bf16-autocast":
        return model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return copy.deepcopy(model).to(torch.bfloat16), contextlib.nullcontext


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a prepared model name or a converted directory")
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--n-eval", type=int, default=250)
    ap.add_argument("--n-cache", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="training batch (the CKA batch m)")
    ap.add_argument("--pairs", type=int, default=12, help="matched heads (the circuit size)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n-tom", type=int, default=64, help="theory-of-mind prompts for the prefix-reuse stage")
    ap.add_argument("--stages", default="evaluation,cache,prefix,step", help="comma-separated: which stages to run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: every path once (smoke)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    a = ap.parse_args(argv)
    stages = set(a.stages.split(","))
    if not stages <= {"evaluation", "cache", "prefix", "step"}:
        ap.error(f"--stages: choose among evaluation, cache, prefix, step; got {a.stages!r}")
    if a.quick:
        a.n_eval, a.n_cache, a.batch, a.pairs, a.steps, a.boxes, a.n_tom = 8, 8, 4, 2, 1, 3, 8

    import torch
    from scipy.stats import binomtest

    import fastcd
    from fastcd.artifacts import Matching, Pair
    from fastcd.cka import cka_loss
    from fastcd.metrics import accuracy_per_example
    from fastcd.models import Head, get_adapter
    from fastcd.plan import time_steps
    from fastcd.tasks import EntityTracking, adapt_task
    from fastcd.teacher_cache import MemoryCache, teacher_signals

    cond = {"model": a.model, "boxes": a.boxes, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}

    def emit(rec):
        line = json.dumps({**cond, **rec, "peak_rss_mib": _peak_mib()})
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    t0 = time.time()
    model = fastcd.load_model(a.model, dtype="float32")
    tok = fastcd.load_tokenizer(a.model)
    model.eval()
    emit({"stage": "load", "seconds": round(time.time() - t0, 1)})
    task = adapt_task(EntityTracking(n_boxes=a.boxes), [tok])
    test = task.encode(task.generate(a.n_eval, seed=0, split="test"), tok)
    train = task.encode(task.generate(max(a.n_cache, a.batch), seed=1, split="train"), tok)
    spec = get_adapter(model).spec
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(spec.n_layers * spec.n_heads, generator=g)[:a.pairs].tolist()
    heads = [Head(h // spec.n_heads, h % spec.n_heads) for h in flat]
    matching = Matching([Pair(h, h, "last") for h in heads], "bench")

    # evaluation
    ref = None
    for name in VARIANTS if "evaluation" in stages else ():
        m, ctx = _variant(model, name)
        with torch.no_grad(), ctx():
            t = time.time()
            correct = accuracy_per_example(m, test, batch_size=32)
            sec = time.time() - t
        rec = {"stage": "evaluation", "variant": name, "n": len(test), "seconds": round(sec, 2),
               "accuracy": sum(correct) / len(correct)}
        if ref is None:
            ref = correct
        else:
            only_fp32 = sum(x and not y for x, y in zip(ref, correct))
            only_bf16 = sum(y and not x for x, y in zip(ref, correct))
            rec.update(only_float32_right=only_fp32, only_bf16_right=only_bf16,
                       mcnemar_p=1.0 if only_fp32 + only_bf16 == 0 else
                       binomtest(only_fp32, only_fp32 + only_bf16, 0.5).pvalue)
        emit(rec)
        del m

    # teacher cache
    cache_batch = train.index(range(a.n_cache))
    sig_ref = None
    for name in VARIANTS if stages & {"cache", "step"} else ():
        m, ctx = _variant(model, name)
        with torch.no_grad(), ctx():
            t = time.time()
            sig = teacher_signals(m, cache_batch, matching, batch_size=32)
            sec = time.time() - t
        rec = {"stage": "teacher cache", "variant": name, "n": a.n_cache, "seconds": round(sec, 2)}
        if sig_ref is None:
            sig_ref = sig
        else:
            rec["labels_equal_float32"] = float((sig["labels"] == sig_ref["labels"]).float().mean())
            rec["z_rel_err"] = float((sig["z"] - sig_ref["z"]).norm() / sig_ref["z"].norm())
            _, same = cka_loss(sig["z"].float(), sig_ref["z"], impl="torch")  # per head: bf16 z vs float32 z
            zr = sig_ref["z"]  # [P, N, d]; a head whose float32 z is the same for every prompt has no CKA at all
            spread = (zr - zr.mean(1, keepdim=True)).flatten(1).norm(dim=1) / zr.flatten(1).norm(dim=1).clamp_min(1e-30)
            live = spread > 1e-4
            rec["z_cka_to_float32"] = {"min": round(float(same[live].min()), 4) if live.any() else None,
                                       "mean": round(float(same[live].mean()), 4) if live.any() else None,
                                       "constant_heads_left_out": int((~live).sum())}
        emit(rec)
        del m

    # prefix reuse: few-shot ToM against entity tracking, bf16 weights
    if "prefix" in stages:
        import copy
        import os

        from fastcd.hooks import mean_z
        from fastcd.metrics import circuit_correct
        from fastcd.models import shared_prefix_length
        from fastcd.tasks import TheoryOfMind

        tom = adapt_task(TheoryOfMind(instruction="causaltom", few_shot=3), [tok])
        tb = tom.encode(tom.generate(a.n_tom, seed=0, split="test"), tok)
        eb = test.index(range(min(a.n_tom, len(test))))
        m, _ = _variant(model, "bf16-weights")
        per: dict = {}  # (stage, task, reuse) -> seconds per prompt
        out: dict = {}  # (stage, task, reuse) -> what the stage returned
        means = {}  # per task: the circuit evaluation's per-position means (untimed)

        def measure(stage, label, batch, reuse, fn, *args, **kw) -> dict:
            """Time ``fn(m, batch, *args, **kw)``; its record with the cost against entity tracking's."""
            with torch.no_grad():
                t = time.time()
                out[(stage, label, reuse)] = fn(m, batch, *args, **kw)
                sec = time.time() - t
            per[(stage, label, reuse)] = sec / len(batch)
            rec = {"stage": stage, "variant": "bf16-weights", "task": label, "prefix_reuse": reuse, "n": len(batch),
                   "seconds": round(sec, 2), "seconds_per_prompt": round(per[(stage, label, reuse)], 4)}
            if label == "theory of mind":
                rec["cost_vs_entity_tracking"] = round(per[(stage, label, reuse)]
                                                       / per[(stage, "entity tracking", True)], 2)
            return rec

        for label, batch, reuse in (("entity tracking", eb, True), ("theory of mind", tb, False),
                                    ("theory of mind", tb, True)):
            os.environ["FASTCD_PREFIX_REUSE"] = "1" if reuse else "0"
            both = reuse and label == "theory of mind"  # compare with the run without reuse
            rec = measure("prefix reuse", label, batch, reuse, accuracy_per_example, batch_size=32)
            got = out[("prefix reuse", label, reuse)]
            rec.update(tokens=int(batch.input_ids.shape[1]), shared_prefix_tokens=shared_prefix_length(batch.input_ids),
                       accuracy=sum(got) / len(batch))
            if both:
                rec["same_correctness_as_without"] = got == out[("prefix reuse", label, False)]
            emit(rec)
            # the teacher cache: the same prompts, z captured at the pairs' roles
            stage = "prefix reuse, teacher cache"
            rec = measure(stage, label, batch, reuse, teacher_signals, matching, batch_size=32)
            if both:
                a_, b_ = out[(stage, label, True)], out[(stage, label, False)]
                rec["labels_equal_without"] = bool(torch.equal(a_["labels"], b_["labels"]))
                rec["z_rel_err_vs_without"] = float((a_["z"] - b_["z"]).norm() / b_["z"].norm())
            emit(rec)
            # circuit evaluation (the search's inner loop): the matched heads live at the last token, every other
            # head mean-ablated at every position (strict), means over these prompts
            if label not in means:
                means[label] = mean_z(m, batch.input_ids[:16])
            stage = "prefix reuse, circuit evaluation"
            rec = measure(stage, label, batch, reuse, circuit_correct, means[label],
                          [(p.student, "last") for p in matching.pairs], batch_size=32)
            if both:
                rec["same_correctness_as_without"] = out[(stage, label, True)] == out[(stage, label, False)]
            emit(rec)
        # attribution patching at the last token (one forward and backward per chunk, mean ablation): with a
        # position after the shared prefix, the prefix runs once per chunk, its keys and values constants
        from fastcd.attribution import attribution_patching
        from fastcd.discover import make_source

        for label, batch, reuse in (("theory of mind", tb, False), ("theory of mind", tb, True)):
            os.environ["FASTCD_PREFIX_REUSE"] = "1" if reuse else "0"
            src = make_source(m, batch, "mean", batch_size=32)  # untimed
            t = time.time()
            out[("attribution", label, reuse)] = attribution_patching(m, batch, src, position="last", batch_size=16)
            rec = {"stage": "prefix reuse, attribution patching", "variant": "bf16-weights", "task": label,
                   "prefix_reuse": reuse, "n": len(batch), "seconds": round(time.time() - t, 2)}
            if reuse:
                a_, b_ = (out[("attribution", label, r)].scores for r in (True, False))
                rec["scores_rel_err_vs_without"] = float((a_ - b_).norm() / b_.norm())
            emit(rec)
        # a ce+cka training step (bf16 weights, float32 master slices) on --batch of these prompts: the prefix runs
        # once on the graph, the suffixes over the batch; the same losses as without reuse
        for label, batch, reuse in (("entity tracking", eb, True), ("theory of mind", tb, False),
                                    ("theory of mind", tb, True)):
            os.environ["FASTCD_PREFIX_REUSE"] = "1" if reuse else "0"
            rows = batch.index(range(a.batch))
            sig = MemoryCache(out[("prefix reuse, teacher cache", label, True)])  # the teacher is the model itself
            sec, last, _ = time_steps(copy.deepcopy(m), matching, rows, sig, "no", steps=a.steps)
            per[("step", label, reuse)] = sec
            rec = {"stage": "prefix reuse, ce+cka step", "variant": "bf16-weights", "task": label,
                   "prefix_reuse": reuse, "batch": a.batch, "pairs": a.pairs, "seconds_per_step": round(sec, 3),
                   "last_loss": {k: round(v, 4) for k, v in last.items() if k in ("ce", "cka_loss", "loss")}}
            if label == "theory of mind":
                rec["cost_vs_entity_tracking"] = round(sec / per[("step", "entity tracking", True)], 2)
            emit(rec)
        os.environ.pop("FASTCD_PREFIX_REUSE", None)
        del m

    # ce+cka step: the model is its own student; teacher signals from the float32 cache
    for prec in ("no", "bf16-recast", "bf16", "bf16-weights") if "step" in stages else ():
        # bf16-autocast: what training runs (the frozen weights held in bf16 for the steps: trainable.FrozenCast);
        # bf16-recast: autocast re-casting the float32 frozen weights at every call (frozen_cast=False; the same
        # numbers); bf16-weights: the student's weights in bf16, its trained slices float32 masters, no autocast
        student = _variant(model, "bf16-weights")[0] if prec == "bf16-weights" else model
        sec, last, n_trainable = time_steps(student, matching, cache_batch.index(range(a.batch)),
                                            MemoryCache(sig_ref), {"bf16-weights": "no", "bf16-recast": "bf16"}.get(
                                                prec, prec), steps=a.steps, lr=1e-5, frozen_cast=prec != "bf16-recast")
        emit({"stage": "ce+cka step", "variant": {"no": "float32", "bf16": "bf16-autocast"}.get(prec, prec),
              "batch": a.batch, "pairs": a.pairs, "seconds_per_step": round(sec, 3), "trainable_params": n_trainable,
              "last_loss": {k: round(v, 4) for k, v in last.items() if k in ("ce", "cka_loss", "mean_cka", "loss")}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

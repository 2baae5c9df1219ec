"""Exact large-batch CKA from micro-batches: peak memory and step time against the one-shot batch.

For a prepared model (``fastcd models prepare NAME``) as the student of a ce+cka step on entity-tracking prompts,
--pairs heads matched at the last token, teacher z and labels given (random z of the student's width, the
prompts' answers: the teacher plays no part in the student's memory). Each variant runs in a fresh process:
``batch_size`` m and ``micro_batch_size`` (0 = the whole batch in one forward), ``:gc`` for gradient checkpointing
of the student's layers; it reports the process's peak RSS
after the model loaded and after the steps, their difference (the step's own memory), and the mean seconds of
--steps steps after one warm-up step. The gradients of the variants with the same m are equal (tested:
tests/test_micro_batch.py); this measures what they cost. Not a test: no assertion.

    python benchmarks/micro_batch.py --model smollm2-135m --variants 16:0 64:0 64:16 64:8 64:8:gc --out micro.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def one(model: str, m: int, micro: int, steps: int, pairs: int, boxes: int, precision: str, gc: bool = False,
        spread: bool = False) -> dict:
    import torch

    from fastcd.artifacts import Matching, Pair
    from fastcd.config import DistillConfig
    from fastcd.distillation import CircuitDistiller, DistillBatch
    from fastcd.loading import load_model, load_tokenizer
    from fastcd.models import get_adapter
    from fastcd.tasks import EntityTracking, adapt_task
    from fastcd.training import gradient_checkpointing

    student, tok = load_model(model, dtype="float32"), load_tokenizer(model)
    spec = get_adapter(student).spec
    task = adapt_task(EntityTracking(n_boxes=boxes), [tok])
    enc = task.encode(task.generate(m, seed=0), tok)
    every = spec.all_heads()
    # the last --pairs heads (the backward stops at their layers), or one every n_heads*L/pairs (a circuit across
    # the depth: every layer from the first matched one on holds activations for the backward)
    heads = [every[i * len(every) // pairs] for i in range(pairs)] if spread else every[-pairs:]
    matching = Matching([Pair(h, h, "last", "g", {}) for h in heads], "bench")
    cfg = DistillConfig(method="ce+cka", batch_size=m, n_train=m, micro_batch_size=micro, progress=False,
                        mixed_precision=precision).validate()
    cd = CircuitDistiller(student, matching, config=cfg)
    student.train()  # as in training (gradient checkpointing acts in training mode only)
    g = torch.Generator().manual_seed(0)
    batch = DistillBatch(enc.input_ids, enc.positions, enc.answer_ids,
                         teacher_z=torch.randn(pairs, m, spec.d_head, generator=g), teacher_labels=enc.answer_ids)
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-6)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    loaded = _peak_mib()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp, gradient_checkpointing(student, gc):
            if micro:
                cd.backward_micro(batch, micro)
            else:
                loss, _ = cd(batch)
                loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = _peak_mib()
    return {"model": model, "m": m, "micro_batch_size": micro, "gradient_checkpointing": gc, "pairs": pairs,
            "heads": "spread" if spread else "last layers",
            "boxes": boxes,
            "tokens": int(enc.input_ids.shape[1]), "precision": precision, "step_s": round(sum(times[1:]) / steps, 3),
            "peak_rss_mib_loaded": loaded, "peak_rss_mib": peak, "step_mib": round(peak - loaded, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", nargs="+", default=["16:0", "64:0", "64:16", "64:8"],
                    help="m:micro_batch_size pairs (micro 0: the whole batch in one forward), :gc appended for "
                         "gradient checkpointing")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--precision", choices=("no", "bf16"), default="bf16")
    ap.add_argument("--spread", action="store_true", help="matched heads spread over the depth (default: the last "
                    "--pairs heads)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    a = ap.parse_args(argv)
    if a.one:
        m, micro, *gc = a.one.split(":")
        print(json.dumps(one(a.model, int(m), int(micro), a.steps, a.pairs, a.boxes, a.precision, gc == ["gc"],
                             a.spread)))
        return 0
    for v in a.variants:
        p = subprocess.run([sys.executable, __file__, "--model", a.model, "--one", v, "--steps", str(a.steps),
                            "--pairs", str(a.pairs), "--boxes", str(a.boxes), "--precision", a.precision]
                           + (["--spread"] if a.spread else []),
                           capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
            return p.returncode
        line = p.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

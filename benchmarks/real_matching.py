"""Head matching on a real pretrained pair, and the identity check that nothing synthetic gives.

1. Teacher circuit: attribution patching over every head of the teacher (entity tracking, --boxes, --n prompts of
   the val split, mean ablation, metric prob, last position), the --k most negative heads rechecked exactly.
2. Teacher -> student matching by the paper's ablation rule (Eqs. 3-5) and by CKA (one-to-one assignment), both
   written as Matching JSON with their scores.
3. Identity check: the student's own circuit matched into (a) the student itself and (b) a copy of it lightly
   fine-tuned on the task (full-model CE on its own labels, --ft-steps steps): the share of circuit heads mapped
   to themselves, per matching rule.

    python benchmarks/real_matching.py --teacher qwen2.5-coder-1.5b --student qwen2.5-coder-0.5b --out docs/real

Each finished part is written at once (resumable by hand: parts whose JSON exists are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _say(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def circuit_of(model, task, tok, n, k, path, seed=0):
    """The circuit saved at ``path``, or found (and saved there) when the file does not exist yet."""
    import torch

    from fastcd import discover as D
    from fastcd.artifacts import Circuit
    from fastcd.attribution import attribution_patching

    if os.path.isfile(path):
        return Circuit.load(path)

    pairs = task.pairs(n, seed=seed, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    src = D.make_source(model, clean, "mean", corrupt=corrupt)
    t = time.time()
    with torch.enable_grad():
        res = attribution_patching(model, clean, src, metric="prob", position="last", batch_size=16,
                                     recheck_top_k=k, progress=True)
    circuit = D.circuit_from_scores(res, k, task=task.name, group="heads", position="last")
    circuit.meta.update(method="attribution+exact recheck", n_examples=n, seconds=round(time.time() - t, 1))
    circuit.save(path)
    return circuit


def identity_share(m) -> float:
    return sum(p.teacher == p.student for p in m.pairs) / len(m.pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b")
    p.add_argument("--student", default="qwen2.5-coder-0.5b")
    p.add_argument("--out", required=True)
    p.add_argument("--boxes", type=int, default=5)
    p.add_argument("--n", type=int, default=32, help="prompts for discovery and CKA")
    p.add_argument("--n-ablation", type=int, default=16, help="prompts for the ablation rule (every student head)")
    p.add_argument("--k", type=int, default=12, help="circuit size")
    p.add_argument("--ft-steps", type=int, default=20)
    p.add_argument("--parts", default="pair,identity")
    args = p.parse_args(argv)

    import torch

    import fastcd
    from fastcd.artifacts import Matching
    from fastcd.io import write_json_atomic
    from fastcd.match import MatchInputs, match
    from fastcd.tasks import EntityTracking, adapt_task

    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}

    def save_summary():
        summary["peak_rss_mb"] = max(summary.get("peak_rss_mb", 0), _peak_mb())
        write_json_atomic(summary, summary_path, indent=1)

    s_tok = fastcd.load_tokenizer(args.student)
    student = fastcd.load_model(args.student, dtype="float32")
    parts = args.parts.split(",")

    def inputs(teacher, t_tok, circuit, n, stud):
        task = adapt_task(EntityTracking(n_boxes=args.boxes), [s_tok, t_tok])
        pairs = task.pairs(n, seed=1, split="val")
        clean, corrupt = [q.clean for q in pairs], [q.corrupt for q in pairs]
        return MatchInputs(teacher, stud, circuit, task.encode(clean, t_tok), task.encode(clean, s_tok),
                           task.encode(corrupt, t_tok), task.encode(corrupt, s_tok))

    def run_matchings(tag, teacher, t_tok, circuit, stud):
        out = {}
        for method, n, kw in (("cka", args.n, {}), ("ablation", args.n_ablation, {})):
            path = os.path.join(args.out, f"matching_{tag}_{method}.json")
            if os.path.isfile(path):
                m = Matching.load(path)
            else:
                t = time.time()
                m = match(inputs(teacher, t_tok, circuit, n, stud), method, **kw)
                m.meta.update(seconds=round(time.time() - t, 1), n_examples=n, boxes=args.boxes, tag=tag)
                m.save(path)
            out[method] = {"identity_share": identity_share(m), "seconds": m.meta.get("seconds"),
                           "pairs": [[str(q.teacher), str(q.student), q.position,
                                      {k: round(v, 4) for k, v in q.scores.items()}] for q in m.pairs]}
            _say(tag, method, out[method]["identity_share"], m.meta.get("seconds"), "s")
        return out

    if "pair" in parts:
        t_tok = fastcd.load_tokenizer(args.teacher)
        teacher = fastcd.load_model(args.teacher, dtype="float32")
        task = adapt_task(EntityTracking(n_boxes=args.boxes), [s_tok, t_tok])
        circuit = circuit_of(teacher, task, t_tok, args.n, args.k, os.path.join(args.out, "teacher_circuit.json"))
        _say("teacher circuit", circuit)
        summary["pair"] = {"teacher": args.teacher, "student": args.student, "boxes": args.boxes,
                           "circuit": [str(c.head) for c in circuit.heads],
                           "circuit_seconds": circuit.meta.get("seconds"),
                           **run_matchings("teacher_to_student", teacher, t_tok, circuit, student)}
        save_summary()
        del teacher

    if "identity" in parts:
        task = adapt_task(EntityTracking(n_boxes=args.boxes), [s_tok])
        circuit = circuit_of(student, task, s_tok, args.n, args.k, os.path.join(args.out, "student_circuit.json"))
        _say("student circuit", circuit)
        self_copy = fastcd.load_model(args.student, dtype="float32")
        # teacher side: the model whose circuit this is; student side: an identical copy
        summary["identity_self"] = run_matchings("self", student, s_tok, circuit, self_copy)
        del self_copy
        save_summary()
        # a copy lightly fine-tuned on the task: every parameter, CE on its own labels
        t = time.time()
        cfg = fastcd.DistillConfig(method="full-ce", steps=args.ft_steps, batch_size=8, n_train=64, n_eval=32,
                                   lr=1e-5, progress=True, n_discovery=2)
        with torch.enable_grad():
            ft = fastcd.distill(args.student, args.student, task, config=cfg, student_tokenizer=s_tok).student
        summary["finetune"] = {"steps": args.ft_steps, "lr": 1e-5, "batch": 8, "seconds": round(time.time() - t, 1),
                               "max_abs_weight_change": max(float((a - b).abs().max()) for a, b in zip(
                                   ft.state_dict().values(), student.state_dict().values()))}
        summary["identity_finetuned"] = run_matchings("finetuned", student, s_tok, circuit, ft)
        save_summary()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

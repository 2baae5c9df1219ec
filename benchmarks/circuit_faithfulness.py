"""Faithfulness of a circuit JSON on a real model (``fastcd.metrics.faithfulness_record``), as one JSON object.

    python benchmarks/circuit_faithfulness.py --model qwen2.5-coder-1.5b --circuit docs/real/teacher_circuit.json \
        --boxes 7 --n 128 --out docs/real/teacher_circuit_eval.json

Full and circuit accuracy on --n entity-tracking test pairs (the seed-independent test split), faithfulness, and
--n-random random circuits of the same size and roles with their mean and SD; the model in --dtype (bf16 halves
the time on an AVX-512-BF16 CPU, benchmarks/RESULTS.md). With --matching instead of --circuit it measures the
matched student circuit (each pair's student head at its role) on --model, the student. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a prepared model name or a converted directory")
    ap.add_argument("--circuit", default=None, help="a circuit JSON for that model")
    ap.add_argument("--matching", default=None, help="instead of --circuit: a matching JSON whose student side (each "
                    "pair's student head at its role) is the circuit, evaluated on --model, the student")
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--n", type=int, default=128, help="test pairs")
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--protocol", default="strict", help="strict (the paper's) or lenient (fastcd.metrics.PROTOCOLS)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch

    import fastcd
    from fastcd.artifacts import Circuit
    from fastcd.config import TEST_SEED
    from fastcd.io import write_json_atomic
    from fastcd.loading import spec_of
    from fastcd.metrics import check_protocol, faithfulness_record
    from fastcd.tasks import EntityTracking, adapt_task

    if (a.circuit is None) == (a.matching is None):
        ap.error("give exactly one of --circuit and --matching")
    spec = spec_of(a.model, "--model")
    if a.matching:  # the matched student circuit: every pair's student head at the pair's role
        from fastcd.artifacts import CircuitHead, Matching

        m = Matching.load(a.matching)
        units = list(dict.fromkeys((p.student, p.position, p.group) for p in m.pairs))
        circuit = Circuit([CircuitHead(h, g or "matched", r, 0.0) for h, r, g in units], "entity-tracking",
                          spec.n_layers, spec.n_heads, {"matching": a.matching})
    else:
        circuit = Circuit.load(a.circuit)  # a bad file, or a circuit of another model, fails before the model loads
        circuit.check_model(spec, "--model")
    check_protocol(a.protocol)
    torch.set_grad_enabled(False)
    t0 = time.time()
    model = fastcd.load_model(a.model, dtype=a.dtype)
    tok = fastcd.load_tokenizer(a.model)
    task = adapt_task(EntityTracking(n_boxes=a.boxes), [tok])
    pairs = task.pairs(a.n, seed=TEST_SEED, split="test")
    clean, ref = (task.encode([getattr(p, k) for p in pairs], tok) for k in ("clean", "corrupt"))
    rec = faithfulness_record(model, clean, ref, circuit, split="test", n_random=a.n_random, protocol=a.protocol)
    rec.update(model=a.model, dtype=a.dtype, circuit_file=a.circuit, matching_file=a.matching, boxes=a.boxes,
               seconds=round(time.time() - t0, 1), torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(rec, indent=1))
    if a.out:
        write_json_atomic(rec, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

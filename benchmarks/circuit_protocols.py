"""A circuit under both evaluation protocols, and what each protocol admits at all, as one JSON object.

    python benchmarks/circuit_protocols.py --model qwen2.5-coder-1.5b --circuit docs/real/circuits/X.json \
        --boxes 7 --n 128 --out docs/real/circuits/X_protocols.json

On --n entity-tracking test pairs (the seed-independent test split; means over their corrupt prompts): the
circuit's faithfulness under the ``lenient`` protocol with --n-random random circuits of its size and roles (its
``strict`` record is the one ``fastcd discover`` wrote), and the all-heads checks: every head live at the
reference's three roles, and at all of the task's roles, under each protocol (the ceiling a circuit of those roles
can reach). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a prepared model name or a converted directory")
    ap.add_argument("--circuit", required=True, help="a circuit JSON for that model")
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--n", type=int, default=128, help="test pairs")
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch

    import fastcd
    from fastcd.artifacts import Circuit
    from fastcd.config import TEST_SEED
    from fastcd.hooks import mean_z
    from fastcd.io import write_json_atomic
    from fastcd.loading import spec_of
    from fastcd.metrics import circuit_accuracy, faithfulness_record
    from fastcd.models import get_adapter
    from fastcd.tasks import EntityTracking, adapt_task

    circuit = Circuit.load(a.circuit)
    circuit.check_model(spec_of(a.model, "--model"), "--model")  # before the weights load
    torch.set_grad_enabled(False)
    t0 = time.time()
    model = fastcd.load_model(a.model, dtype=a.dtype)
    tok = fastcd.load_tokenizer(a.model)
    task = adapt_task(EntityTracking(n_boxes=a.boxes), [tok])
    pairs = task.pairs(a.n, seed=TEST_SEED, split="test")
    clean, ref = (task.encode([getattr(p, k) for p in pairs], tok) for k in ("clean", "corrupt"))
    rec = {"lenient": faithfulness_record(model, clean, ref, circuit, split="test", n_random=a.n_random,
                                          protocol="lenient")}
    means = mean_z(model, ref.input_ids)
    full = rec["lenient"]["full_accuracy"]  # the same model on the same prompts
    heads = get_adapter(model).spec.all_heads()
    checks = {}
    for name, roles in (("reference_roles", task.reference_roles), ("all_roles", ("last", *task.roles[1:]))):
        for protocol in ("strict", "lenient"):
            acc = circuit_accuracy(model, clean, means, [(h, r) for h in heads for r in roles], protocol=protocol)
            checks[f"{name}/{protocol}"] = {"roles": list(roles), "protocol": protocol, "circuit_accuracy": acc,
                                            "faithfulness": acc / full if full else None}
            print(f"every head at {list(roles)}, {protocol}: {acc:.3f} (faithfulness "
                  f"{acc / full if full else float('nan'):.3f})", flush=True)
    rec.update(all_heads_at_roles=checks, full_accuracy=full, model=a.model, dtype=a.dtype, circuit_file=a.circuit,
               boxes=a.boxes, n_prompts=a.n, seconds=round(time.time() - t0, 1), torch=torch.__version__,
               threads=torch.get_num_threads())
    print(json.dumps(rec, indent=1))
    if a.out:
        write_json_atomic(rec, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a model needs its heads: circuit accuracy with every head live at the three reference roles plus positions
at fixed offsets from the queried box's label, everything else mean-ablated (strict protocol), one line each.

    python benchmarks/circuit_positions.py --model qwen2.5-coder-1.5b --boxes 7 --n 32

Offsets count from the queried label in the context: -4 is the queried object ("the X is in Box L"), +1 the comma or
period after the label. Means over the corrupted prompts of the same pairs. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json

SETS = ([], [1], [-1], [-5, -4, -3, -2, -1], [-5, -4, -3, -2, -1, 1], [-4], [-4, 1], [-4, -3, -2, -1, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--n", type=int, default=32, help="test pairs")
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args(argv)

    import torch

    import fastcd
    from fastcd.config import TEST_SEED
    from fastcd.hooks import mean_z
    from fastcd.metrics import circuit_accuracy, clean_metric
    from fastcd.models import get_adapter
    from fastcd.tasks import EntityTracking, adapt_task

    torch.set_grad_enabled(False)
    model = fastcd.load_model(a.model, dtype=a.dtype)
    tok = fastcd.load_tokenizer(a.model)
    task = adapt_task(EntityTracking(n_boxes=a.boxes), [tok])
    pairs = task.pairs(a.n, seed=TEST_SEED, split="test")
    clean, ref = (task.encode([getattr(p, k) for p in pairs], tok) for k in ("clean", "corrupt"))
    means = mean_z(model, ref.input_ids)
    full = float(clean_metric(model, clean, "accuracy", None, 64)[0].mean())
    print(json.dumps({"model": a.model, "boxes": a.boxes, "n": a.n, "dtype": a.dtype, "full_accuracy": full}))
    heads, label = get_adapter(model).spec.all_heads(), clean.positions["box_label"]
    base = dict(clean.positions)
    for offs in SETS:
        extra = {f"label{o:+d}": (label + o).clamp(0, clean.input_ids.shape[1] - 1) for o in offs}
        clean.positions = {**base, **extra}
        roles = [*task.reference_roles, *extra]
        acc = circuit_accuracy(model, clean, means, [(h, r) for h in heads for r in roles])
        print(json.dumps({"live_roles": roles, "circuit_accuracy": acc}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

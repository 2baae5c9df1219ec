"""`fastcd discover`: what the command does once its flags are parsed (:func:`run_discover`): find a circuit with
one of :mod:`fastcd.discover`'s methods or :func:`fastcd.circuit_search.search_circuit`, measure its faithfulness on
held-out test prompts, and write the circuit JSON with its figure beside it."""

from __future__ import annotations

import json
import os

from fastcd.artifacts import provenance
from fastcd.circuit_search import check_search_args, search_circuit
from fastcd.config import TEST_SEED
from fastcd.cost import discover_stages, per_prompt_s, simple_plan, weight_bytes
from fastcd.discover_policy import default_circuit
from fastcd.errors import UsageError
from fastcd.io import write_text_atomic
from fastcd.loading import check_model_path, load_model, load_tokenizer, model_identity, resolve_model, spec_of
from fastcd.metrics import faithfulness_record, format_faithfulness
from fastcd.plots import faithfulness_curve_plot, head_heatmaps
from fastcd.stages import Stages
from fastcd.tasks import adapt_task, get_task


def run_discover(a) -> int:
    """Run ``fastcd discover`` for parsed :class:`fastcd.cli_args.DiscoverArgs` ``a``; checks that need no
    weights come first."""
    import torch


    if a.n_examples < 2:
        raise UsageError(f"--n-examples must be >= 2, got {a.n_examples}")
    if a.method == "path" and a.task != "entity-tracking":
        raise UsageError("--method path is defined for entity-tracking only (use patching or attribution for tom)")
    task = get_task(a.task, **({"n_boxes": a.n_boxes} if a.task == "entity-tracking" else {}))  # or module:Class
    a.model = resolve_model(a.model, "--model", weights=False)  # resolved once; config only: no weights needed
    n_heads = a.model.spec.n_total_heads
    if a.top_k is not None and not 1 <= a.top_k <= n_heads:
        raise UsageError(f"--top-k must be in 1..{n_heads} (the number of heads), got {a.top_k}")
    search = a.method == "search"
    if a.max_units is not None and not search:
        raise UsageError(f"--max-units caps the circuit search (--method search), not --method {a.method}")
    roles = list(a.roles) if a.roles else ["last", *[r for r in task.roles if r != "last"]]
    if search or a.evaluate:
        check_search_args(target=a.target, roles=roles, task_roles=tuple(dict.fromkeys(("last", *task.roles))),
                          n_heldout=a.n_heldout, n_random=a.n_random, max_units=a.max_units)
    check_model_path(a.model, "--model")  # the weights are there, before the tokenizer loads
    tok = load_tokenizer(a.model, "--model")
    task = adapt_task(task, [tok])

    stages, spec = Stages(), spec_of(a.model, "--model")
    # a packaged model's name, not its directory's last part ("hf")
    model_name = getattr(a.model, "name", None) or os.path.basename(os.path.normpath(a.model))
    with stages("load", f"{model_name} ({weight_bytes(a.model)[1] / 2**30:.2f} GiB)"):
        model = load_model(a.model, dtype=a.dtype, device=a.device, what="--model")
    with stages("tokenisation", f"{a.n_examples} prompt pairs" + (f" and {a.n_heldout} held-out pairs"
                                                                  if search or a.evaluate else "")):
        pairs = task.pairs(a.n_examples, seed=a.seed, split=a.split)
        clean, corrupt = (task.encode([getattr(p, k) for p in pairs], tok) for k in ("clean", "corrupt"))
        hp = task.pairs(a.n_heldout, seed=TEST_SEED, split="test") if search or a.evaluate else []
        held = [task.encode([getattr(p, k) for p in hp], tok) for k in ("clean", "corrupt")] if hp else None
    with stages("calibration", "a forward of 16 prompts"):
        sec = per_prompt_s(model, clean)
    stages.say_plan(simple_plan(f"discover ({a.method}) on {a.model}", discover_stages(a, spec, task, clean),
                                sum(p.numel() * p.element_size() for p in model.parameters()),
                                {"teacher": sec, "student": sec}))
    if a.plan:
        return 0
    png = os.path.splitext(a.out)[0] + ".png"

    meta = dict(model=model_name, n_examples=a.n_examples, seed=a.seed, split=a.split, dtype=a.dtype,
                provenance=provenance(task, {"model": model_identity(a.model)}, [p.clean for p in pairs]))
    boxes = f" ({task.n_boxes} boxes)" if hasattr(task, "n_boxes") else ""
    if search:
        stream = os.path.splitext(a.out)[0] + ".curve.jsonl"  # every point with its units, as it is measured
        write_text_atomic(json.dumps({"search": {"task": task.name, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
                                                 "roles": roles, "protocol": a.protocol, "target": a.target, **meta}})
                          + "\n", stream)  # the header; each point is appended as it is measured

        def on_point(row):
            with open(stream, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

        with stages("discovery", stages.what("discovery")):  # the search measures its own held-out record
            res = search_circuit(model, clean, *held, roles=roles, target=a.target, protocol=a.protocol,
                                 n_random=a.n_random, seed=a.seed, batch_size=a.batch_size, task=task.name,
                                 max_units=a.max_units, progress=True, on_point=on_point)
        circuit = res.circuit
        circuit.meta.update(meta, n_boxes=getattr(task, "n_boxes", None), curve=res.curve)
        faithfulness_curve_plot(res.curve, res.record, png, title=f"{model_name}, {a.task}{boxes}: circuit search\n"
                                f"{a.protocol} mean ablation, {a.n_heldout} held-out test prompts")
    else:
        with stages("discovery", stages.what("discovery")):
            circuit, panels, marked = default_circuit(
                model, task, clean, corrupt, method=a.method, top_k=a.top_k, path_k=a.path_k, position=a.position,
                mode=a.mode, metric=a.metric, relative=not a.absolute, threshold=a.threshold,
                recheck_top_k=a.recheck_top_k, batch_size=a.batch_size, max_batch=a.max_batch, progress=True)
        circuit.meta.update(meta)
        if a.evaluate:
            with torch.no_grad(), stages("evaluation", stages.what("evaluation")):
                circuit.meta["evaluation"] = faithfulness_record(model, *held, circuit, split="test",
                                                                 n_random=a.n_random, protocol=a.protocol)
        method = circuit.meta.get("method", a.method)
        head_heatmaps(panels, png, title=f"{model_name}, {a.task}{boxes}: head scores ({method}, {a.n_examples} "
                      "prompts)", marked=marked, metric=a.metric, relative=not a.absolute,
                      nan_label="no path to the group's receivers (in the same or a later layer)")
    circuit.save(a.out)
    print(circuit)
    if circuit.meta.get("evaluation"):
        print(format_faithfulness(circuit.meta["evaluation"]))
    print(f"wrote {a.out} and {png}" + (f" (and {stream}: every curve point's units)" if search else ""))
    return 0

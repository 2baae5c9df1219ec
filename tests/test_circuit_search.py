"""Circuit evaluation protocols, the role-wise circuit search and its bad inputs (fastcd.circuit_search)."""

import json
import re

import pytest
import torch
from conftest import make_tiny

from fastcd.artifacts import Circuit, CircuitHead
from fastcd.circuit_search import _soft_keep, check_search_args, curve_circuit, search_circuit, unit_gradients
from fastcd.cli import main
from fastcd.errors import UsageError
from fastcd.metrics import keep_masks
from fastcd.models import Head, get_adapter, logits_at
from fastcd.tasks import EntityTracking


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _batches(tok, n=24, boxes=3):
    task = EntityTracking(n_boxes=boxes)
    pairs = task.pairs(n, seed=0, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


def test_entity_tracking_roles_mark_the_queried_clause(tok):
    clean, _ = _batches(tok, 16, boxes=5)
    for i, ex in enumerate(clean.examples):
        toks = tok.convert_ids_to_tokens(clean.input_ids[i].tolist())
        assert toks[clean.positions["object"][i]] == ex.answer
        assert toks[clean.positions["clause_end"][i]] in (",", ".")
        assert clean.positions["clause_end"][i] == clean.positions["box_label"][i] + 1
    assert EntityTracking.reference_roles == ("last", "query_label", "box_label")


def test_unit_gradients_match_finite_differences(tok):
    """The reference for the search's scores: d log p / d keep by central differences (float64)."""
    model = make_tiny("llama", vocab_size=len(tok)).double()
    spec = get_adapter(model).spec
    clean, corrupt = _batches(tok, 8)
    from fastcd.hooks import mean_z

    means = mean_z(model, corrupt.input_ids).double()
    roles = ["last", "object", "box_label", "all"]
    live = [(Head(1, 0), "last")]
    g = unit_gradients(model, clean, means, live, roles, batch_size=8)
    idx = torch.arange(len(clean))
    base = keep_masks(spec, clean, live, idx).double()

    def f(keep):
        with torch.no_grad(), _soft_keep(model, keep, means):
            logits, _ = logits_at(model, clean.positions["last"], input_ids=clean.input_ids)
        return float(logits.log_softmax(-1)[idx, clean.answer_ids].mean())  # float64 (metric_values casts to fp32)

    eps = 1e-2  # Llama's RMSNorm computes in fp32 even in a float64 model: smaller steps drown in its rounding
    for head, role in [(Head(1, 0), "last"), (Head(0, 3), "object"), (Head(1, 2), "box_label"), (Head(0, 1), "all")]:
        bump = torch.zeros_like(base)
        if role == "all":  # a unit live at every position: the whole prompt's keep moves
            bump[head.layer, :, :, head.head] = eps
        else:
            bump[head.layer, idx, clean.positions[role], head.head] = eps
        fd = (f(base + bump) - f(base - bump)) / (2 * eps)
        assert g[head.layer, head.head, roles.index(role)].item() == pytest.approx(fd, rel=2e-3, abs=1e-6)


def _shipped_teacher(n: int):
    """The shipped 7-box teacher, its task, and n search prompts, n held-out prompts and their corrupt twins."""
    from fastcd.loading import load_model, load_tokenizer
    from fastcd.pretrain import shipped_checkpoint

    path = shipped_checkpoint("et-teacher")
    model, tk = load_model(path), load_tokenizer(path)
    task = EntityTracking(n_boxes=7)
    sp, hp = task.pairs(n, seed=0, split="val"), task.pairs(n, seed=1, split="test")
    enc = [task.encode([getattr(p, k) for p in ps], tk) for ps, k in ((sp, "clean"), (hp, "clean"), (hp, "corrupt"))]
    return model, task, enc


def test_search_on_the_shipped_teacher_reaches_the_target(tmp_path):
    """The shipped 7-box teacher (2 layers x 4 heads, accuracy 1.0): lenient protocol, target 0.85."""
    model, task, enc = _shipped_teacher(48)
    streamed = []
    with pytest.warns(UserWarning, match="answers only 48 of the 48 search prompts"):  # 48 < 50 right ones
        res = search_circuit(model, *enc, roles=task.roles, target=0.85, protocol="lenient", start=1, growth=2,
                             n_random=4, n_random_curve=2, on_point=streamed.append)
    assert streamed == res.curve  # each point streamed as it was measured, with its units
    assert all(len(r["unit_list"]) == r["units"] for r in res.curve)
    assert [[str(c.head), c.position] for c in res.circuit.heads] == res.curve[-1]["unit_list"]
    rec = res.record
    assert rec["reached"] and rec["search_faithfulness"] >= 0.85
    assert rec["circuit_units"] < 8 * len(task.roles)  # smaller than every unit
    assert rec["faithfulness"] > rec["random_circuit_accuracy"] / rec["full_accuracy"] + 0.3
    grow = [r for r in res.curve if r["stage"] == "grow"]
    assert grow[-1]["faithfulness"] > grow[0]["faithfulness"]
    assert {r["stage"] for r in res.curve} >= {"grow", "pruned"}
    assert rec["faithfulness"] == pytest.approx(rec["circuit_accuracy"] / rec["full_accuracy"])
    assert res.circuit.meta["evaluation"] is rec and len(res.circuit.heads) == rec["circuit_units"]
    # any curve point is a circuit: re-evaluated from the saved file, it scores what its point recorded
    from fastcd.hooks import mean_z
    from fastcd.metrics import circuit_correct

    path = tmp_path / "search.json"
    res.circuit.meta["curve"] = res.curve
    res.circuit.save(path)
    means = mean_z(model, enc[2].input_ids)
    for row in (res.curve[0], res.curve[-1]):
        c = curve_circuit(path, row["units"])
        assert c.meta["curve_point"]["faithfulness"] == row["faithfulness"] and len(c.heads) == row["units"]
        hits = circuit_correct(model, enc[1], means, [(h.head, h.position) for h in c.heads], protocol="lenient")
        assert sum(hits) / len(hits) == pytest.approx(row["circuit_accuracy"])
    sizes = [r["units"] for r in res.curve]
    with pytest.raises(UsageError, match=re.escape(f"units: no curve point in {str(path)!r} has 1000 units (sizes "
                                                   f"measured: {sizes})")):
        curve_circuit(path, 1000)
    with pytest.raises(UsageError, match="path: .* does not exist"):
        curve_circuit(tmp_path / "none.curve.jsonl", 1)


def test_unit_gradients_in_chunks_of_the_memory_budget_are_the_same(tok, monkeypatch):
    """The backward keeps every layer's activations: a small FASTCD_MEMORY_BUDGET splits the prompts into more
    chunks (one row each here) and the summed gradients stay the same."""
    from fastcd.hooks import mean_z, rows_for_budget

    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _batches(tok, 8)
    means = mean_z(model, corrupt.input_ids)
    live, roles = [(Head(1, 0), "last")], ["last", "object", "all"]
    whole = unit_gradients(model, clean, means, live, roles, batch_size=8)
    t = clean.input_ids.shape[1]
    assert rows_for_budget(model, t, grad=True) >= 8
    one = rows_for_budget(model, t, grad=True, budget=1)
    monkeypatch.setenv("FASTCD_MEMORY_BUDGET", "1")
    assert one == 1 and rows_for_budget(model, t, grad=True) == 1 < rows_for_budget(model, t, budget=10**6)
    torch.testing.assert_close(unit_gradients(model, clean, means, live, roles, batch_size=8), whole,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["strict", "lenient"])
def test_unit_gradients_on_few_shot_prompts_run_the_shared_prefix_once(tok, monkeypatch, protocol):
    """Few-shot prompts (ToM behind its instruction and shots): the prefix runs once (batch 1) under its own soft
    mask, whose gradient is the sum of the rows' there: the same scores as full forwards (FASTCD_PREFIX_REUSE=0),
    for units at roles and live everywhere."""
    from fastcd.hooks import mean_z
    from fastcd.models import shared_prefix_length
    from fastcd.tasks import TheoryOfMind

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    pairs = task.pairs(6, seed=0, split="val")
    clean, ref = (task.encode([getattr(q, k) for q in pairs], tok) for k in ("clean", "corrupt"))
    model = make_tiny("llama", vocab_size=len(tok)).double()
    means = mean_z(model, ref.input_ids).double()
    live, roles = [(Head(1, 0), "all"), (Head(0, 2), "question_character")], ["last", "question_container", "all"]
    shapes = []
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: shapes.append(tuple(k["input_ids"].shape)) or orig(*a, **k))
    got = unit_gradients(model, clean, means, live, roles, protocol=protocol, batch_size=4)
    p, t = shared_prefix_length(clean.input_ids), clean.input_ids.shape[1]
    assert shapes == [(1, p), (4, t - p), (1, p), (2, t - p)]
    monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
    shapes.clear()
    ref_g = unit_gradients(model, clean, means, live, roles, protocol=protocol, batch_size=4)
    assert shapes == [(4, t), (2, t)]
    assert got.abs().max() > 0
    torch.testing.assert_close(got, ref_g, atol=1e-9, rtol=1e-7)


def test_search_with_heads_live_at_every_position():
    """roles ["all"] (the paper's ToM protocol, strict): every unit is a head live at every position, every other
    head mean-ablated everywhere; the shipped 7-box teacher keeps the target with fewer than its 8 heads."""
    model, task, enc = _shipped_teacher(48)
    with pytest.warns(UserWarning, match="answers only"):
        res = search_circuit(model, *enc, roles=["all"], target=0.85, protocol="strict", start=1, growth=2,
                             n_random=4, n_random_curve=2)
    rec = res.record
    assert rec["reached"] and rec["search_faithfulness"] >= 0.85 and rec["circuit_units"] < 8
    assert {c.position for c in res.circuit.heads} == {"all"} and rec["units_per_role"] == {"all": rec["circuit_units"]}
    # the ceiling is the full model by construction (not measured): every head live everywhere changes nothing
    from fastcd.hooks import mean_z
    from fastcd.metrics import circuit_correct

    assert rec["all_heads_at_roles_faithfulness"] == {"search": 1.0, "heldout": 1.0}
    every = [(h, "all") for h in get_adapter(model).spec.all_heads()]
    hits = circuit_correct(model, enc[1], mean_z(model, enc[2].input_ids), every, protocol="strict")
    assert sum(hits) / len(hits) == rec["full_accuracy"]
    assert rec["faithfulness"] > rec["random_circuit_accuracy"] / rec["full_accuracy"] + 0.3


def test_search_stops_growing_at_max_units():
    """max_units caps the growth: the search keeps its curve up to there and records the target as not reached."""
    model, task, enc = _shipped_teacher(24)
    with pytest.warns(UserWarning, match="answers only"):
        res = search_circuit(model, *enc, roles=["all"], target=1.0, protocol="strict", start=1, growth=2,
                             max_units=3, n_random=2, n_random_curve=2)
    assert not res.record["reached"]  # 3 of the teacher's 8 heads do not keep all of its accuracy
    assert [r["units"] for r in res.curve] == [1, 2, 3] and res.record["circuit_units"] == 3


@pytest.mark.parametrize("kw, msg", [
    (dict(target=0.0), "target must be a faithfulness in"), (dict(target=1.5), "target must be a faithfulness in"),
    (dict(roles=["last", "nowhere"]), "roles must be a non-empty list of the task's roles"),
    (dict(n_heldout=8), "n_heldout must be >= 20"), (dict(n_random=1), "n_random must be >= 2"),
])
def test_search_bad_inputs(kw, msg):
    args = dict(target=0.85, roles=["last"], task_roles=("last", "object"), n_heldout=128, n_random=10) | kw
    with pytest.raises(ValueError, match=msg):
        check_search_args(**args)


def _weightless_model(tmp_path):
    """A saved tiny model without its weights: any command that loads it fails; checks must come first."""
    from fastcd.tokenizer import build_word_tokenizer

    tk = build_word_tokenizer()
    m = make_tiny("llama", n_layers=3, vocab_size=len(tk))
    m.save_pretrained(tmp_path / "model")
    tk.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    return tmp_path / "model"


@pytest.mark.parametrize("flags, msg", [
    (["--target", "1.5"], "target must be a faithfulness in (0, 1]"),
    (["--roles", "last", "nowhere"], "roles must be a non-empty list of the task's roles"),
    (["--n-heldout", "5"], "n_heldout must be >= 20"),
    (["--n-random", "1"], "n_random must be >= 2"),
])
def test_cli_search_bad_inputs_fail_before_the_model_loads(tmp_path, capsys, flags, msg):
    model = _weightless_model(tmp_path)
    capsys.readouterr()
    rc = main(["discover", "--model", str(model), "--task", "entity-tracking", "--method", "search",
               "--out", str(tmp_path / "c.json"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_circuit_of_another_model_fails_before_loading(tmp_path, capsys):
    model = _weightless_model(tmp_path)  # 3 x 4 heads
    capsys.readouterr()
    circ = tmp_path / "c.json"
    Circuit([CircuitHead(Head(0, 1), "g", "last", 0.0)], "entity-tracking", 28, 12, {"model": "qwen"}).save(circ)
    rc = main(["match", "--teacher", str(model), "--student", str(model), "--circuit", str(circ),
               "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "circuit is for a model of 28 layers x 12 heads (qwen)" in err[0], err


@pytest.mark.slow
def test_cli_search_writes_circuit_curve_and_png(tmp_path, capsys):
    from fastcd.pretrain import shipped_checkpoint

    out = tmp_path / "search.json"
    rc = main(["discover", "--model", shipped_checkpoint("et-teacher"), "--task", "entity-tracking", "--n-boxes", "5",
               "--method", "search", "--protocol", "lenient", "--n-examples", "32", "--n-heldout", "32",
               "--n-random", "3", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    ev = d["meta"]["evaluation"]
    assert d["meta"]["method"] == "search" and ev["protocol"] == "lenient" and ev["n_prompts"] == 32
    assert ev["n_random"] == 3 and len(ev["random_circuit_accuracies"]) == 3 and d["meta"]["curve"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "faithfulness (lenient protocol, 32 test prompts)" in capsys.readouterr().out
    # the streamed curve: the search's header, then every point with its units, as the circuit's meta has them
    lines = [json.loads(x) for x in (tmp_path / "search.curve.jsonl").read_text().splitlines()]
    assert lines[0]["search"]["n_layers"] == d["n_layers"] and lines[0]["search"]["protocol"] == "lenient"
    assert lines[1:] == d["meta"]["curve"]
    n = lines[1]["units"]
    a, b = curve_circuit(tmp_path / "search.curve.jsonl", n), curve_circuit(out, n)
    assert a.heads == b.heads and len(a.heads) == n and a.task == b.task == "entity-tracking"
    bad = tmp_path / "bad.curve.jsonl"
    bad.write_text('{"units": 1}\n')
    with pytest.raises(UsageError, match="is not a search's curve"):
        curve_circuit(bad, 1)


@pytest.mark.slow
def test_circuit_protocols_script_on_the_shipped_teacher(tmp_path):
    """benchmarks/circuit_protocols.py: the lenient record and the four all-heads checks, one JSON object."""
    import subprocess
    import sys
    from pathlib import Path

    from fastcd.pretrain import shipped_checkpoint

    root = Path(__file__).resolve().parents[1]
    circ = tmp_path / "c.json"
    Circuit([CircuitHead(Head(0, 2), "g", "last", 0.0), CircuitHead(Head(0, 3), "g", "box_label", 0.0)],
            "entity-tracking", 2, 4).save(circ)
    out = tmp_path / "p.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "circuit_protocols.py"), "--model",
                        shipped_checkpoint("et-teacher"), "--circuit", str(circ), "--n", "24", "--n-random", "2",
                        "--dtype", "float32", "--out", str(out)], capture_output=True, text=True, cwd=root, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["lenient"]["protocol"] == "lenient" and rec["lenient"]["n_random"] == 2
    checks = rec["all_heads_at_roles"]
    assert set(checks) == {f"{r}/{p}" for r in ("reference_roles", "all_roles") for p in ("strict", "lenient")}
    assert checks["all_roles/lenient"]["circuit_accuracy"] == pytest.approx(rec["full_accuracy"])  # nothing ablated
    bad = tmp_path / "bad.json"
    Circuit([CircuitHead(Head(0, 1), "g", "last", 0.0)], "entity-tracking", 28, 12).save(bad)
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "circuit_protocols.py"), "--model",
                        shipped_checkpoint("et-teacher"), "--circuit", str(bad)], capture_output=True, text=True,
                       cwd=root, timeout=600)
    assert p.returncode != 0 and "circuit is for a model of 28 layers x 12 heads" in p.stderr

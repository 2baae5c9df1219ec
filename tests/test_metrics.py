"""Metrics and circuit evaluation (fastcd.metrics): per-example metrics at the last position, accuracy and CE,
patching scores, the ablation protocols' keep masks, circuit accuracy and the faithfulness record."""

import random

import pytest
import torch
from conftest import make_tiny

from fastcd.artifacts import Circuit, CircuitHead
from fastcd.discover import circuit_from_scores, make_source, patch_heads_batched
from fastcd.metrics import (
    accuracy_and_ce,
    circuit_accuracy,
    clean_metric,
    evaluate_circuit,
    faithfulness_record,
    format_faithfulness,
    keep_masks,
    metric_values,
    random_units,
    relative_change,
)
from fastcd.models import Head, get_adapter, logits_at
from fastcd.tasks import EntityTracking


def _batches(tok, n=24, boxes=3):
    task = EntityTracking(n_boxes=boxes)
    pairs = task.pairs(n, seed=0, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


def test_metric_values_against_the_softmax_by_hand(tok):
    clean, _ = _batches(tok, 6)
    logits = torch.randn(6, len(tok))
    ans = clean.answer_ids
    rows = torch.arange(6)
    p = logits.softmax(-1)[rows, ans]
    torch.testing.assert_close(metric_values(logits, clean, "prob"), p)
    torch.testing.assert_close(metric_values(logits, clean, "logprob"), p.log())
    logits[rows, ans] = 100.0  # the answer is the argmax everywhere
    assert metric_values(logits, clean, "accuracy").tolist() == [1.0] * 6
    d = torch.tensor([int(tok.convert_tokens_to_ids("box"))] * 6)
    torch.testing.assert_close(metric_values(logits, clean, "logit_diff", distractor_ids=d), 100.0 - logits[rows, d])
    # [n, T, vocab] logits are read at each example's last position
    full = torch.zeros(6, clean.input_ids.shape[1], len(tok))
    full[rows, clean.positions["last"]] = logits
    torch.testing.assert_close(metric_values(full, clean, "prob"), metric_values(logits, clean, "prob"))


def test_accuracy_and_ce_is_the_answers_mean_negative_logprob(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, _ = _batches(tok, 10)
    correct, ce = accuracy_and_ce(model, clean, batch_size=4)  # three chunks: 4 + 4 + 2
    with torch.no_grad():
        logits, _ = logits_at(model, clean.positions["last"], input_ids=clean.input_ids)
    lp = logits.float().log_softmax(-1)[torch.arange(10), clean.answer_ids]
    assert ce == pytest.approx(float(-lp.mean()), rel=1e-5)
    assert correct == (logits.argmax(-1) == clean.answer_ids).tolist()


def test_relative_change_per_example_for_prob_else_on_the_means():
    patched, clean = torch.tensor([[0.1, 0.4]]), torch.tensor([0.2, 0.8])
    # prob (Prakash et al.): mean of per-example relative changes, (0.1-0.2)/0.2 and (0.4-0.8)/0.8
    assert float(relative_change(patched, clean, "prob", True)) == pytest.approx(-0.5)
    # other metrics: the change of the means over |clean mean|: (0.25 - 0.5) / 0.5
    assert float(relative_change(patched, clean, "logprob", True)) == pytest.approx(-0.5)
    assert float(relative_change(torch.tensor([[1.0, 3.0]]), torch.tensor([-1.0, -3.0]), "logit_diff", True)) \
        == pytest.approx(2.0)
    assert float(relative_change(patched, clean, "prob", False)) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="clean probability is 0 for example 1"):
        relative_change(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.0]), "prob", True)
    with pytest.raises(ValueError, match="clean mean is 0"):
        relative_change(torch.tensor([1.0]), torch.tensor([0.0]), "accuracy", True)


def test_metric_errors(tok):
    clean, corrupt = _batches(tok, 4)
    with pytest.raises(ValueError, match="metric must be one of"):
        metric_values(torch.zeros(4, 3, 10), clean, "kl")
    with pytest.raises(ValueError, match="without an answer"):
        metric_values(torch.zeros(4, clean.input_ids.shape[1], len(tok)), corrupt, "prob")


def test_faithfulness_record_adds_the_random_spread_and_prints_one_line(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _batches(tok, 16)
    circuit = Circuit([CircuitHead(Head(1, 0), "g", "last", -0.1), CircuitHead(Head(0, 2), "g", "last", -0.1)],
                      "entity-tracking", 2, 4)
    rec = faithfulness_record(model, clean, corrupt, circuit, split="test", n_random=4, seed=3)
    ev = evaluate_circuit(model, clean, circuit, reference=corrupt, n_random=4, seed=3)
    assert {k: rec[k] for k in ev} == ev  # the evaluation itself, unchanged
    rand = ev["random_circuit_accuracies"]
    m = sum(rand) / 4
    assert rec["random_circuit_sd"] == pytest.approx((sum((r - m) ** 2 for r in rand) / 3) ** 0.5)
    assert (rec["n_random"], rec["n_prompts"], rec["split"], rec["protocol"]) == (4, 16, "test", "strict")
    line = format_faithfulness(rec)
    assert line.startswith("faithfulness (strict protocol, 16 test prompts): full ")
    assert f"circuit {rec['circuit_accuracy']:.3f}" in line and line.endswith("size 2 of 8 heads")


def test_evaluate_circuit(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _batches(tok, n=32)
    everything = Circuit([CircuitHead(h, "all", "all", 0.0) for h in [Head(l, k) for l in range(2) for k in range(4)]],
                         "entity-tracking", 2, 4)
    r = evaluate_circuit(model, clean, everything, reference=corrupt, n_random=10)
    assert r["circuit_accuracy"] == r["full_accuracy"]  # nothing ablated
    assert len(r["random_circuit_accuracies"]) == 10
    src = make_source(model, clean, "mean", corrupt=corrupt)
    res = patch_heads_batched(model, clean, src, metric="prob")
    small = circuit_from_scores(res, 2, task="entity-tracking", position="last")
    r2 = evaluate_circuit(model, clean, small, reference=corrupt, n_random=10, seed=1)
    assert 0 <= r2["circuit_accuracy"] <= 1 and r2["circuit_size"] == 2
    if r2["full_accuracy"] > 0:
        assert r2["faithfulness"] == pytest.approx(r2["circuit_accuracy"] / r2["full_accuracy"])
    bad = Circuit([CircuitHead(Head(0, 0), "g", "all", 0.0)], "entity-tracking", 3, 4)
    with pytest.raises(ValueError, match="circuit is for 3 x 4 heads"):
        evaluate_circuit(model, clean, bad, reference=corrupt)


def test_keep_masks_strict_and_lenient(tok):
    spec = get_adapter(make_tiny("llama", vocab_size=len(tok))).spec
    clean, _ = _batches(tok, 6)
    idx = torch.arange(6)
    live = [(Head(1, 2), "last"), (Head(0, 1), "object")]
    strict = keep_masks(spec, clean, live, idx, "strict")
    assert int(strict.sum()) == 12  # one position per example per unit
    assert bool(strict[1, torch.arange(6), clean.positions["last"], 2].all())
    assert bool(strict[0, torch.arange(6), clean.positions["object"], 1].all())
    lenient = keep_masks(spec, clean, live, idx, "lenient")
    t = clean.input_ids.shape[1]
    roles = len(clean.positions)  # last + the task's five roles, all distinct positions
    assert int(lenient.sum()) == spec.n_layers * spec.n_heads * 6 * (t - roles) + 12
    with pytest.raises(ValueError, match="protocol must be one of"):
        keep_masks(spec, clean, live, idx, "loose")


@pytest.mark.parametrize("protocol", ["strict", "lenient"])
def test_every_unit_live_is_the_full_model(tok, protocol):
    model = make_tiny("llama", vocab_size=len(tok))
    spec = get_adapter(model).spec
    clean, corrupt = _batches(tok)
    from fastcd.hooks import mean_z

    means = mean_z(model, corrupt.input_ids)
    live = ([(h, "all") for h in spec.all_heads()] if protocol == "strict" else
            [(h, r) for h in spec.all_heads() for r in clean.positions])
    full = float(clean_metric(model, clean, "accuracy", None, 64)[0].mean())
    assert circuit_accuracy(model, clean, means, live, protocol=protocol) == full
    none = circuit_accuracy(model, clean, means, [], protocol=protocol)
    assert 0 <= none <= 1


def test_random_units_keep_size_and_roles():
    from fastcd.models import ModelSpec

    spec = ModelSpec("llama", n_layers=3, n_heads=4, n_kv_heads=4, d_head=8, d_model=32, vocab_size=10)
    live = [(Head(0, 0), "last"), (Head(1, 1), "last"), (Head(0, 0), "object")]
    r = random_units(spec, live, random.Random(0))
    assert sorted(role for _, role in r) == ["last", "last", "object"]
    assert len({h for h, role in r if role == "last"}) == 2

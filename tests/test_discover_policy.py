"""One entry point over every discovery method with the task's default policy (fastcd.discover_policy), shared by
``distill`` and ``fastcd discover``."""

import pytest
import torch
from conftest import make_tiny

from fastcd import discover as D
from fastcd.discover_policy import default_circuit
from fastcd.tasks import EntityTracking, TheoryOfMind


def _prompts(task, tok, n=16):
    pairs = task.pairs(n, seed=0, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


def test_entity_tracking_default_is_role_wise_patching_at_the_reference_roles(tok):
    task = EntityTracking(n_boxes=3)
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _prompts(task, tok)
    circuit, panels, marked = default_circuit(model, task, clean, corrupt, threshold=0.0)
    src = D.make_source(model, clean, "mean", corrupt=corrupt)
    want, results = D.circuit_by_roles(model, clean, src, task.reference_roles, k_per_role=3, threshold=0.0,
                                       task="entity-tracking")
    assert [(c.head, c.position) for c in circuit.heads] == [(c.head, c.position) for c in want.heads]
    assert list(panels) == [f"@{r}" for r in task.reference_roles]
    for r in task.reference_roles:
        assert torch.equal(panels[f"@{r}"], results[r].scores)
        assert marked[f"@{r}"] == [c.head for c in circuit.heads if c.position == r]


def test_bad_methods_are_one_line(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _prompts(TheoryOfMind(), tok, n=4)
    with pytest.raises(ValueError, match="discovery method must be 'auto' or one of"):
        default_circuit(model, TheoryOfMind(), clean, corrupt, method="magic")
    with pytest.raises(ValueError, match="'path' is defined for entity tracking only"):
        default_circuit(model, TheoryOfMind(), clean, corrupt, method="path")
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.8"):
        default_circuit(model, TheoryOfMind(), clean, corrupt, method="patching", top_k=9)


def test_tom_default_discovery_keeps_the_most_harmful_share_at_the_last_token(tok):
    """One default policy (distill and `fastcd discover` share it): ToM = mean-ablation patching at the last token,
    keeping the most harmful 15% of the heads (those whose patch lowers p(answer))."""
    task = TheoryOfMind()
    model = make_tiny("llama", vocab_size=len(tok))
    pairs = task.pairs(16, seed=0, split="val")
    clean, corrupt = task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)
    circuit, panels, marked = default_circuit(model, task, clean, corrupt)
    src = D.make_source(model, clean, "mean", corrupt=corrupt)
    res = D.patch_heads_batched(model, clean, src, metric="prob", position="last")
    scores, k = res.scores, max(1, round(D.CIRCUIT_SHARE * res.scores.numel()))
    want = [h for h, _ in res.top(k, strict=True)]
    assert [c.head for c in circuit.heads] == want and len(want) <= k
    assert list(marked.values())[0] == want and torch.equal(list(panels.values())[0], scores)
    assert all(c.position == "last" for c in circuit.heads)
    assert all(float(scores[c.head.layer, c.head.head]) < 0 for c in circuit.heads)

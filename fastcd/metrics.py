"""Metric values, accuracy and circuit evaluation: what every stage (discovery, matching, training, the demo)
measures a model with. Lower than discovery: anything may import it.

Circuit evaluation follows Prakash et al.'s ``circuit_eval.ipynb`` (github.com/Nix07/finetuning): per-position
means, circuit heads live only at their group's position, every other (head, position) mean-ablated, a random
circuit of the same size averaged over draws, faithfulness = circuit / full.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from fastcd.artifacts import Circuit
from fastcd.errors import UsageError
from fastcd.hooks import ALL, intervene, mean_z, position_mask, role_positions, run_with_z
from fastcd.models import (
    PREFIX_MIN,
    Head,
    accepts_logits_to_keep,
    get_adapter,
    logits_at,
    shared_prefix,
    shared_prefix_length,
)
from fastcd.tasks.base import EncodedBatch

METRICS = ("prob", "logprob", "logit_diff", "accuracy", "candidate_accuracy")
SCORINGS = ("vocab", "candidates")

def metric_values(logits: torch.Tensor, batch: EncodedBatch, metric: str,
                  distractor_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example metric at each example's last position.

    Args:
        logits: ``[n, T, vocab]``, or ``[n, vocab]`` already taken at each example's last position (what
            :func:`fastcd.models.logits_at` returns).
        metric: ``prob`` (probability of the answer), ``logprob``, ``logit_diff`` (answer minus
            distractor logit; needs ``distractor_ids``), ``accuracy`` (argmax over the vocabulary is the answer)
            or ``candidate_accuracy`` (argmax among the answers the prompt allows, ``batch.candidate_ids``: the
            in-context objects for entity tracking, the story's drinks and "unknown" for ToM).

    Returns:
        ``[n]`` float tensor.
    """
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {METRICS}, got {metric!r}")
    if bool((batch.answer_ids < 0).any()):
        raise UsageError("batch has examples without an answer (corrupt prompts?); metrics need clean examples")
    n = logits.shape[0]
    if logits.dim() == 2:
        last = logits.float()
    else:
        last = logits[torch.arange(n), batch.positions["last"].to(logits.device)].float()  # [n, vocab]
    ans = batch.answer_ids.to(logits.device)
    if metric == "prob":
        return last.softmax(-1)[torch.arange(n), ans]
    if metric == "logprob":
        return last.log_softmax(-1)[torch.arange(n), ans]
    if metric == "accuracy":
        return (last.argmax(-1) == ans).float()
    if metric == "candidate_accuracy":
        if batch.candidate_ids is None:
            raise UsageError("metric='candidate_accuracy' needs batch.candidate_ids (encode with the task's encode())")
        cand = batch.candidate_ids.to(logits.device)
        return (cand[torch.arange(n), last.gather(1, cand).argmax(-1)] == ans).float()
    if distractor_ids is None:
        distractor_ids = batch.distractor_ids
    if distractor_ids is None:
        raise UsageError("metric='logit_diff' needs distractor_ids (one alternative answer token per example)")
    d = distractor_ids.to(logits.device)
    return last[torch.arange(n), ans] - last[torch.arange(n), d]


@torch.no_grad()
def accuracy_per_example(model: nn.Module, batch: EncodedBatch, batch_size: int = 256, *,
                         scoring: str = "vocab") -> list[bool]:
    """Whether the argmax at each example's last position is its answer: over the whole vocabulary
    (``scoring="vocab"``) or among the answers the prompt allows (``scoring="candidates"``)."""
    if scoring not in SCORINGS:
        raise UsageError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    metric = "accuracy" if scoring == "vocab" else "candidate_accuracy"
    vals, _ = clean_metric(model, batch, metric, None, batch_size)
    return vals.bool().tolist()


@torch.no_grad()
def accuracy_and_ce(model: nn.Module, batch: EncodedBatch, batch_size: int = 256) -> tuple[list[bool], float]:
    """One forward per chunk: whether each example's argmax at its last position is its answer, and the mean
    cross-entropy of the answer there (nats)."""
    device = next(model.parameters()).device
    correct, ce = [], []
    for i in range(0, len(batch), batch_size):
        sub = batch.index(range(i, min(i + batch_size, len(batch))))
        logits, _ = logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device))
        correct += metric_values(logits, sub, "accuracy").bool().tolist()
        ce.append(-metric_values(logits, sub, "logprob").cpu())
    return correct, float(torch.cat(ce).mean())


def relative_change(patched: torch.Tensor, clean: torch.Tensor, metric: str, relative: bool) -> torch.Tensor:
    """Score of a patch: per-example ``(p - c) / c`` for ``prob`` (Prakash), else on the means."""
    if not relative:
        return (patched - clean).mean(-1)
    if metric == "prob":
        zero = (clean == 0).nonzero()
        if zero.numel():
            raise UsageError(
                f"relative metric 'prob': the clean probability is 0 for example {int(zero[0, 0])}; "
                "use relative=False or metric='logprob'"
            )
        return ((patched - clean) / clean).mean(-1)
    base = clean.mean()
    if float(base) == 0.0:
        raise UsageError(f"relative metric {metric!r}: the clean mean is 0; use relative=False")
    return (patched.mean(-1) - base) / base.abs()


def check_aligned(a: EncodedBatch, b: EncodedBatch, name: str) -> None:
    if not a.equal_length or not b.equal_length or a.input_ids.shape[1] != b.input_ids.shape[1]:
        raise UsageError(
            f"clean and {name} prompts must all have one token length where positions align "
            f"(got lengths {a.attention_mask.sum(1).unique().tolist()} and {b.attention_mask.sum(1).unique().tolist()})"
        )

@torch.no_grad()
def clean_metric(model, clean, metric, distractor_ids, batch_size) -> tuple[torch.Tensor, int]:
    device = next(model.parameters()).device
    vals, fw = [], 0
    for i in range(0, len(clean), batch_size):
        sub = clean.index(range(i, min(i + batch_size, len(clean))))
        logits, _ = logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device))
        fw += 1
        d = None if distractor_ids is None else distractor_ids[i : i + batch_size]
        vals.append(metric_values(logits, sub, metric, d).cpu())
    return torch.cat(vals), fw


def check_patching_args(clean: EncodedBatch, metric: str, batch_size: int) -> None:
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {METRICS}, got {metric!r}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if not clean.equal_length:
        raise UsageError("clean prompts must all have one token length where positions align")



PROTOCOLS = ("strict", "lenient")
PROTOCOL_TEXT = {
    "strict": ("mean ablation, strict (the reference's default, ablate_non_vital_pos=True; what the paper's Table 3 "
               "used): every head outside the circuit at every position, a circuit head live only at its role, "
               "per-position means over the reference prompts"),
    "lenient": ("mean ablation, lenient (the reference's ablate_non_vital_pos=False): at the positions of the task's "
                "roles only the circuit's (head, role) units live, every head live at every other position"),
}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def keep_masks(spec, batch: EncodedBatch, live, idx: torch.Tensor, protocol: str = "strict") -> torch.Tensor:
    """bool ``[n_layers, rows, T, n_heads]``: where z stays as computed (True) rather than mean-ablated.

    ``strict``: only the live ``(head, role)`` units at their role's positions (``all``: every position).
    ``lenient``: every head at every position that is no role of ``batch``; at the roles' positions only the live
    units.
    """
    check_protocol(protocol)
    t = batch.input_ids.shape[1]
    keep = torch.zeros(spec.n_layers, len(idx), t, spec.n_heads, dtype=torch.bool)
    if protocol == "lenient":
        vital = torch.zeros(len(idx), t, dtype=torch.bool)
        for pos in batch.positions.values():
            vital |= position_mask(pos[idx][:, None], len(idx), t)
        keep |= ~vital[None, :, :, None]
    for head, role in live:
        keep[head.layer, :, :, head.head] |= position_mask(
            None if role == ALL else role_positions(batch, role)[idx], len(idx), t)
    return keep


def role_free_prefix_length(model: nn.Module, batch: EncodedBatch) -> int:
    """The leading tokens every prompt of ``batch`` shares and no role (``last`` included) lies in, when worth a
    forward of their own (``PREFIX_MIN``) and the model can run a suffix on their cache (``logits_to_keep``); 0
    otherwise, or with ``FASTCD_PREFIX_REUSE=0``. Any mask that treats heads by role is the same for every row
    there."""
    import os

    p = shared_prefix_length(batch.input_ids)
    if p < PREFIX_MIN or os.environ.get("FASTCD_PREFIX_REUSE") == "0" or not accepts_logits_to_keep(model):
        return 0
    return 0 if any(int(v.min()) < p for v in batch.positions.values()) else p


def ablated_prefix_length(model: nn.Module, clean: EncodedBatch, means: torch.Tensor, protocol: str) -> int:
    """How many leading tokens of ``clean`` run the same under the circuit's ablation as without it (0: none worth
    reusing). Every prompt shares them and no role lies there, so ``lenient`` keeps every head there as computed;
    ``strict`` ablates them with ``means``, which equal the clean z there when the reference prompts share the
    prefix too (checked per layer: the z of one clean prefix against ``means``, within the rounding of the
    model's dtype): the residual stream, keys and values of the prefix are then the clean ones, computed once
    (few-shot prompts: the instruction and the shots)."""
    p = role_free_prefix_length(model, clean)
    if p and protocol == "strict":  # the means there must be the clean z, up to the rounding of the model's dtype
        _, z = run_with_z(model, clean.input_ids[:1, :p].to(next(model.parameters()).device), logits=False)
        tol = 1e-3 if z.dtype == torch.float32 else 5e-2  # bf16 paths differ by ~1.5% (relative), other prefixes ~1
        diff = (z[:, 0].float() - means[:, :p].to(z.device).float()).flatten(1).norm(dim=1)
        if bool((diff > tol * means[:, :p].float().flatten(1).norm(dim=1).to(z.device)).any()):
            return 0
    return p


@torch.no_grad()
def circuit_correct(model: nn.Module, clean: EncodedBatch, means: torch.Tensor,
                    live: list[tuple[Head, str]], *, batch_size: int = 64, protocol: str = "strict") -> list[bool]:
    """Per-example correctness with only ``live`` (head, position role) pairs active (:func:`keep_masks`): every
    other z mean-ablated with per-position ``means`` [L, T, H, D]. A prefix that the ablation leaves clean
    (:func:`ablated_prefix_length`) runs once, without hooks; only the suffixes run under the ablation."""
    check_protocol(protocol)
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    n, t = clean.input_ids.shape
    if means.shape[1] != t:
        raise UsageError(f"means are for length {means.shape[1]}, prompts have length {t}")
    p = ablated_prefix_length(model, clean, means, protocol)
    out: list[bool] = []
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        keep = keep_masks(spec, clean, live, idx, protocol)
        ids, last = clean.input_ids[idx].to(device), clean.positions["last"][idx]
        pre = shared_prefix(model, ids, [last], length=p) if p else None  # before the hooks go on
        s = pre.length if pre is not None else 0
        plan = {l: (~keep[l][:, s:], means[l][None, s:]) for l in range(spec.n_layers)}
        with intervene(model, plan):
            logits, _ = logits_at(model, last, input_ids=ids, prefix=pre)
        out += metric_values(logits, clean.index(idx), "accuracy").bool().tolist()
    return out


def circuit_accuracy(model: nn.Module, clean: EncodedBatch, means: torch.Tensor,
                     live: list[tuple[Head, str]], *, batch_size: int = 64, protocol: str = "strict") -> float:
    """Mean of :func:`circuit_correct`."""
    hits = circuit_correct(model, clean, means, live, batch_size=batch_size, protocol=protocol)
    return sum(hits) / len(hits)


def random_units(spec, live: list[tuple[Head, str]], rng: random.Random) -> list[tuple[Head, str]]:
    """A random circuit of the same size and roles: for each role as many distinct random heads as ``live`` has
    there (the reference's random baseline draws the same number of heads per group)."""
    per_role: dict[str, int] = {}
    for _, role in live:
        per_role[role] = per_role.get(role, 0) + 1
    heads = spec.all_heads()
    return [(h, role) for role, k in per_role.items() for h in rng.sample(heads, k)]


@torch.no_grad()
def evaluate_circuit(model: nn.Module, clean: EncodedBatch, circuit: Circuit, *, reference: EncodedBatch,
                     n_random: int = 10, seed: int = 0, batch_size: int = 64, protocol: str = "strict") -> dict:
    """Full-model, circuit-only and random-circuit accuracy and faithfulness (PAPER.md §2)."""
    if n_random < 1:
        raise UsageError(f"n_random must be >= 1, got {n_random}")
    check_protocol(protocol)
    spec = get_adapter(model).spec
    if (circuit.n_layers, circuit.n_heads) != (spec.n_layers, spec.n_heads):
        raise UsageError(
            f"circuit is for {circuit.n_layers} x {circuit.n_heads} heads, "
            f"the model has {spec.n_layers} x {spec.n_heads}"
        )
    check_aligned(clean, reference, "reference")
    device = next(model.parameters()).device
    means = mean_z(model, reference.input_ids.to(device), batch_size=batch_size)
    full, _ = clean_metric(model, clean, "accuracy", None, batch_size)
    full_acc = float(full.mean())
    live = [(c.head, c.position) for c in circuit.heads]
    kw = dict(batch_size=batch_size, protocol=protocol)
    circ = circuit_accuracy(model, clean, means, live, **kw)
    rng = random.Random(seed)
    rand = [circuit_accuracy(model, clean, means, random_units(spec, live, rng), **kw) for _ in range(n_random)]
    return {
        "full_accuracy": full_acc,
        "circuit_accuracy": circ,
        "random_circuit_accuracy": sum(rand) / len(rand),
        "random_circuit_accuracies": rand,
        "faithfulness": circ / full_acc if full_acc > 0 else math.nan,
        "circuit_size": len(circuit.unique_heads()),
        "circuit_units": len(live),
        "n_heads_total": spec.n_total_heads,
        "protocol": protocol,
    }


CIRCUIT_PROTOCOL = PROTOCOL_TEXT["strict"]


def faithfulness_record(model: nn.Module, clean: EncodedBatch, reference: EncodedBatch, circuit: Circuit, *,
                        split: str, n_random: int = 10, seed: int = 0, protocol: str = "strict") -> dict:
    """:func:`evaluate_circuit` with what a reader needs beside it: the spread of the random circuits, how many
    prompts of which split, and the ablation protocol."""
    import statistics

    ev = evaluate_circuit(model, clean, circuit, reference=reference, n_random=n_random, seed=seed, protocol=protocol)
    rand = ev["random_circuit_accuracies"]
    return {**ev, "random_circuit_sd": statistics.stdev(rand) if len(rand) > 1 else None, "n_random": len(rand),
            "n_prompts": len(clean), "split": split, "protocol": protocol,
            "protocol_text": PROTOCOL_TEXT[protocol]}


def format_faithfulness(ev: dict) -> str:
    """One line of a faithfulness record (:func:`faithfulness_record`, a search's record)."""
    return (f"faithfulness ({ev['protocol']} protocol, {ev['n_prompts']} test prompts): full {ev['full_accuracy']:.3f}"
            f"  circuit {ev['circuit_accuracy']:.3f}  faithfulness {ev['faithfulness']:.3f}  random "
            f"{ev['random_circuit_accuracy']:.3f} (SD {ev['random_circuit_sd']:.3f}, {ev['n_random']} circuits)  size "
            f"{ev['circuit_size']} of {ev['n_heads_total']} heads")

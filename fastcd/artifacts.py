"""The project's two artifacts: a teacher :class:`Circuit` (heads, groups, position roles, scores) and a
teacher -> student :class:`Matching` (head pairs at position roles, with their scores). Both are plain data with
JSON forms (heads named ``L{l}H{h}``), read with one-line errors and written atomically (:mod:`fastcd.io`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fastcd.errors import UsageError
from fastcd.io import read_json, short_sha, write_json_atomic
from fastcd.loading import spec_of
from fastcd.models import Head


@dataclass
class CircuitHead:
    head: Head
    group: str
    position: str  # a position role of the task, or "all"
    score: float

    def to_json(self) -> dict:
        return {"head": str(self.head), "group": self.group, "position": self.position, "score": self.score}


@dataclass
class Circuit:
    """Heads with their group, position role and score; JSON with heads named ``L{l}H{h}``."""

    heads: list[CircuitHead]
    task: str
    n_layers: int
    n_heads: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.heads:
            raise UsageError("circuit must hold at least one head")
        for ch in self.heads:
            if not (0 <= ch.head.layer < self.n_layers and 0 <= ch.head.head < self.n_heads):
                raise UsageError(f"circuit head {ch.head} is out of range for {self.n_layers} x {self.n_heads}")

    def unique_heads(self) -> list[Head]:
        seen, out = set(), []
        for ch in self.heads:
            if ch.head not in seen:
                seen.add(ch.head)
                out.append(ch.head)
        return out

    def groups(self) -> dict[str, list[CircuitHead]]:
        out: dict[str, list[CircuitHead]] = {}
        for ch in self.heads:
            out.setdefault(ch.group, []).append(ch)
        return out

    def __len__(self) -> int:
        return len(self.heads)

    def __str__(self) -> str:
        lines = [f"Circuit({self.task}, {len(self.unique_heads())} unique heads of {self.n_layers * self.n_heads})"]
        for g, chs in self.groups().items():
            lines.append(f"  {g} @ {chs[0].position}: " + ", ".join(f"{c.head}({c.score:+.3f})" for c in chs))
        return "\n".join(lines)

    def aligned_at(self, role: str) -> Circuit:
        """This circuit with every unit found at ``all`` positions put at ``role`` (units at a role keep it): where
        CKA matching compares such a head with student heads and the alignment term reads it. A head live at every
        position has no single token of its own; at ``all`` CKA would flatten every position, the shared prefix of
        few-shot prompts included. ``meta["aligned_at"]`` records it."""
        if not isinstance(role, str) or not role or role == "all":
            raise UsageError(f"align position must be a position role of the task, got {role!r}")
        heads = [CircuitHead(c.head, c.group, role if c.position == "all" else c.position, c.score) for c in self.heads]
        return Circuit(heads, self.task, self.n_layers, self.n_heads, {**self.meta, "aligned_at": role})

    def check_model(self, spec, what: str = "model") -> None:
        """One-line error when this circuit was found in a model of another shape than ``spec`` (a ModelSpec, read
        from the config before any weights load)."""
        if (self.n_layers, self.n_heads) != (spec.n_layers, spec.n_heads):
            found = f" ({self.meta['model']})" if self.meta.get("model") else ""
            raise UsageError(f"circuit is for a model of {self.n_layers} layers x {self.n_heads} heads{found}; {what} "
                             f"has {spec.n_layers} x {spec.n_heads}: pass the circuit found in this model")

    def check_task(self, task_name: str, allow: bool = False) -> None:
        """One-line error when this circuit was found on another task (``allow``: deliberate cross-task use)."""
        _check_task("circuit", self.task, self.meta.get("model"), task_name, allow)

    def to_json(self) -> dict:
        return {"task": self.task, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "heads": [c.to_json() for c in self.heads], "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Circuit:
        try:
            heads = [CircuitHead(Head.parse(h["head"]), h["group"], h["position"], float(h["score"]))
                     for h in d["heads"]]
            return cls(heads, d["task"], int(d["n_layers"]), int(d["n_heads"]), d.get("meta", {}))
        except KeyError as e:
            raise UsageError(f"circuit JSON is missing key {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        return cls.from_json(read_json(path, "circuit"))



@dataclass
class Pair:
    teacher: Head
    student: Head
    position: str  # position role where both heads' activations are taken
    group: str = ""
    scores: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"teacher": str(self.teacher), "student": str(self.student), "position": self.position,
                "group": self.group, "scores": self.scores}


@dataclass
class Matching:
    """Teacher -> student head pairs with their scores and positions; JSON with heads named ``L{l}H{h}``."""

    pairs: list[Pair]
    method: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.pairs:
            raise UsageError("matching must hold at least one pair")

    def student_heads(self) -> list[Head]:
        return sorted({p.student for p in self.pairs})

    def teacher_heads(self) -> list[Head]:
        return sorted({p.teacher for p in self.pairs})

    def circuit_units(self) -> list[tuple[Head, str]]:
        """The student circuit's (head, position) units, what a circuit evaluation keeps live: each pair's student
        head at its role, or at every position where its teacher unit was live at every position and the pair only
        aligns at ``meta["aligned_at"]`` (``fastcd match --align-position``; ``meta["live_everywhere"]``)."""
        everywhere, at = set(self.meta.get("live_everywhere", ())), self.meta.get("aligned_at")
        return [(p.student, "all" if str(p.teacher) in everywhere and p.position == at else p.position)
                for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __str__(self) -> str:
        lines = [f"Matching({self.method}, {len(self.pairs)} pairs, {len(self.student_heads())} student heads)",
                 f"  {'teacher':>8} -> {'student':<8} {'position':<14} scores"]
        for p in self.pairs:
            sc = " ".join(f"{k}={v:.3f}" for k, v in p.scores.items() if isinstance(v, float))
            lines.append(f"  {str(p.teacher):>8} -> {str(p.student):<8} {p.position:<14} {sc}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"method": self.method, "pairs": [p.to_json() for p in self.pairs], "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Matching:
        try:
            pairs = [Pair(Head.parse(p["teacher"]), Head.parse(p["student"]), p["position"], p.get("group", ""),
                          dict(p.get("scores", {}))) for p in d["pairs"]]
            return cls(pairs, d["method"], d.get("meta", {}))
        except KeyError as e:
            raise UsageError(f"matching JSON is missing key {e}") from None

    def save(self, path) -> None:
        write_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path) -> Matching:
        return cls.from_json(read_json(path, "matching"))

    def check_task(self, task_name: str, allow: bool = False) -> None:
        """One-line error when this matching was made for another task (recorded in ``meta["task"]``)."""
        _check_task("matching", self.meta.get("task"), None, task_name, allow)

    def check_models(self, teacher, student) -> None:
        """A clear error when a pair names a head that the models lack. Models or paths (checked from their
        config, before any weight loads); None skips that side."""

        ts = None if teacher is None else spec_of(teacher)
        ss = None if student is None else spec_of(student)
        for p in self.pairs:
            if ts is not None:
                ts.check_head(p.teacher, "matching teacher head")
            if ss is not None:
                ss.check_head(p.student, "matching student head")




def prompts_sha(examples) -> str:
    """A hash of the prompts and answers an artifact was made from (the order counts)."""
    return short_sha([[e.prompt, e.answer] for e in examples])


def provenance(task, models: dict, examples) -> dict:
    """What a circuit, matching or teacher cache was made from: the task's name and settings, the models'
    identities (:func:`fastcd.loading.model_identity`) and the prompts."""
    return {"task": task.name, "task_settings": short_sha(vars(task)), **models, "prompts": prompts_sha(examples),
            "n_prompts": len(examples)}


def check_provenance(what: str, prov: dict | None, models: dict, allow: bool = False) -> None:
    """One line when ``prov`` (an artifact's provenance) names another model than ``models`` (role -> identity of
    this run's model; None: not known, e.g. a module) for the same role."""
    if not prov or allow:
        return
    for role, mine in models.items():
        theirs = prov.get(role)
        if theirs and mine and theirs != mine:
            raise UsageError(f"{what}: made with another {role} ({theirs}) than this run's ({mine}): the heads it "
                             f"names are another model's; use the {what} made for this {role}, or "
                             "allow_foreign_artifacts=True (--allow-foreign-artifacts) to use it deliberately")


def _check_task(what: str, made_for: str | None, model: str | None, task_name: str, allow: bool) -> None:
    if made_for and made_for != task_name and not allow:
        on = f" on {model!r}" if model else ""
        raise UsageError(f"{what}: made for task {made_for!r}{on}, this run's task is {task_name!r}; use the {what} "
                         f"of this task, or allow_foreign_artifacts=True (--allow-foreign-artifacts) to use it "
                         "deliberately (recorded in the run's manifest)")


__all__ = ["Circuit", "CircuitHead", "Matching", "Pair"]

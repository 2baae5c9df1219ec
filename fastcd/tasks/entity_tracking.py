"""Entity tracking in the boxes format of Kim & Schuster (2023) as reformatted by Prakash et al. (2024).

``The string is in Box G, the bill is in Box A, ..., the hat is in Box Q. Box G contains the`` -> `` string``

Position roles (PAPER.md §2): ``last`` (value fetchers, position transmitters), ``query_label`` (the
queried letter after the context, position detectors) and ``box_label`` (the queried box's letter in the
context, structure readers) are the reference's three vital positions (``REFERENCE_ROLES``, what discovery's
``roles`` method patches at). Two more mark the rest of the queried clause where a model may bind object and
box: ``object`` (the queried object in the context) and ``clause_end`` (the comma or period right after the
queried box's letter). Qwen2.5-Coder-1.5B needs heads at both: with every head live at the reference's three
roles only, its circuit accuracy is 0.00; with these two added, 0.97 (docs/RESULTS.md, "Faithful circuits").
Corrupt prompts follow Prakash's code: a different example whose queried box sits at another context position,
with the query letter overwritten by a letter absent from its context, so the answer cannot be recovered.
"""

from __future__ import annotations

import random
import re
import string

from fastcd.errors import UsageError
from fastcd.tasks.base import Example, check_pools, generate_unique
from fastcd.tasks.protocol import TaskBase

# Single-token (for Llama-3 and GPT-2 BPE, with a leading space) everyday objects.
OBJECTS = (
    "apple", "bag", "ball", "bell", "bill", "boat", "book", "bottle", "bowl", "box", "bread", "brick",
    "brush", "cake", "camera", "candle", "car", "card", "chair", "clock", "coat", "coin", "cup", "disk",
    "doll", "drum", "egg", "engine", "fan", "file", "fish", "flag", "flower", "fork", "glass", "guitar",
    "hammer", "hat", "key", "kite", "lamp", "leaf", "letter", "map", "milk", "mirror", "mouse", "paper",
    "pen", "phone", "piano", "pillow", "plane", "plate", "radio", "ring", "rock", "rose", "shirt", "shoe",
    "sock", "spoon", "stone", "string", "table", "ticket", "tie", "toy", "tree", "watch", "wheel", "wire",
)
LETTERS = tuple(string.ascii_uppercase)
REFERENCE_ROLES = ("last", "query_label", "box_label")
ROLES = REFERENCE_ROLES + ("object", "clause_end")
_CLAUSE = re.compile(r"[Tt]he (\w+) is in Box (\w)")
_QUERY = re.compile(r"Box (\w) contains the$")


class EntityTracking(TaskBase):
    """Entity-tracking prompt generator.

    Args:
        n_boxes: boxes per prompt (default 7, chance 1/7).
        objects, letters: the word pools (objects must be single tokens for the model's tokenizer).
    """

    name = "entity-tracking"
    roles = ROLES
    reference_roles = REFERENCE_ROLES
    discovery_defaults = {"method": "roles"}  # position-aware patching at each role

    def __init__(self, n_boxes: int = 7, objects=OBJECTS, letters=LETTERS):
        objects, letters = tuple(objects), tuple(letters)
        if not isinstance(n_boxes, int) or n_boxes < 2:
            raise UsageError(f"n_boxes must be an integer >= 2, got {n_boxes!r}")
        if len(set(objects)) < n_boxes:
            raise UsageError(f"objects must hold at least n_boxes={n_boxes} distinct words, got {len(set(objects))}")
        if len(set(letters)) < n_boxes + 1:
            raise UsageError(
                f"letters must hold at least n_boxes+1={n_boxes + 1} distinct labels (corrupt prompts query an "
                f"absent letter), got {len(set(letters))}"
            )
        self.n_boxes, self.objects, self.letters = n_boxes, objects, letters

    def __repr__(self) -> str:
        return f"EntityTracking(n_boxes={self.n_boxes}, objects={len(self.objects)}, letters={len(self.letters)})"

    def vocabulary(self) -> set[str]:
        return set(self.objects) | set(self.letters) | {"The", "the", "is", "in", "Box", "contains", ",", "."}

    # --- building prompts --------------------------------------------------------------------------
    @staticmethod
    def render(objects, labels, query_label: str) -> Example:
        """The example for boxes ``labels[i]`` holding ``objects[i]`` and a query for ``query_label``."""
        parts, spans, pos = [], {}, 0
        label_spans, object_spans = [], []
        for i, (o, l) in enumerate(zip(objects, labels)):
            clause = f"{'The' if i == 0 else 'the'} {o} is in Box {l}"
            label_spans.append(pos + len(clause) - 1)
            object_spans.append(pos + len("the "))
            parts.append(clause)
            pos += len(clause) + 2  # ", "
        context = ", ".join(parts) + "."
        prompt = f"{context} Box {query_label} contains the"
        q_start = len(context) + len(" Box ")
        spans["query_label"] = [q_start, q_start + 1]
        meta = {"objects": list(objects), "labels": list(labels), "query_label": query_label}
        if query_label in labels:
            qi = labels.index(query_label)
            spans["box_label"] = [label_spans[qi], label_spans[qi] + 1]
            spans["object"] = [object_spans[qi], object_spans[qi] + len(objects[qi])]
            spans["clause_end"] = [label_spans[qi] + 1, label_spans[qi] + 2]  # "," or "."
            meta["query_index"] = qi
            meta["distractor"] = objects[(qi + 1) % len(objects)]  # another in-context object (logit_diff)
            answer = objects[qi]
        else:  # corrupt: the queried letter is not in the context
            meta["query_index"] = None
            answer = None
        meta["spans"] = spans
        return Example(EntityTracking.name, prompt, answer, meta)

    def sample(self, rng: random.Random, query_index: int | None = None) -> Example:
        objects = rng.sample(self.objects, self.n_boxes)
        labels = rng.sample(self.letters, self.n_boxes)
        qi = rng.randrange(self.n_boxes) if query_index is None else query_index
        return self.render(objects, labels, labels[qi])

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` unique examples of ``split``, deterministic in ``seed``."""
        return generate_unique(self.sample, n, f"{self.name}/{self.n_boxes}/{seed}", split, repr(self))

    def corrupt(self, clean: Example, rng: random.Random) -> Example:
        """Another example whose queried box sits elsewhere, queried with a letter absent from its context."""
        m = clean.meta
        n_boxes = len(m["objects"])
        choices = [i for i in range(n_boxes) if i != m["query_index"]]
        qi = rng.choice(choices)
        objects = rng.sample([o for o in self.objects if o != clean.answer], n_boxes)
        labels = rng.sample(self.letters, n_boxes)
        absent = rng.choice([l for l in self.letters if l not in labels])
        ex = self.render(objects, labels, absent)
        ex.meta["intended_query_index"] = qi
        return ex


    # --- positions -----------------------------------------------------------------------------------
    def spans(self, ex: Example) -> dict[str, list[int]]:
        if "spans" in ex.meta:
            return {k: v for k, v in ex.meta["spans"].items() if k in ROLES}
        return self.parse(ex.prompt).meta["spans"]

    @classmethod
    def parse(cls, prompt: str) -> Example:
        """Recover objects, labels and spans from a prompt in the standard format (for user-supplied data)."""
        clauses = _CLAUSE.findall(prompt)
        q = _QUERY.search(prompt)
        if not clauses or q is None:
            raise UsageError(
                "prompt is not in the entity-tracking format 'The X is in Box L, ... Box L contains the': "
                f"{prompt[:80]!r}"
            )
        objects, labels = [c[0] for c in clauses], [c[1] for c in clauses]
        ex = cls.render(objects, labels, q.group(1))
        if ex.prompt != prompt:
            raise UsageError(f"prompt does not follow the standard entity-tracking format exactly: {prompt[:80]!r}")
        return ex

    def word_pools(self) -> dict[str, tuple]:
        return {"objects": self.objects, "letters": self.letters}

    def with_pools(self, **pools) -> EntityTracking:
        return EntityTracking(self.n_boxes, objects=pools.get("objects", self.objects),
                              letters=pools.get("letters", self.letters))

    def candidates(self, ex: Example) -> list[str]:
        """The answers the prompt allows: its in-context objects (candidate scoring)."""
        return list(ex.meta.get("objects") or self.parse(ex.prompt).meta["objects"])

    def check_tokenizer(self, tokenizer) -> None:
        check_pools(tokenizer, self.word_pools())


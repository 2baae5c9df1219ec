"""Task examples, clean/corrupt pairs, deterministic splits, JSONL I/O and encoding to token ids.

JSONL schema (one object per line)::
    {"task": "entity-tracking", "prompt": "The apple is in Box F, ... Box F contains the",
     "answer": "apple", "meta": {...}}

``answer`` is the word the model should produce next (scored as the single token of ``" " + answer``).
``meta`` is task-specific; ``meta["spans"]`` maps a position role to ``[start, end)`` character offsets in
``prompt`` (the token covering ``start`` is that role's position). Entity-tracking prompts in the standard
format may omit ``meta``: it is recovered by parsing. A pair file holds ``{"clean": {...}, "corrupt": {...}}``
per line; a corrupt example's ``answer`` may be null (the answer is not recoverable from it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from fastcd.errors import InputFileError, UsageError
from fastcd.io import atomic_target
from fastcd.io import status_once as say

SPLITS = ("train", "val", "test")
# Share of the hash space per split: a prompt's split depends on the prompt alone, so the splits never
# share a prompt, whatever the seed or the sizes asked for.
_SPLIT_BOUNDS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its text."""
    bucket = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16) % 100
    for name, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError("unreachable")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def generate_unique(sample, n: int, seed_key: str, split: str, what: str) -> list:
    """``n`` examples of ``split`` with distinct prompts, drawn with ``sample(rng)`` from a seeded RNG."""

    check_split(split)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"n must be a positive integer, got {n!r}")
    rng = random.Random(f"{seed_key}/{split}")
    seen, out = set(), []
    for _ in range(200 * n + 10_000):
        ex = sample(rng)
        if ex.prompt in seen or split_of(ex.prompt) != split:
            continue
        seen.add(ex.prompt)
        out.append(ex)
        if len(out) == n:
            return out
    raise UsageError(f"n={n} is more unique {split} prompts than this configuration ({what}) can produce")


@dataclass
class Example:
    task: str
    prompt: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict, where: str = "example") -> Example:
        if not isinstance(d, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for key in ("task", "prompt", "answer"):
            if key not in d:
                raise UsageError(f"{where}: missing key {key!r} (expected task, prompt, answer, optional meta)")
        if not isinstance(d["task"], str) or not d["task"]:
            raise UsageError(f"{where}: 'task' must be a non-empty string (e.g. 'entity-tracking'), got {d['task']!r}")
        if not isinstance(d["prompt"], str) or not d["prompt"]:
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        if d["answer"] is not None and not isinstance(d["answer"], str):
            raise UsageError(f"{where}: 'answer' must be a string or null")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise UsageError(f"{where}: 'meta' must be an object")
        if d["task"] == "entity-tracking" and d["answer"] is not None:
            context = d["prompt"].rsplit(".", 1)[0]  # the boxes, before the final question
            if not re.search(rf"\b{re.escape(d['answer'])}\b", context):
                raise UsageError(f"{where}: the answer {d['answer']!r} does not appear in the prompt's context; an "
                                 "entity-tracking answer is the object in the queried box")
        return cls(d["task"], d["prompt"], d["answer"], dict(meta))


@dataclass
class ContrastPair:
    """A clean example and its corrupted counterpart (same token length, answer not recoverable)."""

    clean: Example
    corrupt: Example

    def to_json(self) -> dict:
        return {"clean": self.clean.to_json(), "corrupt": self.corrupt.to_json()}

    @classmethod
    def from_json(cls, d: dict, where: str = "pair") -> ContrastPair:
        if not isinstance(d, dict) or "clean" not in d or "corrupt" not in d:
            raise UsageError(f"{where}: expected an object with keys 'clean' and 'corrupt'")
        return cls(Example.from_json(d["clean"], f"{where}.clean"), Example.from_json(d["corrupt"], f"{where}.corrupt"))


def save_jsonl(items, path: str | os.PathLike) -> None:
    """Write examples or pairs, one JSON object per line."""

    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")


def load_jsonl(path: str | os.PathLike) -> list[Example] | list[ContrastPair]:
    """Read a file written by :func:`save_jsonl` (or by hand, following the module's schema)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputFileError(f"path: no such file {path!r}")
    out = []
    kind = None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"path: {path!r} is not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8 "
                         "JSON lines") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        this = "pair" if isinstance(d, dict) and "clean" in d else "example"
        if kind is None:
            kind = this
        elif kind != this:
            raise UsageError(f"{path}:{i}: mixes examples and pairs; a file holds one kind")
        where = f"{path}:{i}"
        out.append(ContrastPair.from_json(d, where) if this == "pair" else Example.from_json(d, where))
    if not out:
        raise UsageError(f"path: {path!r} holds no examples")
    return out


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------
def word_token_id(tokenizer, word: str, what: str = "answer") -> int:
    """The single token id of ``" " + word``; a clear error when the tokenizer splits it or lacks it."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(
            f"{what} {word!r} is not a single token for this tokenizer (it splits into {pieces}); "
            "choose single-token words for this model"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise UsageError(f"{what} {word!r} is not in this tokenizer's vocabulary (it maps to the unknown token)")
    return ids[0]


SPACED = (" {}",)  # the form a pool word takes in a prompt: after a space


def _is_single_token(tokenizer, word: str, forms=SPACED) -> bool:
    """Whether ``word`` is one token in every form (``" {}"``: after a space; ``"{}"``: at the start of a text)."""
    for form in forms:
        if form == " {}":
            try:
                word_token_id(tokenizer, word)
            except ValueError:
                return False
        elif len(tokenizer(form.format(word), add_special_tokens=False)["input_ids"]) != 1:
            return False
    return True


def check_single_tokens(tokenizer, words, what: str) -> None:
    check_pools(tokenizer, {what: words})


def _forms(task, pool: str):
    return getattr(task, "word_forms", lambda: {})().get(pool, SPACED)


def check_pools(tokenizer, pools: dict, forms: dict | None = None) -> None:
    """One error that names every pool holding words that are not single tokens (``" " + word``, and the other
    forms ``forms[pool]`` lists)."""
    problems = []
    for what, words in pools.items():
        f = (forms or {}).get(what, SPACED)
        bad = [w for w in sorted(set(words)) if not _is_single_token(tokenizer, w, f)]
        if bad:
            problems.append(f"{what}: {len(bad)} ({', '.join(bad[:12])}{' ...' if len(bad) > 12 else ''})")
    if problems:
        raise UsageError(
            "words that are not single tokens for this tokenizer: " + "; ".join(problems)
            + " (adapt the task's pools with fastcd.tasks.adapt_task(task, tokenizers))"
        )


def single_token_words(words, tokenizers, forms=SPACED) -> tuple[tuple, tuple]:
    """``(kept, dropped)``: the words that are one token (in each of ``forms``; default: with a leading space)
    for every tokenizer, in order."""
    kept, dropped = [], []
    for w in words:
        (kept if all(_is_single_token(t, w, forms) for t in tokenizers) else dropped).append(w)
    return tuple(kept), tuple(dropped)


def adapt_task(task, tokenizers, *, status_once: bool = True):
    """The task with each word pool cut to the words that are single tokens for *every* tokenizer in play
    (teacher and student), and ``task.dropped = {pool: dropped words}``.

    Fails with one line, naming each pool that is left too small for the task's size. Words the answer format
    needs (e.g. ToM's ``unknown``) are not droppable: when one is not a single token the error names it.
    """
    if not isinstance(tokenizers, (list, tuple)):
        tokenizers = [tokenizers]
    if not tokenizers:
        raise UsageError("tokenizers must name at least one tokenizer")
    pools = task.word_pools()
    kept, dropped = {}, {}
    for name, words in pools.items():
        kept[name], d = single_token_words(words, tokenizers, _forms(task, name))
        if d:
            dropped[name] = list(d)
    fixed = [w for w in getattr(task, "fixed_words", ()) if not single_token_words([w], tokenizers)[0]]
    if fixed:
        raise UsageError(f"task {task.name}: the answer word(s) {fixed} are not single tokens for every tokenizer")
    try:
        out = task.with_pools(**kept) if dropped else task
    except ValueError as e:
        short = "; ".join(f"{k}: {len(v)} dropped (e.g. {', '.join(v[:4])})" for k, v in dropped.items())
        raise UsageError(f"task {task.name}: too few single-token words remain after adapting to the tokenizers "
                         f"({short}): {e}") from None
    out.dropped = dropped
    if dropped and status_once:
        say(f"fastcd: {task.name} word pools adapted to {len(tokenizers)} tokenizer(s): "
            + ", ".join(f"{name} {len(kept[name])}/{len(pools[name])} kept (dropped {', '.join(d)})"
                        for name, d in dropped.items()))
    return out


@dataclass
class EncodedBatch:
    """Token ids of examples, right-padded, with the positions each head group needs.

    input_ids, attention_mask: ``[n, T]``; answer_ids: ``[n]`` (-1 where the answer is None);
    positions: ``{role: [n]}`` absolute token indices.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    positions: dict[str, torch.Tensor]
    examples: list[Example]
    distractor_ids: torch.Tensor | None = None  # [n] an alternative answer per example (for logit_diff)
    candidate_ids: torch.Tensor | None = None  # [n, C] the answers each prompt allows (candidate scoring)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def index(self, idx) -> EncodedBatch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return EncodedBatch(
            self.input_ids[idx], self.attention_mask[idx], self.answer_ids[idx],
            {k: v[idx] for k, v in self.positions.items()}, [self.examples[i] for i in idx.tolist()],
            None if self.distractor_ids is None else self.distractor_ids[idx],
            None if self.candidate_ids is None else self.candidate_ids[idx],
        )

    @property
    def equal_length(self) -> bool:
        return bool(self.attention_mask.all())

    def to(self, device) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_ids.to(device),
                            {k: v.to(device) for k, v in self.positions.items()}, self.examples,
                            None if self.distractor_ids is None else self.distractor_ids.to(device),
                            None if self.candidate_ids is None else self.candidate_ids.to(device))


def _token_at(offsets, char_pos: int, prompt: str, role: str) -> int:
    for i, (s, e) in enumerate(offsets):
        if s <= char_pos < e:
            return i
    raise UsageError(f"position role {role!r}: no token covers character {char_pos} of prompt {prompt[:60]!r}...")


def encode(examples, tokenizer, spans_fn, candidates_fn=None) -> EncodedBatch:
    """Tokenize prompts (one batched call, right padding), answers (single tokens) and the role positions.

    Args:
        examples: list of :class:`Example`.
        tokenizer: a fast HF tokenizer (offsets are needed to place the roles).
        spans_fn: ``Example -> {role: (start, end)}`` character spans.
        candidates_fn: optional ``Example -> [word, ...]``, the answers the prompt allows (same count for every
            example); their token ids go to ``candidate_ids`` for candidate scoring.
    """
    if not examples:
        raise UsageError("examples must not be empty")
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("tokenizer must be a fast (Rust) tokenizer: positions are placed with offset mappings")
    token_of: dict[tuple[str, str], int] = {}

    def tid(word: str, what: str) -> int:
        if (word, what) not in token_of:
            token_of[(word, what)] = word_token_id(tokenizer, word, what)
        return token_of[(word, what)]

    enc = tokenizer([ex.prompt for ex in examples], return_offsets_mapping=True)
    rows, answers = enc["input_ids"], []
    positions: dict[str, list[int]] = {}
    for n, ex in enumerate(examples):
        ids, offsets = rows[n], enc["offset_mapping"][n]
        answers.append(tid(ex.answer, "answer") if ex.answer is not None else -1)
        roles = {"last": len(ids) - 1}
        for role, (start, _end) in spans_fn(ex).items():
            roles[role] = _token_at(offsets, start, ex.prompt, role)
        if n and set(roles) != set(positions):
            raise UsageError(f"example {n} has position roles {sorted(roles)}, others have {sorted(positions)}")
        for role, p in roles.items():
            positions.setdefault(role, []).append(p)
    t = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    distractors = None
    if all(ex.meta.get("distractor") for ex in examples):
        distractors = torch.tensor([tid(ex.meta["distractor"], "distractor") for ex in examples])
    candidates = None
    if candidates_fn is not None and all(ex.answer is not None for ex in examples):
        cands = [[tid(w, "candidate") for w in candidates_fn(ex)] for ex in examples]
        if len({len(c) for c in cands}) == 1:
            candidates = torch.tensor(cands, dtype=torch.long)
    return EncodedBatch(input_ids, attn, torch.tensor(answers, dtype=torch.long),
                        {k: torch.tensor(v, dtype=torch.long) for k, v in positions.items()}, list(examples),
                        distractors, candidates)

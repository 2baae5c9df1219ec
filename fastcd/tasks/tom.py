"""Theory of mind from the CausalToM template of Prakash et al. (2025), PAPER.md §1.

``<c1> and <c2> are working in a busy restaurant. To complete an order, <c1> grabs an opaque <k1> and fills
it with <s1>. Then <c2> grabs another opaque <k2> and fills it with <s2>. <c2> can/cannot observe <c1>'s
actions. <c1> can/cannot observe <c2>'s actions. Question: What does <c> believe the <k> contains? Answer:``

The answer is the drink the character believes is in the container: its own drink for its own container
(``own``), the other's drink when it can observe the other (``observed``), and ``unknown`` when it cannot
(``unobserved``, the belief case that the "answer the true content" heuristic gets wrong). Question types
are drawn uniformly, so that heuristic scores 2/3.

Corrupt prompts keep the question's roles (which character, which container) but draw new entities and
flip the queried character's visibility, so the clean answer is absent and the belief changes.
"""

from __future__ import annotations

import random

from fastcd.errors import UsageError
from fastcd.tasks.base import Example, check_pools, generate_unique
from fastcd.tasks.protocol import TaskBase

NAMES = (
    "Anne", "Bob", "Carla", "Dan", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Leo", "Mary",
    "Nick", "Olivia", "Paul", "Rose", "Sam", "Tom", "Uma", "Victor", "Wendy",
)
CONTAINERS = (
    "bottle", "cup", "glass", "jar", "jug", "mug", "pot", "bowl", "flask", "kettle", "pitcher", "tumbler",
    "vase", "bucket", "carafe", "canteen", "tankard", "goblet", "beaker", "chalice", "crock",
)
DRINKS = (
    "coffee", "tea", "beer", "wine", "milk", "water", "juice", "soda", "cider", "lemonade", "cocoa", "whiskey",
    "vodka", "rum", "gin", "sake", "punch", "champagne", "espresso", "smoothie", "broth", "kefir", "tonic",
)
UNKNOWN = "unknown"
CAUSALTOM_INSTRUCTION = (
    "1. Track the belief of each character as described in the story. 2. A character's belief is formed only "
    "when they perform an action themselves or can observe the action taking place. 3. A character does not have "
    "any belief about a container and its contents that they cannot observe. 4. To answer the question, predict "
    "only what is inside the queried container, strictly based on the belief of the character mentioned in the "
    "question. 5. If the queried character has no belief about the container in question, answer 'unknown'. "
    "6. Answer with one word: a drink or 'unknown'."
)
QUESTION_TYPES = ("own", "observed", "unobserved")
ROLES = ("last", "question_character", "question_container")


class TheoryOfMind(TaskBase):
    """CausalToM-style belief questions.

    Args:
        instruction: optional text put before the story as ``Instruction: ...\\n\\nStory: ...`` (the layout of
            Prakash et al.'s CausalToM prompt); ``"causaltom"`` uses :data:`CAUSALTOM_INSTRUCTION`, a rule block
            in the spirit of theirs; None for the bare story.
        few_shot: number of solved stories (one per question type in turn, fixed, from their own RNG) put before
            every prompt, each ending in its answer. Real base LMs answer the bare template with " The".
    """

    name = "tom"
    roles = ROLES
    discovery_defaults = {"method": "patching", "position": "last"}  # the position the CKA term aligns

    def __init__(self, names=NAMES, containers=CONTAINERS, drinks=DRINKS, instruction: str | None = None,
                 few_shot: int = 0):
        self.names, self.containers, self.drinks = tuple(names), tuple(containers), tuple(drinks)
        for what, pool in (("names", self.names), ("containers", self.containers), ("drinks", self.drinks)):
            if len(set(pool)) < 4:
                raise UsageError(f"{what} must hold at least 4 distinct words, got {len(set(pool))}")
        if UNKNOWN in self.drinks:
            raise UsageError(f"drinks must not contain the answer word {UNKNOWN!r}")
        if instruction == "causaltom":
            instruction = CAUSALTOM_INSTRUCTION
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise UsageError(f"instruction must be a non-empty string, 'causaltom' or None, got {instruction!r}")
        if not isinstance(few_shot, int) or isinstance(few_shot, bool) or not 0 <= few_shot <= 12:
            raise UsageError(f"few_shot must be an integer in 0..12, got {few_shot!r}")
        self.instruction, self.few_shot, self._prefix = None, few_shot, ""
        if few_shot:  # solved stories in the bare template, each "Story: ..." when an instruction leads
            rng = random.Random("tom/few-shot")  # the same shots for every subclass (CausalToM's are these)
            shots = [self.sample(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(few_shot)]
            story = "Story: " if instruction else ""
            self._prefix = "".join(f"{story}{ex.prompt} {ex.answer}\n\n" for ex in shots)
        self.instruction = instruction

    def __repr__(self) -> str:
        extra = (", instruction" if self.instruction else "") + (f", few_shot={self.few_shot}" if self.few_shot else "")
        return (f"TheoryOfMind(names={len(self.names)}, containers={len(self.containers)}, "
                f"drinks={len(self.drinks)}{extra})")

    def vocabulary(self) -> set[str]:
        words = set(self.names) | set(self.containers) | set(self.drinks) | {UNKNOWN}
        template = (
            "and are working in a busy restaurant . To complete an order , grabs an opaque and fills it with "
            "Then another can cannot observe ' s actions Question : What does believe the contains ? Answer"
        )
        words |= set(template.split())
        return words

    @staticmethod
    def answer_for(q_char: int, q_cont: int, sees: tuple[bool, bool], drinks) -> tuple[str, str]:
        """(answer, question type) for character ``q_char`` asked about container ``q_cont``.

        ``sees[i]``: character i can observe the other character's actions.
        """
        if q_char == q_cont:
            return drinks[q_cont], "own"
        if sees[q_char]:
            return drinks[q_cont], "observed"
        return UNKNOWN, "unobserved"

    @staticmethod
    def binding_sentences(chars, conts, drinks) -> str:
        """The story's two "grabs an opaque <k> and fills it with <s>" sentences."""
        return (f"{chars[0]} grabs an opaque {conts[0]} and fills it with {drinks[0]}. Then {chars[1]} grabs another "
                f"opaque {conts[1]} and fills it with {drinks[1]}.")

    def render(self, chars, conts, drinks, sees, q_char: int, q_cont: int) -> Example:
        c1, c2 = chars
        story = (
            f"{c1} and {c2} are working in a busy restaurant. To complete an order, "
            f"{self.binding_sentences(chars, conts, drinks)} {c2} {'can' if sees[1] else 'cannot'} observe "
            f"{c1}'s actions. {c1} {'can' if sees[0] else 'cannot'} observe {c2}'s actions."
        )
        head = (f"Instruction: {self.instruction}\n\n" if self.instruction else "") + self._prefix
        head += "Story: " if self.instruction else ""
        question = f" Question: What does {chars[q_char]} believe the {conts[q_cont]} contains? Answer:"
        prompt = head + story + question
        qc = len(head + story) + len(" Question: What does ")
        qk = qc + len(f"{chars[q_char]} believe the ")
        answer, qtype = self.answer_for(q_char, q_cont, tuple(sees), drinks)
        meta = {
            "characters": list(chars), "containers": list(conts), "drinks": list(drinks), "sees": list(sees),
            "question_character": q_char, "question_container": q_cont, "question_type": qtype,
            "true_content": drinks[q_cont],
            # the alternative belief (logit_diff): "unknown" for a drink answer, the true content otherwise
            "distractor": UNKNOWN if answer != UNKNOWN else drinks[q_cont],
            "spans": {"question_character": [qc, qc + len(chars[q_char])],
                      "question_container": [qk, qk + len(conts[q_cont])]},
        }
        return Example(self.name, prompt, answer, meta)

    def sample(self, rng: random.Random, qtype: str | None = None) -> Example:
        chars = rng.sample(self.names, 2)
        conts = rng.sample(self.containers, 2)
        drinks = rng.sample(self.drinks, 2)
        qtype = rng.choice(QUESTION_TYPES) if qtype is None else qtype
        q_char = rng.randrange(2)
        sees = [rng.random() < 0.5, rng.random() < 0.5]
        if qtype == "own":
            q_cont = q_char
        else:
            q_cont = 1 - q_char
            sees[q_char] = qtype == "observed"
        return self.render(chars, conts, drinks, sees, q_char, q_cont)

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` unique examples of ``split``, deterministic in ``seed``."""
        return generate_unique(self.sample, n, f"{self.name}/{seed}", split, repr(self))

    def corrupt(self, clean: Example, rng: random.Random) -> Example:
        m = clean.meta
        chars = rng.sample(self.names, 2)
        conts = rng.sample(self.containers, 2)
        drinks = rng.sample([d for d in self.drinks if d not in m["drinks"]], 2)
        sees = list(m["sees"])
        sees[m["question_character"]] = not sees[m["question_character"]]
        return self.render(chars, conts, drinks, sees, m["question_character"], m["question_container"])


    def spans(self, ex: Example) -> dict[str, list[int]]:
        if "spans" not in ex.meta:
            raise UsageError(
                "tom examples need meta.spans (question_character, question_container); see fastcd.tasks.base"
            )
        return {k: v for k, v in ex.meta["spans"].items() if k in ROLES}

    fixed_words = (UNKNOWN,)

    def word_pools(self) -> dict[str, tuple]:
        return {"names": self.names, "containers": self.containers, "drinks": self.drinks}

    def with_pools(self, **pools) -> TheoryOfMind:
        return type(self)(pools.get("names", self.names), pools.get("containers", self.containers),
                          pools.get("drinks", self.drinks), instruction=self.instruction, few_shot=self.few_shot)

    def candidates(self, ex: Example) -> list[str]:
        """The answers the prompt allows: the story's two drinks and ``unknown`` (candidate scoring)."""
        return list(ex.meta["drinks"]) + [UNKNOWN]

    def word_forms(self) -> dict[str, tuple]:
        """Names also open the bare story (no space before them): they must be one token there too, or prompts
        differ in token length and positions stop aligning."""
        return {"names": (" {}", "{}")}

    def check_tokenizer(self, tokenizer) -> None:
        check_pools(tokenizer, {**self.word_pools(), "answer words": self.fixed_words}, self.word_forms())



class CausalToM(TheoryOfMind):
    """Theory of mind in the format real instruction-tuned LMs answer (``get_task("tom-causaltom")``): the
    CausalToM-style instruction and three solved stories, one per question type, before every story. The bare
    template leaves Qwen2.5-Coder at 0.00 (it answers " The"); this format lifts the 0.5B to 0.44 and the 1.5B to
    0.63 (candidates 1/3; docs/RESULTS.md). The prefix is the same for every prompt, so evaluation and patching
    run it once (``fastcd.models.shared_prefix``)."""

    name = "tom-causaltom"

    def __init__(self, names=NAMES, containers=CONTAINERS, drinks=DRINKS, instruction: str | None = "causaltom",
                 few_shot: int = 3):
        super().__init__(names, containers, drinks, instruction=instruction, few_shot=few_shot)

"""fastcd.tasks.tom: answers follow visibility, corrupt prompts change the belief, the instruction block."""

from fastcd.tasks import TheoryOfMind


def test_tom_answers_follow_visibility():
    task = TheoryOfMind()
    exs = task.generate(600, seed=0)
    kinds = {"own": 0, "observed": 0, "unobserved": 0}
    for ex in exs:
        m = ex.meta
        qc, qk = m["question_character"], m["question_container"]
        kinds[m["question_type"]] += 1
        if qc == qk:
            assert ex.answer == m["drinks"][qk]
        elif m["sees"][qc]:
            assert ex.answer == m["drinks"][qk]
        else:
            assert ex.answer == "unknown"
        observer = m["characters"][qc]
        other = m["characters"][1 - qc]
        verb = "can" if m["sees"][qc] else "cannot"
        assert f"{observer} {verb} observe {other}'s actions." in ex.prompt
        assert ex.prompt.endswith(f"What does {observer} believe the {m['containers'][qk]} contains? Answer:")
    assert all(v > 150 for v in kinds.values())  # roughly uniform over question types


def test_tom_corrupt_changes_belief_and_entities():
    task = TheoryOfMind()
    for p in task.pairs(200, seed=0):
        c, k = p.clean.meta, p.corrupt.meta
        assert (c["question_character"], c["question_container"]) == (k["question_character"], k["question_container"])
        assert not set(c["drinks"]) & set(k["drinks"])
        assert p.clean.answer not in p.corrupt.prompt.split()


def test_tom_instruction_block():
    ex = TheoryOfMind(instruction="Answer the question.").generate(1)[0]
    assert ex.prompt.startswith("Instruction: Answer the question.\n\nStory: ")
    s = ex.meta["spans"]["question_character"]
    assert ex.prompt[s[0] : s[1]] == ex.meta["characters"][ex.meta["question_character"]]


def test_causaltom_task_is_tom_behind_the_instruction_and_three_shots():
    """get_task("tom-causaltom"): the instruction, then three solved stories (one per question type), then the
    story; the prefix is the same for every prompt and the same as TheoryOfMind(instruction="causaltom",
    few_shot=3)'s (the format the real-model measurements used); a tokenizer's pools keep the class and format."""
    from fastcd.tasks import CausalToM, get_task

    task = get_task("tom-causaltom")
    assert isinstance(task, CausalToM) and task.name == "tom-causaltom" and task.few_shot == 3
    exs = task.generate(20, seed=0, split="test")
    plain = TheoryOfMind(instruction="causaltom", few_shot=3).generate(1, seed=0, split="test")[0]
    head = plain.prompt[: plain.prompt.rindex("Story: ")]
    assert head.startswith("Instruction: ") and head.count("Story: ") == 3
    for ex in exs:
        assert ex.prompt.startswith(head) and ex.prompt.count("Story: ") == 4
        assert ex.prompt.endswith("? Answer:")
        s = ex.meta["spans"]["question_container"]
        assert ex.prompt[s[0] : s[1]] == ex.meta["containers"][ex.meta["question_container"]]
    fewer = task.with_pools(drinks=task.drinks[:5])
    assert isinstance(fewer, CausalToM) and fewer.generate(1)[0].prompt.count("Story: ") == 4

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

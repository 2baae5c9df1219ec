"""fastcd.tasks and tasks.base: both tasks deterministic with disjoint splits, JSONL, encoded positions, the
single-token checks, get_task (each task's own prompts: test_entity_tracking.py, test_tom.py)."""

import random

import pytest
import torch

from fastcd.tasks import ContrastPair, EntityTracking, Example, TheoryOfMind, get_task, load_jsonl, save_jsonl, split_of
from fastcd.tasks.base import word_token_id


@pytest.mark.parametrize("task", [EntityTracking(), TheoryOfMind()], ids=["et", "tom"])
def test_deterministic_and_seed_dependent(task):
    a = task.generate(50, seed=3)
    b = task.generate(50, seed=3)
    c = task.generate(50, seed=4)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]


@pytest.mark.parametrize("task", [EntityTracking(), TheoryOfMind()], ids=["et", "tom"])
def test_splits_are_disjoint_and_large(task):
    train = task.generate(10_000, seed=0, split="train")
    assert len({e.prompt for e in train}) == 10_000
    val = task.generate(500, seed=0, split="val")
    test = task.generate(500, seed=7, split="test")
    ps = [{e.prompt for e in s} for s in (train, val, test)]
    assert not (ps[0] & ps[1]) and not (ps[0] & ps[2]) and not (ps[1] & ps[2])
    assert all(split_of(e.prompt) == "test" for e in test)


def test_jsonl_roundtrip(tmp_path):
    task = EntityTracking()
    exs = task.generate(20)
    save_jsonl(exs, tmp_path / "a.jsonl")
    back = load_jsonl(tmp_path / "a.jsonl")
    assert [e.to_json() for e in back] == [e.to_json() for e in exs]
    pairs = TheoryOfMind().pairs(5)
    save_jsonl(pairs, tmp_path / "p.jsonl")
    back = load_jsonl(tmp_path / "p.jsonl")
    assert isinstance(back[0], ContrastPair) and back[0].to_json() == pairs[0].to_json()


def test_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"task": "entity-tracking", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'answer'"):
        load_jsonl(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_jsonl(p)
    with pytest.raises(FileNotFoundError, match="path"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_user_examples_without_meta_are_parsed(word_tokenizer):
    task = EntityTracking()
    ex = task.generate(4)
    bare = [Example("entity-tracking", e.prompt, e.answer) for e in ex]
    a, b = task.encode(ex, word_tokenizer), task.encode(bare, word_tokenizer)
    assert torch.equal(a.input_ids, b.input_ids)
    for role in task.roles:
        assert torch.equal(a.positions[role], b.positions[role])


def test_encode_positions_point_at_the_right_tokens(word_tokenizer):
    task = EntityTracking()
    exs = task.generate(16, seed=5)
    b = task.encode(exs, word_tokenizer)
    for i, ex in enumerate(exs):
        toks = word_tokenizer.convert_ids_to_tokens(b.input_ids[i].tolist())
        assert toks[b.positions["query_label"][i]] == ex.meta["query_label"]
        assert toks[b.positions["box_label"][i]] == ex.meta["query_label"]
        assert toks[b.positions["last"][i]] == "the"
        assert toks[b.positions["box_label"][i] - 4] == ex.answer  # "the X is in Box L"
        assert b.answer_ids[i] == word_token_id(word_tokenizer, ex.answer)
    tom = TheoryOfMind()
    exs = tom.generate(8)
    b = tom.encode(exs, word_tokenizer)
    for i, ex in enumerate(exs):
        toks = word_tokenizer.convert_ids_to_tokens(b.input_ids[i].tolist())
        assert toks[b.positions["question_character"][i]] == ex.meta["characters"][ex.meta["question_character"]]
        assert toks[b.positions["question_container"][i]] == ex.meta["containers"][ex.meta["question_container"]]
        assert toks[b.positions["last"][i]] == ":"


def test_clean_and_corrupt_have_equal_token_length(word_tokenizer):
    for task in (EntityTracking(), TheoryOfMind()):
        pairs = task.pairs(32)
        c = task.encode([p.clean for p in pairs], word_tokenizer)
        k = task.encode([p.corrupt for p in pairs], word_tokenizer)
        assert c.input_ids.shape == k.input_ids.shape and c.equal_length and k.equal_length


def test_multi_token_words_get_a_clear_error(word_tokenizer):
    task = EntityTracking(objects=list(EntityTracking().objects[:10]) + ["spaceship"])
    with pytest.raises(ValueError, match=r"not single tokens for this tokenizer: objects: 1 \(spaceship\)"):
        task.check_tokenizer(word_tokenizer)
    ex = Example("entity-tracking", task.generate(1)[0].prompt, "spaceship")
    with pytest.raises(ValueError, match="answer 'spaceship' is not in this tokenizer's vocabulary"):
        task.encode([ex], word_tokenizer)


def test_bpe_tokenizer_single_token_check():
    """Any HF tokenizer: a word that BPE splits gets a clear error naming the pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "Ġ": 1, "a": 2, "p": 3, "l": 4, "e": 5, "Ġapple": 6, "Ġp": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "p")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ValueError, match="'pale' is not a single token"):
        word_token_id(hf, "pale")


def test_get_task_and_bad_input():
    assert isinstance(get_task("tom"), TheoryOfMind)
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("arithmetic")
    with pytest.raises(ValueError, match="split must be one of"):
        EntityTracking().generate(3, split="dev")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        EntityTracking().generate(0)
    tiny = EntityTracking(n_boxes=2, objects=["apple", "bag"], letters="ABC")
    with pytest.raises(ValueError, match="more unique"):
        tiny.generate(1000, split="test")


def test_split_of_is_stable():
    # the split of a prompt is a pure function of its text (hash-based)
    r = random.Random(0)
    prompts = [str(r.random()) for _ in range(2000)]
    counts = {s: sum(split_of(p) == s for p in prompts) for s in ("train", "val", "test")}
    assert 1450 < counts["train"] < 1750 and counts["val"] > 120 and counts["test"] > 120
    assert split_of("abc") == split_of("abc")

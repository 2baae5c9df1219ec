"""Your own prompts as a task: a JSONL file or a list of examples, in distill(), the CLI and experiments."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.resume import data_identity
from fastcd.tasks import DatasetTask, EntityTracking, Example, get_task, save_jsonl, split_of
from fastcd.tokenizer import build_word_tokenizer


def _write(path, meta: bool = False):
    """Entity-tracking prompts of every split, written as a user would (no metadata: they are parsed)."""
    et = EntityTracking(n_boxes=3)
    exs = [e for split, n in (("train", 120), ("val", 30), ("test", 30)) for e in et.generate(n, seed=1, split=split)]
    if not meta:
        exs = [Example(e.task, e.prompt, e.answer) for e in exs]
    save_jsonl(exs, path)
    return exs


def test_a_jsonl_file_is_a_task_with_disjoint_seeded_splits(tmp_path):
    exs = _write(tmp_path / "p.jsonl")
    task = get_task(str(tmp_path / "p.jsonl"))
    assert isinstance(task, DatasetTask) and task.name == "entity-tracking" and task.roles == EntityTracking.roles
    train = task.generate(100, seed=0, split="train")
    assert all(split_of(e.prompt) == "train" for e in train) and len({e.prompt for e in train}) == 100
    assert [e.prompt for e in train] == [e.prompt for e in task.generate(100, seed=0, split="train")]
    assert [e.prompt for e in train] != [e.prompt for e in task.generate(100, seed=1, split="train")]
    assert {e.prompt for e in train} <= {e.prompt for e in exs}
    with pytest.raises(ValueError, match=r"dataset .*p.jsonl: 200 train examples asked for, it holds 120 \(of 180"):
        task.generate(200, split="train")
    pairs = task.pairs(8, seed=0, split="val")  # corrupt prompts from the built-in task, parsed from the prompt
    tok = build_word_tokenizer()
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    assert clean.input_ids.shape == corrupt.input_ids.shape and set(clean.positions) >= {"last", "query_label"}


def test_distill_trains_on_the_file_and_on_a_list(tmp_path):
    _write(tmp_path / "p.jsonl")
    tok = build_word_tokenizer()
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given")
    cfg = DistillConfig(steps=2, batch_size=8, n_train=32, n_eval=16, progress=False, save_every=2,
                        out=str(tmp_path / "run"))
    res = distill(make_tiny("llama", vocab_size=len(tok), seed=1), make_tiny("llama", vocab_size=len(tok), seed=2),
                  str(tmp_path / "p.jsonl"), matching=m, config=cfg, student_tokenizer=tok, teacher_tokenizer=tok)
    task = DatasetTask(tmp_path / "p.jsonl")
    want = data_identity({"train": task.generate(32, seed=0, split="train")})["train"]
    got = json.loads((tmp_path / "run" / "manifest.json").read_text())["identity"]["data"]["train"]
    assert got == want  # the run trained on the file's training prompts
    assert len(res.correct) == 16
    listed = distill(make_tiny("llama", vocab_size=len(tok), seed=1), make_tiny("llama", vocab_size=len(tok), seed=2),
                     task.examples, matching=m, config=DistillConfig(steps=2, batch_size=8, n_train=32, n_eval=16,
                                                                     progress=False),
                     student_tokenizer=tok, teacher_tokenizer=tok)
    assert listed.correct == res.correct  # a list of the same examples is the same task


def test_the_cli_takes_a_jsonl_task_and_names_a_bad_line(tmp_path, capsys):
    from fastcd.cli import main

    _write(tmp_path / "p.jsonl")
    tok = build_word_tokenizer()
    model = make_tiny("llama", n_layers=2, vocab_size=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rc = main(["discover", "--model", str(tmp_path / "model"), "--task", str(tmp_path / "p.jsonl"), "--method",
               "attribution", "--n-examples", "8", "--position", "last", "--top-k", "2", "--out",
               str(tmp_path / "c.json")])
    assert rc == 0 and json.loads((tmp_path / "c.json").read_text())["task"] == "entity-tracking"
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    rc = main(["discover", "--model", str(tmp_path / "model"), "--task", str(tmp_path / "bad.jsonl"), "--out",
               str(tmp_path / "c2.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "bad.jsonl:3: not valid JSON" in err[0]


def test_a_pair_file_of_your_own_task_gives_its_roles_and_corrupt_prompts(tmp_path):
    from fastcd.tasks import ContrastPair

    pairs = []
    for i in range(400):
        names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]
        a, b = names[i % 6], names[(i + 1) % 6]
        p, q = ["cat", "dog", "eel", "fox"][i % 4], ["gnu", "hen"][i % 2]
        prompt = f"{a} owns a {p} . {b} owns a {q} . {b} owns a" + " ." * (i // 24)
        start = prompt.index(f". {b} owns a", len(a)) + 2
        clean = Example("pets", prompt, q, {"spans": {"query_name": [start, start + 3]}})
        pairs.append(ContrastPair(clean, Example("pets", prompt.replace(b, "Eve"), None, clean.meta)))
    save_jsonl(pairs, tmp_path / "pets.jsonl")
    task = DatasetTask(tmp_path / "pets.jsonl")
    assert task.name == "pets" and task.roles == ("query_name",) and task.base is None
    got = task.pairs(5, seed=0, split="train")
    assert all(p.corrupt.answer is None and "Eve" in p.corrupt.prompt for p in got)
    no_pairs = DatasetTask([p.clean for p in pairs])
    with pytest.raises(ValueError, match="patching needs corrupt prompts: give clean/corrupt pairs"):
        no_pairs.pairs(5)

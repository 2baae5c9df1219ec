"""Circuit adapters: the trained slices alone, applied onto the base student, give the distilled student."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny

from fastcd.adapters import apply_adapter, load_adapted, read_adapter, save_adapter
from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.tasks import EntityTracking
from fastcd.tokenizer import build_word_tokenizer

PAIRS = ((Head(1, 2), Head(1, 1), "last"), (Head(0, 3), Head(0, 2), "query_label"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    tok = build_word_tokenizer()
    base = make_tiny("qwen2", vocab_size=len(tok), seed=2)  # GQA, with q bias
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    cfg = DistillConfig(steps=3, batch_size=8, n_train=16, n_eval=8, lr=1e-2, progress=False, out=str(tmp / "run"))
    res = distill(make_tiny("llama", vocab_size=len(tok), seed=1), str(tmp / "base"), EntityTracking(n_boxes=3),
                  matching=Matching([Pair(t, s, r, "g", {}) for t, s, r in PAIRS], "given"),
                  teacher_tokenizer=tok, student_tokenizer=tok, config=cfg)
    return tmp, tok, res


def test_the_adapter_applied_to_the_base_is_the_distilled_student(run):
    tmp, tok, res = run
    rec = save_adapter(res, tmp / "adapter")
    assert rec["heads"] == ["L0H2", "L1H1"] and rec["kv"] == "frozen"  # GQA: shared KV groups stay the base's
    tensors = read_adapter(tmp / "adapter")[1]
    assert rec["n_params"] == sum(t.numel() for t in tensors.values())
    n_model = sum(p.numel() for p in res.student.parameters())
    assert rec["n_params"] < 0.2 * n_model and rec["share_of_base"] == pytest.approx(rec["n_params"] / n_model)
    student = load_adapted(str(tmp / "base"), tmp / "adapter")
    ids = torch.randint(0, len(tok), (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, res.student(ids).logits, rtol=0, atol=0)
    plain = make_tiny("qwen2", vocab_size=len(tok), seed=2)  # the base alone differs from the distilled student
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, res.student(ids).logits)
    # only the matched heads' slices differ from the base
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed and all(".q_proj." in k or ".o_proj." in k for k in changed)
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in changed} == {0, 1}


def test_distill_writes_the_adapter_of_its_run(run):
    from transformers import AutoModelForCausalLM

    tmp, tok, res = run
    rec = json.loads((tmp / "run" / "adapter" / "adapter.json").read_text())
    assert rec["base"] == "base" and rec["heads"] == ["L0H2", "L1H1"]
    student = load_adapted(str(tmp / "base"), tmp / "run" / "adapter")
    saved = AutoModelForCausalLM.from_pretrained(tmp / "run" / "student", local_files_only=True)
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=0)


def test_an_adapter_is_refused_by_another_base_or_shape(run):
    tmp, tok, res = run
    save_adapter(res, tmp / "adapter2")
    other = make_tiny("qwen2", vocab_size=len(tok), seed=5)  # same shape, another checkpoint
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="token embeddings differ from that base's"):
        apply_adapter(other, tmp / "adapter2")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    apply_adapter(other, tmp / "adapter2", check_base=False)  # deliberate: allowed
    wide = make_tiny("qwen2", vocab_size=len(tok), seed=2, n_layers=3)
    with pytest.raises(ValueError, match="another shape .*n_layers 2 there, 3 here"):
        apply_adapter(wide, tmp / "adapter2")


def test_bad_adapters_and_results_are_one_line_errors(run, tmp_path):
    tmp, tok, res = run
    with pytest.raises(FileNotFoundError, match="is not an adapter directory"):
        read_adapter(tmp_path)
    save_adapter(res, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    meta["format"] = "something-else/9"
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has format 'something-else/9'"):
        read_adapter(tmp_path / "a")

    class Full:
        student, matching, metrics = res.student, res.matching, {"trained_heads_fraction": 1.0}

    with pytest.raises(ValueError, match="full-model method trains every weight"):
        save_adapter(Full(), tmp_path / "b")
    assert not os.path.exists(tmp_path / "b")

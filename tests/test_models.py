import pytest
import torch
from conftest import make_tiny

from fastcd.loading import load_model, load_tokenizer, parse_dtype
from fastcd.models import SUPPORTED_ARCHITECTURES, Head, get_adapter


def test_head_str_and_parse():
    assert str(Head(3, 8)) == "L3H8"
    assert Head.parse("L12H0") == Head(12, 0)
    with pytest.raises(ValueError, match="head name must look like"):
        Head.parse("3.8")


@pytest.mark.parametrize(
    "arch, kv", [("llama", 2), ("mistral", 2), ("qwen2", 2), ("qwen3", 2), ("gpt2", 4)]
)
def test_adapter_shapes(arch, kv):
    m = make_tiny(arch)
    a = get_adapter(m)
    s = a.spec
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_head, s.d_model) == (2, 4, kv, 8, 32)
    assert len(a.layers()) == 2
    o = a.o_proj(1)
    w = o.weight
    # o_proj takes n_heads * d_head inputs
    in_features = w.shape[1] if arch != "gpt2" else w.shape[0]
    assert in_features == s.n_heads * s.d_head


def test_out_of_range_head_names_the_shape():
    s = get_adapter(make_tiny("llama")).spec
    with pytest.raises(ValueError, match=r"L2H0 is out of range for this model: 2 layers x 4 heads"):
        s.check_head(Head(2, 0))
    with pytest.raises(ValueError, match="L0H4 is out of range"):
        s.check_head(Head(0, 4))


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*gpt2.*llama.*qwen2"):
        get_adapter(bert)
    assert "llama" in SUPPORTED_ARCHITECTURES and "gpt2" in SUPPORTED_ARCHITECTURES
    with pytest.raises(TypeError, match="Hugging Face PreTrainedModel"):
        get_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_slices_cover_the_head(arch):
    m = make_tiny(arch)
    a = get_adapter(m)
    sl = a.head_slices(Head(1, 2), kv=True)
    names = [s.name for s in sl]
    assert any("q" in n for n in names) and any(("o_proj" in n) or ("c_proj" in n) for n in names)
    for s in sl:
        assert s.index.stop - s.index.start == 8  # d_head
        assert s.index.stop <= s.param.shape[s.dim]


def test_load_model_from_local_dir(tmp_path, word_tokenizer, caplog, capsys):
    m = make_tiny("llama", vocab_size=len(word_tokenizer))
    m.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    import logging

    with caplog.at_level(logging.INFO, logger="fastcd"):
        loaded = load_model(tmp_path, dtype="float32")
    assert not loaded.training
    ids = torch.randint(0, len(word_tokenizer), (2, 9))
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits)
    assert loaded.config._attn_implementation == "sdpa"
    load_model(tmp_path)
    err = capsys.readouterr().err
    assert err.count("fastcd: attention implementation sdpa") <= 1  # said once per process
    tok = load_tokenizer(tmp_path)
    assert tok("Box A contains the")["input_ids"] == word_tokenizer("Box A contains the")["input_ids"]
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a local directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="path_or_module"):
        load_model(42)
    with pytest.raises(ValueError, match="dtype must be"):
        parse_dtype("float8")


def test_load_model_accepts_module():
    m = make_tiny("gpt2")
    assert load_model(m) is m

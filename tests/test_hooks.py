import pytest
import torch
from conftest import make_tiny

from fastcd.hooks import ablate, capture_z, intervene, mean_z, patch, run_with_z
from fastcd.models import Head, get_adapter


def _ids(n=3, t=10, vocab=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def test_capture_matches_manual_attention():
    """Captured z equals softmax(QK^T/sqrt(d)) V computed by hand (Llama, GQA)."""
    m = make_tiny("llama")
    ids = _ids()
    a = get_adapter(m)
    s = a.spec
    attn_in = {}
    h = a.layers()[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: attn_in.update(x=kwargs["hidden_states"], pe=kwargs["position_embeddings"]),
        with_kwargs=True,
    )
    with capture_z(m, [Head(0, 3), Head(0, 0)]) as cache:
        m(ids)
    h.remove()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = a.layers()[0].self_attn
    x = attn_in["x"]
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, s.n_heads, s.d_head).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, s.n_kv_heads, s.d_head).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, s.n_kv_heads, s.d_head).transpose(1, 2)
    cos, sin = attn_in["pe"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for hd in (3, 0):
        g = hd // s.group_size
        scores = q[:, hd] @ k[:, g].transpose(-1, -2) / s.d_head**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        z = scores.softmax(-1) @ v[:, g]  # [batch, pos, d_head]
        torch.testing.assert_close(cache[Head(0, hd)], z, atol=1e-6, rtol=1e-5)
    assert cache.stack().shape == (3, 10, 2, 8)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_capture_shapes_and_positions(arch):
    m = make_tiny(arch)
    ids = _ids()
    heads = [Head(1, 2), Head(0, 1), Head(1, 0)]
    with capture_z(m, heads) as full:
        m(ids)
    with capture_z(m, heads, positions=[-1, 4]) as sel:
        m(ids)
    assert full.stack().shape == (3, 10, 3, 8)
    assert sel.stack().shape == (3, 2, 3, 8)
    torch.testing.assert_close(sel.stack(), full.stack()[:, [9, 4]])
    per_ex = torch.tensor([[1], [5], [9]])
    with capture_z(m, heads, positions=per_ex) as pe:
        m(ids)
    for i in range(3):
        torch.testing.assert_close(pe.stack()[i, 0], full.stack()[i, per_ex[i, 0]])
    # o_proj(z) == sum over heads W_O[:, h] z_h: the capture sees exactly what o_proj mixes
    a = get_adapter(m)
    with capture_z(m, None) as every:
        m(ids)
    z = every.layer(0)  # [batch, pos, n_heads, d_head]
    flat = z.reshape(3, 10, -1)
    torch.testing.assert_close(a.o_proj(0)(flat), a.o_proj(0)(flat))  # smoke: shape is o_proj's input


def test_capture_errors():
    m = make_tiny("llama")
    with pytest.raises(ValueError, match="out of range"):
        with capture_z(m, [Head(5, 0)]):
            pass
    with pytest.raises(ValueError, match="must not repeat"):
        with capture_z(m, [Head(0, 0), Head(0, 0)]):
            pass
    with pytest.raises(ValueError, match="positions must lie in"):
        with capture_z(m, [Head(0, 0)], positions=[20]):
            m(_ids())
    with capture_z(m, [Head(0, 0)]) as c:
        pass
    with pytest.raises(KeyError, match="not captured"):
        c[Head(1, 1)]


def _hook_count(m):
    return sum(len(mod._forward_pre_hooks) for mod in m.modules())


def test_hooks_removed_on_exception():
    m = make_tiny("llama")
    before = _hook_count(m)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_z(m, [Head(0, 0), Head(1, 1)]):
            assert _hook_count(m) == before + 2
            raise RuntimeError("boom")
    assert _hook_count(m) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(m, [Head(0, 0)]):
            raise RuntimeError("boom")
    assert _hook_count(m) == before


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"])
def test_gradient_reaches_exactly_the_captured_head(arch):
    """A loss on one head's captured z (through its own o_proj columns, W_O[:, h] z_h) gives non-zero
    gradients to exactly that head's q rows and o columns, and zero to every other head's."""
    m = make_tiny(arch, n_layers=2)
    m.train()
    a = get_adapter(m)
    target = Head(0, 2)
    with capture_z(m, [target]) as cache:
        m(_ids())
    z = cache[target]  # [batch, pos, d_head]
    assert z.requires_grad and z.grad_fn is not None
    a.head_write(target, z).pow(2).sum().backward()
    for head in a.spec.all_heads():
        for sl in a.head_slices(head):
            g = sl.param.grad
            part = None if g is None else g.narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start)
            if head == target:
                assert part is not None and part.abs().sum() > 0, f"{sl.name} got no gradient"
            elif "bias" not in sl.name or arch != "gpt2":
                assert part is None or torch.all(part == 0), f"{sl.name} got a gradient"
    # GQA: the target's KV group gets k/v gradients, the other group none
    if arch != "gpt2":
        attn = a.layers()[0].self_attn
        kg = attn.k_proj.weight.grad.view(a.spec.n_kv_heads, a.spec.d_head, -1)
        g = target.head // a.spec.group_size
        assert kg[g].abs().sum() > 0 and torch.all(kg[1 - g] == 0)


def test_detached_capture_has_no_graph():
    m = make_tiny("llama")
    with capture_z(m, [Head(0, 0)], detach=True) as cache:
        m(_ids())
    assert not cache[Head(0, 0)].requires_grad


def test_patch_every_head_reproduces_source_logits():
    """Patch all heads from run B into run A: where tokens agree (later positions), logits equal B's."""
    for arch in ("llama", "gpt2"):
        m = make_tiny(arch)
        a_ids = _ids(2, 12, seed=1)
        b_ids = a_ids.clone()
        b_ids[:, 3] = (b_ids[:, 3] + 7) % 211  # differ at one early position
        logits_b, z_b = run_with_z(m, b_ids)
        logits_a, _ = run_with_z(m, a_ids)
        with torch.no_grad(), patch(m, get_adapter(m).spec.all_heads(), z_b):
            patched = m(a_ids).logits
        torch.testing.assert_close(patched[:, 4:], logits_b[:, 4:], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(logits_a[:, 4:], logits_b[:, 4:], atol=1e-3)
        # at the differing position the residual keeps A's token embedding, so it stays different
        assert not torch.allclose(patched[:, 3], logits_b[:, 3], atol=1e-3)


def test_patch_subset_of_heads_and_positions():
    m = make_tiny("llama")
    a_ids, b_ids = _ids(2, 8, seed=1), _ids(2, 8, seed=2)
    _, z_b = run_with_z(m, b_ids)
    heads = [Head(0, 1), Head(1, 3)]
    with torch.no_grad(), patch(m, heads, z_b, positions=[-1]), capture_z(m, None) as c:
        m(a_ids)
    _, z_a = run_with_z(m, a_ids)
    torch.testing.assert_close(c.layer(0)[:, -1, 1], z_b[0, :, -1, 1])
    torch.testing.assert_close(c.layer(0)[:, :-1, 1], z_a[0, :, :-1, 1])  # other positions untouched
    torch.testing.assert_close(c.layer(0)[:, :, 0], z_a[0, :, :, 0])  # other heads untouched (layer 0)


def test_mean_and_zero_ablation():
    m = make_tiny("llama")
    ids = _ids(4, 8)
    means = mean_z(m, ids, batch_size=3)
    _, z = run_with_z(m, ids)
    torch.testing.assert_close(means, z.mean(dim=1))
    # mean ablation with the means of a single identical prompt changes nothing
    one = ids[:1]
    with torch.no_grad():
        base = m(one).logits
        with ablate(m, [Head(0, 0), Head(1, 2)], means=mean_z(m, one)):
            same = m(one).logits
    torch.testing.assert_close(same, base, atol=1e-6, rtol=1e-5)
    # zero ablation of a head == zeroing its o_proj columns
    head = Head(0, 1)
    with torch.no_grad(), ablate(m, [head]):
        zeroed = m(ids).logits
    o = get_adapter(m).o_proj(0)
    with torch.no_grad():
        saved = o.weight[:, 8:16].clone()
        o.weight[:, 8:16] = 0
        ref = m(ids).logits
        o.weight[:, 8:16] = saved
    torch.testing.assert_close(zeroed, ref, atol=1e-6, rtol=1e-5)
    # ablation at per-example positions only touches those positions
    pos = torch.tensor([[2], [5], [1], [7]])
    with torch.no_grad(), ablate(m, [Head(1, 0)], means=means, positions=pos), capture_z(m, [Head(1, 0)]) as c:
        m(ids)
    for i in range(4):
        torch.testing.assert_close(c[Head(1, 0)][i, pos[i, 0]], means[1, pos[i, 0], 0])


def test_intervention_errors():
    m = make_tiny("llama")
    ids = _ids(2, 8)
    means = mean_z(m, ids)
    with pytest.raises(ValueError, match="means were computed for sequences of length 8"):
        with torch.no_grad(), ablate(m, [Head(0, 0)], means=means):
            m(_ids(2, 9))
    with pytest.raises(ValueError, match="means must be"):
        with ablate(m, [Head(0, 0)], means=means[0]):
            pass
    _, z = run_with_z(m, ids)
    with pytest.raises(ValueError, match="built for sequences of length 8"):
        with torch.no_grad(), patch(m, [Head(0, 0)], z):
            m(_ids(2, 9))
    with pytest.raises(ValueError, match="plan names layer 7"):
        with intervene(m, {7: (torch.ones(1, 8, 4, dtype=torch.bool), torch.zeros(1, 8, 4, 8))}):
            pass

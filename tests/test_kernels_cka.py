"""The fused Triton CKA kernel against its float64 PyTorch specification.

CPU: under TRITON_INTERPRET=1 (set in conftest.py), small awkward shapes, fp32. GPU (marked): full shapes in
fp32 and bf16 with the 2x-PyTorch-error rule (STYLE.md P13: the kernel's error against the float64 reference
is at most twice that of PyTorch in the same dtype, plus a small floor).
"""

import pytest
import torch
from conftest import gpu

from fastcd.reference import cka_loss_gather_ref

triton = pytest.importorskip("triton", reason="the triton extra is not installed")
from fastcd.kernels.cka import cka_loss_triton  # noqa: E402


def _case(p, m, ds, dt, *, hs=3, ht=2, t=6, device="cpu", dtype=torch.float32, gathered=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = (torch.randn(m, t, hs * ds, generator=g) + 0.5).to(device=device, dtype=dtype)
    pos_s = torch.randint(0, t, (p, m), generator=g).to(device)  # differs per pair and per example
    head_s = torch.randint(0, hs, (p,), generator=g).to(device)
    if gathered:
        y = torch.randn(p, m, dt, generator=g).to(device=device, dtype=dtype)
        pos_t, head_t = None, torch.zeros(p, dtype=torch.long, device=device)
    else:
        y = (torch.randn(m, t + 1, ht * dt, generator=g) - 1.0).to(device=device, dtype=dtype)
        pos_t = torch.randint(0, t + 1, (p, m), generator=g).to(device)
        head_t = torch.randint(0, ht, (p,), generator=g).to(device)
    return xs, pos_s, head_s, y, pos_t, head_t


def _ref(xs, pos_s, head_s, y, pos_t, head_t, ds, dt, dtype=torch.float64):
    x = xs.detach().to(dtype).requires_grad_(True)
    loss, cka = cka_loss_gather_ref(x, pos_s, head_s, y.to(dtype), pos_t, head_t, ds=ds, dt=dt)
    loss.backward()
    return loss.detach(), cka.detach(), x.grad


@pytest.mark.parametrize("m", [2, 7, 33])
@pytest.mark.parametrize("ds, dt", [(16, 16), (64, 16), (16, 64)])
@pytest.mark.parametrize("p", [1, 5])
def test_kernel_matches_reference_cpu(m, ds, dt, p):
    xs, pos_s, head_s, y, pos_t, head_t = _case(p, m, ds, dt, seed=m + ds + dt + p)
    ref_loss, ref_cka, ref_grad = _ref(xs, pos_s, head_s, y, pos_t, head_t, ds, dt)
    x = xs.clone().requires_grad_(True)
    loss, cka = cka_loss_triton(x, pos_s, head_s, y, pos_t, head_t, ds=ds, dt=dt)
    loss.backward()
    torch.testing.assert_close(cka.double(), ref_cka, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss.double(), ref_loss, atol=5e-5, rtol=1e-4)
    # fp32 kernel vs fp64 reference: absolute floor 1e-6 (at m = 2 CKA is identically 1 and the true
    # gradient is 0; fp32 leaves ~3e-8), plus 1e-4 of the gradient's scale
    atol = 1e-6 + 1e-4 * float(ref_grad.abs().max())
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=atol, rtol=1e-3)
    # the gradient lives only in the pairs' (example, position, head) slots
    touched = torch.zeros_like(xs, dtype=torch.bool)
    for i in range(p):
        h = int(head_s[i])
        touched[torch.arange(m), pos_s[i], h * ds : (h + 1) * ds] = True
    assert torch.all(x.grad[~touched] == 0)


def test_kernel_with_pregathered_teacher_cpu():
    xs, pos_s, head_s, y, pos_t, head_t = _case(3, 9, 16, 32, gathered=True)
    ref_loss, ref_cka, ref_grad = _ref(xs, pos_s, head_s, y, None, head_t, 16, 32)
    x = xs.clone().requires_grad_(True)
    loss, cka = cka_loss_triton(x, pos_s, head_s, y, None, head_t, ds=16, dt=32)
    loss.backward()
    torch.testing.assert_close(cka.double(), ref_cka, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-5, rtol=1e-3)


def test_kernel_degenerate_input_stays_finite_cpu():
    m, ds = 2, 16
    xs = torch.ones(m, 3, 2 * ds, requires_grad=True)  # constant activations, m = 2
    pos_s = torch.zeros(2, m, dtype=torch.long)
    head_s = torch.tensor([0, 1])
    y = torch.randn(2, m, 16)
    loss, cka = cka_loss_triton(xs, pos_s, head_s, y, None, torch.zeros(2, dtype=torch.long), ds=ds, dt=16)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xs.grad).all() and torch.all(cka == 0)
    x2 = torch.randn(m, 3, 2 * ds)
    x2[:, :, 0] = 5.0  # one constant column
    x2.requires_grad_(True)
    loss, cka = cka_loss_triton(x2, pos_s, head_s, y, None, torch.zeros(2, dtype=torch.long), ds=ds, dt=16)
    loss.backward()
    assert torch.isfinite(x2.grad).all() and torch.isfinite(cka).all()


def test_kernel_rejects_bad_shapes_cpu():
    xs, pos_s, head_s, y, pos_t, head_t = _case(2, 4, 16, 16)
    with pytest.raises(ValueError, match="m >= 2"):
        cka_loss_triton(xs[:1], pos_s[:, :1], head_s, y, pos_t[:, :1], head_t, ds=16, dt=16)
    with pytest.raises(ValueError, match="does not fit"):
        cka_loss_triton(xs, pos_s, head_s, y, pos_t, head_t, ds=20, dt=16)


# --- GPU (marked): full shapes, fp32 and bf16 with the 2x-PyTorch-error rule ---------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p, m, d", [(8, 256, 64), (64, 256, 128), (16, 2048, 128)])
def test_kernel_matches_reference_gpu(dtype, p, m, d):
    xs, pos_s, head_s, y, pos_t, head_t = _case(p, m, d, d, hs=8, ht=8, t=32, device="cuda", dtype=dtype)
    ref_loss, ref_cka, ref_grad = _ref(xs, pos_s, head_s, y, pos_t, head_t, d, d)
    same_loss, same_cka, same_grad = _ref(xs, pos_s, head_s, y, pos_t, head_t, d, d, dtype=dtype)
    x = xs.clone().requires_grad_(True)
    loss, cka = cka_loss_triton(x, pos_s, head_s, y, pos_t, head_t, ds=d, dt=d)
    loss.backward()
    err_k = (cka.double() - ref_cka).abs().max()
    err_t = (same_cka.double() - ref_cka).abs().max()
    assert err_k <= 2 * err_t + 1e-5
    gk = (x.grad.double() - ref_grad).abs().max()
    gt = (same_grad.double() - ref_grad).abs().max()
    assert gk <= 2 * gt + 1e-5 * ref_grad.abs().max()


def test_every_gpu_test_has_a_cpu_sibling():
    """Each test under the ``gpu`` marker (skipped cleanly without CUDA) has a CPU sibling on the same contract in
    its module: the same name with ``_cpu`` for ``_gpu``."""
    import ast
    from pathlib import Path

    missing, n_gpu = [], 0
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        for f in tree.body:
            if isinstance(f, ast.FunctionDef) and any(isinstance(d, ast.Name) and d.id == "gpu"
                                                      for d in f.decorator_list):
                n_gpu += 1
                if not f.name.endswith("_gpu") or f.name[:-4] + "_cpu" not in names:
                    missing.append(f"{path.name}::{f.name}")
    assert n_gpu >= 1 and not missing, missing


def test_distiller_triton_path_matches_torch_cpu():
    """CPU sibling of the GPU end-to-end contract: impl='triton' (interpreter) == impl='torch'."""
    from conftest import make_tiny

    from fastcd.artifacts import Matching, Pair
    from fastcd.config import DistillConfig
    from fastcd.distillation import CircuitDistiller, DistillBatch
    from fastcd.models import Head
    from fastcd.tasks import EntityTracking
    from fastcd.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    task = EntityTracking(n_boxes=3)
    enc = task.encode(task.generate(16), tok)
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {}), Pair(Head(0, 3), Head(1, 1), "query_label", "g", {}),
                  Pair(Head(0, 1), Head(0, 2), "box_label", "g", {})], "given")
    grads = {}
    for impl in ("torch", "triton"):
        teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
        student = make_tiny("llama", vocab_size=len(tok), seed=2)
        cd = CircuitDistiller(student, m, teacher=teacher, config=DistillConfig(method="ce+cka", impl=impl))
        loss, parts = cd(DistillBatch(enc.input_ids, enc.positions, enc.answer_ids, enc.input_ids, enc.positions))
        loss.backward()
        grads[impl] = (float(loss.detach()), parts["mean_cka"], [p.grad.clone() for p in cd.trainable_parameters()])
    assert grads["triton"][0] == pytest.approx(grads["torch"][0], rel=1e-5)
    assert grads["triton"][1] == pytest.approx(grads["torch"][1], rel=1e-5)
    for a, b in zip(grads["triton"][2], grads["torch"][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_dispatch(monkeypatch):
    from fastcd.cka import choose_impl, cka_loss

    assert choose_impl(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTCD_IMPL", "triton")
    assert choose_impl(torch.device("cpu")) == "triton"  # allowed here: TRITON_INTERPRET=1
    x, y = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 8, 16)
    lt, ct = cka_loss(x, y)
    monkeypatch.setenv("FASTCD_IMPL", "torch")
    lr, cr = cka_loss(x, y)
    torch.testing.assert_close(ct, cr, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("FASTCD_IMPL", "cuda")
    with pytest.raises(ValueError, match="FASTCD_IMPL"):
        choose_impl(torch.device("cpu"))
    monkeypatch.delenv("FASTCD_IMPL")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        choose_impl(torch.device("cpu"), "triton")

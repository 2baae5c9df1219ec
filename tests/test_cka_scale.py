"""CKA is scale-invariant in every implementation (torch loss, Triton kernel, C++ and torch scorers), and the
debiased estimator is the unbiased HSIC U-statistic.

Real models in bf16 have heads at activation scales from about 1e-3 to 1e3; an eps added to unnormalised
squared norms made the loss report CKA 0.0055 where the exact value is 0.33 (scale 3e-3) and overflow at 1e4.
"""

import itertools

import numpy as np
import pytest
import torch

from fastcd.cka import cka_loss, cka_matrix
from fastcd.reference import cka_loss_ref, linear_cka_ref

SCALES = [1e-4, 3e-3, 1.0, 1e2, 1e4]


def _pair(m=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, m, d, generator=g) + 0.3
    y = torch.randn(3, m, d, generator=g) + 0.5 * x
    return x, y


def _exact(x, y):
    return torch.tensor([float(linear_cka_ref(x[i].double().numpy(), y[i].double().numpy()))
                         for i in range(x.shape[0])], dtype=torch.float64)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_torch_loss_is_scale_invariant(scale, dtype, tol):
    x, y = _pair()
    exact = _exact(x, y)
    xs = (x * scale).to(dtype).requires_grad_(True)
    loss, cka = cka_loss_ref(xs, (y * scale).to(dtype))
    assert torch.allclose(cka.double(), exact, atol=tol), (scale, cka, exact)
    loss.backward()
    assert bool(xs.grad.isfinite().all())


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 1e4])
def test_gradient_follows_the_scale(scale):
    """dCKA/dx at scale s is the unit-scale gradient divided by s (CKA is homogeneous of degree 0)."""
    x, y = _pair()
    xa = x.double().requires_grad_(True)
    cka_loss_ref(xa, y.double())[0].backward()
    xb = (x.double() * scale).requires_grad_(True)
    cka_loss_ref(xb, y.double() * scale)[0].backward()
    assert torch.allclose(xb.grad * scale, xa.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", SCALES)
def test_triton_kernel_is_scale_invariant_cpu(scale):
    pytest.importorskip("triton")
    from fastcd.kernels.cka import cka_loss_triton

    x, y = _pair(m=16, d=16)
    exact = _exact(x, y)
    xs = (x * scale).permute(1, 0, 2).reshape(16, 1, 3 * 16).contiguous().requires_grad_(True)
    pos = torch.zeros(3, 16, dtype=torch.long)
    loss, cka = cka_loss_triton(xs, pos, torch.arange(3), (y * scale).contiguous(), None,
                                torch.zeros(3, dtype=torch.long), ds=16, dt=16)
    assert torch.allclose(cka.double(), exact, atol=1e-5), (scale, cka, exact)
    loss.backward()
    xr = (x * scale).double().requires_grad_(True)
    cka_loss_ref(xr, (y * scale).double())[0].backward()
    g = xs.grad.view(16, 3, 16).permute(1, 0, 2).double()
    assert torch.allclose(g, xr.grad, rtol=1e-3, atol=1e-6 / scale)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_scorer_is_scale_invariant(scale, impl):
    from fastcd import _ext

    if impl == "cpp" and not _ext.HAS_CPP:
        pytest.skip("fastcd._C is not built")
    x, y = _pair()
    ref = cka_matrix((x).numpy(), (y).numpy(), impl="python")
    got = cka_matrix((x * scale).numpy(), (y * scale).numpy(), impl=impl)
    assert np.allclose(got, ref, atol=1e-6), (scale, got, ref)


def _hsic_u_statistic(k, l):
    """Song et al. (2012), Theorem 2: the unbiased HSIC as a U-statistic over ordered 4-tuples of distinct indices,
    h = (1/24) sum over the 24 orderings of (k_tu l_tu + k_tu l_vw - 2 k_tu l_tv)."""
    m = k.shape[0]
    total = 0.0
    n = 0
    for i, j, q, r in itertools.permutations(range(m), 4):
        acc = 0.0
        for t, u, v, w in itertools.permutations((i, j, q, r)):
            acc += k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
        total += acc / 24
        n += 1
    return total / n


def test_unbiased_estimator_is_the_u_statistic():
    from fastcd.reference import _hsic_unbiased

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(7, 4, generator=g, dtype=torch.float64) + x[:, :4]
    k, l = x @ x.T, y @ y.T
    got = float(_hsic_unbiased(k[None], l[None])[0])
    assert got == pytest.approx(_hsic_u_statistic(k.numpy(), l.numpy()), rel=1e-9)


def test_unbiased_cka_removes_the_finite_sample_pull_to_one():
    """Independent Gaussian heads of width 64 at m=32: the biased estimator reads about 0.7, the debiased about 0."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 32, 64, generator=g), torch.randn(20, 32, 64, generator=g)
    biased = cka_loss(x, y, impl="torch")[1].mean()
    unbiased = cka_loss(x, y, impl="torch", estimator="unbiased")[1].mean()
    assert biased > 0.6 and abs(unbiased) < 0.05
    # a shared signal still reads as similar
    z = torch.randn(20, 32, 8, generator=g)
    x2 = torch.cat([z, 0.3 * x[..., :56]], -1)
    y2 = torch.cat([z, 0.3 * y[..., :56]], -1)
    assert cka_loss(x2, y2, impl="torch", estimator="unbiased")[1].mean() > 0.5


def test_estimator_arguments():
    x, y = _pair()
    with pytest.raises(ValueError, match="estimator must be one of"):
        cka_loss(x, y, estimator="debiased")
    with pytest.raises(ValueError, match="impl='triton' computes the biased estimator only"):
        cka_loss(x, y, impl="triton", estimator="unbiased")
    with pytest.raises(ValueError, match="needs m >= 4"):
        cka_loss(x[:, :3], y[:, :3], estimator="unbiased")


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 1e4])
def test_unbiased_estimator_is_scale_invariant(scale):
    x, y = _pair(m=64)
    ref = cka_loss(x.double(), y.double(), estimator="unbiased")[1]
    got = cka_loss(x * scale, y * scale, estimator="unbiased")[1]
    assert torch.allclose(got.double(), ref, atol=1e-4), (scale, got, ref)

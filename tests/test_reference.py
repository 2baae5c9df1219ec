"""The plain-PyTorch specifications (fastcd.reference) checked against each other and against the textbook:
the Gram form of linear CKA (Kornblith et al. 2019), the feature form of the loss, the all-pairs scorer and the
gathering twin of the fused kernel. The fast paths are tested against these in test_ext.py and test_kernels_cka.py."""

import numpy as np
import pytest
import torch

from fastcd.reference import cka_loss_gather_ref, cka_loss_ref, cka_matrix_ref, linear_cka_ref, nearest_indices_ref


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_cka_is_the_normalised_hsic_of_centred_grams():
    x, y = _x(12, 5), _x(12, 3, seed=1)
    xc, yc = x - x.mean(0), y - y.mean(0)  # feature form: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)
    want = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert float(linear_cka_ref(x, y)) == pytest.approx(float(want), rel=1e-12)
    q, _ = torch.linalg.qr(_x(5, 5, seed=2))  # invariant to rotations and isotropic scaling of either side
    assert float(linear_cka_ref(3.0 * x @ q, y)) == pytest.approx(float(want), rel=1e-10)
    assert float(linear_cka_ref(x, x)) == pytest.approx(1.0)
    assert float(linear_cka_ref(torch.ones(12, 5, dtype=torch.float64), y)) == 0.0  # a constant head


def test_the_loss_is_one_minus_cka_summed_over_pairs():
    x, y = _x(3, 16, 6), _x(3, 16, 4, seed=1)
    loss, cka = cka_loss_ref(x, y, eps=0.0)
    want = torch.stack([linear_cka_ref(x[p], y[p]) for p in range(3)])
    torch.testing.assert_close(cka, want, rtol=1e-12, atol=1e-12)
    assert float(loss) == pytest.approx(float((1 - want).sum()), rel=1e-12)


def test_all_pairs_scorer_is_every_pair():
    a, b = _x(3, 10, 4), _x(2, 10, 6, seed=1)
    got = cka_matrix_ref(a, b)
    assert got.shape == (3, 2) and got.dtype == np.float64
    for i in range(3):
        for j in range(2):
            assert got[i, j] == pytest.approx(float(linear_cka_ref(a[i], b[j])), rel=1e-12)


def test_gather_twin_gathers_each_pairs_head_at_its_positions():
    b, t, hs, ds, ht, dt = 6, 5, 3, 4, 2, 8
    xs, yt = _x(b, t, hs * ds), _x(b, t, ht * dt, seed=1)
    pos_s, pos_t = torch.randint(0, t, (2, b)), torch.randint(0, t, (2, b))
    head_s, head_t = torch.tensor([2, 0]), torch.tensor([1, 1])
    loss, cka = cka_loss_gather_ref(xs, pos_s, head_s, yt, pos_t, head_t, ds=ds, dt=dt)
    rows = torch.arange(b)
    x = torch.stack([xs[rows, pos_s[p], head_s[p] * ds:(head_s[p] + 1) * ds] for p in range(2)])
    y = torch.stack([yt[rows, pos_t[p], head_t[p] * dt:(head_t[p] + 1) * dt] for p in range(2)])
    want_loss, want_cka = cka_loss_ref(x, y)
    torch.testing.assert_close(cka, want_cka)
    pre, _ = cka_loss_gather_ref(xs, pos_s, head_s, y, None, None, ds=ds, dt=dt)  # teacher already gathered
    assert float(pre) == float(want_loss) == float(loss)


def test_nearest_indices_is_the_argmin_distance():
    q, k = np.array([0.4, 2.6, -5.0, 1.5]), np.array([0.0, 1.0, 2.0, 3.0])
    assert nearest_indices_ref(q, k).tolist() == [0, 3, 0, 1]  # 1.5 is a tie of 1 and 2: the lower index
    with pytest.raises(ValueError, match="keys must not be empty"):
        nearest_indices_ref(q, [])

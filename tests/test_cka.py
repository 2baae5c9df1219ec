"""fastcd.cka and its reference: the CKA loss (properties, finiteness, bf16 inputs)."""

import pytest
import torch

from fastcd.reference import cka_loss_ref


# --- the loss ------------------------------------------------------------------------------------------
def test_cka_loss_reference_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g, dtype=torch.float64)
    loss, cka = cka_loss_ref(x, x.clone(), eps=0.0)
    assert torch.allclose(cka, torch.ones(3, dtype=torch.float64)) and abs(float(loss)) < 1e-12
    y = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    loss, cka = cka_loss_ref(x, y)
    assert float(loss) == pytest.approx(float((1 - cka).sum()))  # summed over pairs (Eq. 7)
    assert torch.all((cka > 0) & (cka < 1))
    x1 = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: cka_loss_ref(a, y)[0], (x1,))


def test_cka_loss_never_nan():
    x = torch.ones(2, 2, 4, requires_grad=True)  # constant activations, m = 2
    y = torch.randn(2, 2, 3)
    loss, cka = cka_loss_ref(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.all(cka == 0)
    with pytest.raises(ValueError, match="m >= 2"):
        cka_loss_ref(torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="share P and m"):
        cka_loss_ref(torch.randn(2, 5, 4), torch.randn(3, 5, 4))


def test_cka_loss_bf16_upcast():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    ref = cka_loss_ref(x.double(), y.double())[0]
    low = cka_loss_ref(x.bfloat16(), y.bfloat16())[0]
    assert low.dtype == torch.float32 and abs(float(low) - float(ref)) < 2e-2

"""Fused per-head gather + batched linear CKA alignment loss, forward and backward (Triton).

For P head pairs at once, reads student z and teacher z as the attention output projection sees them,
``[batch, pos, heads * d_head]``, at per-example token positions and head indices, without materialising
per-head copies, and computes ``loss = sum_p (1 - CKA_p)`` with the biased linear CKA in feature form on
centred activations scaled to unit Frobenius norm (so the result does not depend on their scale, and eps only
guards a dead head):

    X^ = Xc / ||Xc||_F,  CKA = ||X^^T Y^||_F^2 / sqrt(||X^^T X^||_F^2 ||Y^^T Y^||_F^2 + eps)

The covariances are accumulated unscaled in float32 and divided by the traces before squaring, so nothing
overflows at activation scale 1e4 or underflows at 1e-4. As in the reference, the norms are constants in the
backward pass (exact CKA is scale-invariant: this drops a term of order eps).

Backward writes dL/dz straight into the right head slice of a zero ``[batch, pos, heads * d_head]`` buffer
(atomic adds: one student head may sit in several pairs). The PyTorch specification is
``fastcd.reference.cka_loss_gather_ref``. Layout follows STYLE.md P1: kernels, launchers, autograd Function.
"""

import torch
import triton
import triton.language as tl

from fastcd.errors import UsageError


@triton.jit
def _load_rows(ptr, pair, rows, rmask, pos_ptr, stride_pp, head, stride_b, stride_t, stride_d, stride_p,
               offs_d, dmask, D: tl.constexpr, GATHERED: tl.constexpr):
    # [BLOCK_M, BLOCK_D] rows of one head: z[b, pos[pair, b], head * D + d], or y[pair, b, d] when GATHERED
    if GATHERED:
        ptrs = ptr + pair * stride_p + rows[:, None] * stride_b + offs_d[None, :] * stride_d
    else:
        pos = tl.load(pos_ptr + pair * stride_pp + rows, mask=rmask, other=0)
        ptrs = ptr + rows[:, None] * stride_b + pos[:, None] * stride_t + (head * D + offs_d)[None, :] * stride_d
    return tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_centred(x_ptr, y_ptr, pair, rows, rmask, pos_s_ptr, pos_t_ptr, stride_pp, hs, ht,
                  stride_xb, stride_xt, stride_xd, stride_yb, stride_yt, stride_yd, stride_yp,
                  offs_s, offs_t, smask, tmask, mean_x, mean_y,
                  DS: tl.constexpr, DT: tl.constexpr, Y_GATHERED: tl.constexpr):
    # one row block of both heads, centred with the pair's column means; padded rows/columns are exact zeros
    x = _load_rows(x_ptr, pair, rows, rmask, pos_s_ptr, stride_pp, hs, stride_xb, stride_xt, stride_xd, 0,
                   offs_s, smask, DS, False)
    y = _load_rows(y_ptr, pair, rows, rmask, pos_t_ptr, stride_pp, ht, stride_yb, stride_yt, stride_yd,
                   stride_yp, offs_t, tmask, DT, Y_GATHERED)
    xc = tl.where(rmask[:, None] & smask[None, :], x - mean_x[None, :], 0.0)
    yc = tl.where(rmask[:, None] & tmask[None, :], y - mean_y[None, :], 0.0)
    return xc, yc


@triton.jit
def _cka_fwd_kernel(
    x_ptr, stride_xb, stride_xt, stride_xd, pos_s_ptr, head_s_ptr,
    y_ptr, stride_yb, stride_yt, stride_yd, stride_yp, pos_t_ptr, head_t_ptr,
    stride_pp,
    cka_ptr, sxy_ptr, sxx_ptr, mean_x_ptr, mean_y_ptr, stats_ptr, ry_ptr,
    M, eps,
    DS: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    Y_GATHERED: tl.constexpr,
):
    """CKA_p on unit-norm centred activations (see the module docstring). Each program owns one pair p."""
    pair = tl.program_id(0)
    hs = tl.load(head_s_ptr + pair)
    ht = tl.load(head_t_ptr + pair)
    offs_s = tl.arange(0, BLOCK_DS)
    offs_t = tl.arange(0, BLOCK_DT)
    smask = offs_s < DS
    tmask = offs_t < DT
    # Phase 1: column means. Two passes (means, then centred products) instead of one pass of raw moments:
    # X^T X - m mu mu^T cancels catastrophically in fp32 when |mu| >> std, as for z of attention heads.
    sum_x = tl.zeros([BLOCK_DS], dtype=tl.float32)
    sum_y = tl.zeros([BLOCK_DT], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        x = _load_rows(x_ptr, pair, rows, rmask, pos_s_ptr, stride_pp, hs, stride_xb, stride_xt, stride_xd, 0,
                       offs_s, smask, DS, False)
        y = _load_rows(y_ptr, pair, rows, rmask, pos_t_ptr, stride_pp, ht, stride_yb, stride_yt, stride_yd,
                       stride_yp, offs_t, tmask, DT, Y_GATHERED)
        sum_x += tl.sum(x, axis=0)
        sum_y += tl.sum(y, axis=0)
    mean_x = sum_x / M
    mean_y = sum_y / M
    # Phase 2: centred cross- and self-covariances, accumulated over row blocks with tl.dot (fp32).
    sxy = tl.zeros([BLOCK_DS, BLOCK_DT], dtype=tl.float32)
    sxx = tl.zeros([BLOCK_DS, BLOCK_DS], dtype=tl.float32)
    syy = tl.zeros([BLOCK_DT, BLOCK_DT], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        xc, yc = _load_centred(x_ptr, y_ptr, pair, rows, rmask, pos_s_ptr, pos_t_ptr, stride_pp, hs, ht,
                               stride_xb, stride_xt, stride_xd, stride_yb, stride_yt, stride_yd, stride_yp,
                               offs_s, offs_t, smask, tmask, mean_x, mean_y, DS, DT, Y_GATHERED)
        xct = tl.trans(xc)
        sxy += tl.dot(xct, yc)
        sxx += tl.dot(xct, xc)
        syy += tl.dot(tl.trans(yc), yc)
    # Phase 3: scale to unit-norm X^ and Y^ (||Xc||_F^2 = tr S_xx), then the ratio; eps sits inside the sqrt so
    # a constant head gives CKA 0 and finite gradients.
    diag_s = offs_s[:, None] == offs_s[None, :]
    diag_t = offs_t[:, None] == offs_t[None, :]
    rx = 1.0 / tl.sqrt(tl.maximum(tl.sum(tl.sum(tl.where(diag_s, sxx, 0.0), axis=1), axis=0), 1e-30))
    ry = 1.0 / tl.sqrt(tl.maximum(tl.sum(tl.sum(tl.where(diag_t, syy, 0.0), axis=1), axis=0), 1e-30))
    sxy = sxy * (rx * ry)
    sxx = sxx * (rx * rx)
    syy = syy * (ry * ry)
    cross = tl.sum(tl.sum(sxy * sxy, axis=1), axis=0)
    a = tl.sum(tl.sum(sxx * sxx, axis=1), axis=0)
    b = tl.sum(tl.sum(syy * syy, axis=1), axis=0)
    den = tl.sqrt(a * b + eps)
    tl.store(cka_ptr + pair, cross / den)
    # Saved for backward: S_xy, S_xx, the means and (cross, b, den).
    tl.store(sxy_ptr + pair * BLOCK_DS * BLOCK_DT + offs_s[:, None] * BLOCK_DT + offs_t[None, :], sxy)
    tl.store(sxx_ptr + pair * BLOCK_DS * BLOCK_DS + offs_s[:, None] * BLOCK_DS + offs_s[None, :], sxx)
    tl.store(mean_x_ptr + pair * BLOCK_DS + offs_s, mean_x)
    tl.store(mean_y_ptr + pair * BLOCK_DT + offs_t, mean_y)
    tl.store(stats_ptr + pair * 4 + 0, cross)
    tl.store(stats_ptr + pair * 4 + 1, b)
    tl.store(stats_ptr + pair * 4 + 2, den)
    tl.store(stats_ptr + pair * 4 + 3, rx)
    tl.store(ry_ptr + pair, ry)


@triton.jit
def _cka_bwd_kernel(
    x_ptr, stride_xb, stride_xt, stride_xd, pos_s_ptr, head_s_ptr,
    y_ptr, stride_yb, stride_yt, stride_yd, stride_yp, pos_t_ptr, head_t_ptr,
    stride_pp,
    sxy_ptr, sxx_ptr, mean_x_ptr, mean_y_ptr, stats_ptr, ry_ptr, grad_loss_ptr,
    gx_ptr, stride_gb, stride_gt, stride_gd,
    M,
    DS: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    Y_GATHERED: tl.constexpr,
):
    """dL/dX^ for L = 1 - c / D, c = ||X^^T Y^||^2, a = ||X^^T X^||^2, D = sqrt(a b + eps) (S_xy, S_xx here the
    covariances of the unit-norm X^, Y^): dc/dX^ = 2 Y^ S_xy^T, da/dX^ = 4 X^ S_xx, dD/da = b / (2D), so
    dL/dX^ = -(2 / D) Y^ S_xy^T + (2 c b / D^3) X^ S_xx, and dL/dXc = rx dL/dX^ (the norm held constant).
    Both terms have zero column means, so dL/dX = dL/dXc (the centring projection changes nothing).
    Each program owns one pair and scatters its rows into the student z gradient with atomic adds."""
    pair = tl.program_id(0)
    hs = tl.load(head_s_ptr + pair)
    ht = tl.load(head_t_ptr + pair)
    offs_s = tl.arange(0, BLOCK_DS)
    offs_t = tl.arange(0, BLOCK_DT)
    smask = offs_s < DS
    tmask = offs_t < DT
    sxy = tl.load(sxy_ptr + pair * BLOCK_DS * BLOCK_DT + offs_s[:, None] * BLOCK_DT + offs_t[None, :])
    sxx = tl.load(sxx_ptr + pair * BLOCK_DS * BLOCK_DS + offs_s[:, None] * BLOCK_DS + offs_s[None, :])
    mean_x = tl.load(mean_x_ptr + pair * BLOCK_DS + offs_s)
    mean_y = tl.load(mean_y_ptr + pair * BLOCK_DT + offs_t)
    cross = tl.load(stats_ptr + pair * 4 + 0)
    b = tl.load(stats_ptr + pair * 4 + 1)
    den = tl.load(stats_ptr + pair * 4 + 2)
    rx = tl.load(stats_ptr + pair * 4 + 3)
    ry = tl.load(ry_ptr + pair)
    g = tl.load(grad_loss_ptr)
    coef_y = -2.0 * g * rx * ry / den
    coef_x = 2.0 * g * cross * b * rx * rx / (den * den * den)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        xc, yc = _load_centred(x_ptr, y_ptr, pair, rows, rmask, pos_s_ptr, pos_t_ptr, stride_pp, hs, ht,
                               stride_xb, stride_xt, stride_xd, stride_yb, stride_yt, stride_yd, stride_yp,
                               offs_s, offs_t, smask, tmask, mean_x, mean_y, DS, DT, Y_GATHERED)
        gx = coef_x * tl.dot(xc, sxx) + coef_y * tl.dot(yc, tl.trans(sxy))  # [BLOCK_M, BLOCK_DS]
        pos = tl.load(pos_s_ptr + pair * stride_pp + rows, mask=rmask, other=0)
        gptrs = gx_ptr + rows[:, None] * stride_gb + pos[:, None] * stride_gt + (hs * DS + offs_s)[None, :] * stride_gd
        tl.atomic_add(gptrs, gx, mask=rmask[:, None] & smask[None, :])


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _check(xs, pos_s, head_s, y, pos_t, head_t, ds, dt):
    if xs.dim() != 3:
        raise UsageError(f"xs must be [batch, pos, heads * d_head], got {tuple(xs.shape)}")
    p, m = pos_s.shape
    if m < 2:
        raise UsageError(f"CKA needs a batch of m >= 2 examples, got m={m}")
    if xs.shape[0] != m or xs.shape[2] % ds:
        raise UsageError(f"xs {tuple(xs.shape)} does not fit m={m} examples of d_head={ds}")
    if head_s.shape != (p,) or head_t.shape != (p,):
        raise UsageError(f"head_s and head_t must be [P={p}]")
    if y.dim() == 3 and pos_t is None and y.shape[:2] != (p, m):
        raise UsageError(f"gathered y must be [P={p}, m={m}, d_t], got {tuple(y.shape)}")


def cka_fwd(xs, pos_s, head_s, y, pos_t, head_t, ds: int, dt: int, eps: float, block_m: int = 32):
    """Launch the forward. ``y`` is teacher z ``[batch, pos, heads*dt]`` with ``pos_t``/``head_t``, or already
    gathered ``[P, batch, dt]`` with ``pos_t=None``. Returns ``(cka [P], saved)``."""
    _check(xs, pos_s, head_s, y, pos_t, head_t, ds, dt)
    p, m = pos_s.shape
    dev = xs.device
    bs, bt = _block(ds), _block(dt)
    gathered = pos_t is None
    cka = torch.empty(p, device=dev, dtype=torch.float32)
    sxy = torch.empty(p, bs, bt, device=dev, dtype=torch.float32)
    sxx = torch.empty(p, bs, bs, device=dev, dtype=torch.float32)
    mean_x = torch.empty(p, bs, device=dev, dtype=torch.float32)
    mean_y = torch.empty(p, bt, device=dev, dtype=torch.float32)
    stats = torch.empty(p, 4, device=dev, dtype=torch.float32)
    ry = torch.empty(p, device=dev, dtype=torch.float32)
    pos_s = pos_s.contiguous()
    pos_t_arg = pos_s if gathered else pos_t.contiguous()
    ystr = (y.stride(1), 0, y.stride(2), y.stride(0)) if gathered else (y.stride(0), y.stride(1), y.stride(2), 0)
    _cka_fwd_kernel[(p,)](
        xs, xs.stride(0), xs.stride(1), xs.stride(2), pos_s, head_s,
        y, *ystr, pos_t_arg, head_t,
        pos_s.stride(0),
        cka, sxy, sxx, mean_x, mean_y, stats, ry,
        m, eps,
        DS=ds, DT=dt, BLOCK_M=block_m, BLOCK_DS=bs, BLOCK_DT=bt, Y_GATHERED=gathered,
    )
    return cka, (sxy, sxx, mean_x, mean_y, stats, ry)


def cka_bwd(grad_loss, xs, pos_s, head_s, y, pos_t, head_t, saved, ds: int, dt: int, block_m: int = 32):
    """Launch the backward: dL/dxs as a ``[batch, pos, heads*ds]`` float32 tensor, zero outside the pairs."""
    p, m = pos_s.shape
    sxy, sxx, mean_x, mean_y, stats, ry = saved
    gathered = pos_t is None
    gx = torch.zeros(xs.shape, device=xs.device, dtype=torch.float32)
    pos_s = pos_s.contiguous()
    pos_t_arg = pos_s if gathered else pos_t.contiguous()
    ystr = (y.stride(1), 0, y.stride(2), y.stride(0)) if gathered else (y.stride(0), y.stride(1), y.stride(2), 0)
    _cka_bwd_kernel[(p,)](
        xs, xs.stride(0), xs.stride(1), xs.stride(2), pos_s, head_s,
        y, *ystr, pos_t_arg, head_t,
        pos_s.stride(0),
        sxy, sxx, mean_x, mean_y, stats, ry, grad_loss.contiguous().float(),
        gx, gx.stride(0), gx.stride(1), gx.stride(2),
        m,
        DS=ds, DT=dt, BLOCK_M=block_m, BLOCK_DS=_block(ds), BLOCK_DT=_block(dt), Y_GATHERED=gathered,
    )
    return gx


class CKAFunction(torch.autograd.Function):
    """``loss, cka = CKAFunction.apply(xs, pos_s, head_s, y, pos_t, head_t, ds, dt, eps)``."""

    @staticmethod
    def forward(ctx, xs, pos_s, head_s, y, pos_t, head_t, ds, dt, eps):
        cka, saved = cka_fwd(xs, pos_s, head_s, y, pos_t, head_t, ds, dt, eps)
        ctx.save_for_backward(xs, pos_s, head_s, y, *( () if pos_t is None else (pos_t,)), head_t, *saved)
        ctx.meta = (ds, dt, pos_t is None)
        ctx.mark_non_differentiable(cka)
        return (1.0 - cka).sum(), cka

    @staticmethod
    def backward(ctx, grad_loss, _grad_cka):
        ds, dt, gathered = ctx.meta
        t = ctx.saved_tensors
        if gathered:
            xs, pos_s, head_s, y, head_t, *saved = t
            pos_t = None
        else:
            xs, pos_s, head_s, y, pos_t, head_t, *saved = t
        gx = cka_bwd(grad_loss, xs, pos_s, head_s, y, pos_t, head_t, saved, ds, dt)
        return gx.to(xs.dtype), None, None, None, None, None, None, None, None


def cka_loss_triton(xs, pos_s, head_s, y, pos_t, head_t, *, ds: int, dt: int, eps: float = 1e-8):
    """Fused gather + ``sum_p (1 - CKA_p)``; see the module docstring. Returns ``(loss, cka [P])``."""
    head_s = head_s.to(device=xs.device, dtype=torch.int32)
    head_t = head_t.to(device=xs.device, dtype=torch.int32)
    pos_s = pos_s.to(device=xs.device, dtype=torch.int32)
    pos_t = None if pos_t is None else pos_t.to(device=xs.device, dtype=torch.int32)
    return CKAFunction.apply(xs, pos_s, head_s, y.to(xs.device), pos_t, head_t, ds, dt, eps)

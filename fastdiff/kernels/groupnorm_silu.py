"""Fused GroupNorm + SiLU, forward and backward, NCHW or channels_last.

    x̂ = (x − μ_bg) · rstd_bg,   z = γ_c x̂ + β_c,   y = SiLU(z) = z · σ(z)

One program per (sample, channel) plane, so a batch of 4 at 128 channels launches
512 programs, not B × G = 128; per-plane partial sums are reduced to group
statistics in between. Reads and writes use the input's strides, so NCHW and
channels_last take the same kernels.

Backward (per group of n = C/G · H · W elements):
    ∂z = ∂y · σ(z) (1 + z (1 − σ(z)))                      (SiLU')
    ∂β_c = Σ_{b,hw} ∂z,   ∂γ_c = Σ_{b,hw} ∂z · x̂
    ∂x̂ = γ_c ∂z
    ∂x = rstd · (∂x̂ − mean_g(∂x̂) − x̂ · mean_g(∂x̂ · x̂))
and mean_g(∂x̂) = Σ_{c∈g} γ_c Σ_hw ∂z / n, mean_g(∂x̂ x̂) = Σ_{c∈g} γ_c Σ_hw ∂z x̂ / n, so the
per-plane sums Σ∂z and Σ∂z·x̂ of the first backward pass give every reduction needed.

Layout: kernels → launchers → torch reference → registration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdiff.kernels import like_fake, use_triton
from fastdiff.tuning import dense_layout


@triton.jit
def _plane(w_ptr, bias_ptr, mean_ptr, rstd_ptr, C, CPG, stride_b, stride_c):
    """This program's (b, c) plane: its (b, group) index, the group's mean and rstd, the
    channel's affine γ and β, and the plane's offset."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    bg = b * (C // CPG) + c // CPG
    mean = tl.load(mean_ptr + bg)
    rstd = tl.load(rstd_ptr + bg)
    gamma = tl.load(w_ptr + c).to(tl.float32)
    beta = tl.load(bias_ptr + c).to(tl.float32)
    return bg, mean, rstd, gamma, beta, b * stride_b + c * stride_c


@triton.jit
def _silu_grad(dy, xhat, gamma, beta):
    """∂z = ∂y · σ(z) (1 + z (1 − σ(z))) at z = γ x̂ + β."""
    z = xhat * gamma + beta
    s = 1.0 / (1.0 + tl.exp(-z))
    return dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def _plane_stats_kernel(x_ptr, sums_ptr, C, HW, stride_b, stride_c, stride_hw, BLOCK: tl.constexpr):
    # program (b, c): Σx and Σx² over the H·W plane, in fp32
    b = tl.program_id(0)
    c = tl.program_id(1)
    base = x_ptr + b * stride_b + c * stride_c
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(base + offs * stride_hw, mask=offs < HW, other=0.0).to(tl.float32)
        acc += v
        acc2 += v * v
    tl.store(sums_ptr + (b * C + c) * 2, tl.sum(acc, axis=0))
    tl.store(sums_ptr + (b * C + c) * 2 + 1, tl.sum(acc2, axis=0))


@triton.jit
def _fwd_apply_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    HW,
    CPG,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK: tl.constexpr,
):
    bg, mean, rstd, gamma, beta, off = _plane(
        w_ptr, bias_ptr, mean_ptr, rstd_ptr, C, CPG, stride_b, stride_c
    )
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        v = tl.load(x_ptr + off + offs * stride_hw, mask=mask, other=0.0).to(tl.float32)
        z = (v - mean) * rstd * gamma + beta
        y = z / (1.0 + tl.exp(-z))
        tl.store(y_ptr + off + offs * stride_hw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    C,
    HW,
    CPG,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK: tl.constexpr,
):
    # program (b, c): Σ∂z and Σ∂z·x̂ over the plane (z recomputed from x)
    bg, mean, rstd, gamma, beta, off = _plane(
        w_ptr, bias_ptr, mean_ptr, rstd_ptr, C, CPG, stride_b, stride_c
    )
    acc_dz = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_dzx = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        v = tl.load(x_ptr + off + offs * stride_hw, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off + offs * stride_hw, mask=mask, other=0.0).to(tl.float32)
        xhat = (v - mean) * rstd
        dz = _silu_grad(dy, xhat, gamma, beta)
        acc_dz += tl.where(mask, dz, 0.0)
        acc_dzx += tl.where(mask, dz * xhat, 0.0)
    plane = tl.program_id(0) * C + tl.program_id(1)
    tl.store(sums_ptr + plane * 2, tl.sum(acc_dz, axis=0))
    tl.store(sums_ptr + plane * 2 + 1, tl.sum(acc_dzx, axis=0))


@triton.jit
def _bwd_dx_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    m1_ptr,
    m2_ptr,
    C,
    HW,
    CPG,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK: tl.constexpr,
):
    bg, mean, rstd, gamma, beta, off = _plane(
        w_ptr, bias_ptr, mean_ptr, rstd_ptr, C, CPG, stride_b, stride_c
    )
    m1 = tl.load(m1_ptr + bg)  # mean_g(∂x̂)
    m2 = tl.load(m2_ptr + bg)  # mean_g(∂x̂ · x̂)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        v = tl.load(x_ptr + off + offs * stride_hw, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off + offs * stride_hw, mask=mask, other=0.0).to(tl.float32)
        xhat = (v - mean) * rstd
        dxhat = gamma * _silu_grad(dy, xhat, gamma, beta)
        dx = rstd * (dxhat - m1 - xhat * m2)
        tl.store(dx_ptr + off + offs * stride_hw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers
def _layout(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(HW, stride_b, stride_c, stride_hw) for NCHW or channels_last; else copy first."""
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    if sh != W * sw:
        raise ValueError("group_norm_silu needs H and W laid out together (NCHW or NHWC)")
    return H * W, sb, sc, sw


def _launch_config(HW: int) -> dict:
    return {"BLOCK": min(triton.next_power_of_2(HW), 1024)}


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x if dense_layout(x) else x.contiguous()


def group_norm_silu_fwd_triton(x, weight, bias, groups: int, eps: float):
    x = _prepare(x)
    B, C = x.shape[:2]
    HW, sb, sc, shw = _layout(x)
    cfg = _launch_config(HW)
    sums = torch.empty((B, C, 2), device=x.device, dtype=torch.float32)
    _plane_stats_kernel[(B, C)](x, sums, C, HW, sb, sc, shw, **cfg)
    n = (C // groups) * HW
    s = sums.view(B, groups, C // groups, 2).sum(2)  # (B, G, 2)
    mean = s[..., 0] / n
    var = (s[..., 1] / n - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    y = torch.empty_like(x)
    _fwd_apply_kernel[(B, C)](
        x,
        y,
        weight,
        bias,
        mean.contiguous(),
        rstd.contiguous(),
        C,
        HW,
        C // groups,
        sb,
        sc,
        shw,
        **cfg,
    )
    return y, mean, rstd


def group_norm_silu_bwd_triton(dy, x, weight, bias, mean, rstd, groups: int):
    x = _prepare(x)
    dy = (
        dy.contiguous(memory_format=torch.channels_last)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else dy.contiguous()
    )
    B, C = x.shape[:2]
    HW, sb, sc, shw = _layout(x)
    cfg = _launch_config(HW)
    sums = torch.empty((B, C, 2), device=x.device, dtype=torch.float32)
    _bwd_sums_kernel[(B, C)](
        dy, x, weight, bias, mean, rstd, sums, C, HW, C // groups, sb, sc, shw, **cfg
    )
    n = (C // groups) * HW
    gsums = (sums * weight.float().view(1, C, 1)).view(B, groups, C // groups, 2).sum(2) / n
    dx = torch.empty_like(x)
    _bwd_dx_kernel[(B, C)](
        dy,
        x,
        dx,
        weight,
        bias,
        mean,
        rstd,
        gsums[..., 0].contiguous(),
        gsums[..., 1].contiguous(),
        C,
        HW,
        C // groups,
        sb,
        sc,
        shw,
        **cfg,
    )
    dbias = sums[..., 0].sum(0).to(weight.dtype)
    dweight = sums[..., 1].sum(0).to(weight.dtype)
    return dx, dweight, dbias


# ------------------------------------------------------------------ reference
def group_norm_silu_reference(x, weight, bias, groups: int, eps: float):
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def _stats_reference(x, groups: int, eps: float):
    xg = x.float().reshape(x.shape[0], groups, -1)
    mean = xg.mean(-1)
    rstd = torch.rsqrt(xg.var(-1, unbiased=False) + eps)
    return mean, rstd


def group_norm_silu_bwd_reference(dy, x, weight, bias, groups: int, eps: float):
    """The backward of the module docstring in plain torch (a custom op's body runs below
    autograd, so it cannot differentiate the forward reference itself)."""
    B, C = x.shape[:2]
    mean, rstd = _stats_reference(x, groups, eps)  # (B, G)
    xg = x.float().reshape(B, groups, -1)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    gamma = weight.float().view(1, C, 1, 1)
    z = xhat * gamma + bias.float().view(1, C, 1, 1)
    s = torch.sigmoid(z)
    dz = dy.float() * s * (1 + z * (1 - s))
    dxhat = (dz * gamma).reshape(B, groups, -1)
    xh = xhat.reshape(B, groups, -1)
    dx = rstd[..., None] * (
        dxhat - dxhat.mean(-1, keepdim=True) - xh * (dxhat * xh).mean(-1, keepdim=True)
    )
    return (
        like_fake(dx.reshape(x.shape).to(x.dtype), x),
        (dz * xhat).sum((0, 2, 3)).to(weight.dtype),
        dz.sum((0, 2, 3)).to(bias.dtype),
    )


# --------------------------------------------------------------- registration
@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _gn_silu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return group_norm_silu_fwd_triton(x, weight, bias, groups, eps)
    mean, rstd = _stats_reference(x, groups, eps)
    return like_fake(group_norm_silu_reference(x, weight, bias, groups, eps), x), mean, rstd


@_gn_silu_op.register_fake
def _(x, weight, bias, groups, eps):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


@torch.library.custom_op("fastdiff::group_norm_silu_backward", mutates_args=())
def _gn_silu_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return group_norm_silu_bwd_triton(dy, x, weight, bias, mean, rstd, groups)
    return tuple(group_norm_silu_bwd_reference(dy, x, weight, bias, groups, eps))


@_gn_silu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.groups, ctx.eps = groups, eps


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _gn_silu_bwd_op(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.eps)
    return dx, dweight, dbias, None, None


_gn_silu_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float = 1e-5
) -> torch.Tensor:
    """SiLU(GroupNorm(x)) for x of shape (B, C, H, W), NCHW or channels_last."""
    if x.ndim != 4 or x.shape[1] % groups:
        raise ValueError(
            f"group_norm_silu needs (B, C, H, W) with C divisible by groups={groups},"
            f" got {tuple(x.shape)}"
        )
    return _gn_silu_op(x, weight, bias, groups, float(eps))[0]

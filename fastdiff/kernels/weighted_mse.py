"""Fused Min-SNR-weighted ε-MSE: per-sample loss and its gradient in Triton.

    loss_b = w(t_b) · (1/N) Σ_i (ε̂_bi − ε_bi)²,   w = 1 (uniform) or min(SNR, γ)/SNR (minsnr),
    SNR(t) = ᾱ_t / (1 − ᾱ_t)

read straight from the prediction, the target, the timesteps and the ᾱ table: no
(B, C, H, W) temporary for the difference, no gathered weight tensor.

Layout: kernels (forward, backward) → launcher → torch reference → registration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import like_fake, use_triton
from fastdiff.tuning import dense_layout

WEIGHTINGS = {"uniform": 0, "minsnr": 1}
BLOCK = 1024


@triton.jit
def _weight(ac_ptr, t, gamma, MINSNR: tl.constexpr):
    """w(t) for one sample, in fp32 (see fastdiff.diffusion.loss_weight)."""
    a = tl.load(ac_ptr + t).to(tl.float32)
    if MINSNR:
        snr = a / (1.0 - a)
        w = tl.where(snr > 0, tl.minimum(snr, gamma) / snr, 1.0)
    else:
        w = a * 0.0 + 1.0
    return w


@triton.jit
def _chunk(
    pred_ptr, target_ptr, t_ptr, ac_ptr, N, gamma, MINSNR: tl.constexpr, BLOCK: tl.constexpr
):
    """Program (b, k): its chunk of sample b, the difference ε̂ − ε there (fp32) and w(t_b)."""
    b = tl.program_id(0)
    k = tl.program_id(1)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.load(pred_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(target_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    return b, k, offs, mask, p - e, _weight(ac_ptr, tl.load(t_ptr + b), gamma, MINSNR)


@triton.jit
def _fwd_kernel(
    pred_ptr,
    target_ptr,
    t_ptr,
    ac_ptr,
    partial_ptr,
    N,
    CHUNKS,
    gamma,
    MINSNR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid (B, CHUNKS): program (b, k) sums w·(ε̂−ε)²/N over its chunk of sample b;
    # the CHUNKS partials of a sample are added afterwards (deterministic, no atomics).
    b, k, offs, mask, d, w = _chunk(pred_ptr, target_ptr, t_ptr, ac_ptr, N, gamma, MINSNR, BLOCK)
    tl.store(partial_ptr + b * CHUNKS + k, w * tl.sum(d * d, axis=0) / N)


@triton.jit
def _bwd_kernel(
    grad_out_ptr,
    pred_ptr,
    target_ptr,
    t_ptr,
    ac_ptr,
    grad_pred_ptr,
    N,
    gamma,
    MINSNR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ∂loss_b/∂ε̂_bi = 2 w(t_b) (ε̂_bi − ε_bi) / N, times the incoming ∂L/∂loss_b.
    # The target (ε) is data: it gets no gradient.
    b, k, offs, mask, d, w = _chunk(pred_ptr, target_ptr, t_ptr, ac_ptr, N, gamma, MINSNR, BLOCK)
    g = tl.load(grad_out_ptr + b).to(tl.float32)
    grad = (2.0 * w * g / N) * d
    tl.store(grad_pred_ptr + b * N + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers
def _flat(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """pred and target with one dense layout, pred's own where it has one (NCHW or
    channels_last), and N = C·H·W. In both layouts sample b is the N elements from
    b·N in memory, and a sample's loss sums them in any order, so the kernels index
    the storage flat: no copy of the channels_last prediction, and the gradient comes
    back in its layout, as the fake says."""
    if not dense_layout(pred):
        pred = pred.contiguous()
    channels_last = not pred.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return pred, target.contiguous(memory_format=fmt), pred[0].numel()


def weighted_mse_fwd_triton(pred, target, t, alphas_cumprod, gamma: float, weighting: str):
    p, e, N = _flat(pred, target)
    B, chunks = p.shape[0], triton.cdiv(N, BLOCK)
    partial = torch.empty((B, chunks), device=p.device, dtype=torch.float32)
    _fwd_kernel[(B, chunks)](
        p,
        e,
        t.contiguous(),
        alphas_cumprod.contiguous(),
        partial,
        N,
        chunks,
        float(gamma),
        MINSNR=WEIGHTINGS[weighting] == 1,
        BLOCK=BLOCK,
    )
    return partial.sum(1)


def weighted_mse_bwd_triton(
    grad_out, pred, target, t, alphas_cumprod, gamma: float, weighting: str
):
    p, e, N = _flat(pred, target)
    B = p.shape[0]
    grad = torch.empty_like(p)  # p's dense layout, which is empty_like(pred)'s for dense pred
    _bwd_kernel[(B, triton.cdiv(N, BLOCK))](
        grad_out.contiguous().float(),
        p,
        e,
        t.contiguous(),
        alphas_cumprod.contiguous(),
        grad,
        N,
        float(gamma),
        MINSNR=WEIGHTINGS[weighting] == 1,
        BLOCK=BLOCK,
    )
    return like_fake(grad, pred)


# ------------------------------------------------------------------ reference
def weighted_mse_reference(pred, target, t, alphas_cumprod, gamma: float, weighting: str):
    """The same maths in plain torch, from the diffusion module's own functions."""
    from fastdiff.diffusion import eps_mse, loss_weight, snr

    w = loss_weight(snr(alphas_cumprod.double()[t]), weighting, gamma)
    return eps_mse(pred, target, w.float())


def weighted_mse_bwd_reference(grad_out, pred, target, t, alphas_cumprod, gamma, weighting):
    from fastdiff.diffusion import loss_weight, snr

    w = loss_weight(snr(alphas_cumprod.double()[t]), weighting, gamma).float()
    scale = (2 * w * grad_out.float() / pred[0].numel()).view(-1, *([1] * (pred.ndim - 1)))
    return like_fake((scale * (pred.float() - target.float())).to(pred.dtype), pred)


# --------------------------------------------------------------- registration
@torch.library.custom_op("fastdiff::weighted_mse", mutates_args=())
def _weighted_mse_op(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float,
    weighting: str,
) -> torch.Tensor:
    if use_triton(pred):
        return weighted_mse_fwd_triton(pred, target, t, alphas_cumprod, gamma, weighting)
    return weighted_mse_reference(pred, target, t, alphas_cumprod, gamma, weighting)


@_weighted_mse_op.register_fake
def _(pred, target, t, alphas_cumprod, gamma, weighting):
    return pred.new_empty((pred.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdiff::weighted_mse_backward", mutates_args=())
def _weighted_mse_bwd_op(
    grad_out: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float,
    weighting: str,
) -> torch.Tensor:
    if use_triton(pred):
        return weighted_mse_bwd_triton(grad_out, pred, target, t, alphas_cumprod, gamma, weighting)
    return weighted_mse_bwd_reference(grad_out, pred, target, t, alphas_cumprod, gamma, weighting)


@_weighted_mse_bwd_op.register_fake
def _(grad_out, pred, target, t, alphas_cumprod, gamma, weighting):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, t, alphas_cumprod, gamma, weighting = inputs
    ctx.save_for_backward(pred, target, t, alphas_cumprod)
    ctx.gamma, ctx.weighting = gamma, weighting


def _backward(ctx, grad_out):
    pred, target, t, alphas_cumprod = ctx.saved_tensors
    grad = _weighted_mse_bwd_op(grad_out, pred, target, t, alphas_cumprod, ctx.gamma, ctx.weighting)
    return grad, None, None, None, None, None


_weighted_mse_op.register_autograd(_backward, setup_context=_setup_context)


def weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float = 5.0,
    weighting: str = "minsnr",
) -> torch.Tensor:
    """Per-sample weighted ε-MSE, shape (B,), fp32. ``alphas_cumprod``: (T,) on pred's device."""
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}"
        )
    if weighting == "minsnr" and not gamma > 0:
        raise ValueError(f"loss.minsnr_gamma must be > 0, got {gamma}")
    return _weighted_mse_op(pred, target, t, alphas_cumprod, float(gamma), weighting)

"""Fused weighted MSE: per-sample loss and its gradient in Triton.

    loss_b = w[t_b] · (1/N) Σ_i (out_bi − target_bi)²

read straight from the prediction, the target, the timesteps and the run's weight table
w (T,), which :mod:`fastdiff.weighting` makes for any family and prediction target: no
(B, C, H, W) temporary for the difference, no gathered weight tensor, and no second
copy of any weighting formula here, so every family the registry has runs fused.

Layout: kernels (forward, backward) → launchers → torch reference → registration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import like_fake, use_triton
from fastdiff.tuning import dense_layout

BLOCK = 1024


@triton.jit
def _chunk(pred_ptr, target_ptr, t_ptr, w_ptr, N, BLOCK: tl.constexpr):
    """Program (b, k): its chunk of sample b, the difference out − target (fp32) and w[t_b]."""
    b = tl.program_id(0)
    k = tl.program_id(1)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.load(pred_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(target_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + tl.load(t_ptr + b)).to(tl.float32)
    return b, k, offs, mask, p - e, w


@triton.jit
def _fwd_kernel(pred_ptr, target_ptr, t_ptr, w_ptr, partial_ptr, N, CHUNKS, BLOCK: tl.constexpr):
    # grid (B, CHUNKS): program (b, k) sums w·(out−target)²/N over its chunk of sample b;
    # the CHUNKS partials of a sample are added afterwards (deterministic, no atomics).
    b, k, offs, mask, d, w = _chunk(pred_ptr, target_ptr, t_ptr, w_ptr, N, BLOCK)
    tl.store(partial_ptr + b * CHUNKS + k, w * tl.sum(d * d, axis=0) / N)


@triton.jit
def _bwd_kernel(
    grad_out_ptr, pred_ptr, target_ptr, t_ptr, w_ptr, grad_pred_ptr, N, BLOCK: tl.constexpr
):
    # ∂loss_b/∂out_bi = 2 w[t_b] (out_bi − target_bi) / N, times the incoming ∂L/∂loss_b.
    # The target is data: it gets no gradient.
    b, k, offs, mask, d, w = _chunk(pred_ptr, target_ptr, t_ptr, w_ptr, N, BLOCK)
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


def weighted_mse_fwd_triton(pred, target, t, weights):
    p, e, N = _flat(pred, target)
    B, chunks = p.shape[0], triton.cdiv(N, BLOCK)
    partial = torch.empty((B, chunks), device=p.device, dtype=torch.float32)
    _fwd_kernel[(B, chunks)](
        p, e, t.contiguous(), weights.float().contiguous(), partial, N, chunks, BLOCK=BLOCK
    )
    return partial.sum(1)


def weighted_mse_bwd_triton(grad_out, pred, target, t, weights):
    p, e, N = _flat(pred, target)
    B = p.shape[0]
    grad = torch.empty_like(p)  # p's dense layout, which is empty_like(pred)'s for dense pred
    _bwd_kernel[(B, triton.cdiv(N, BLOCK))](
        grad_out.contiguous().float(),
        p,
        e,
        t.contiguous(),
        weights.float().contiguous(),
        grad,
        N,
        BLOCK=BLOCK,
    )
    return like_fake(grad, pred)


# ------------------------------------------------------------------ reference
def weighted_mse_reference(pred, target, t, weights):
    """The same maths in plain torch, from the diffusion module's own function."""
    from fastdiff.diffusion import weighted_mse as torch_weighted_mse

    return torch_weighted_mse(pred, target, weights.float()[t])


def weighted_mse_bwd_reference(grad_out, pred, target, t, weights):
    w = weights.float()[t]
    scale = (2 * w * grad_out.float() / pred[0].numel()).view(-1, *([1] * (pred.ndim - 1)))
    return like_fake((scale * (pred.float() - target.float())).to(pred.dtype), pred)


# --------------------------------------------------------------- registration
@torch.library.custom_op("fastdiff::weighted_mse", mutates_args=())
def _weighted_mse_op(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    if use_triton(pred):
        return weighted_mse_fwd_triton(pred, target, t, weights)
    return weighted_mse_reference(pred, target, t, weights)


@_weighted_mse_op.register_fake
def _(pred, target, t, weights):
    return pred.new_empty((pred.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdiff::weighted_mse_backward", mutates_args=())
def _weighted_mse_bwd_op(
    grad_out: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    if use_triton(pred):
        return weighted_mse_bwd_triton(grad_out, pred, target, t, weights)
    return weighted_mse_bwd_reference(grad_out, pred, target, t, weights)


@_weighted_mse_bwd_op.register_fake
def _(grad_out, pred, target, t, weights):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    pred, target, t, weights = ctx.saved_tensors
    return _weighted_mse_bwd_op(grad_out, pred, target, t, weights), None, None, None


_weighted_mse_op.register_autograd(_backward, setup_context=_setup_context)


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-sample weighted MSE, shape (B,), fp32: w[t_b] · mean (pred_b − target_b)².
    ``weights``: the run's (T,) table (:func:`fastdiff.weighting.weights`) on pred's device."""
    if weights.ndim != 1 or t.ndim != 1 or t.shape[0] != pred.shape[0]:
        raise ValueError(
            f"weighted_mse takes a (T,) weight table and (B,) timesteps for a batch of "
            f"{pred.shape[0]}, got weights {tuple(weights.shape)} and t {tuple(t.shape)}"
        )
    return _weighted_mse_op(pred, target, t, weights)

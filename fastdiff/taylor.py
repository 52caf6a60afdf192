"""vᵀHv of the ε-MSE loss without a backward pass: second-order Taylor mode.

For g(ε) = L(θ + εv), vᵀHv = g''(0). Pushing the truncated series
x(ε) = x₀ + ε·x₁ + ε²·x₂ through the network gives L's coefficient L₂ = g''(0)/2.
Every op needs only a forward rule:

- linear ops (reshape, cat, upsampling, sums):   y_k = f(x_k)
- bilinear ops (conv, linear, matmul, product):   y₁ = f(x₁,w₀) + f(x₀,w₁)
                                                  y₂ = f(x₂,w₀) + f(x₁,w₁) + f(x₀,w₂)
- elementwise φ (SiLU, (·+eps)^-½):               y₁ = φ'x₁,  y₂ = φ'x₂ + ½φ''x₁²
- softmax s (rows):   s₁ = s₀⊙u,  s₂ = s₀⊙(a₂ − ⟨a₂⟩ + ½(u² − ⟨u²⟩)),  u = a₁ − ⟨a₁⟩

A conv layer costs 4 convolutions per probe (y₁: 2, y₂: 2, as w₂ = 0) where
forward-over-reverse (``jvp`` of ``grad``) or PyHessian's double backward cost about
6, and nothing is kept for a backward pass. The rules are written for one probe and
:mod:`fastdiff.curvature` batches the K probes with ``torch.func.vmap``: x₀ carries no
probe dimension and runs once, convolutions fold the probes into the batch (x·w₀) or
the output channels (x₀·w₁), and x₁·w₁ (both sides vary with the probe) has its own
batching rule (:func:`probe_conv`). Series are kept channels_last per image, stored
(K, B, H, W, C) under vmap, so every fold is a view: these convolutions run several
times faster channels_last on CPU (docs/performance.md#measurements-behind-choices-in-the-code),
and vmap's defaults (a grouped convolution, NCHW cat) would copy between layouts at
most layers.

This walks fastdiff's own UNet (``fastdiff.unet``) in eval mode (dropout off) with
the torch reference ops; the general ``jvp(grad)`` path in :mod:`fastdiff.curvature`
covers any other model, and the tests hold the two to the same values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.unet import Attention, GroupNormSiLU, ResBlock, UNet, timestep_embedding


class Jet(NamedTuple):
    """x(ε) = c0 + ε·c1 + ε²·c2; c1/c2 None means zero."""

    c0: torch.Tensor
    c1: torch.Tensor | None = None
    c2: torch.Tensor | None = None


def _add(*terms: torch.Tensor | None) -> torch.Tensor | None:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    out = present[0]
    for t in present[1:]:
        out = out + t
    return out


def linear(f: Callable, x: Jet) -> Jet:
    return Jet(*(None if c is None else f(c) for c in x))


def bilinear(f: Callable, x: Jet, w: Jet) -> Jet:
    def term(a, b):
        return None if a is None or b is None else f(a, b)

    return Jet(
        f(x.c0, w.c0),
        _add(term(x.c1, w.c0), term(x.c0, w.c1)),
        _add(term(x.c2, w.c0), term(x.c1, w.c1), term(x.c0, w.c2)),
    )


def _layer(
    f: Callable, x: Jet, w: Jet, b: Jet, *, both: Callable | None = None, settle=None
) -> Jet:
    """f(x, w) + b for a layer whose parameters move linearly (w₂ = b₂ = 0), biases
    inside ``f``. ``both(x₁, w₁)`` computes the term where both sides vary with the
    probe (default ``f``); ``settle`` lays out c₁ when it is x₀·w₁ alone."""
    both = both or f
    c1 = f(x.c0, w.c1, b.c1)
    c2 = None
    if x.c1 is None:
        c1 = settle(c1) if settle else c1
    else:
        c1 = f(x.c1, w.c0).add_(c1)
        c2 = both(x.c1, w.c1)
    if x.c2 is not None:
        c2 = f(x.c2, w.c0) if c2 is None else f(x.c2, w.c0).add_(c2)
    return Jet(f(x.c0, w.c0, b.c0), c1, c2)


def conv2d(x: Jet, w: Jet, b: Jet, *, stride, padding) -> Jet:
    """conv(x, w) + b. Under vmap x₀·w₁ comes out as (B, K·C, H, W), strided across
    probes: settled channels_last when it stands alone."""

    def conv(a, weight, bias=None):
        return F.conv2d(a, weight, bias, stride, padding)

    def both(a, weight):
        return probe_conv(a, weight, _pair(stride), _pair(padding))

    return _layer(conv, x, w, b, both=both, settle=_channels_last)


def linear_layer(x: Jet, w: Jet, b: Jet) -> Jet:
    """x·wᵀ + b."""
    return _layer(F.linear, x, w, b)


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _channels_last(c: torch.Tensor) -> torch.Tensor:
    """c (B, C, H, W) stored as (B, H, W, C), under vmap as (K, B, H, W, C): folding the
    probes into the batch is then a view, and convolutions need no copies."""
    return c.movedim(-3, -1).contiguous().movedim(-1, -3)


@torch.library.custom_op("fastdiff::probe_conv", mutates_args=())
def probe_conv(
    x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int]
) -> torch.Tensor:
    """conv2d(x, w), where both vary with the probe: its own batching rule below."""
    return F.conv2d(x, w, None, stride, padding)


@probe_conv.register_vmap
def _probe_conv_batched(info, in_dims, x, w, stride, padding):
    """Probe k's activations meet probe k's weights: one convolution per probe, written
    into a channels_last-per-image (K, B, C, H, W) buffer that folds back into the
    batch as a view. vmap's own rule (one grouped convolution) moves x to (B, K·C, H, W)
    and returns (K, B, C, H, W) strided across probes: two copies per layer, which
    made the whole probe measurably slower (unet_cifar32, 8 probes;
    docs/performance.md#measurements-behind-choices-in-the-code)."""
    K = info.batch_size
    x = x.expand(K, *x.shape) if in_dims[0] is None else x.movedim(in_dims[0], 0)
    w = w.expand(K, *w.shape) if in_dims[1] is None else w.movedim(in_dims[1], 0)
    out = None
    for k in range(K):
        y = F.conv2d(x[k], w[k], None, stride, padding)
        if out is None:
            B, C, H, W = y.shape
            out = torch.empty(K, B, H, W, C, dtype=y.dtype, device=y.device).movedim(-1, -3)
        out[k].copy_(y)
    return out, 0


def add(a: Jet, b: Jet) -> Jet:
    return Jet(a.c0 + b.c0, _add(a.c1, b.c1), _add(a.c2, b.c2))


def elementwise(x: Jet, f: torch.Tensor, df: torch.Tensor, half_d2f: torch.Tensor) -> Jet:
    """φ applied elementwise, given φ(x₀), φ'(x₀) and ½φ''(x₀)."""
    if x.c1 is None:
        return Jet(f, None, None if x.c2 is None else df * x.c2)
    c1 = df * x.c1
    c2 = (
        half_d2f * x.c1.square()
        if x.c2 is None
        else torch.addcmul(df * x.c2, half_d2f * x.c1, x.c1)
    )
    return Jet(f, c1, c2)


def silu(x: Jet) -> Jet:
    s = torch.sigmoid(x.c0)
    df = s * (1 + x.c0 * (1 - s))
    half_d2f = 0.5 * s * (1 - s) * (2 + x.c0 * (1 - 2 * s))
    return elementwise(x, x.c0 * s, df, half_d2f)


def softmax(a: Jet) -> Jet:
    """Row softmax over the last dim."""
    s = torch.softmax(a.c0, dim=-1)

    def centred(c):
        return c - (s * c).sum(-1, keepdim=True)

    if a.c1 is None and a.c2 is None:
        return Jet(s)
    u = None if a.c1 is None else centred(a.c1)
    c1 = None if u is None else s * u
    c2 = _add(
        None if a.c2 is None else s * centred(a.c2),
        None if u is None else 0.5 * s * centred(u.square()),
    )
    return Jet(s, c1, c2)


def group_norm(x: Jet, gamma: Jet, beta: Jet, *, groups: int, eps: float) -> Jet:
    """GroupNorm as y = x·a + b with per-(sample, channel) a = γ·rstd and b = β − μ·a:
    the full-size tensors see 8 reductions and 5 fused multiply-adds; the group
    statistics' own series are tiny."""
    C = x.c0.shape[1]
    xg = linear(lambda c: c.reshape(*c.shape[:-3], groups, -1), x)
    mean = linear(lambda c: c.mean(-1, keepdim=True), xg)
    centred = xg.c0 - mean.c0
    # var = E[(x - μ)²]: var₁ = 2E[c₀x₁], var₂ = 2E[c₀x₂] + E[x₁²] − μ₁² (as E[c₀] = 0)
    var1 = None if xg.c1 is None else 2 * (centred * xg.c1).mean(-1, keepdim=True)
    var2 = _add(
        None if xg.c2 is None else 2 * (centred * xg.c2).mean(-1, keepdim=True),
        None if xg.c1 is None else xg.c1.square().mean(-1, keepdim=True) - mean.c1.square(),
    )
    var = Jet(centred.square().mean(-1, keepdim=True), var1, var2)
    v = var.c0 + eps
    rstd = elementwise(var, v.rsqrt(), -0.5 * v.pow(-1.5), 0.375 * v.pow(-2.5))

    def per_channel(c):  # (..., B, G, 1) -> (..., B, C)
        return c.expand(*c.shape[:-1], C // groups).flatten(-2)

    scale = bilinear(torch.mul, linear(per_channel, rstd), gamma)
    shift = add(beta, linear(torch.neg, bilinear(torch.mul, linear(per_channel, mean), scale)))
    return affine(x, scale, shift)


def affine(x: Jet, a: Jet, b: Jet) -> Jet:
    """x·a + b for x (B, C, H, W) and per-(sample, channel) a, b (B, C), as addcmuls."""

    def fma(acc, u, w):  # acc + u·w[..., None, None]; None factors drop out
        if u is None or w is None:
            return acc
        w = w[..., None, None]
        return u * w if acc is None else torch.addcmul(acc, u, w)

    def spatial(c):
        return None if c is None else c[..., None, None]

    c1 = fma(fma(spatial(b.c1), x.c0, a.c1), x.c1, a.c0)
    c2 = fma(fma(fma(spatial(b.c2), x.c0, a.c2), x.c1, a.c1), x.c2, a.c0)
    return Jet(torch.addcmul(spatial(b.c0), x.c0, a.c0[..., None, None]), c1, c2)


class _Walker:
    """Pushes jets through the UNet, with the parameters' jets (θ, v, 0) by module."""

    def __init__(self, model: UNet, params: dict[str, Jet]):
        self.params = {}
        for prefix, module in model.named_modules():
            names = (n for n, _ in module.named_parameters(recurse=False))
            self.params[module] = {n: params[f"{prefix}.{n}" if prefix else n] for n in names}

    def __call__(self, module: nn.Module, x: Jet, temb=None) -> Jet:
        p = self.params[module]
        if isinstance(module, nn.Conv2d):
            return conv2d(x, p["weight"], p["bias"], stride=module.stride, padding=module.padding)
        if isinstance(module, nn.Linear):
            return linear_layer(x, p["weight"], p["bias"])
        if isinstance(module, nn.GroupNorm):
            out = group_norm(x, p["weight"], p["bias"], groups=module.num_groups, eps=module.eps)
            return silu(out) if isinstance(module, GroupNormSiLU) else out
        if isinstance(module, nn.SiLU):
            return silu(x)
        if isinstance(module, nn.Dropout | nn.Identity):  # eval mode: identity
            return x
        if isinstance(module, nn.Upsample):
            return linear(lambda c: F.interpolate(c, scale_factor=2, mode="nearest"), x)
        if isinstance(module, nn.Sequential):
            for layer in module:
                x = self(layer, x)
            return x
        if isinstance(module, nn.ModuleList):  # ResBlock [+ Attention]
            x = self(module[0], x, next(temb))
            return self(module[1], x) if len(module) > 1 else x
        if isinstance(module, ResBlock):  # temb: this block's time projection
            h = self(module.conv1, self(module.norm1, x))
            t = linear(lambda c: c[..., None, None], temb)
            h = self(module.conv2, self(module.norm2, add(h, t)))
            return add(self(module.skip, x), h)
        if isinstance(module, Attention):
            return add(x, self._attention(module, x))
        raise TypeError(f"no Taylor rule for {type(module).__name__}")

    def _attention(self, module: Attention, x: Jet) -> Jet:
        _, C, H, W = x.c0.shape
        qkv = self(module.qkv, self(module.norm, x))
        tokens = linear(lambda c: c.reshape(*c.shape[:-3], 3, C, H * W), qkv)
        q, k, v = (linear(lambda c, i=i: c[..., i, :, :], tokens) for i in range(3))  # (.., C, HW)
        scores = bilinear(lambda a, b: a.transpose(-1, -2) @ b / math.sqrt(C), q, k)
        attn = softmax(scores)  # (..., B, HW_q, HW_k)
        # (..., B, C, HW_q), computed as its transpose: channels_last for the projection
        h = bilinear(lambda vv, a: (a @ vv.transpose(-1, -2)).transpose(-1, -2), v, attn)
        return self(module.proj, linear(lambda c: c.unflatten(-1, (H, W)), h))


def unet_jet(model: UNet, params: dict[str, Jet], x: torch.Tensor, t: torch.Tensor) -> Jet:
    """The model's output as a jet in the direction of the parameters' c1."""
    walk = _Walker(model, params)
    temb = silu(walk(model.temb, Jet(timestep_embedding(t, model.base_channels).to(x.dtype))))
    stacked = walk(model.temb_proj, temb)  # every block's projection, in forward order
    edges = [0, *itertools.accumulate(model.temb_sizes)]
    projs = iter([linear(lambda c, a=a, b=b: c[..., a:b], stacked) for a, b in pairwise(edges)])
    h = walk(model.conv_in, Jet(x))
    hs = [h]
    for layer in model.down:
        h = walk(layer, h, projs)
        hs.append(h)
    h = walk(model.mid[0], h, next(projs))
    h = walk(model.mid[2], walk(model.mid[1], h), next(projs))
    for layer in model.up:
        if isinstance(layer, nn.ModuleList):
            h = _cat(h, hs.pop())
        h = walk(layer, h, projs)
    return walk(model.out, h)


def _cat(a: Jet, b: Jet) -> Jet:
    """Channel concatenation, joined channels-last: under vmap a plain cat of (B, C, H, W)
    returns its series NCHW and costs the next convolutions a copy. A zero coefficient
    on one side becomes explicit zeros."""

    def cat(x, y, x0, y0):
        if x is None and y is None:
            return None
        parts = (torch.zeros_like(c0) if c is None else c for c, c0 in ((x, x0), (y, y0)))
        return torch.cat([c.movedim(-3, -1) for c in parts], -1).movedim(-1, -3)

    return Jet(torch.cat([a.c0, b.c0], 1), cat(a.c1, b.c1, a.c0, b.c0), cat(a.c2, b.c2, a.c0, b.c0))


def vhv_taylor(
    model: UNet,
    params: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    *,
    t: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """vᵀHv of mean_b w_b·mean_pix (model(x_t, t) − target)² w.r.t. the parameters, for
    one probe v (a dict like ``params``); batch probes with ``torch.func.vmap``."""
    return (weight * vhv_taylor_per_sample(model, params, v, x_t, t=t, target=target)).mean()


def vhv_taylor_per_sample(
    model: UNet,
    params: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    *,
    t: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """(B,): vᵀH_b v of each sample's unweighted loss mean_pix (model(x_t, t) − target)²,
    all from one forward pass: any weighting, batch subset or bin of the trace is then
    a weighted mean of these, with the same probe vector."""
    out = unet_jet(model, {k: Jet(p, v[k]) for k, p in params.items()}, x_t, t)
    r0 = out.c0 - target
    # L_b(ε) = mean_pix r(ε)²: its ε² coefficient is mean_pix(2 r₀ r₂ + r₁²), and
    # vᵀH_b v = 2 × that coefficient (the second derivative of L_b(θ + εv) at 0)
    second = torch.addcmul(out.c1.square(), r0, out.c2, value=2)
    return 2 * second.flatten(1).mean(1)

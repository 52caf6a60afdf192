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
6, and nothing is kept for a backward pass. The K probes are batched by hand: x₀ has
the activation's shape and runs once, x₁ and x₂ carry a leading probe dimension
(K, B, C, H, W) that the rules broadcast against x₀; convolutions fold it into the
batch (x·w₀) or the output channels (x₀·w₁), and run x₁·w₁ once per probe, all
channels_last.
(``vmap`` would do the same folding but cannot keep channels_last, which is 2-4x
faster for these convolutions on CPU.)

This walks fastdiff's own UNet (``fastdiff.unet``) in eval mode (dropout off) with
the torch reference ops; the general ``jvp(grad)`` path in :mod:`fastdiff.curvature`
covers any other model, and the tests hold the two to the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _empty(lead: tuple[int, ...], c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(*lead, C, H, W) stored as (*lead, H, W, C): channels_last per image, so folding
    the probe dim into the batch stays a view and convolutions need no copies."""
    out = torch.empty(*lead, h, w, c, dtype=like.dtype, device=like.device)
    return out.movedim(-1, -3)


def _fold(c: torch.Tensor) -> torch.Tensor:  # (K, B, C, H, W) -> (K·B, C, H, W)
    return c.flatten(0, 1) if c.dim() == 5 else c


def _per_probe(c: torch.Tensor, k: int) -> torch.Tensor:  # (B, K·C, H, W) -> (K, B, C, H, W)
    return c.unflatten(1, (k, -1)).transpose(0, 1)


def _accumulate(acc: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """acc + term, in acc's layout (a fresh channels_last copy when acc is None)."""
    if acc is None:
        return _empty(term.shape[:2], *term.shape[2:], like=term).copy_(term)
    return acc.add_(term)


def conv2d(x: Jet, w: Jet, b: Jet, stride, padding) -> Jet:
    """conv(x, w) + b, biases inside the convolutions; w₁, b₁ carry the probe dim, w₂ = 0."""

    def conv(a, weight, bias=None, groups=1):
        return F.conv2d(_cl(a), weight, bias, stride, padding, 1, groups)

    K = w.c1.shape[0]
    w0, w1 = _cl(w.c0), _cl(w.c1.flatten(0, 1))  # w1: (K·Cout, Cin, kh, kw)
    y1 = y2 = None
    if x.c2 is not None:
        y2 = conv(_fold(x.c2), w0).unflatten(0, (K, -1))
    if x.c1 is not None:
        y1 = conv(_fold(x.c1), w0).unflatten(0, (K, -1))
        # x₁·w₁: probe k's activations meet probe k's weights. One convolution per probe
        # beats a grouped one here: no transposed copies of x₁ in or of y₂ out.
        per_probe = w1.unflatten(0, (K, -1))
        for k in range(K):
            term = conv(x.c1[k], per_probe[k])
            if y2 is None:
                y2 = _empty((K,), *term.shape, like=term)
            if x.c2 is None:
                y2[k].copy_(term)
            else:
                y2[k].add_(term)
    y1 = _accumulate(y1, _per_probe(conv(x.c0, w1, b.c1.flatten()), K))  # + x₀·w₁ + b₁
    return Jet(conv(x.c0, w0, b.c0), y1, y2)


def linear_layer(x: Jet, w: Jet, b: Jet) -> Jet:
    """x·wᵀ + b with w₁ (K, out, in), b₁ (K, out); x₁, x₂ (K, B, in)."""
    w1t = w.c1.transpose(-1, -2)
    y1 = torch.baddbmm(b.c1[:, None], x.c0.expand(w1t.shape[0], -1, -1), w1t)
    y2 = None
    if x.c1 is not None:
        y1 = y1 + F.linear(x.c1, w.c0)
        y2 = torch.bmm(x.c1, w1t)
    if x.c2 is not None:
        y2 = _add(y2, F.linear(x.c2, w.c0))
    return Jet(F.linear(x.c0, w.c0, b.c0), y1, y2)


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


def group_norm(x: Jet, gamma: Jet, beta: Jet, groups: int, eps: float) -> Jet:
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

    gamma, beta = _vector(gamma), _vector(beta)
    scale = bilinear(torch.mul, linear(per_channel, rstd), gamma)
    shift = add(beta, linear(torch.neg, bilinear(torch.mul, linear(per_channel, mean), scale)))
    return affine(x, scale, shift)


def _vector(p: Jet) -> Jet:
    """A per-channel parameter (C,) with tangents (K, C), made to broadcast against
    per-sample activations (K, B, C)."""
    return Jet(p.c0, None if p.c1 is None else p.c1[:, None], p.c2)


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

    def __call__(self, module: nn.Module, x: Jet, temb: Jet | None = None) -> Jet:
        p = self.params[module]
        if isinstance(module, nn.Conv2d):
            return conv2d(x, p["weight"], p["bias"], module.stride, module.padding)
        if isinstance(module, nn.Linear):
            return linear_layer(x, p["weight"], p["bias"])
        if isinstance(module, nn.GroupNorm):
            out = group_norm(x, p["weight"], p["bias"], module.num_groups, module.eps)
            return silu(out) if isinstance(module, GroupNormSiLU) else out
        if isinstance(module, nn.SiLU):
            return silu(x)
        if isinstance(module, nn.Dropout | nn.Identity):  # eval mode: identity
            return x
        if isinstance(module, nn.Upsample):
            return linear(_images(lambda c: F.interpolate(c, scale_factor=2, mode="nearest")), x)
        if isinstance(module, nn.Sequential):
            for layer in module:
                x = self(layer, x)
            return x
        if isinstance(module, nn.ModuleList):  # ResBlock [+ Attention]
            x = self(module[0], x, temb)
            return self(module[1], x) if len(module) > 1 else x
        if isinstance(module, ResBlock):
            h = self(module.conv1, self(module.norm1, x))
            t = linear(lambda c: c[..., None, None], self(module.temb_proj, silu(temb)))
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
        h = bilinear(lambda vv, a: vv @ a.transpose(-1, -2), v, attn)  # (..., B, C, HW_q)
        return self(module.proj, linear(lambda c: c.unflatten(-1, (H, W)), h))


def unet_jet(model: UNet, params: dict[str, Jet], x: torch.Tensor, t: torch.Tensor) -> Jet:
    """The model's output as a jet in the direction of the parameters' c1."""
    walk = _Walker(model, params)
    temb = walk(model.temb, Jet(timestep_embedding(t, model.base_channels).to(x.dtype)))
    h = walk(model.conv_in, Jet(x))
    hs = [h]
    for layer in model.down:
        h = walk(layer, h, temb)
        hs.append(h)
    h = walk(model.mid[0], h, temb)
    h = walk(model.mid[2], walk(model.mid[1], h), temb)
    for layer in model.up:
        if isinstance(layer, nn.ModuleList):
            h = _cat(h, hs.pop())
        h = walk(layer, h, temb)
    return walk(model.out, h)


def _images(f: Callable) -> Callable:
    """Apply a 4-D image op to (B, C, H, W) or, through the batch, (K, B, C, H, W)."""
    return lambda c: f(c) if c.dim() == 4 else f(_fold(c)).unflatten(0, c.shape[:2])


def _cat(a: Jet, b: Jet) -> Jet:
    """Channel concatenation; a zero coefficient on one side becomes explicit zeros."""

    def cat(x, y, x0, y0):
        if x is None and y is None:
            return None
        lead = (x if x is not None else y).shape[:-3]
        ca = x0.shape[-3]
        out = _empty(lead, ca + y0.shape[-3], *x0.shape[-2:], x0)
        for part, c in ((out[..., :ca, :, :], x), (out[..., ca:, :, :], y)):
            if c is None:
                part.zero_()
            else:
                part.copy_(c)
        return out

    return Jet(torch.cat([a.c0, b.c0], 1), cat(a.c1, b.c1, a.c0, b.c0), cat(a.c2, b.c2, a.c0, b.c0))


def vhv_taylor(
    model: UNet,
    params: dict[str, torch.Tensor],
    vs: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """vᵀHv of mean_b eps_mse(model(x_t, t), noise, weight) w.r.t. the parameters, for
    the K probes stacked in ``vs`` (each (K, *param.shape)); returns (K,)."""
    jets = {k: Jet(p, vs[k]) for k, p in params.items()}
    out = unet_jet(model, jets, x_t, t)
    r0 = out.c0 - noise
    # L(ε) = mean_b w_b mean_pix r(ε)²: the ε² coefficient is mean(w (2 r₀ r₂ + r₁²))
    second = torch.addcmul(out.c1.square(), r0, out.c2, value=2)
    return 2 * (weight * second.flatten(-3).mean(-1)).mean(-1)

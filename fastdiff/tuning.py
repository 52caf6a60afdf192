"""CPU tuning, in one place: what fastdiff does differently from the plain PyTorch
of the same maths because it measured faster (or more exact) on the CPU.

Each entry says what it replaces and why; the figures behind each, which rot, are in
docs/performance.md#measurements-behind-choices-in-the-code with their machines.
Everything here keeps the maths: the tests compare each against the plain version.

- :func:`amp_precision`: what ``train.amp`` means on this machine;
- :func:`reuse_freed_memory`: glibc keeps freed host memory (applied by the entry points);
- :class:`GroupNorm32`: GroupNorm in fp32 under CPU autocast;
- :class:`Dropout`: dropout masks from 16-bit draws on CPU (:func:`training_mask`: the
  mask it applies, for a caller that hands masks in);
- :func:`dense_layout`: which parameters a flat buffer can hold with their own strides.

Elsewhere, because they are part of a structure rather than a layer: the flat
parameter buffer (:mod:`fastdiff.flat`) and the UNet's stacked time projections
(``UNet.temb_proj``: the 22 ResBlocks' time projections as one product, faster forward
and backward than 22 small ones under bf16 autocast, where each small product also casts
its weight).
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F
from torch import nn


def amp_precision(amp: bool, cuda: bool) -> str:
    """What ``train.amp`` means on this machine, as accelerate's ``mixed_precision``:
    bf16 autocast on CUDA where supported, else fp16 with a grad scaler; on CPU bf16
    autocast where the CPU multiplies bf16 natively (AMX or AVX512-BF16: oneDNN's
    bf16 convolutions are several times faster than fp32 ones there), else fp32, since emulated
    bf16 is slower than fp32."""
    if not amp:
        return "no"
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_multiplies_bf16() else "no"


def cpu_multiplies_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU. ``torch.cpu.get_capabilities`` is newer than the
    torch 2.11 of the lent GPU machines, which have the private probes instead."""
    if hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# ------------------------------------------------------------------ host memory
# Keep freed host memory for reuse instead of handing it back to the kernel.
#
# glibc's malloc serves large requests (above a threshold that never exceeds 32 MB) with
# fresh ``mmap`` pages and unmaps them on ``free``. PyTorch's CPU allocator goes straight
# to malloc, so every large CPU tensor is new memory, and its first write page-faults
# through it. At batch 128 the UNet's activations are 33-100 MB each: an add into a fresh
# tensor is several times slower than into a reused one, and the whole training step is
# much faster once freed memory is reused. At batch 4 (1 MB activations, below
# the threshold) it makes no measurable difference.
#
# :func:`reuse_freed_memory` tells glibc to serve every request from its heap and never
# trim it: freed blocks are reused by the next step. The price is memory: the process
# keeps its peak footprint until it exits, and the heap fragments (large aligned blocks
# do not always fit back into the holes they left). Measured: training at batch 128
# holds its footprint flat from the second step on; DDIM sampling at large batches is
# faster too and holds several times the memory it held before. The figures, with their
# machine: docs/performance.md#measurements-behind-choices-in-the-code.
# ``train.reuse_host_memory=false`` turns it off.

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # an int: the largest threshold mallopt takes

_applied = False


def reuse_freed_memory() -> bool:
    """Reuse freed memory for later allocations (glibc on Linux; elsewhere a no-op).
    Idempotent; returns whether the setting is in effect."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied


# ----------------------------------------------------------------------- layers
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 under autocast, output fp32.

    CUDA's autocast already runs group_norm in fp32; CPU's leaves it in bf16, where
    the mixed-dtype channels_last kernel is slower and its statistics coarser: in the
    ``unet_cifar32`` step at batch 4 under CPU bf16 autocast, GroupNorm's forward and
    backward take a fraction of their bf16 time in fp32, and the whole step is faster
    (docs/performance.md#measurements-behind-choices-in-the-code).
    An fp32 or fp64 input is used as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32 only
        if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
            # torch 2.11's group_norm fails on channels_last under jvp and vmap (a view
            # of incompatible strides; is_contiguous NYI), and 2.11 is the GPU image's
            x = x.contiguous()
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Dropout(nn.Dropout):
    """Dropout whose CPU mask comes from 16-bit draws: four per 64-bit random word.

    ``F.dropout`` on CPU spends a visible share of a ``unet_cifar32`` training step at
    batch 4 in its Bernoulli sampler; drawing a quarter as many int64 words and one
    compare costs a fraction of that
    (docs/performance.md#measurements-behind-choices-in-the-code). The drop probability is
    rounded to a multiple of 2⁻¹⁶ (0.1 → 0.100006) and the survivors scaled by the
    exact 1 / P(keep). CUDA keeps ``F.dropout`` (Philox, fused by the compiler).
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        # A mask given from outside (fastdiff.fused hands each of several vmapped models
        # the mask its standalone run would draw, through functional_call's buffers).
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p and self.mask is not None:
            return x * self.mask.to(x.dtype)
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(x, self.p)


def training_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The x-shaped factor :class:`Dropout` multiplies ``x`` by in training, drawn as its
    forward draws it, from the default generator of x's device: on CPU
    :func:`dropout_mask`, elsewhere ``F.dropout`` of ones (its Philox draws depend on the
    generator's state and on x's shape, strides and dtype, never on x's values)."""
    if x.device.type == "cpu":
        return dropout_mask(x, p)
    return F.dropout(torch.ones_like(x), p, training=True)


def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None):
    """x-shaped tensor of 0 (probability ≈ p) and 1 / P(keep), from ``generator`` or the
    default CPU generator (so ``torch.manual_seed`` fixes it)."""
    drop = round(p * 65536)  # uniform int16 u is dropped iff u < drop - 32768
    if drop >= 65536:
        return torch.zeros_like(x)
    n = (x.numel() + 3) // 4
    words = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=generator)
    u = words.view(torch.int16)[: x.numel()]
    # iid draws: lay them out with x's strides (NCHW or channels_last) so x * mask is dense
    u = u.as_strided(x.shape, x.stride()) if dense_layout(x) else u.view(x.shape)
    return torch.where(u >= drop - 32768, 65536 / (65536 - drop), 0.0).to(x.dtype)


def dense_layout(t: torch.Tensor) -> bool:
    """Contiguous or channels_last: the elements fill one dense block in some order, so
    a flat buffer of ``numel`` elements can hold ``t`` with ``t``'s own strides."""
    return t.is_contiguous() or (
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    )

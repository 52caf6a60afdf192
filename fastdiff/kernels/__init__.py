"""Triton kernels for fastdiff, imported as ``fastdiff.kernels``.

Each op is a ``torch.library`` custom op (``fastdiff::…``) with a fake implementation
and autograd, so ``torch.compile(fullgraph=True)`` treats it as one opaque node. The
op runs its Triton kernel on CUDA; on other devices it runs the torch reference
kept in the same file, unless ``TRITON_INTERPRET=1`` asks for the Triton
interpreter (that is how the tests check the kernels on a CPU).

``reference_only()`` forces the plain-torch path, for code that needs double
backward or forward-mode AD (the Hutchinson probe): the kernels define neither.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

# A thread's flag, not a ContextVar: torch 2.11's Dynamo (the GPU image's) cannot trace
# ContextVar.get, and the UNet reads this inside the compiled step
_REFERENCE_ONLY = threading.local()


def use_triton(x: torch.Tensor) -> bool:
    """Run the Triton kernel for a tensor on this device?"""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def kernels_allowed() -> bool:
    """False inside ``reference_only()``: modules should take their plain-torch path."""
    return not getattr(_REFERENCE_ONLY, "on", False)


def like_fake(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (x's shape) with the strides of ``torch.empty_like(x)``, which is what the ops'
    fake implementations promise: under torch.compile Inductor asserts the real outputs'
    strides against the fake's, and a channels_last ``x`` must not come back NCHW."""
    out = torch.empty_like(x, dtype=t.dtype)
    return t if t.stride() == out.stride() else out.copy_(t)


@contextlib.contextmanager
def reference_only():
    was = getattr(_REFERENCE_ONLY, "on", False)
    _REFERENCE_ONLY.on = True
    try:
        yield
    finally:
        _REFERENCE_ONLY.on = was


from fastdiff.kernels.groupnorm_silu import (  # noqa: E402
    group_norm_silu,
    group_norm_silu_reference,
)
from fastdiff.kernels.weighted_mse import weighted_mse, weighted_mse_reference  # noqa: E402

__all__ = [
    "group_norm_silu",
    "group_norm_silu_reference",
    "kernels_allowed",
    "like_fake",
    "reference_only",
    "use_triton",
    "weighted_mse",
    "weighted_mse_reference",
]

"""One flat buffer for all of a model's parameters, and one for their gradients.

``unet_cifar32`` has 304 parameter tensors. Adam, gradient clipping and the EMA each
launch one small kernel per tensor (or a foreach loop that does the same); with every
parameter a view into one flat buffer each of them is a single kernel over 9M floats,
which measured faster for fused Adam and for the global gradient norm, and spares the
copy the per-tensor fused path makes of channels_last weights (the figures:
docs/performance.md#measurements-behind-choices-in-the-code).

The views keep each parameter's strides, so channels_last weights stay channels_last.
Gradients are views into the flat gradient buffer: autograd accumulates into an
existing ``.grad`` in place, so the buffer always holds the whole gradient. Never set
a model parameter's ``.grad`` to None afterwards except through :class:`Handover`.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.tuning import dense_layout

ALIGN = 16  # elements: every view starts on a 64-byte boundary (fp32)


def flatten_(model: nn.Module, grads: bool = True) -> nn.Parameter:
    """Move every parameter of ``model`` into one flat buffer (in place) and return it
    as a Parameter whose ``.grad`` is the flat gradient buffer (when ``grads``).

    Two models with the same architecture and memory format get the same layout, so
    their flat buffers line up element for element (the EMA relies on it)."""
    params = list(model.parameters())
    if not params:
        raise ValueError("flatten_: the model has no parameters")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"flatten_ needs one dtype and one device, got {sorted(map(str, dtypes))} on "
            f"{sorted(map(str, devices))}: cast the model first"
        )
    offsets, total = [], 0
    for p in params:
        if not dense_layout(p):
            raise ValueError(
                f"flatten_: a parameter of shape {tuple(p.shape)} has strides {p.stride()}: "
                "only contiguous or channels_last parameters can be flattened"
            )
        offsets.append(total)
        total += -(-p.numel() // ALIGN) * ALIGN
    flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    grad = torch.zeros_like(flat) if grads else None
    for p, offset in zip(params, offsets):
        view = flat.as_strided(p.shape, p.stride(), offset)
        view.copy_(p.detach())
        p.data = view
        if grad is not None:
            p.grad = grad.as_strided(p.shape, p.stride(), offset)
    out = nn.Parameter(flat, requires_grad=grads)
    out.grad = grad
    return out


def backs(flat: torch.Tensor, model: nn.Module) -> bool:
    """Whether every parameter of ``model`` (and its gradient) still lives in ``flat``:
    a ``.to()`` that copies, or a ``.grad`` set to None, silently breaks the link."""
    data, grad = flat.untyped_storage().data_ptr(), flat.grad
    for p in model.parameters():
        if p.untyped_storage().data_ptr() != data:
            return False
        if grad is not None and (
            p.grad is None
            or p.grad.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr()
        ):
            return False
    return True


class Handover:
    """Autograd's gradients copied into the flat gradient buffer instead of accumulated
    into a zeroed one.

    With every ``.grad`` a view of the buffer, a step zeroes 9M floats and autograd
    then adds each gradient into its zeros (read two, write one). ``release()`` before
    backward sets the ``.grad`` to None, so autograd hands each freshly computed
    gradient over as it is; ``collect()`` after backward copies them into their views
    in one foreach call and points the ``.grad`` back at the views: half the memory
    traffic. A parameter that got no gradient gets zeros.
    """

    def __init__(self, flat: nn.Parameter, model: nn.Module):
        if flat.grad is None:
            raise ValueError("Handover needs a flat buffer made with grads=True")
        self.params = list(model.parameters())
        self.views = [p.grad for p in self.params]

    def release(self) -> None:
        for p in self.params:
            p.grad = None

    def collect(self) -> None:
        got = [(v, p.grad) for v, p in zip(self.views, self.params) if p.grad is not None]
        if got:
            torch._foreach_copy_([v for v, _ in got], [g for _, g in got])
        for v, p in zip(self.views, self.params):
            if p.grad is None:
                v.zero_()
            p.grad = v

"""Exponential moving average of the weights, kept in fp32 (Polyak averaging).

θ_ema ← decay · θ_ema + (1 − decay) · θ: one lerp over the flat parameter buffer when
the trained model is flattened (:mod:`fastdiff.flat`), else one foreach lerp.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastdiff.flat import flatten_


class EMA:
    def __init__(self, model: nn.Module, decay: float, flat: torch.Tensor | None = None):
        """``flat``: the trained model's flat parameter buffer, if it has one; the
        average then gets the same layout and updates in a single kernel."""
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._source = flat
        if flat is not None:
            if flat.dtype != torch.float32:
                raise ValueError(f"EMA over a flat buffer needs fp32 weights, got {flat.dtype}")
            self._flat = flatten_(self.model, grads=False).detach()
            if self._flat.shape != flat.shape:
                raise ValueError("EMA: the flat buffer does not match the model's layout")
        self._params = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay
        if self._source is not None:
            self._flat.lerp_(self._source.detach(), weight)
        else:
            src = [p.detach().float() for p in model.parameters()]
            torch._foreach_lerp_(self._params, src, weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

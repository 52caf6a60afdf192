"""Exponential moving average of the weights, kept in fp32 (Polyak averaging).

θ_ema ← decay · θ_ema + (1 − decay) · θ, done as one foreach lerp over all tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._params = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self._params, src, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

"""The run's optimizer: fused Adam over the model's flat buffer, behind one ``step``.

Everything between the loss and the updated weights lives here, so nothing else
touches torch's optimizer internals:

- the gradient handover (:class:`fastdiff.flat.Handover`): backward hands its fresh
  gradients over instead of accumulating into a zeroed 9M-float buffer;
- the global gradient norm and the clip, folded into fused Adam's ``grad_scale``
  (Adam divides each gradient by it as it reads it: one pass over the gradients
  fewer than scaling them first);
- skip-on-non-finite: a non-finite loss or norm sets fused Adam's ``found_inf``, so
  the update is skipped on the device, without a host sync.

With a loss scaler (fp16 on CUDA) accelerate's scaler unscales, skips and clips the
true gradient instead.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.flat import Handover, flatten_

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class FlatAdam:
    def __init__(
        self,
        model: nn.Module,
        accelerator,
        lr: float,
        betas: tuple[float, float],
        *,
        weight_decay: float,
        grad_clip: float,
        name: str = "adam",
    ):
        """Moves ``model``'s parameters into one flat buffer (``self.flat``). ``name``:
        ``adam`` (weight decay added to the gradient, L2) or ``adamw`` (decoupled)."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
        self.acc, self.grad_clip = accelerator, grad_clip
        self.flat = flatten_(model)
        self.handover = Handover(self.flat, model)
        adam = OPTIMIZERS[name](
            [self.flat], lr=lr, betas=betas, weight_decay=weight_decay, fused=True
        )
        self.optimizer = accelerator.prepare_optimizer(adam)

    @property
    def adam(self) -> torch.optim.Adam:
        return self.optimizer.optimizer

    def step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of ``loss`` and one update. Returns the gradient's global norm
        before clipping and whether the step was finite (both device tensors)."""
        self.backward(loss)
        return self.update(loss)

    def backward(self, loss: torch.Tensor) -> None:
        """The loss's gradient into the flat gradient buffer (handed over, not summed)."""
        self.handover.release()
        self.acc.backward(loss)
        self.handover.collect()

    def update(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update from the gradient in the flat buffer, however it got there (a
        fused study writes several models' gradients at once); ``loss`` only decides
        whether the step is finite."""
        norm = self._clip()
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if self.acc.scaler is None:
            self.adam.found_inf = (~finite).float()
        self.optimizer.step()  # no zero_grad: the next backward's gradients are handed over
        return norm.detach().float(), finite

    def _clip(self) -> torch.Tensor:
        """The global norm (a BLAS dot product: half the time of ``vector_norm`` here),
        and the clip coefficient passed to Adam (or applied, under a scaler)."""
        grad = self.flat.grad
        if self.acc.scaler is not None:
            self.acc.unscale_gradients()
        norm = torch.linalg.vecdot(grad, grad).sqrt()
        if self.grad_clip:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            if self.acc.scaler is None:
                self.adam.grad_scale = coef.reciprocal()
            else:
                grad.mul_(coef)
        return norm

    def moments(self) -> dict[str, torch.Tensor]:
        """Adam's state for the flat buffer (exp_avg, exp_avg_sq, step)."""
        return self.adam.state[self.flat]

    def set_hyperparameters(self, lr: float, betas: tuple[float, float], weight_decay: float):
        """For kept moments of another run (train.init_keep_optimizer): a loaded state
        carries that run's hyperparameters in its param groups."""
        for group in self.adam.param_groups:
            group.update(lr=lr, betas=betas, weight_decay=weight_decay)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

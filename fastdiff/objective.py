"""The training objective, in one place.

x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε,  out = model(x_t, t),  loss_b = w(t_b) · mean_pix (out_b − y_b)²

where y is the prediction's target (ε, x0 or v: :func:`fastdiff.diffusion.target`) and
w(t) the run's weighting family converted to that target's space
(:func:`fastdiff.weighting.weights`). The trainer minimises it, the curvature probe
differentiates it twice (:mod:`fastdiff.curvature`), and Taylor mode expands the same
per-sample residual to second order (:func:`fastdiff.taylor.vhv_taylor_per_sample`).
Where a change goes:

- a new weighting: one :func:`fastdiff.weighting.family` (the fused kernel reads its table);
- a new prediction target: :func:`fastdiff.diffusion.target` and ``to_x0_eps``;
- a new schedule: :func:`fastdiff.diffusion.make_betas`.
"""

from __future__ import annotations

import torch

from fastdiff import weighting
from fastdiff.diffusion import (
    Schedule,
    eps_mse_per_target_mse,
    q_sample,
    snr,
    target,
    weighted_mse,
)
from fastdiff.kernels import weighted_mse as fused_weighted_mse


class Objective:
    """One run's objective: its schedule's ᾱ_t (T,), its weight table w(t) (T,) in the
    prediction's space, and what the network predicts.

    ``fused``: the loss of the model's output goes through the fused Triton kernel,
    which reads the same table. Otherwise plain torch."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        weights: torch.Tensor,
        *,
        prediction: str = "eps",
        fused: bool = False,
    ):
        self.alphas_cumprod, self.weights = alphas_cumprod.float(), weights.float()
        self.prediction, self.fused = prediction, fused
        snr_t = snr(alphas_cumprod.double())
        # m(t): the ε-MSE per unit of the target's MSE (the curvature probe's unweighted trace)
        self.eps_per_target = eps_mse_per_target_mse(prediction, snr_t).to(self.weights)
        # plain ε-MSE = eps_scale[t] · weighted loss: the logged unweighted ε-MSE
        self.eps_scale = weighting.eps_mse_scale(weights.double(), snr_t, prediction).to(
            self.weights
        )

    @classmethod
    def of(cls, cfg, device) -> Objective:
        schedule = Schedule.of(cfg)
        loss = cfg.loss
        weights = weighting.weights(
            snr(schedule.alphas_cumprod),
            loss.weighting,
            prediction=loss.prediction,
            gamma=loss.gamma,
            k=loss.k,
        )
        objective = cls(
            schedule.alphas_cumprod.to(device),
            weights.to(device),
            prediction=loss.prediction,
            fused=cfg.model.kernels == "triton",
        )
        objective.schedule = schedule  # the samplers' (float64, on the host)
        return objective

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for (x0, ε) at t."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return target(self.prediction, x0, noise, a.to(x0.dtype))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) per sample, fp32."""
        return self.weights[t]

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """The per-sample loss (B,), unreduced: the caller averages, probes look per sample."""
        return self.of_prediction(model(self.noised(x0, t, noise), t), x0, noise, t)

    def of_prediction(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t):
        """The per-sample loss (B,) of an output made elsewhere (fastdiff.fused runs
        several models in one vmapped pass), with this run's target and weights."""
        y = self.target(x0, noise, t)
        if self.fused:
            return fused_weighted_mse(out, y, t, self.weights)
        return weighted_mse(out, y, self.weight(t))

    @staticmethod
    def of_noised(model, x_t, t, target, *, weight) -> torch.Tensor:
        """The per-sample loss at given x_t, target and weights: what the curvature probe
        differentiates (its x_t is fixed, its weights may be all ones)."""
        return weighted_mse(model(x_t, t), target, weight)

    def unweighted(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Plain ε-MSE per sample (whatever the prediction), from the weighted loss."""
        return per_sample * self.eps_scale[t]

"""The ε-prediction objective, in one place.

x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε,  ε̂ = model(x_t, t),  loss_b = w(t_b) · mean_pix (ε̂_b − ε_b)².

The trainer minimises it, the curvature probe differentiates it twice
(:mod:`fastdiff.curvature`), and Taylor mode expands the same per-sample residual to
second order (:func:`fastdiff.taylor.vhv_taylor_per_sample`). Where a change goes:

- a new weighting: :func:`fastdiff.diffusion.loss_weight` (the table w(t)), and for
  ``model.kernels=triton`` also ``fastdiff/kernels/weighted_mse.py``, whose fused kernel
  computes w(t) from ᾱ_t itself instead of reading the table;
- a new schedule: :func:`fastdiff.diffusion.make_betas`.
"""

from __future__ import annotations

import torch

from fastdiff.diffusion import Schedule, eps_loss, eps_mse, q_sample
from fastdiff.kernels import weighted_mse


class Objective:
    """One run's objective: its schedule's ᾱ_t (T,) and weighting table w(t) (T,).

    ``fused``: the loss of the model's output goes through the fused Triton kernel,
    which computes w(t) from ᾱ_t for the named ``weighting`` and ``gamma`` (same
    values as the table). Otherwise the torch formula reads the table."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        weights: torch.Tensor,
        weighting: str | None = None,
        gamma: float | None = None,
        fused: bool = False,
    ):
        if fused and weighting is None:
            raise ValueError("the fused loss needs the weighting's name (and gamma)")
        self.alphas_cumprod, self.weights = alphas_cumprod.float(), weights.float()
        self.weighting, self.gamma, self.fused = weighting, gamma, fused

    @classmethod
    def of(cls, cfg, device) -> Objective:
        schedule = Schedule.make(cfg.diffusion.beta_schedule, cfg.diffusion.T)
        weights = schedule.loss_weights(cfg.loss.weighting, cfg.loss.minsnr_gamma)
        objective = cls(
            schedule.alphas_cumprod.to(device),
            weights.to(device),
            cfg.loss.weighting,
            cfg.loss.minsnr_gamma,
            fused=cfg.model.kernels == "triton",
        )
        objective.schedule = schedule  # the samplers' (float64, on the host)
        return objective

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) per sample, fp32."""
        return self.weights[t]

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """The per-sample loss (B,), unreduced: the caller averages, probes look per sample."""
        if self.fused:
            eps = model(self.noised(x0, t, noise), t)
            return weighted_mse(eps, noise, t, self.alphas_cumprod, self.gamma, self.weighting)
        return eps_loss(model, x0, t, noise, self.alphas_cumprod, self.weights)

    def of_prediction(self, eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """The per-sample loss (B,) of a prediction made elsewhere (fastdiff.fused runs
        several models in one vmapped pass), with this run's weights."""
        return eps_mse(eps, noise, self.weight(t))

    @staticmethod
    def of_noised(model, x_t, t, noise, weight) -> torch.Tensor:
        """The per-sample loss at given x_t and weights: what the curvature probe
        differentiates (its x_t is fixed, its weights may be all ones)."""
        return eps_mse(model(x_t, t), noise, weight)

    def unweighted(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Plain ε-MSE per sample, from the weighted loss."""
        return per_sample / self.weights[t]

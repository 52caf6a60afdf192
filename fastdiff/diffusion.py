"""The diffusion maths as small pure functions.

Notation follows Ho et al. 2020 (DDPM, arXiv:2006.11239): β_t is the noise
schedule, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s ("alphas_cumprod"), and the forward
process is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM eq. 4).

Timesteps are 0-indexed here: t ∈ {0, …, T−1}, so `alphas_cumprod[t]` is
ᾱ_{t+1} in the paper's 1-indexed notation.

Every function takes its randomness (t, noise) from outside, so tests can fix
it and paired runs can share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "minsnr")


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape (T,).

    - ``"linear"``: β rises linearly from 1e-4 to 0.02 (DDPM §4, the CIFAR-10 setting).
    - ``"cosine"``: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008,
      β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17).
    """
    if T <= 0:
        raise ValueError(f"diffusion.T must be a positive number of steps, got {T}")
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, eq. 1)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def loss_weight(snr_t: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-timestep weight of the ε-MSE loss.

    - ``"uniform"``: 1 (the "simple" DDPM loss, eq. 14).
    - ``"minsnr"``: min(SNR, γ) / SNR, the Min-SNR-γ strategy for ε-prediction
      (Hang et al. 2023, arXiv:2303.09556, §3.4). The x0-space weight min(SNR, γ)
      becomes min(SNR, γ)/SNR in ε-space because ‖ε − ε̂‖² = SNR · ‖x0 − x̂0‖².
      As SNR → 0 the ratio tends to 1 (SNR < γ there), which is what SNR == 0 gets.
    """
    if weighting == "uniform":
        return torch.ones_like(snr_t)
    if weighting == "minsnr":
        if not gamma > 0:
            raise ValueError(f"loss.minsnr_gamma must be > 0, got {gamma}")
        ratio = torch.clamp(snr_t, max=gamma) / snr_t
        return torch.where(snr_t > 0, ratio, torch.ones_like(snr_t))
    raise ValueError(f"unknown loss weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")


@dataclass(frozen=True)
class Schedule:
    """A discretised noise schedule: β_t and the quantities derived from it (float64)."""

    betas: torch.Tensor  # (T,)

    @classmethod
    def make(cls, beta_schedule: str, T: int) -> Schedule:
        return cls(make_betas(beta_schedule, T))

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)

    def loss_weights(self, weighting: str, gamma: float) -> torch.Tensor:
        """Weight per timestep, shape (T,), float64."""
        return loss_weight(snr(self.alphas_cumprod), weighting, gamma)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in x's dtype, for broadcasting against images."""
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε   (DDPM eq. 4).  x0, noise: (B, C, H, W); t: (B,)."""
    a = alphas_cumprod.to(x0.device)[t]
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def eps_mse(eps_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted per-sample ε-MSE: w_t · mean_{c,h,w} (ε̂ − ε)², shape (B,), accumulated in fp32."""
    err = (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)
    return weight.float() * err


def eps_loss(
    model,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Per-sample weighted ε-prediction loss, unreduced, shape (B,).

    ``weights`` is the per-timestep table from :meth:`Schedule.loss_weights`; the
    caller reduces (mean over the batch) so tests and probes can look per sample.
    """
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    eps_pred = model(x_t, t)
    return eps_mse(eps_pred, noise, weights.to(x0.device)[t])


def t_bin_edges(T: int, bins: int) -> list[int]:
    """Edges of ``bins`` equal-width timestep bins over [0, T): bin i holds the t with
    t·bins // T == i, which are edges[i] ≤ t < edges[i+1]. No bins: no edges."""
    return [-(-T * i // bins) for i in range(bins + 1)] if bins else []


def t_bin_names(T: int, bins: int) -> list[str]:
    """``t{lo}-{hi}`` (inclusive) per bin, the suffix of the per-timestep metric names."""
    edges = t_bin_edges(T, bins)
    return [f"t{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]

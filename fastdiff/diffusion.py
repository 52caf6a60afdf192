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
# What the network's output means (Salimans & Ho 2022, §4 and appendix D): the noise ε,
# the clean image x0, or the velocity v = √ᾱ ε − √(1−ᾱ) x0.
PREDICTIONS = ("eps", "x0", "v")


def make_betas(schedule: str, T: int, *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape (T,).

    - ``"linear"``: β rises linearly from 1e-4 to 0.02 (DDPM §4, the CIFAR-10 setting).
    - ``"cosine"``: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008,
      β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17).

    ``zero_terminal_snr``: rescaled so that SNR(T) = 0 exactly (:func:`rescale_zero_terminal_snr`).
    """
    if T <= 0:
        raise ValueError(f"diffusion.T must be a positive number of steps, got {T}")
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    else:
        raise ValueError(
            f"unknown beta schedule {schedule!r}: use one of {', '.join(BETA_SCHEDULES)}"
        )
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 (arXiv:2305.08891), Algorithm 1: shift √ᾱ so its last value is 0
    and scale it so its first value is kept, then rebuild β. SNR(T) is then 0 exactly and
    β_T = 1: the last step's input is pure noise, as sampling starts from."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, eq. 1)."""
    return alphas_cumprod / (1 - alphas_cumprod)


@dataclass(frozen=True)
class Schedule:
    """A discretised noise schedule: β_t and the quantities derived from it (float64)."""

    betas: torch.Tensor  # (T,)

    @classmethod
    def make(cls, beta_schedule: str, T: int, *, zero_terminal_snr: bool = False) -> Schedule:
        return cls(make_betas(beta_schedule, T, zero_terminal_snr=zero_terminal_snr))

    @classmethod
    def of(cls, cfg) -> Schedule:
        """The run's schedule from its config (``diffusion.*``)."""
        d = cfg.diffusion
        return cls.make(d.beta_schedule, d.T, zero_terminal_snr=d.zero_terminal_snr)

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor):
    """What a ``prediction`` network is trained to output at x_t = √ᾱ x0 + √(1−ᾱ) ε.
    ``a``: ᾱ_t broadcastable against x0."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":  # Salimans & Ho 2022, eq. 31 (their α = √ᾱ, σ = √(1−ᾱ))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def to_x0_eps(prediction: str, out: torch.Tensor, x_t: torch.Tensor, a):
    """(x̂0, ε̂) from a ``prediction`` network's output ``out`` at x_t, ᾱ_t = ``a`` (a float
    or a tensor broadcastable against x_t): the one conversion every sampler and consumer
    uses. ε from x0 divides by √(1−ᾱ) > 0; x0 from ε divides by √ᾱ, which is why
    ε-prediction cannot have SNR = 0 (config validation refuses it)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    sa, sb = a.sqrt().to(x_t.dtype), (1 - a).sqrt().to(x_t.dtype)
    if prediction == "eps":
        return (x_t - sb * out) / sa, out
    if prediction == "x0":
        return out, (x_t - sa * out) / sb
    if prediction == "v":  # x0 = √ᾱ x_t − √(1−ᾱ) v, ε = √(1−ᾱ) x_t + √ᾱ v (from eq. 31)
        return sa * x_t - sb * out, sb * x_t + sa * out
    raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def eps_mse_per_target_mse(prediction: str, snr_t: torch.Tensor) -> torch.Tensor:
    """m(t) with ‖ε̂ − ε‖² = m · ‖out − target‖² at one x_t: 1 for ε, SNR for x0
    (x̂0 − x0 = −(ε̂ − ε)/√SNR) and ᾱ = SNR/(SNR+1) for v (ε̂ − ε = √ᾱ (v̂ − v))."""
    if prediction == "eps":
        return torch.ones_like(snr_t)
    if prediction == "x0":
        return snr_t
    if prediction == "v":
        return snr_t / (snr_t + 1)
    raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in x's dtype, for broadcasting against images."""
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε   (DDPM eq. 4).  x0, noise: (B, C, H, W); t: (B,)."""
    a = alphas_cumprod.to(x0.device)[t]
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted per-sample MSE: w_b · mean_{c,h,w} (out − target)², shape (B,), in fp32."""
    err = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    return weight.float() * err


def t_bin_edges(T: int, bins: int) -> list[int]:
    """Edges of ``bins`` equal-width timestep bins over [0, T): bin i holds the t with
    t·bins // T == i, which are edges[i] ≤ t < edges[i+1]. No bins: no edges."""
    return [-(-T * i // bins) for i in range(bins + 1)] if bins else []


def t_bin_names(T: int, bins: int) -> list[str]:
    """``t{lo}-{hi}`` (inclusive) per bin, the suffix of the per-timestep metric names."""
    edges = t_bin_edges(T, bins)
    return [f"t{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]

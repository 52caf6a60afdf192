"""Samplers as plain functions with one signature.

    sampler(model, shape, schedule, nfe, generator) -> x0 samples in [-1, 1]

``model(x_t, t)`` predicts ε; ``t`` is always an index into the *original*
T-step schedule, so a respaced sampler calls the network exactly as training did.

Respacing (Nichol & Dhariwal 2021, §4): keep a subset S = {τ_1 < … < τ_K} of the
T timesteps and rebuild a K-step chain with the same marginals:
ᾱ'_i = ᾱ_{τ_i} and β'_i = 1 − ᾱ'_i / ᾱ'_{i−1} (ᾱ'_0 = 1). With K == T the chain is
DDPM's original one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.diffusion import Schedule

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        SAMPLERS[name] = fn
        return fn

    return deco


def respace(schedule: Schedule, nfe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced timesteps (K,) and the respaced ᾱ' (K,) for a K = nfe step chain."""
    T = schedule.T
    if not 1 <= nfe <= T:
        raise ValueError(f"nfe must be between 1 and T={T}, got {nfe}")
    # Every chain starts at T−1, whatever K: linspace(0, T−1, 1) alone would be [0].
    ends = (
        torch.linspace(0, T - 1, nfe, dtype=torch.float64) if nfe > 1 else torch.tensor([T - 1.0])
    )
    timesteps = ends.round().long()
    return timesteps, schedule.alphas_cumprod[timesteps]


def _predict_x0(x: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ  (DDPM eq. 4 solved for x0), clipped to the data range."""
    return ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)


def _noise(shape, generator: torch.Generator | list[torch.Generator], device) -> torch.Tensor:
    """Drawn on the generator's device, so a seed gives the same noise whatever device the
    model is on. A list holds one generator per sample: sample i's noise then does not
    depend on the batch it is generated in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
        ).to(device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@register("ddpm")
@torch.no_grad()
def ddpm_sample(
    model,
    shape,
    schedule: Schedule,
    nfe: int,
    *,
    generator: torch.Generator,
    variance: str = "posterior",
) -> torch.Tensor:
    """Ancestral sampling, DDPM Algorithm 2, on the respaced chain.

    Each step draws x_{i−1} ~ N(μ̃(x_i, x̂0), σ_i²) with the posterior mean
    μ̃ = √ᾱ'_{i−1} β'_i/(1−ᾱ'_i) · x̂0 + √α'_i (1−ᾱ'_{i−1})/(1−ᾱ'_i) · x_i  (DDPM eq. 7) and
    σ² = β̃ = β'_i (1−ᾱ'_{i−1})/(1−ᾱ'_i) (``"posterior"``) or σ² = β'_i (``"beta"``, §3.2).
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown DDPM variance {variance!r}: use 'posterior' or 'beta'")
    device = _device_of(model)
    timesteps, ac = respace(schedule, nfe)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    coef_x0 = ac_prev.sqrt() * betas / (1 - ac)
    coef_xt = (1 - betas).sqrt() * (1 - ac_prev) / (1 - ac)
    var = betas * (1 - ac_prev) / (1 - ac) if variance == "posterior" else betas

    x = _noise(shape, generator, device)
    for i in reversed(range(nfe)):
        t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
        eps = model(x, t).float()
        x0 = _predict_x0(x, eps, ac[i].item())
        x = coef_x0[i].item() * x0 + coef_xt[i].item() * x
        if i > 0:
            x = x + var[i].sqrt().item() * _noise(shape, generator, device)
    return x


@register("ddim")
@torch.no_grad()
def ddim_sample(
    model, shape, schedule: Schedule, nfe: int, *, generator: torch.Generator
) -> torch.Tensor:
    """Deterministic DDIM (η = 0, Song et al. 2021, eq. 12) on the respaced chain:
    x_{i−1} = √ᾱ'_{i−1} x̂0 + √(1−ᾱ'_{i−1}) ε̂, with ε̂ re-derived from the clipped x̂0."""
    device = _device_of(model)
    timesteps, ac = respace(schedule, nfe)
    x = _noise(shape, generator, device)
    for i in reversed(range(nfe)):
        t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
        a = ac[i].item()
        x0 = _predict_x0(x, model(x, t).float(), a)
        if i == 0:
            return x0
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        a_prev = ac[i - 1].item()
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def sample(
    name: str,
    model,
    shape,
    schedule: Schedule,
    *,
    nfe: int,
    generator: torch.Generator,
    ddpm_variance: str = "posterior",
) -> torch.Tensor:
    """Look a sampler up by name and run it: the one way grids and FID sample.
    ``ddpm_variance`` is DDPM's σ² choice (``sampling.ddpm_variance``), unused by DDIM."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    options = {"variance": ddpm_variance} if name == "ddpm" else {}
    return SAMPLERS[name](model, shape, schedule, nfe, generator=generator, **options)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], on the same device."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

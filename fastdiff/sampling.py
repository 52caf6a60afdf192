"""Samplers as plain functions with one signature.

    sampler(model, shape, schedule, nfe, *, generator, prediction, spacing) -> x0 in [-1, 1]

``model(x_t, t)`` outputs what ``prediction`` says (``"eps"``, ``"x0"`` or ``"v"``,
:data:`fastdiff.diffusion.PREDICTIONS`); every sampler turns it into (x̂0, ε̂) with
:func:`fastdiff.diffusion.to_x0_eps` and nothing else. ``t`` is always an index into the
*original* T-step schedule, so a respaced sampler calls the network exactly as training did.

Respacing (Nichol & Dhariwal 2021, §4): keep a subset S = {τ_1 < … < τ_K} of the
T timesteps and rebuild a K-step chain with the same marginals:
ᾱ'_i = ᾱ_{τ_i} and β'_i = 1 − ᾱ'_i / ᾱ'_{i−1} (ᾱ'_0 = 1). With K == T the chain is
DDPM's original one. Which subset: ``spacing`` (:func:`respace`).

Zero terminal SNR (Lin et al. 2024): ᾱ_{T−1} = 0, so the first step's input is pure noise,
exactly what sampling starts from. Nothing here divides by √ᾱ except ε-prediction's x̂0,
which such a schedule refuses (ε at SNR = 0 says nothing of x0); ε̂ from x̂0 divides by
√(1−ᾱ) ≥ √β_1 > 0 and the posterior coefficients by 1 − ᾱ'_i > 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.diffusion import PREDICTIONS, Schedule, to_x0_eps

SAMPLERS: dict[str, Callable] = {}
SPACINGS = ("linspace", "trailing")


def register(name: str):
    def deco(fn):
        SAMPLERS[name] = fn
        return fn

    return deco


def respace(
    schedule: Schedule, nfe: int, *, spacing: str = "linspace"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K = nfe timesteps a K-step chain visits, ascending (K,), and its ᾱ' (K,).

    - ``"linspace"``: round(linspace(0, T−1, K)), both ends kept (diffusers'
      ``timestep_spacing="linspace"``).
    - ``"trailing"``: round(T − i·T/K) − 1 for i = 0 … K−1, i.e. diffusers'
      ``timestep_spacing="trailing"``, round(arange(T, 0, −T/K)) − 1 (Lin et al. 2024,
      §3.3): it starts at T−1 and steps back by T/K, so it never visits t = 0 for K < T.
      Computed in integers (round half to even, as numpy's round): diffusers' float
      ``arange`` gets the same numbers except where float error bites, where it sometimes
      has K+1 steps ending at t = −1 (T=1000, K=61) or rounds a .5 tie the other way
      (T=1000, K=48).

    Every chain starts at T−1, whatever K and spacing.
    """
    T = schedule.T
    if not 1 <= nfe <= T:
        raise ValueError(f"nfe must be between 1 and T={T}, got {nfe}")
    if spacing == "linspace":
        # linspace(0, T−1, 1) alone would be [0]: a one-step chain starts at T−1 too.
        ends = (
            torch.linspace(0, T - 1, nfe, dtype=torch.float64)
            if nfe > 1
            else torch.tensor([T - 1.0])
        )
        timesteps = ends.round().long()
    elif spacing == "trailing":
        timesteps = torch.tensor(
            [_round_half_even(T * (nfe - i), nfe) - 1 for i in reversed(range(nfe))]
        )
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    return timesteps, schedule.alphas_cumprod[timesteps]


def _round_half_even(num: int, den: int) -> int:
    """num / den rounded to the nearest integer, ties to even (numpy's and torch's round)."""
    q, r = divmod(num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def _chain(model, shape, schedule: Schedule, nfe: int, *, generator, prediction, spacing):
    """What every sampler starts from: the respaced timesteps and ᾱ' (checked against the
    prediction), the model's device, and x_T drawn from ``generator``."""
    timesteps, ac = respace(schedule, nfe, spacing=spacing)
    _check(prediction, ac)
    device = _device_of(model)
    return timesteps, ac, device, _noise(shape, generator, device)


def _check(prediction: str, ac: torch.Tensor) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")
    if prediction == "eps" and not bool((ac > 0).all()):
        raise ValueError(
            "an ε-prediction model cannot sample a zero-terminal-SNR schedule: x̂0 from ε̂ "
            "divides by √ᾱ = 0 (use a v or x0 model)"
        )


def _x0_hat(model, x: torch.Tensor, t: torch.Tensor, a: float, *, prediction: str) -> torch.Tensor:
    """x̂0 from the network's output at x_t, ᾱ_t = a, clipped to the data range.
    The output is cast to x's dtype (fp32 under AMP, fp64 where a test samples in fp64)."""
    x0, _ = to_x0_eps(prediction, model(x, t).to(x.dtype), x, a)
    return x0.clamp(-1, 1)


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
    prediction: str = "eps",
    spacing: str = "linspace",
) -> torch.Tensor:
    """Ancestral sampling, DDPM Algorithm 2, on the respaced chain.

    Each step draws x_{i−1} ~ N(μ̃(x_i, x̂0), σ_i²) with the posterior mean
    μ̃ = √ᾱ'_{i−1} β'_i/(1−ᾱ'_i) · x̂0 + √α'_i (1−ᾱ'_{i−1})/(1−ᾱ'_i) · x_i  (DDPM eq. 7) and
    σ² = β̃ = β'_i (1−ᾱ'_{i−1})/(1−ᾱ'_i) (``"posterior"``) or σ² = β'_i (``"beta"``, §3.2);
    the last step adds no noise (z = 0, Algorithm 2) and returns x̂0 (ᾱ'_0 = 1 there).
    At zero terminal SNR the first step has α' = 0: μ̃ = √ᾱ'_{i−1} x̂0, x_T drops out.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown DDPM variance {variance!r}: use 'posterior' or 'beta'")
    options = {"generator": generator, "prediction": prediction, "spacing": spacing}
    timesteps, ac, device, x = _chain(model, shape, schedule, nfe, **options)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    coef_x0 = ac_prev.sqrt() * betas / (1 - ac)
    coef_xt = (1 - betas).sqrt() * (1 - ac_prev) / (1 - ac)
    var = betas * (1 - ac_prev) / (1 - ac) if variance == "posterior" else betas
    for i in reversed(range(nfe)):
        t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
        x0 = _x0_hat(model, x, t, ac[i].item(), prediction=prediction)
        x = coef_x0[i].item() * x0 + coef_xt[i].item() * x
        if i > 0:
            x = x + var[i].sqrt().item() * _noise(shape, generator, device)
    return x


@register("ddim")
@torch.no_grad()
def ddim_sample(
    model,
    shape,
    schedule: Schedule,
    nfe: int,
    *,
    generator: torch.Generator,
    prediction: str = "eps",
    spacing: str = "linspace",
) -> torch.Tensor:
    """Deterministic DDIM (η = 0, Song et al. 2021, eq. 12) on the respaced chain:
    x_{i−1} = √ᾱ'_{i−1} x̂0 + √(1−ᾱ'_{i−1}) ε̂, with ε̂ re-derived from the clipped x̂0
    (diffusers' ``use_clipped_model_output=True``) whatever the network predicts; the last
    step returns x̂0 (ᾱ'_0 = 1)."""
    options = {"generator": generator, "prediction": prediction, "spacing": spacing}
    timesteps, ac, device, x = _chain(model, shape, schedule, nfe, **options)
    for i in reversed(range(nfe)):
        t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
        a = ac[i].item()
        x0 = _x0_hat(model, x, t, a, prediction=prediction)
        if i == 0:
            return x0
        _, eps = to_x0_eps("x0", x0, x, a)  # ε̂ = (x_t − √ᾱ x̂0)/√(1−ᾱ), 1 − ᾱ > 0
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
    prediction: str = "eps",
    spacing: str = "linspace",
) -> torch.Tensor:
    """Look a sampler up by name and run it: the one way grids, FID and eval sample.
    ``ddpm_variance`` is DDPM's σ² choice (``sampling.ddpm_variance``), unused by DDIM;
    ``prediction`` is what the model outputs (``loss.prediction``) and ``spacing`` which
    timesteps a respaced chain visits (``sampling.spacing``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    options = {"variance": ddpm_variance} if name == "ddpm" else {}
    return SAMPLERS[name](
        model,
        shape,
        schedule,
        nfe,
        generator=generator,
        prediction=prediction,
        spacing=spacing,
        **options,
    )


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], on the same device."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

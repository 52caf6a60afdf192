"""Loss weighting families: each one function λ(SNR) on the x0-MSE scale, registered once.

A family says how much each noise level counts, as a weight on ‖x̂0 − x0‖². The loss a
run minimises is in its prediction's own space, so the weight there is λ converted
(‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖², ‖v̂ − v‖² = (SNR+1)·‖x̂0 − x0‖²):

    w_eps = λ / SNR,   w_x0 = λ,   w_v = λ / (SNR + 1).

So "Min-SNR-γ" is min(SNR, γ) whatever the target, as in Hang et al. 2023. The one
exception is ``uniform``: each prediction's own plain MSE (w = 1), which is a different λ
per target. The table w(t) this module makes is all the fused Triton loss reads
(:mod:`fastdiff.kernels.weighted_mse`), so a family added here reaches every path.

A new family is one :func:`family` call: its λ, its parameters (``loss.gamma``,
``loss.k``) with their defaults (``None``: the user must set it) and, if λ/SNR has a
finite limit at SNR = 0, that limit (ε-prediction's weight there; never reached in a
run, as ε-prediction with a zero terminal SNR is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdiff.diffusion import PREDICTIONS, eps_mse_per_target_mse


@dataclass(frozen=True)
class Family:
    name: str
    lam: Callable | None  # λ(snr, **params) on the x0 scale; None: uniform in every space
    params: dict[str, float | None]  # parameter -> default (None: required)
    eps_limit: Callable | None  # lim_{SNR→0} λ/SNR given the params, where finite
    source: str

    def resolve(self, given: dict[str, float | None]) -> dict[str, float]:
        """This family's parameters from ``loss.*`` (``given``), defaults filled in;
        ValueError with one line for a missing or non-positive one."""
        out = {}
        for name, default in self.params.items():
            value = given.get(name)
            value = default if value is None else value
            if value is None:
                raise ValueError(
                    f"loss.weighting={self.name} needs loss.{name} ({self.source}): set it, "
                    f"e.g. loss.{name}=1"
                )
            if not value > 0:
                raise ValueError(f"loss.{name} must be > 0 for {self.name}, got {value}")
            out[name] = float(value)
        return out


FAMILIES: dict[str, Family] = {}


def family(name: str, *, params=None, eps_limit=None, source: str):
    """Register λ(snr, **params) as the weighting family ``name``."""

    def deco(lam):
        FAMILIES[name] = Family(name, lam, dict(params or {}), eps_limit, source)
        return lam

    return deco


FAMILIES["uniform"] = Family(
    "uniform", None, {}, None, "the prediction's own plain MSE, Ho et al. 2020 eq. 14 for ε"
)


# Min-SNR-γ: w_t = min(SNR(t), γ) on the x0-MSE (Hang et al. 2023, arXiv:2303.09556, §3.4)
@family(
    "minsnr", params={"gamma": 5.0}, eps_limit=lambda gamma: 1.0, source="Hang et al. 2023 §3.4"
)
def _minsnr(snr, *, gamma):
    return torch.clamp(snr, max=gamma)


# k-diffusion's weighting_soft_min_snr with σ_data² = 1/γ, written as a weight on ‖x̂0 − x0‖²:
# the harmonic "soft" minimum 1/(1/SNR + 1/γ) (Crowson et al. 2024, arXiv:2401.11605)
@family(
    "soft_minsnr",
    params={"gamma": 5.0},
    eps_limit=lambda gamma: 1.0,
    source="Crowson et al. 2024 (HDiT), soft-min-SNR",
)
def _soft_minsnr(snr, *, gamma):
    return snr * gamma / (snr + gamma)


# truncated SNR: L = max(‖x̂0 − x0‖², ‖ε̂ − ε‖²) = max(SNR, 1)·‖x̂0 − x0‖²
# (Salimans & Ho 2022, arXiv:2202.00512, §4)
@family("maxsnr", source="Salimans & Ho 2022 §4, truncated SNR")
def _maxsnr(snr):
    return torch.clamp(snr, min=1.0)


# P2: λ'_t = λ_t / (k + SNR(t))^γ with λ_t = 1 on L_simple, the ε-MSE (Choi et al. 2022,
# arXiv:2204.00227, §3.2), so SNR/(k + SNR)^γ on the x0-MSE
@family(
    "p2",
    params={"k": None, "gamma": None},
    eps_limit=lambda k, gamma: k**-gamma,
    source="Choi et al. 2022 §3.2",
)
def _p2(snr, *, k, gamma):
    return snr / (k + snr) ** gamma


# debiased estimation: 1/√SNR(t) on the ε-MSE (Yu et al. 2023, arXiv:2310.08442), so √SNR
# on the x0-MSE
@family("debiased", source="Yu et al. 2023")
def _debiased(snr):
    return snr.sqrt()


def canonical_loss(flat: dict) -> dict:
    """A flat config ({"loss.weighting": …}) as fastdiff records it: the old key
    ``loss.minsnr_gamma`` read as ``loss.gamma``, the family's defaults filled in and the
    parameters it does not use set to None (uniform's γ means nothing). Records written
    before the rename compare equal to new ones."""
    out = dict(flat)
    old = out.pop("loss.minsnr_gamma", None)
    if old is not None:
        if out.get("loss.gamma") not in (None, old):
            raise ValueError(
                f"loss.minsnr_gamma={old} and loss.gamma={out['loss.gamma']} disagree: "
                "set only loss.gamma (minsnr_gamma is its old name)"
            )
        out["loss.gamma"] = old
    fam = FAMILIES.get(out.get("loss.weighting", "uniform"))
    if fam is None:
        return out
    for name in ("gamma", "k"):  # a parameter the family has no use for is not a setting
        given = out.get(f"loss.{name}")
        out[f"loss.{name}"] = (
            (fam.params[name] if given is None else given) if name in fam.params else None
        )
    return out


def check_loss(weighting: str, prediction: str, flat: dict) -> dict[str, float]:
    """:func:`check` on a flat config's loss keys."""
    return check(weighting, prediction, {"gamma": flat.get("loss.gamma"), "k": flat.get("loss.k")})


def check(weighting: str, prediction: str, params: dict) -> dict[str, float]:
    """The family's resolved parameters; ValueError (one line) for what makes no sense."""
    if weighting not in FAMILIES:
        raise ValueError(f"unknown loss.weighting {weighting!r}: use one of {', '.join(FAMILIES)}")
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"unknown loss.prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}"
        )
    return FAMILIES[weighting].resolve(params)


def weights(
    snr: torch.Tensor, weighting: str, *, prediction: str = "eps", **params
) -> torch.Tensor:
    """w(t) on the ``prediction``'s own MSE for each SNR (any shape), float64.

    ε-prediction at SNR = 0 takes the family's limit of λ/SNR; a family without a finite
    one (maxsnr, debiased) raises, as ε-prediction cannot reach SNR = 0 anyway."""
    fam = FAMILIES[weighting]
    values = check(weighting, prediction, params)
    snr = snr.double()
    if fam.lam is None:
        return torch.ones_like(snr)
    lam = fam.lam(snr, **values)
    if prediction == "x0":
        return lam
    if prediction == "v":
        return lam / (snr + 1)
    zero = snr == 0
    if zero.any() and fam.eps_limit is None:
        raise ValueError(
            f"loss.weighting={weighting} has no finite ε-prediction weight at SNR = 0: "
            "use loss.prediction=v or x0"
        )
    safe = torch.where(zero, torch.ones_like(snr), snr)
    limit = fam.eps_limit(**values) if fam.eps_limit is not None else 0.0
    return torch.where(zero, torch.full_like(snr, limit), lam / safe)


def eps_mse_scale(w: torch.Tensor, snr: torch.Tensor, prediction: str) -> torch.Tensor:
    """s(t) with plain ε-MSE = s · (weighted loss), for the logged unweighted ε-MSE. Where
    the target's MSE says nothing of ε (v or x0 at SNR = 0, where x_t = ε is known
    exactly) the ε-MSE is 0."""
    m = eps_mse_per_target_mse(prediction, snr.double())
    return torch.where(m > 0, m / torch.where(w > 0, w, torch.ones_like(w)), torch.zeros_like(m))

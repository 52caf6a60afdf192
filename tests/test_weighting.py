"""Weighting families against their sources' formulas, computed here independently,
in the space each source writes them in; and zero terminal SNR against Lin et al. 2024."""

import math

import numpy as np
import pytest
import torch

from fastdiff.config import compose, to_config
from fastdiff.diffusion import Schedule, make_betas, snr
from fastdiff.errors import ConfigError
from fastdiff.weighting import FAMILIES, canonical_loss, weights
from tests.conftest import tiny

GAMMA, K = 5.0, 2.0  # k = 2: p2's ε limit k^-γ is not 1
SNRS = [0.0, 1e-9, 1.0, GAMMA, 1e8]  # zero, tiny, 1, γ, huge


def soft_min_kdiffusion(s, gamma):
    """k-diffusion's weighting_soft_min_snr, (σ σ_d)²/(σ² + σ_d²)², on its c_out-scaled
    target, with σ² = 1/SNR and σ_d² = 1/γ, brought to the x0-MSE by 1/c_out²,
    c_out² = σ² σ_d²/(σ² + σ_d²)."""
    if s == 0:
        return 0.0  # σ → ∞: (σ_d²σ²)/(σ²+σ_d²)² · (σ²+σ_d²)/(σ²σ_d²) = 1/(σ²+σ_d²) → 0
    sig2, d2 = 1 / s, 1 / gamma
    w_f = sig2 * d2 / (sig2 + d2) ** 2
    return w_f / (sig2 * d2 / (sig2 + d2))


def expected(family, target, s):
    """The weight on the ``target``'s own MSE, from each source's own formula."""
    if family == "uniform":
        return 1.0
    if family == "minsnr":  # Min-SNR-γ official code: min(snr, γ), / snr (ε), / (snr+1) (v)
        lam = min(s, GAMMA)
        return {"x0": lam, "eps": 1.0 if s == 0 else lam / s, "v": lam / (s + 1)}[target]
    if family == "soft_minsnr":
        lam = soft_min_kdiffusion(s, GAMMA)
        return {"x0": lam, "eps": 1.0 if s == 0 else lam / s, "v": lam / (s + 1)}[target]
    if family == "maxsnr":  # max(‖x̂0−x0‖², ‖ε̂−ε‖²): max(SNR, 1) on x0
        lam = max(s, 1.0)
        return lam / s if target == "eps" else lam / (s + 1) if target == "v" else lam
    if family == "p2":  # 1/(k + SNR)^γ on the ε-MSE
        eps_w = 1 / (K + s) ** GAMMA
        return {"eps": eps_w, "x0": eps_w * s, "v": eps_w * s / (s + 1)}[target]
    if family == "debiased":  # 1/√SNR on the ε-MSE, so 1/√SNR · SNR on the x0-MSE
        if target == "eps":
            return 1 / math.sqrt(s)
        return math.sqrt(s) if target == "x0" else math.sqrt(s) / (s + 1)
    raise AssertionError(family)


PARAMS = {
    "minsnr": {"gamma": GAMMA},
    "soft_minsnr": {"gamma": GAMMA},
    "p2": {"k": K, "gamma": GAMMA},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_each_family_matches_its_source_at_every_snr(family, target):
    diverges = target == "eps" and family in ("maxsnr", "debiased")
    snrs = SNRS[1:] if diverges else SNRS
    got = weights(
        torch.tensor(snrs, dtype=torch.float64), family, prediction=target, **PARAMS.get(family, {})
    )
    assert torch.isfinite(got).all(), got
    want = [expected(family, target, s) for s in snrs]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", ["maxsnr", "debiased"])
def test_eps_weight_with_no_finite_limit_at_zero_snr_is_refused(family):
    with pytest.raises(ValueError, match="use loss.prediction=v or x0"):
        weights(torch.tensor([0.0, 1.0]), family, prediction="eps")


def test_minsnr_is_the_same_lambda_for_every_target():
    # The same x0-scale weight: w_target · (‖target err‖² per ‖x0 err‖²) is min(SNR, γ)
    s = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)
    per_x0 = {"eps": s, "x0": torch.ones_like(s), "v": s + 1}
    for target, factor in per_x0.items():
        lam = weights(s, "minsnr", prediction=target, gamma=GAMMA) * factor
        np.testing.assert_allclose(lam.numpy(), np.minimum(s.numpy(), GAMMA), rtol=1e-12)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=p2"], "needs loss.k"),
        (["loss=p2", "loss.k=1"], "needs loss.gamma"),
        (["loss=minsnr", "loss.gamma=0"], "loss.gamma must be > 0"),
        (["loss=soft_minsnr", "loss.gamma=-2"], "loss.gamma must be > 0"),
        (["loss=p2", "loss.k=-1", "loss.gamma=1"], "loss.k must be > 0"),
        (["loss.weighting=nope"], "unknown loss.weighting"),
        (["loss.prediction=score"], "unknown loss.prediction"),
        (["diffusion.zero_terminal_snr=true"], "use loss.prediction=v or x0"),
        (["loss=minsnr", "loss.minsnr_gamma=1", "loss.gamma=2"], "disagree"),
    ],
)
def test_config_refuses_what_makes_no_sense_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        to_config(compose(tiny(tmp_path, *overrides)))
    assert "\n" not in str(err.value)


def test_old_gamma_key_is_read_as_gamma_and_defaults_are_recorded(tmp_path):
    cfg = to_config(compose(tiny(tmp_path, "loss=minsnr", "loss.minsnr_gamma=2")))
    assert (cfg.loss.gamma, cfg.loss.minsnr_gamma) == (2.0, None)
    assert to_config(compose(tiny(tmp_path, "loss=minsnr"))).loss.gamma == 5.0
    old = {"loss.weighting": "minsnr", "loss.minsnr_gamma": 5.0}
    assert canonical_loss(old)["loss.gamma"] == 5.0 and "loss.minsnr_gamma" not in canonical_loss(
        old
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_follows_lin_et_al_algorithm_1(schedule):
    T = 1000
    base = make_betas(schedule, T)
    got = make_betas(schedule, T, zero_terminal_snr=True)
    # Algorithm 1, in numpy: shift √ᾱ to end at 0, scale to keep its start, rebuild β
    root = np.sqrt(np.cumprod(1 - base.numpy()))
    r0, rT = root[0], root[-1]
    root = (root - rT) * r0 / (r0 - rT)
    ab = root**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    np.testing.assert_allclose(got.numpy(), 1 - alphas, rtol=1e-12, atol=1e-15)
    ac = Schedule(got).alphas_cumprod
    assert ac[-1].item() == 0.0 and snr(ac)[-1].item() == 0.0
    assert ac[0].item() == pytest.approx(Schedule(base).alphas_cumprod[0].item(), rel=1e-12)
    assert base[-1] < 1 and got[-1].item() == 1.0  # without it SNR(T) > 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    base = make_betas(schedule, 1000)
    theirs = diffusers.rescale_zero_terminal_snr(base.clone())
    np.testing.assert_allclose(
        make_betas(schedule, 1000, zero_terminal_snr=True).numpy(), theirs.numpy(), rtol=1e-10
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["x0", "v"])
def test_every_family_is_finite_on_a_zero_terminal_snr_schedule(family, target):
    s = snr(Schedule.make("cosine", 1000, zero_terminal_snr=True).alphas_cumprod)
    w = weights(s, family, prediction=target, **PARAMS.get(family, {}))
    assert torch.isfinite(w).all() and (w >= 0).all()


FAMILY_OVERRIDES = {
    "uniform": [],
    "minsnr": ["loss.gamma=5"],
    "soft_minsnr": ["loss.gamma=5"],
    "maxsnr": [],
    "p2": ["loss.k=1", "loss.gamma=1"],
    "debiased": [],
}


@pytest.mark.parametrize("ztsnr", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_twenty_steps_of_every_family_under_cosine_stay_finite(tmp_path, prediction, ztsnr):
    """The run's own objective (Objective.of) on the tiny UNet, 20 Adam steps per family;
    ε-prediction with zero terminal SNR is refused before any step."""
    from fastdiff.data import load_images
    from fastdiff.objective import Objective
    from fastdiff.unet import build_model

    images = load_images("digits", None, 8)[:4].float() / 127.5 - 1
    composed = compose(
        tiny(
            tmp_path,
            "diffusion=cosine",
            f"diffusion.zero_terminal_snr={str(ztsnr).lower()}",
            f"loss.prediction={prediction}",
        )
    )
    for family, params in FAMILY_OVERRIDES.items():
        node = composed.copy()
        node.loss.weighting = family
        for item in params:
            key, value = item.split("=")
            node.loss[key.split(".")[1]] = float(value)
        if ztsnr and prediction == "eps":
            with pytest.raises(ConfigError, match="use loss.prediction=v or x0"):
                to_config(node)
            continue
        cfg = to_config(node)
        objective = Objective.of(cfg, "cpu")
        assert torch.isfinite(objective.weights).all() and torch.isfinite(objective.eps_scale).all()
        torch.manual_seed(0)
        model = build_model("unet_tiny", 16, 0.0, 8)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            t = torch.randint(0, 1000, (4,), generator=g)
            t[0] = 999  # the last step, SNR = 0 with zero terminal SNR
            loss = objective(model, images, t, torch.randn(images.shape, generator=g))
            assert torch.isfinite(loss).all(), (family, prediction, ztsnr)
            assert torch.isfinite(objective.unweighted(loss.detach(), t)).all()
            opt.zero_grad()
            loss.mean().backward()
            opt.step()

"""The diffusion formulas against values computed independently here."""

import math

import numpy as np
import pytest
import torch

from fastdiff.diffusion import Schedule, make_betas, q_sample, snr
from fastdiff.objective import Objective
from tests.conftest import table


def test_linear_betas_match_ddpm_endpoints_and_spacing():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    expected = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=0, atol=1e-15)


def test_cosine_betas_follow_nichol_dhariwal():
    T, s = 50, 0.008

    def abar(t):
        return (
            math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
            / math.cos(s / (1 + s) * math.pi / 2) ** 2
        )

    expected = [min(1 - abar(t + 1) / abar(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(make_betas("cosine", T).numpy(), expected, rtol=1e-12)


def test_cosine_last_beta_is_clipped_and_alphas_cumprod_decreases():
    betas = make_betas("cosine", 1000)
    assert betas.max().item() == pytest.approx(0.999)
    ac = Schedule(betas).alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1])
    # ᾱ at t = T/2 is cos²(π/4 · (0.5 + s)/(1 + s)) / f(0) for the cosine schedule.
    s = 0.008
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    mid = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / f0
    assert ac[499].item() == pytest.approx(mid, rel=1e-9)


def test_alphas_cumprod_is_the_running_product():
    betas = make_betas("linear", 10)
    expected, running = [], 1.0
    for b in betas.tolist():
        running *= 1 - b
        expected.append(running)
    np.testing.assert_allclose(Schedule(betas).alphas_cumprod.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("schedule, T", [("quadratic", 10), ("linear", 0), ("cosine", -3)])
def test_bad_schedule_arguments_raise(schedule, T):
    with pytest.raises(ValueError):
        make_betas(schedule, T)


def test_snr_is_signal_over_noise():
    ac = torch.tensor([0.5, 0.8, 0.2], dtype=torch.float64)
    np.testing.assert_allclose(snr(ac).numpy(), [1.0, 4.0, 0.25])


def test_minsnr_downweights_only_high_snr_timesteps_of_linear_schedule():
    sched = Schedule.make("linear", 1000)
    w = table(sched, "minsnr")
    s = snr(sched.alphas_cumprod)
    assert torch.all(w[s <= 5] == 1) and torch.all(w[s > 5] < 1)
    assert (s > 5).sum() > 0 and (s <= 5).sum() > 0


def test_q_sample_formula():
    ac = torch.tensor([0.9, 0.25], dtype=torch.float64)
    x0 = torch.full((2, 1, 2, 2), 2.0)
    noise = torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([1, 0])
    out = q_sample(x0, t, noise, ac)
    # t=1: sqrt(.25)*2 + sqrt(.75)*(-1); t=0: sqrt(.9)*2 + sqrt(.1)*(-1)
    assert out[0].flatten().tolist() == pytest.approx([0.5 * 2 - math.sqrt(0.75)] * 4, rel=1e-6)
    assert out[1].flatten().tolist() == pytest.approx(
        [math.sqrt(0.9) * 2 - math.sqrt(0.1)] * 4, rel=1e-6
    )


def test_objective_loss_is_per_sample_weighted_mse_of_the_target():
    # A "model" that always predicts zeros: the loss is w_t · mean(target²).
    def model(x, t):
        return torch.zeros_like(x)

    x0 = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), -1.0)])
    noise = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 3.0)])
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ac = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    t = torch.tensor([0, 2])
    eps = Objective(ac, weights)(model, x0, t, noise)
    assert eps.tolist() == pytest.approx([0.5 * 4.0, 2.0 * 9.0])
    x0_ = Objective(ac, weights, prediction="x0")(model, x0, t, noise)
    assert x0_.tolist() == pytest.approx([0.5 * 1.0, 2.0 * 1.0])
    # v = √ᾱ ε − √(1−ᾱ) x0: sample 0 √.9·2 − √.1·1, sample 1 √.1·3 + √.9·1
    v = Objective(ac, weights, prediction="v")(model, x0, t, noise)
    v0, v1 = math.sqrt(0.9) * 2 - math.sqrt(0.1), math.sqrt(0.1) * 3 + math.sqrt(0.9)
    assert v.tolist() == pytest.approx([0.5 * v0**2, 2.0 * v1**2], rel=1e-6)

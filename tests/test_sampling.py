"""Respacing and the samplers, checked with exact oracles (ε, x0 and v)."""

import pytest
import torch

from fastdiff.diffusion import PREDICTIONS, Schedule, target, to_x0_eps
from fastdiff.sampling import ddim_sample, ddpm_sample, respace, sample, to_uint8


def test_respace_with_nfe_equal_T_is_the_original_chain():
    sched = Schedule.make("linear", 100)
    timesteps, ac = respace(sched, 100)
    assert timesteps.tolist() == list(range(100))
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    torch.testing.assert_close(1 - ac / ac_prev, sched.betas, rtol=1e-10, atol=1e-12)


def test_respace_spacing_and_marginals():
    sched = Schedule.make("cosine", 1000)
    timesteps, ac = respace(sched, 10)
    assert timesteps[0].item() == 0 and timesteps[-1].item() == 999
    gaps = torch.diff(timesteps)
    assert gaps.min() >= 110 and gaps.max() <= 111
    # The respaced chain keeps the marginals: ᾱ'_i == ᾱ_{τ_i}.
    full = torch.cumprod(1 - sched.betas, 0)
    torch.testing.assert_close(ac, full[timesteps])


@pytest.mark.parametrize("nfe", [1, 2, 3, 7])
def test_every_respaced_chain_starts_at_T_minus_1(nfe):
    timesteps, _ = respace(Schedule.make("linear", 1000), nfe)
    assert timesteps[-1].item() == 999 and len(timesteps) == nfe
    assert timesteps.unique().numel() == nfe


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_a_one_step_chain_calls_the_model_at_T_minus_1(sampler):
    sched = Schedule.make("linear", 1000)
    target = torch.full((1, 3, 4, 4), 0.3)
    model = Oracle(target, sched.alphas_cumprod)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1].tolist()))
    x = sampler(model, (2, 3, 4, 4), sched, 1, generator=torch.Generator().manual_seed(0))
    assert seen == [[999, 999]]
    # the oracle's x̂0 from t = T−1 is the point itself, not the clipped starting noise
    torch.testing.assert_close(x, target.expand(2, -1, -1, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("nfe", [0, 1001])
def test_respace_rejects_bad_nfe(nfe):
    with pytest.raises(ValueError, match="nfe"):
        respace(Schedule.make("linear", 1000), nfe)


class Oracle(torch.nn.Module):
    """The exact ε-predictor when the data distribution is a single point x*:
    ε̂(x_t, t) = (x_t − √ᾱ_t x*) / √(1 − ᾱ_t)."""

    def __init__(self, target, alphas_cumprod):
        super().__init__()
        self.register_buffer("target", target)
        self.ac = alphas_cumprod.float()
        self.w = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        a = self.ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_a_point_mass(sampler, schedule):
    sched = Schedule.make(schedule, 1000)
    target = torch.linspace(-0.8, 0.8, 3 * 4 * 4).view(1, 3, 4, 4)
    model = Oracle(target, sched.alphas_cumprod)
    x = sampler(model, (5, 3, 4, 4), sched, 25, generator=torch.Generator().manual_seed(0))
    assert model.calls == 25
    torch.testing.assert_close(x, target.expand(5, -1, -1, -1), atol=1e-3, rtol=0)


def test_ddim_is_deterministic_and_ddpm_is_not():
    sched = Schedule.make("linear", 100)

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return 0.5 * x

    shape = (2, 1, 4, 4)
    a = sample("ddim", Zero(), shape, sched, nfe=10, generator=torch.Generator().manual_seed(1))
    b = sample("ddim", Zero(), shape, sched, nfe=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    c = ddpm_sample(Zero(), shape, sched, 10, generator=g)
    d = ddpm_sample(Zero(), shape, sched, 10, generator=g)
    assert not torch.equal(c, d)


def test_unknown_sampler_and_variance_raise():
    sched = Schedule.make("linear", 10)
    with pytest.raises(ValueError, match="sampler"):
        sample("euler", None, (1, 1, 2, 2), sched, nfe=5, generator=torch.Generator())
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(None, (1, 1, 2, 2), sched, 5, generator=torch.Generator(), variance="learned")


def test_to_uint8_maps_range_endpoints():
    out = to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 255, 255]


class GaussianOracle(torch.nn.Module):
    """The exact ε-predictor for Gaussian data x0 ~ N(0, s²) in every dimension:
    ε̂(x_t, t) = E[ε | x_t] = √(1−ᾱ_t) x_t / (ᾱ_t s² + 1 − ᾱ_t). Records each input x_t,
    so every step of a chain can be checked, not only its end."""

    def __init__(self, s, alphas_cumprod):
        super().__init__()
        self.s2, self.ac = s**2, alphas_cumprod.double()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(x.clone())
        a = self.ac[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x / (a * self.s2 + 1 - a)).float()


def _respaced(schedule, nfe):
    """τ_i and ᾱ'_i, computed here from the schedule (evenly spaced, ending at T−1)."""
    T = schedule.T
    taus = [round(i * (T - 1) / (nfe - 1)) for i in range(nfe)]
    ac = torch.cumprod(1 - schedule.betas.double(), 0)
    return taus, [ac[t].item() for t in taus]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_matches_the_gaussian_variance_recursion_at_every_step(schedule):
    """For Gaussian data each DDPM step is linear: x_{i−1} = A_i x_i + σ_i z with the eq. 7
    coefficients, so Var(x_{i−1}) = A_i² Var(x_i) + σ_i². A wrong posterior-mean or
    variance coefficient shows at the step where it acts."""
    s, nfe, n = 0.3, 8, 20000
    sched = Schedule.make(schedule, 1000)
    _, ac = _respaced(sched, nfe)
    model = GaussianOracle(s, sched.alphas_cumprod)
    out = ddpm_sample(model, (n, 1, 1, 1), sched, nfe, generator=torch.Generator().manual_seed(0))
    var, expected = 1.0, []
    for i in reversed(range(nfe)):
        expected.append(var)  # the variance of the input at this step
        a, a_prev = ac[i], (ac[i - 1] if i else 1.0)
        beta = 1 - a / a_prev
        g = a**0.5 * s**2 / (a * s**2 + 1 - a)  # x̂0 = g x_t
        A = a_prev**0.5 * beta / (1 - a) * g + (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)
        var = A**2 * var + (beta * (1 - a_prev) / (1 - a) if i else 0.0)
    got = [x.double().var().item() for x in model.seen] + [out.double().var().item()]
    assert len(model.seen) == nfe
    assert got == pytest.approx([*expected, var], rel=0.05)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_follows_its_deterministic_map_at_every_step(schedule):
    """For Gaussian data each DDIM step multiplies x by D_i = √ᾱ'_{i−1} g + √(1−ᾱ'_{i−1})
    (1 − √ᾱ'_i g)/√(1−ᾱ'_i): every intermediate x_i / x_T is a known product."""
    s, nfe = 0.3, 6
    sched = Schedule.make(schedule, 1000)
    _, ac = _respaced(sched, nfe)
    model = GaussianOracle(s, sched.alphas_cumprod)
    out = ddim_sample(model, (64, 1, 1, 1), sched, nfe, generator=torch.Generator().manual_seed(1))
    x_T = model.seen[0].double()
    factor = 1.0
    for step, i in enumerate(reversed(range(nfe))):
        torch.testing.assert_close(model.seen[step].double(), factor * x_T, rtol=1e-4, atol=1e-6)
        a = ac[i]
        g = a**0.5 * s**2 / (a * s**2 + 1 - a)
        if i == 0:
            factor *= g  # the last step returns x̂0
        else:
            a_prev = ac[i - 1]
            factor *= a_prev**0.5 * g + (1 - a_prev) ** 0.5 * (1 - a**0.5 * g) / (1 - a) ** 0.5
    torch.testing.assert_close(out.double(), factor * x_T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "variance, prediction, spacing",
    [("posterior", "eps", "linspace"), ("beta", "v", "trailing"), ("posterior", "x0", "trailing")],
)
def test_grids_sample_with_the_configured_options(
    tmp_path, monkeypatch, variance, prediction, spacing
):
    """sampling.ddpm_variance reaches the grid's DDPM sampler (and DDIM takes none),
    loss.prediction and sampling.spacing reach both, and FID's generator and FID job hand
    their sampler the same options: one dispatch for all."""
    from types import SimpleNamespace

    from fastdiff.config import EvalConfig, SamplingConfig
    from fastdiff.fid import generate
    from fastdiff.jobs import FIDJob, Grids
    from fastdiff.sampling import SAMPLERS

    seen = []

    def spy(model, shape, schedule, nfe, generator, **options):
        seen.append(options)
        return torch.zeros(shape)

    monkeypatch.setitem(SAMPLERS, "ddpm", spy)
    monkeypatch.setitem(SAMPLERS, "ddim", spy)
    schedule = Schedule.make("linear", 10)
    reference = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    both = {"prediction": prediction, "spacing": spacing}
    expected = [{"variance": variance, **both}, both]
    for sampler in ("ddpm", "ddim"):
        cfg = SamplingConfig(
            grid_sampler=sampler, grid_images=4, ddpm_variance=variance, spacing=spacing
        )
        grids = Grids(
            tmp_path, cfg, schedule, (3, 8, 8), reference=reference, prediction=prediction
        )
        grids(1, torch.nn.Identity())
    assert seen == expected
    seen.clear()
    model = torch.nn.Linear(1, 1)  # generate reads the device from the parameters
    for sampler in ("ddpm", "ddim"):
        generate(
            model,
            schedule,
            range(2),
            (3, 8, 8),
            sampler=sampler,
            nfe=2,
            seed=0,
            batch_size=2,
            ddpm_variance=variance,
            prediction=prediction,
            spacing=spacing,
        )
    assert seen == expected
    seen.clear()
    # The training-time FID job: eval.sampler with the run's prediction and spacing (its
    # DDPM takes the default σ², as before).
    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=False)
    acc.wait_for_everyone = lambda: None
    for sampler in ("ddpm", "ddim"):
        job = FIDJob(
            None,
            EvalConfig(sampler=sampler, nfe=2, batch_size=2),
            acc,
            None,
            schedule=schedule,
            shape=(3, 8, 8),
            prediction=prediction,
            spacing=spacing,
        )
        job._score(1, model, 2, "val/fid_milestone", final=False)
    assert seen == [{"variance": "posterior", **both}, both]


def test_a_bad_ddpm_variance_is_one_line(tmp_path):
    from fastdiff.config import ConfigError, compose, to_config
    from tests.conftest import tiny

    with pytest.raises(ConfigError, match="sampling.ddpm_variance must be"):
        to_config(compose(tiny(tmp_path, "sampling.ddpm_variance=sigma")))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_x0_eps_inverts_the_training_target(prediction):
    """(x̂0, ε̂) from the target a network is trained on, at x_t built here (DDPM eq. 4),
    are the x0 and ε it was built from, down to ᾱ = 0 for v and x0 (zero terminal SNR)
    and ᾱ → 1; the v target is checked against its definition too."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    levels = [0.0 if prediction != "eps" else 1e-4, 0.02, 0.3, 0.7, 0.95, 0.9999]
    a = torch.tensor(levels, dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = target(prediction, x0, noise, a)
    if prediction == "v":  # Salimans & Ho 2022: v = α ε − σ x0, α = √ᾱ, σ = √(1−ᾱ)
        torch.testing.assert_close(out, a.sqrt() * noise - (1 - a).sqrt() * x0)
    x0_hat, eps_hat = to_x0_eps(prediction, out, x_t, a)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-10)
    for i, level in enumerate(levels):  # ᾱ as a float, as the samplers pass it
        x0_hat, eps_hat = to_x0_eps(prediction, out[i], x_t[i], level)
        torch.testing.assert_close(x0_hat, x0[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(eps_hat, noise[i], rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "T, nfe, expected",
    [
        # round(arange(T, 0, −T/K)) − 1, worked out by hand, ascending
        (1000, 10, [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
        (20, 3, [6, 12, 19]),  # 20, 13.33, 6.67 -> 20, 13, 7
        (10, 4, [1, 4, 7, 9]),  # 10, 7.5, 5, 2.5 -> 10, 8, 5, 2 (ties to even)
        (40, 7, [5, 10, 16, 22, 28, 33, 39]),  # 40, 34.29, 28.57, 22.86, 17.14, 11.43, 5.71
        (7, 6, [0, 1, 3, 4, 5, 6]),  # 7, 5.83, 4.67, 3.5, 2.33, 1.17: the tie 3.5 -> 4
        (1000, 1, [999]),
        (5, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_trailing_spacing_is_diffusers_formula(T, nfe, expected):
    timesteps, ac = respace(Schedule.make("linear", T), nfe, spacing="trailing")
    assert timesteps.tolist() == expected
    torch.testing.assert_close(ac, Schedule.make("linear", T).alphas_cumprod[timesteps])


def test_trailing_spacing_has_nfe_distinct_steps_ending_at_T_minus_1():
    """Exact arithmetic: K steps for every K (diffusers' float arange has K+1 for some,
    the last at t = −1), starting at T−1 and stepping back by T/K rounded."""
    T = 1000
    for nfe in [*range(1, 130), *range(130, T + 1, 7), T]:
        timesteps, _ = respace(Schedule.make("linear", T), nfe, spacing="trailing")
        assert len(timesteps) == nfe and timesteps[-1].item() == T - 1
        gaps = torch.diff(timesteps).double()
        assert timesteps[0].item() >= 0 and bool((gaps > 0).all())
        assert bool(((gaps - T / nfe).abs() <= 1).all())


def test_unknown_spacing_and_prediction_raise():
    sched = Schedule.make("linear", 10)
    with pytest.raises(ValueError, match="spacing"):
        respace(sched, 5, spacing="leading")
    with pytest.raises(ValueError, match="prediction"):
        ddim_sample(None, (1, 1, 2, 2), sched, 5, generator=torch.Generator(), prediction="score")


class PointMass(torch.nn.Module):
    """The exact ``prediction`` network for data at a single point x*: ε = (x_t − √ᾱ x*)/√(1−ᾱ),
    and x0 = x*, v = √ᾱ ε − √(1−ᾱ) x* from it. Defined at ᾱ = 0 too (ε = x_t, v = −x*)."""

    def __init__(self, point, alphas_cumprod, prediction):
        super().__init__()
        self.register_buffer("point", point)
        self.ac, self.prediction = alphas_cumprod.double(), prediction
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t[0].item())
        a = self.ac[t].view(-1, 1, 1, 1).float()
        eps = (x - a.sqrt() * self.point) / (1 - a).sqrt()
        return target(self.prediction, self.point.expand_as(x), eps, a)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize(
    "name, variance", [("ddim", None), ("ddpm", "posterior"), ("ddpm", "beta")]
)
def test_zero_terminal_snr_samples_are_finite_and_right(name, variance, prediction, spacing):
    """ᾱ_{T−1} = 0: the first step's x_t is pure noise and x̂0 = −v or the x0 output, no
    division by √ᾱ. A v- or x0-model's samples are finite and, for a point mass, the point."""
    sched = Schedule.make("linear", 1000, zero_terminal_snr=True)
    assert sched.alphas_cumprod[-1].item() == 0.0
    point = torch.linspace(-0.8, 0.8, 3 * 4 * 4).view(1, 3, 4, 4)
    model = PointMass(point, sched.alphas_cumprod, prediction)
    options = {"ddpm_variance": variance} if variance else {}
    x = sample(
        name,
        model,
        (3, 3, 4, 4),
        sched,
        nfe=10,
        generator=torch.Generator().manual_seed(0),
        prediction=prediction,
        spacing=spacing,
        **options,
    )
    assert model.seen[0] == 999 and len(model.seen) == 10
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, point.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_an_eps_model_cannot_sample_zero_terminal_snr(name):
    sched = Schedule.make("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        sample(name, None, (1, 1, 2, 2), sched, nfe=5, generator=torch.Generator())

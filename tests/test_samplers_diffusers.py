"""fastdiff's DDPM and DDIM against diffusers' DDPMScheduler / DDIMScheduler, stepped by
hand with the same network and the same noise: every intermediate x_t, for each prediction
target, with and without zero terminal SNR, with linspace and trailing spacing.

Both sides run in float64. diffusers keeps its schedule in float32, so each scheduler's
own ᾱ (from ``trained_betas`` = fastdiff's β, and for zero SNR diffusers' own rescale) is
first checked against fastdiff's to float32 precision, then replaced by fastdiff's float64
ᾱ so the trajectories can be compared to ~1e-10 rather than ~1e-6.
"""

import numpy as np
import pytest
import torch

from fastdiff import sampling
from fastdiff.diffusion import Schedule
from fastdiff.sampling import respace, sample

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)
# fastdiff refuses ε-prediction with zero terminal SNR (x̂0 = (x − ε̂)/0 at the first step).
TARGETS = [
    pytest.param(p, z, id=f"{p}-{'zsnr' if z else 'snr>0'}")
    for p in TYPES
    for z in (False, True)
    if not (p == "eps" and z)
]
# DDPM: diffusers steps from each timestep to the next one of its own list
# (DDPMScheduler.previous_timestep), so any (T, K) is exact; T=40, K=7 gives uneven gaps
# and .5 ties (linspace: 6.5 -> 6, 19.5 -> 20; trailing: 40/7 is not an integer).
DDPM_CASES = {"linspace": (40, 7), "trailing": (40, 7)}
# DDIM: diffusers steps back by T // K (DDIMScheduler.step's prev_timestep), which is the
# real gap only for evenly spaced timesteps with stride T // K. Trailing with K | T is that
# (T=20, K=5: 19, 15, 11, 7, 3). Linspace never is for 1 < K < T: its stride
# (T−1)/(K−1) differs from T // K. T=21, K=5 gives 0, 5, 10, 15, 20 (stride 5), and after
# set_timesteps(5) we set the scheduler's num_inference_steps to K−1 = 4, so that
# T // 4 = 5 is the stride and diffusers steps between the very timesteps it listed.
DDIM_CASES = {"linspace": (21, 5), "trailing": (20, 5)}


class Net(torch.nn.Module):
    """A fixed, non-trivial network in float64: out = 1.3 · tanh(conv(x) + b(t)) with a
    random 3×3 conv and a per-channel bias sin(ω_c t) that depends on t. Its outputs reach
    beyond [−1, 1], so the x̂0 clipping acts for the x0 target too. Records each call."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.conv.weight.copy_(0.4 * torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64))
            self.conv.bias.copy_(0.1 * torch.randn(3, generator=g, dtype=torch.float64))
        self.omega = torch.tensor([0.37, 0.61, 0.23], dtype=torch.float64)
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.tolist()))
        b = torch.sin(t.double()[:, None] * self.omega).view(-1, 3, 1, 1)
        return 1.3 * torch.tanh(self.conv(x) + b)


def _schedules(T, zero_snr, scheduler_cls, **kwargs):
    """fastdiff's schedule and a diffusers scheduler on the same β: diffusers is given
    fastdiff's plain β and, for zero SNR, rescales them itself; both must agree."""
    ours = Schedule.make("cosine", T, zero_terminal_snr=zero_snr)
    plain = Schedule.make("cosine", T).betas
    theirs = scheduler_cls(
        num_train_timesteps=T,
        trained_betas=plain.numpy(),
        rescale_betas_zero_snr=zero_snr,
        clip_sample=True,
        clip_sample_range=1.0,
        thresholding=False,
        **kwargs,
    )
    ac = ours.alphas_cumprod
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ac, rtol=1e-5, atol=1e-6)
    if zero_snr:
        assert ac[-1].item() == 0.0 and theirs.alphas_cumprod[-1].item() == 0.0
    else:
        assert ac[-1].item() > 0
    theirs.betas, theirs.alphas, theirs.alphas_cumprod = ours.betas, 1 - ours.betas, ac.clone()
    return ours, theirs


@pytest.fixture
def noise(monkeypatch):
    """fastdiff's noise in float64, each draw recorded so diffusers can be given it."""
    draws = []

    def recorded(shape, generator, device):
        draws.append(torch.randn(shape, generator=generator, dtype=torch.float64))
        return draws[-1]

    monkeypatch.setattr(sampling, "_noise", recorded)
    return draws


def _fastdiff(name, model, schedule, nfe, target, spacing, **options):
    """fastdiff's trajectory: the input x_t of every network call, then the sample."""
    out = sample(
        name,
        model,
        SHAPE,
        schedule,
        nfe=nfe,
        generator=torch.Generator().manual_seed(7),
        prediction=target,
        spacing=spacing,
        **options,
    )
    states, ts = zip(*model.calls)
    model.calls.clear()
    return [*states, out], [t[0] for t in ts]


def _diffusers(scheduler, model, x, step):
    """diffusers' trajectory from x_T = x, stepped by hand (as a pipeline does)."""
    states, ts = [], []
    for t in scheduler.timesteps.tolist():
        out = model(x, torch.full((SHAPE[0],), t))
        states.append(x)
        ts.append(t)
        x = step(out, t, x).prev_sample
    model.calls.clear()
    return [*states, x], ts


def _assert_same_trajectory(ours, theirs):
    (xs, ts), (ys, us) = ours, theirs
    assert ts == us
    assert len(xs) == len(ys) == len(ts) + 1
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.dtype == y.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=lambda m, i=i: f"x at {i}: {m}")
    assert xs[-1].abs().max() <= 1  # DDPM's and DDIM's last step return the clipped x̂0


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("target, zero_snr", TARGETS)
def test_ddim_matches_diffusers_at_every_step(noise, target, zero_snr, spacing):
    T, nfe = DDIM_CASES[spacing]
    ours, theirs = _schedules(
        T,
        zero_snr,
        DDIMScheduler,
        prediction_type=TYPES[target],
        set_alpha_to_one=True,  # the last step lands on ᾱ = 1, i.e. returns x̂0, as fastdiff
        timestep_spacing=spacing,
    )
    model = Net()
    traj = _fastdiff("ddim", model, ours, nfe, target, spacing)
    theirs.set_timesteps(nfe)
    gaps = -np.diff(theirs.timesteps.numpy())
    if spacing == "linspace":  # see DDIM_CASES
        theirs.num_inference_steps = nfe - 1
    assert (gaps == T // theirs.num_inference_steps).all()

    def step(out, t, x):
        # use_clipped_model_output: ε̂ re-derived from the clipped x̂0, as fastdiff does
        return theirs.step(out, t, x, eta=0.0, use_clipped_model_output=True)

    _assert_same_trajectory(traj, _diffusers(theirs, model, noise[0].clone(), step))
    assert len(noise) == 1  # η = 0: the starting noise only


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("target, zero_snr", TARGETS)
def test_ddpm_matches_diffusers_at_every_step(
    monkeypatch, noise, target, zero_snr, spacing, variance
):
    T, nfe = DDPM_CASES[spacing]
    ours, theirs = _schedules(
        T,
        zero_snr,
        DDPMScheduler,
        prediction_type=TYPES[target],
        # fixed_small: the posterior β̃ (DDPM eq. 7); fixed_large: β (DDPM §3.2)
        variance_type={"posterior": "fixed_small", "beta": "fixed_large"}[variance],
        timestep_spacing=spacing,
    )
    model = Net()
    traj = _fastdiff("ddpm", model, ours, nfe, target, spacing, ddpm_variance=variance)
    assert len(noise) == nfe  # x_T, then one draw per step but the last

    # diffusers draws the step noise with randn_tensor: replay fastdiff's draws. diffusers
    # adds noise whenever the *timestep* is > 0, so with trailing spacing (last t = 5 here)
    # it also adds noise at the last step, to x0: N(0, β') with fixed_large, and with
    # fixed_small √(max(β̃, 1e-20)) = 1e-10 times it (β̃ = 0 there). DDPM Algorithm 2 has
    # z = 0 at the last step, as fastdiff: diffusers gets zeros there, and the comparable
    # part, the mean, is compared.
    replay, extra = list(noise[1:]), []

    def randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        assert tuple(shape) == SHAPE and dtype == torch.float64
        if replay:
            return replay.pop(0)
        extra.append(shape)
        return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    theirs.set_timesteps(nfe)
    _assert_same_trajectory(traj, _diffusers(theirs, model, noise[0].clone(), theirs.step))
    assert not replay and len(extra) == int(theirs.timesteps[-1] > 0)


SPACING_CASES = [(1000, 1), (1000, 7), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (40, 7)]


# Linspace with K = 1 is left out: diffusers' linspace(0, T−1, 1) is [0], a one-step chain
# from pure noise at t = 0; fastdiff's one-step chain starts at T−1, as every chain does.
@pytest.mark.parametrize(
    "T, nfe, spacing",
    [
        (T, nfe, spacing)
        for T, nfe in SPACING_CASES
        for spacing in ("linspace", "trailing")
        if (nfe, spacing) != (1, "linspace")
    ],
)
def test_respaced_timesteps_are_diffusers_timesteps(T, nfe, spacing):
    theirs = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    theirs.set_timesteps(nfe)
    ours, _ = respace(Schedule.make("linear", T), nfe, spacing=spacing)
    assert ours.flip(0).tolist() == theirs.timesteps.tolist()


def test_trailing_where_diffusers_float_arange_adds_a_step():
    """diffusers' trailing timesteps are round(arange(T, 0, −T/K)) − 1 in floats: for
    T=1000, K=61 the arange has 62 values, the last ≈ 0, so its list ends with t = −1.
    fastdiff's K steps (exact arithmetic) are diffusers' first K."""
    theirs = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    theirs.set_timesteps(61)
    ours, _ = respace(Schedule.make("linear", 1000), 61, spacing="trailing")
    assert len(theirs.timesteps) == 62 and theirs.timesteps[-1].item() == -1
    assert ours.flip(0).tolist() == theirs.timesteps[:61].tolist()

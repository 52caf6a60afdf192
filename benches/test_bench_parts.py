"""Sampler vs bare forward passes, EMA update, Hutchinson vmap vs loop, shard loader."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benches._setup import DEVICE, MODEL, SMOKE, interleaved, sync, timings
from benches.ratios import paired_ratio
from fastdiff.curvature import CurvatureProbe
from fastdiff.diffusion import Schedule, snr, weighted_mse
from fastdiff.ema import EMA
from fastdiff.flat import flatten_
from fastdiff.objective import Objective
from fastdiff.sampling import ddim_sample, ddpm_sample
from fastdiff.unet import build_model
from fastdiff.weighting import weights

SAMPLE_BATCH = 2 if SMOKE else 16
ROUNDS = 1 if SMOKE else 2
SAMPLER_ROUNDS = 1 if SMOKE else 4


@pytest.fixture(scope="module")
def model():
    name, ch, size = MODEL
    return build_model(name, ch, 0.1, size).to(DEVICE).eval()


@pytest.mark.parametrize("sampler, nfe", [("ddpm", 50), ("ddim", 20)])
def test_sampler(benchmark, model, sampler, nfe):
    """The sampler against the model's own time for it, nfe bare no_grad forward passes
    on the same batch, interleaved round by round: the sampler's overhead
    (sampler / forward, with its interval) is in extra_info."""
    nfe = 3 if SMOKE else nfe
    fn = {"ddpm": ddpm_sample, "ddim": ddim_sample}[sampler]
    sched = Schedule.make("linear", 1000)
    shape = (SAMPLE_BATCH, 3, MODEL[2], MODEL[2])
    x = torch.randn(shape, device=DEVICE)
    t = torch.full((SAMPLE_BATCH,), 10, device=DEVICE)

    def sample():
        fn(model, shape, sched, nfe, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward():
        for _ in range(nfe):
            model(x, t)

    with torch.no_grad():
        model(x, t)  # oneDNN builds its primitives for these shapes on the first call
    times = interleaved(benchmark, {"sampler": sample, "forward": forward}, SAMPLER_ROUNDS, 0)
    benchmark.extra_info.update(
        images=SAMPLE_BATCH,
        nfe=nfe,
        **timings(times),
        overhead=list(paired_ratio(times["forward"], times["sampler"])),
    )


@pytest.mark.parametrize("layout", ["flat", "per_tensor"])
def test_ema_update(benchmark, model, layout):
    """One lerp over the flat parameter buffer (the trainer's) vs a foreach lerp."""
    model = copy.deepcopy(model)
    ema = EMA(model, 0.999, flatten_(model) if layout == "flat" else None)
    benchmark(lambda: (ema.update(model), sync()))


def _probe_setup(model):
    size = MODEL[2]
    sched = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, size, size, generator=g).to(DEVICE) * 2 - 1
    t = torch.randint(0, 1000, (4,), generator=g).to(DEVICE)
    noise = torch.randn(x0.shape, generator=g).to(DEVICE)
    alphas_cumprod = sched.alphas_cumprod.float().to(DEVICE)
    objective = Objective(alphas_cumprod, torch.ones(1000, device=DEVICE))
    probe = CurvatureProbe(x0, t, noise, objective=objective, probes=K, seed=0)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_fn(p):
        return weighted_mse(
            torch.func.functional_call(model, p, (probe.x_t, t)),
            noise,
            torch.ones(4, device=DEVICE),
        ).mean()

    return probe, loss_fn, params


K = 2 if SMOKE else 16


@pytest.fixture(scope="module")
def trained_layout(model):
    """The model as the trainer holds it (channels_last), for both the probe and its peer."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _probe_set(size: int):
    """What a Min-SNR run measures at a probe step (weighted, unweighted and 4 t-bin
    traces with their standard errors, from one Taylor pass) on a batch of 4."""
    from fastdiff.config import compose, to_config
    from fastdiff.curvature import RunProbes

    cfg = to_config(
        compose(
            [
                "experiment=e9b",
                "data=digits",
                f"data.image_size={size}",
                "curvature.batch_size=4",
                "curvature.t_bins=4",
                f"curvature.probes={K}",
            ]
        )
    )
    sched = Schedule.make("linear", 1000)
    images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    objective = Objective(
        sched.alphas_cumprod, weights(snr(sched.alphas_cumprod), "minsnr", gamma=5)
    )
    return RunProbes(images, cfg, objective, DEVICE)


def _loop_probe(model):
    """PyHessian-style peer: one create_graph backward, then K double-backward passes. On
    the NCHW model: its faster layout (measured 10.3 s vs 11.8 s channels_last)."""
    _, loss_fn, params = _probe_setup(model)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}

    def run():
        g = torch.Generator(DEVICE).manual_seed(0)
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        values = []
        for _ in range(K):
            vs = [
                torch.randint(0, 2, p.shape, generator=g, device=DEVICE).float() * 2 - 1
                for p in leaves.values()
            ]
            hv = torch.autograd.grad(grads, list(leaves.values()), vs, retain_graph=True)
            values.append(sum((h * v).sum() for h, v in zip(hv, vs)))
        torch.stack(values).mean().item()

    return run


def test_hutchinson(benchmark, model, trained_layout):
    """K probes of vᵀHv on one batch of 4, taking turns round by round: the run's probe
    batched by vmap (second-order Taylor mode, and vmap of jvp of grad), the
    PyHessian-style loop, and the whole set a Min-SNR run measures at a probe step
    (weighted, unweighted and 4 t-bin traces from one Taylor pass; the goal is at most
    1.3× the single weighted trace). Ratios with their intervals are in extra_info."""
    probes = {}
    for method in ("taylor", "jvp"):
        probes[method], _, _ = _probe_setup(trained_layout)
        probes[method].method = method
    probe_set = _probe_set(MODEL[2])
    steps = {
        "taylor": lambda: probes["taylor"].trace(trained_layout),
        "jvp": lambda: probes["jvp"].trace(trained_layout),
        "loop": _loop_probe(model),
        "probe_set": lambda: probe_set(trained_layout),
    }
    # the first call builds functorch's decompositions
    times = interleaved(benchmark, steps, 1 if SMOKE else 3, warmup=0 if SMOKE else 1)
    benchmark.extra_info.update(
        probes=K,
        **timings(times),
        loop_over={m: list(paired_ratio(times[m], times["loop"])) for m in ("taylor", "jvp")},
        probe_set_over_taylor=list(paired_ratio(times["taylor"], times["probe_set"])),
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fastdiff.data.prepare import main as prepare
    from tests.cifar_fixture import write_cifar_archive

    root = tmp_path_factory.mktemp("bench-cifar")
    write_cifar_archive(root / "c.tar.gz", per_batch=40 if SMOKE else 1000)
    prepare(
        [
            "cifar10",
            "--src",
            str(root / "c.tar.gz"),
            "--out",
            str(root / "s"),
            "--shard-size",
            "50" if SMOKE else "1000",
        ]
    )
    return root / "s"


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_throughput(benchmark, shards, workers):
    from fastdiff.data import StreamBatches

    n_batches = 4 if SMOKE else 40
    batch = 8 if SMOKE else 128

    # Steady state: the workers are started and warm before the clock runs.
    b = StreamBatches(shards, batch, 0, workers=workers, shuffle_buffer=500)
    b.batch(0)
    steps = iter(range(1, 10**9))

    def run():
        for _ in range(n_batches):
            b.batch(next(steps))

    benchmark.extra_info.update(images=n_batches * batch, workers=workers)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)

"""The whole training step: fastdiff (eager, compiled) vs the diffusers peer, same run."""

import os

import pytest
import torch

from benches._setup import BATCHES, DEVICE, MODEL, SMOKE, peer_unet, sync, trainer_overrides
from fastdiff.config import compose, to_config
from fastdiff.trainer import Trainer, amp_precision
from fastdiff.unet import build_model

COMPILE = DEVICE.type == "cuda" or os.environ.get("FASTDIFF_BENCH_COMPILE") == "1"
# "amp": the cards' setting (AMP on), whatever it means on this device (bf16 autocast
# here); "fp32": AMP off. Both sides of a comparison run the same precision.
PRECISIONS = ["amp", "fp32"]


def make_trainer(tmp_path, batch, compile_, precision="amp"):
    cfg = to_config(
        compose(
            trainer_overrides(
                batch,
                f"train.compile={str(compile_).lower()}",
                f"train.amp={str(precision == 'amp').lower()}",
                f"train.runs_root={tmp_path}",
            )
        )
    )
    return Trainer(cfg)


def diffusers_step(benchmark, batch, precision: str, allocator: str):
    """The diffusers train_unconditional example's step: add_noise, UNet2DModel, mse_loss,
    accelerator.backward, clip, Adam, EMAModel.step; its ``--mixed_precision`` set to
    what fastdiff's ``train.amp`` resolves to on this device."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    name, ch, size = MODEL
    model = peer_unet(ch, size).to(DEVICE)
    ours = sum(p.numel() for p in build_model(name, ch, 0.1, size).parameters())
    theirs = sum(p.numel() for p in model.parameters())
    print(f"\nparams: fastdiff {ours:,} diffusers {theirs:,}")
    if not SMOKE:
        assert abs(theirs - ours) / ours < 0.02
    mixed = amp_precision(precision == "amp", DEVICE.type == "cuda")
    acc = Accelerator(mixed_precision=mixed, cpu=DEVICE.type == "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    ema = EMAModel(model.parameters(), decay=0.999)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    images = torch.rand(batch, 3, size, size, device=DEVICE) * 2 - 1

    def step():
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (batch,), device=DEVICE)
        noisy = sched.add_noise(images, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).sample, noise)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())
        sync()

    step()
    benchmark.extra_info.update(
        params=theirs, batch=batch, mode="diffusers", precision=mixed, allocator=allocator
    )
    benchmark.pedantic(
        step, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1
    )


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_diffusers_train_step(benchmark, precision, batch):
    """The peer as its users run it, with glibc's default allocator: benches/conftest.py
    runs it first in the session, before anything applies fastdiff.hostmem."""
    diffusers_step(benchmark, batch, precision, "default")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_fastdiff_train_step(benchmark, tmp_path, mode, precision, batch):
    if mode == "compiled" and not COMPILE:
        pytest.skip("compiled step on CPU takes minutes to compile: FASTDIFF_BENCH_COMPILE=1")
    trainer = make_trainer(tmp_path, batch, mode == "compiled", precision)
    counter = iter(range(10**9))

    def step():
        trainer.train_step(next(counter))
        sync()

    step()  # warm-up (covers compilation)
    benchmark.extra_info.update(
        params=trainer.n_params,
        batch=batch,
        mode=mode,
        precision=trainer.acc.mixed_precision,
        flops=trainer.step_flops,
        peak_flops=trainer.peak_flops,
    )
    benchmark.pedantic(
        step, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1
    )


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_diffusers_train_step_reusing_memory(benchmark, precision, batch):
    """The peer with fastdiff's allocator setting (fastdiff.hostmem, applied by
    benches/conftest.py): how much of the difference is the step itself."""
    diffusers_step(benchmark, batch, precision, "reuse")

"""One training step in a fresh process, driven over a pipe by the train-step benches.

Every train-step bench runs its step in its own worker, so none inherits the heap,
allocator thresholds, thread pools or oneDNN caches of the benches before it (in one
process, fastdiff's batch-4 step measured 163-171 ms alone and 178-189 ms after the
peer's batch-128 benches). The diffusers peer runs with its users' default allocator;
fastdiff's worker applies its own setting (``fastdiff.tuning``) as its entry point
does in training; the third worker kind runs the peer with that setting.

    python -m benches._worker fastdiff|diffusers|diffusers-reuse BATCH PRECISION COMPILE DIR

Protocol, on the worker's original stdout (whatever the step prints goes to stderr):
one JSON line of facts once the model is built and has run one step (the warm-up
that covers compilation), then "ok" after each synchronised step asked for with a
"step" line; it exits at end of input. ``{"skip": why}`` instead of the facts when
the worker cannot run here (diffusers not installed).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from benches._setup import DEVICE, MODEL, peer_unet, sync, trainer_overrides
from fastdiff.config import compose, to_config
from fastdiff.train import apply_host_tuning
from fastdiff.trainer import Trainer
from fastdiff.tuning import amp_precision, reuse_freed_memory
from fastdiff.unet import build_model


def fastdiff_step(batch: int, precision: str, compile_: bool, run_dir: str):
    overrides = trainer_overrides(
        batch,
        f"train.compile={str(compile_).lower()}",
        f"train.amp={str(precision == 'amp').lower()}",
        f"train.runs_root={run_dir}",
    )
    cfg = to_config(compose(overrides))
    apply_host_tuning(cfg)
    trainer = Trainer(cfg)
    counter = iter(range(10**9))
    facts = dict(
        params=trainer.n_params,
        mode="compiled" if compile_ else "eager",
        precision=trainer.acc.mixed_precision,
        flops=trainer.step_flops,
        peak_flops=trainer.peak_flops,
    )
    return lambda: trainer.train_step(next(counter)), facts


def diffusers_step(batch: int, precision: str):
    """The diffusers train_unconditional example's step: add_noise, UNet2DModel, mse_loss,
    accelerator.backward, clip, Adam, EMAModel.step; its ``--mixed_precision`` set to
    what fastdiff's ``train.amp`` resolves to on this device."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    name, ch, size = MODEL
    model = peer_unet(ch, size).to(DEVICE)
    with torch.device("meta"):  # counted without touching the peer's heap
        ours = sum(p.numel() for p in build_model(name, ch, 0.1, size).parameters())
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

    theirs = sum(p.numel() for p in model.parameters())
    return step, dict(params=theirs, fastdiff_params=ours, mode="diffusers", precision=mixed)


def main(argv: list[str]) -> int:
    kind, batch, precision, compile_, run_dir = argv
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints and logs of the step go to stderr, not into the protocol
    try:
        if kind == "fastdiff":
            step, facts = fastdiff_step(int(batch), precision, compile_ == "1", run_dir)
        else:
            if kind == "diffusers-reuse":
                reuse_freed_memory()
            step, facts = diffusers_step(int(batch), precision)
            facts["allocator"] = "reuse" if kind == "diffusers-reuse" else "default"
    except pytest.skip.Exception as e:
        proto.write(json.dumps({"skip": str(e)}) + "\n")
        return 0
    step()  # warm-up: compilation, oneDNN primitives, first-touch memory
    sync()
    proto.write(json.dumps(facts) + "\n")
    for line in sys.stdin:
        if line.strip() != "step":
            raise SystemExit(f"bench worker: unknown request {line.strip()!r}")
        step()
        sync()
        proto.write("ok\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

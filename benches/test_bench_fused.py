"""Fused K-arm steps (fastdiff.fused: one vmapped forward and backward for K runs)
against the same K runs stepped one after another, at the cards' batch 4.

Both sides do the whole step (data, noising, forward, backward, each run's update and
EMA), so the ratio is what a study gains by training its arm-seeds together."""

import itertools

import pytest
import torch
from accelerate.state import AcceleratorState

from benches._setup import DEVICE, SMOKE, sync
from fastdiff.config import compose, to_config

KS = [2] if SMOKE else [2, 4]
ROUNDS = 1 if SMOKE else 3


def k_run_configs(k: int, precision: str, root, smoke: bool = SMOKE):
    """K runs of a study at the cards' batch: e9a, e9b, e9a (next seed), ..."""
    arms = ("e9a", "e9b")
    out = []
    for i in range(k):
        name, ch, size = ("unet_tiny", 16, 8) if smoke else ("unet_cifar32", 64, 32)
        overrides = [
            f"experiment={arms[i % 2]}",
            f"model={name}",
            f"model.base_channels={ch}",
            "data=digits",
            f"data.image_size={size}",
            f"train.batch_size={2 if smoke else 4}",
            "train.progress=false",
            f"train.seed={1077 + 1000 * (i // 2)}",
            f"train.amp={str(precision == 'amp').lower()}",
            "train.compile=false",
            "curvature.enabled=false",
            f"train.run_dir={root / str(i)}",
            "train.ckpt_every=100000",
            "train.log_every=100000",
        ]
        out.append(to_config(compose(overrides)))
    return out


@pytest.mark.parametrize("precision", ["fp32", "amp"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mode", ["fused", "sequential"])
def test_k_runs_step(benchmark, tmp_path, mode, k, precision):
    from fastdiff.fused import FusedRuns
    from fastdiff.trainer import Trainer

    AcceleratorState._reset_state()
    cfgs = k_run_configs(k, precision, tmp_path)
    if mode == "fused":
        runs = FusedRuns(cfgs)
        step = runs.step
    else:
        trainers = []
        for cfg in cfgs:
            trainers.append(Trainer(cfg))

        def step(s):
            return [t.train_step(s) for t in trainers]

    counter = itertools.count()
    step(next(counter))  # warm-up

    def run():
        outs = step(next(counter))
        outs[-1].loss.item()
        sync()

    benchmark.extra_info.update(k=k, precision=precision, device=str(DEVICE))
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    assert all(torch.isfinite(o.loss) for o in step(next(counter)))

"""Fused K-arm steps (fastdiff.fused: one vmapped forward and backward for K runs)
against the same K runs stepped one after another, at the cards' batch 4.

Both sides do the whole step (data, noising, forward, backward, each run's update and
EMA), so the ratio is what a study gains by training its arm-seeds together. The two
take turns in one process, one step each per round, so the ratio of each round is
taken at one moment of the machine's drifting speed."""

import itertools

import pytest
import torch
from accelerate.state import AcceleratorState

from benches._setup import DEVICE, PRECISIONS, SMOKE, interleaved, timings
from benches.ratios import paired_ratio
from fastdiff.config import compose, to_config

KS = [2] if SMOKE else [2, 4]
ROUNDS = 1 if SMOKE else 8


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


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", KS)
def test_fused_vs_sequential(benchmark, tmp_path, k, precision):
    """One fused step of K runs and K standalone steps, interleaved round by round (the
    order rotated) so both see the machine's speed of the moment. The timed round is
    both; their step times and the paired ratio sequential / fused are in extra_info."""
    from fastdiff.fused import FusedRuns
    from fastdiff.trainer import Trainer

    AcceleratorState._reset_state()
    fused = FusedRuns(k_run_configs(k, precision, tmp_path / "fused"))
    trainers = [Trainer(cfg) for cfg in k_run_configs(k, precision, tmp_path / "sequential")]
    counters = itertools.count(), itertools.count()

    def fused_step():
        fused.step(next(counters[0]))[-1].loss.item()

    def sequential_steps():
        s = next(counters[1])
        for trainer in trainers:
            out = trainer.train_step(s)
        out.loss.item()

    steps = {"fused": fused_step, "sequential": sequential_steps}
    times = interleaved(benchmark, steps, rounds=ROUNDS, warmup=1)
    benchmark.extra_info.update(
        k=k,
        precision=precision,
        device=str(DEVICE),
        **timings(times),
        sequential_over_fused=list(paired_ratio(times["fused"], times["sequential"])),
    )
    assert all(torch.isfinite(o.loss) for o in fused.step(next(counters[0])))

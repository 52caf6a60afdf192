"""Shared set-up for the benches.

FASTDIFF_BENCH_SMOKE=1 (set by `make test`) shrinks every bench to tiny shapes so the
suite runs once, untimed, in seconds and never rots; `make bench` runs the real shapes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

SMOKE = os.environ.get("FASTDIFF_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The cards' model; the smoke run uses the tiny preset at 8x8.
MODEL = ("unet_tiny", 16, 8) if SMOKE else ("unet_cifar32", 64, 32)
BATCHES = [2] if SMOKE else [4, 128]
# "amp": the cards' setting (AMP on), whatever it means on this device (bf16 autocast
# here); "fp32": AMP off. Both sides of a comparison run the same precision. The smoke
# run takes AMP alone: fp32 is the same code with the flag off, and each precision
# costs the smoke run a worker process per kind.
PRECISIONS = ["amp"] if SMOKE else ["amp", "fp32"]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def trainer_overrides(batch: int, *extra: str) -> list[str]:
    name, ch, size = MODEL
    return [
        f"model={name}",
        f"model.base_channels={ch}",
        "data=digits",
        f"data.image_size={size}",
        f"train.batch_size={batch}",
        "train.progress=false",
        *extra,
    ]


def peer_unet(ch: int, size: int):
    """diffusers' UNet2DModel laid out as the DDPM CIFAR UNet (same blocks, channels,
    attention at 16x16, dropout, GroupNorm 32): the parameter count matches ours."""
    diffusers = pytest.importorskip("diffusers")
    if SMOKE:
        return diffusers.UNet2DModel(
            sample_size=size,
            in_channels=3,
            out_channels=3,
            block_out_channels=(ch, 2 * ch, 2 * ch),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            dropout=0.1,
            attention_head_dim=None,
            norm_num_groups=8,
        )
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(ch, 2 * ch, 2 * ch, 2 * ch),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
        attention_head_dim=None,
        norm_num_groups=32,
    )


def interleaved(benchmark, steps: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Time ``steps`` (name → callable) taking turns, one call each per round, the order
    rotated each round so none always runs first; pytest-benchmark times the round.
    The machine's speed drifts over seconds (fastdiff's batch-4 step measured 175 ms
    and 280 ms on one VM ten minutes apart): calls of one round share the drift, so
    their ratio does not, and the rounds give it an interval (benches.ratios.paired_ratio).
    Returns each step's times over the timed rounds."""
    times = {name: [] for name in steps}
    order = list(steps)

    def one_round():
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        order.append(order.pop(0))

    for _ in range(warmup):
        one_round()
    for t in times.values():
        t.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return times


def timings(times: dict[str, list[float]]) -> dict:
    """extra_info of an interleaved bench: each step's times and median (seconds)."""
    return {"step_s": times, "median_s": {name: float(np.median(t)) for name, t in times.items()}}

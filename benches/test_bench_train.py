"""The whole training step: fastdiff (eager, compiled) vs the diffusers peer, same run.

Each step runs in a fresh worker process (``benches/_worker.py``), timed here by
pytest-benchmark around a pipe round trip (a few tens of microseconds against steps
of 0.1 s and more), so no bench inherits another's process state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches._setup import BATCHES, DEVICE, SMOKE

COMPILE = DEVICE.type == "cuda" or os.environ.get("FASTDIFF_BENCH_COMPILE") == "1"
# "amp": the cards' setting (AMP on), whatever it means on this device (bf16 autocast
# here); "fp32": AMP off. Both sides of a comparison run the same precision.
PRECISIONS = ["amp", "fp32"]
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A ``benches._worker`` process: ``facts`` once it is warm, ``step()`` per step."""

    def __init__(self, kind: str, batch: int, precision: str, compile_: bool, run_dir: Path):
        self.args = [kind, str(batch), precision, "1" if compile_ else "0", str(run_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benches._worker", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.facts = json.loads(self._read())

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"bench worker {self.args} exited with {code}: see its stderr")
        return line

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        if self._read() != "ok\n":
            raise RuntimeError(f"bench worker {self.args} answered out of protocol")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def time_worker(benchmark, tmp_path, kind, batch, precision, compile_=False) -> dict:
    worker = Worker(kind, batch, precision, compile_, tmp_path)
    try:
        if "skip" in worker.facts:
            pytest.skip(worker.facts["skip"])
        benchmark.extra_info.update(worker.facts, batch=batch)
        benchmark.pedantic(
            worker.step, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1
        )
        return worker.facts
    finally:
        worker.close()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_diffusers_train_step(benchmark, tmp_path, precision, batch):
    """The peer as its users run it: diffusers' UNet2DModel laid out as the DDPM CIFAR
    UNet, glibc's default allocator."""
    facts = time_worker(benchmark, tmp_path, "diffusers", batch, precision)
    ours, theirs = facts["fastdiff_params"], facts["params"]
    print(f"\nparams: fastdiff {ours:,} diffusers {theirs:,}")
    if not SMOKE:
        assert abs(theirs - ours) / ours < 0.02


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_fastdiff_train_step(benchmark, tmp_path, mode, precision, batch):
    if mode == "compiled" and not COMPILE:
        pytest.skip("compiled step on CPU takes minutes to compile: FASTDIFF_BENCH_COMPILE=1")
    time_worker(benchmark, tmp_path, "fastdiff", batch, precision, mode == "compiled")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_diffusers_train_step_reusing_memory(benchmark, tmp_path, precision, batch):
    """The peer with fastdiff's allocator setting (fastdiff.tuning): how much of the
    difference is the step itself."""
    time_worker(benchmark, tmp_path, "diffusers-reuse", batch, precision)

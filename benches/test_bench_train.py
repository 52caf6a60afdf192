"""The whole training step: fastdiff (eager, compiled) vs the diffusers peer, same run.

Each kind of step runs in a fresh worker process of its own (``benches/_worker.py``),
so none inherits another's process state, and the workers take turns, one step each
per round: the ratios come from steps that shared the machine's state of the moment
(``benches._setup.interleaved``). pytest-benchmark times the round; the per-step times are in
the bench's extra_info.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches._setup import BATCHES, DEVICE, PRECISIONS, SMOKE, interleaved, timings
from benches.ratios import paired_ratio

COMPILE = DEVICE.type == "cuda" or os.environ.get("FASTDIFF_BENCH_COMPILE") == "1"
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A ``benches._worker`` process: ``facts`` once it is warm, ``step()`` per step.
    It starts on construction and is waited for on the first ``facts``, so several
    workers start up side by side."""

    def __init__(self, kind: str, batch: int, precision: str, compile_: bool, run_dir: Path):
        self.args = [kind, str(batch), precision, "1" if compile_ else "0", str(run_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benches._worker", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._facts = None

    @property
    def facts(self) -> dict:
        if self._facts is None:
            self._facts = json.loads(self._read())
        return self._facts

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


# Worker kinds of one round, each a fresh process: fastdiff as it trains, the peer as
# its users run it, and the peer with fastdiff's allocator setting.
KINDS = ["fastdiff", "diffusers", "diffusers-reuse"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_step(benchmark, tmp_path, precision, batch):
    """fastdiff's eager step against diffusers' UNet2DModel laid out as the DDPM CIFAR UNet
    (its train_unconditional example's step), interleaved step by step; the compiled
    step joins the rounds where it compiles in reasonable time. The timed round is all
    of them; each one's step times, medians and paired ratios are in extra_info."""
    kinds = KINDS + (["fastdiff-compiled"] if COMPILE else [])
    workers = {}
    try:
        for kind in kinds:
            compiled = kind == "fastdiff-compiled"
            workers[kind] = Worker(
                "fastdiff" if compiled else kind, batch, precision, compiled, tmp_path / kind
            )
        for worker in workers.values():
            if "skip" in worker.facts:
                pytest.skip(worker.facts["skip"])
        ours, theirs = workers["fastdiff"].facts["params"], workers["diffusers"].facts["params"]
        if not SMOKE:
            assert abs(theirs - ours) / ours < 0.02, f"params: fastdiff {ours:,} peer {theirs:,}"
        small = batch <= 4
        times = interleaved(
            benchmark,
            {kind: worker.step for kind, worker in workers.items()},
            rounds=1 if SMOKE else (20 if small else 6),
            warmup=0 if SMOKE else (3 if small else 1),
        )
    finally:
        for worker in workers.values():
            worker.close()
    benchmark.extra_info.update(
        workers["fastdiff"].facts,
        batch=batch,
        peer_params=theirs,
        **timings(times),
        vs_fastdiff={
            kind: list(paired_ratio(times["fastdiff"], t))
            for kind, t in times.items()
            if kind != "fastdiff"
        },
    )

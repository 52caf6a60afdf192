"""How a run ends early, and with which exit code.

A signal (SIGTERM, SIGINT) is acknowledged on stderr at once; the run finishes the
current step, or cuts a sample grid or FID job short at its next sampler step (the
job is redone on resume), checkpoints and exits with ``EXIT_PREEMPTED``; a second
signal cuts any running job short at once. A non-finite step under
``train.on_nonfinite=stop`` exits with ``EXIT_DIVERGED``; resuming a finished run is
not an error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal, resumable with train.resume=auto
EXIT_DIVERGED = 3


class Stopped(Exception):
    """Training ended before train.total_steps."""

    exit_code = 1

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class Preempted(Stopped):
    exit_code = EXIT_PREEMPTED


class Diverged(Stopped):
    exit_code = EXIT_DIVERGED


class Finished(Stopped):
    """Resuming a run that already reached train.total_steps: nothing is touched."""

    exit_code = 0


class JobInterrupted(Exception):
    """A signal cut a periodic job short; the job is redone when the run resumes."""


class Signals:
    """Records SIGTERM/SIGINT instead of dying mid-step; ``received`` is the first
    signal's number (0: none). Each signal is acknowledged on stderr (``announce``).
    A second one sets ``hard`` and, inside :meth:`job` when ``interrupt_jobs``, raises
    JobInterrupted at once: a job only reads the weights, so cutting it anywhere loses
    nothing the checkpoint needs; a step runs to its end, as the checkpoint needs it
    whole. Outside the main thread (signals cannot be caught there) it records nothing."""

    def __init__(self, interrupt_jobs: bool = True, announce: bool = True):
        self.received, self.hard, self.in_job = 0, False, False
        self.interrupt_jobs, self.announce = interrupt_jobs, announce

    def _say(self, line: str) -> None:
        if self.announce:  # os.write: a handler may run in the middle of a print
            os.write(2, f"fastdiff: {line}\n".encode())

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.received:
            self.received = signum
            where = (
                "at the end of this step or sampler step"
                if self.interrupt_jobs
                else "at the next step the processes agree on"
            )
            self._say(f"{name}: stopping {where}, then checkpointing (signal again to hurry)")
            return
        self.hard = True
        self._say(f"{name} again: stopping as soon as the checkpoint is written")
        if self.in_job and self.interrupt_jobs:
            raise JobInterrupted

    @contextlib.contextmanager
    def caught(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    @contextlib.contextmanager
    def job(self):
        """A periodic job runs inside: a second signal ends it where it is."""
        self.in_job = True
        try:
            yield
        finally:
            self.in_job = False

    def stop_job(self) -> bool:
        """Should a job stop at its next boundary (a sampler step, a batch)?"""
        return self.interrupt_jobs and self.received != 0


def agreed_signal(acc, signals: Signals, done: int, every: int) -> int:
    """The signal any rank received (0: none). Under several processes the ranks agree
    every ``every`` steps (a collective, not every step) and stop at the same step."""
    if acc.num_processes == 1:
        return signals.received
    if done % every:
        return 0
    flag = torch.tensor(float(signals.received), device=acc.device)
    return int(acc.reduce(flag, reduction="sum").item())


def check_finite(acc, window, last_checkpoint: Path | None) -> None:
    """Raise Diverged if any rank had a non-finite step in ``window``; the message names
    ``last_checkpoint``, the run's newest (None: it has none)."""
    per_rank = acc.gather(torch.stack([window.bad, window.first_bad])[None])  # (ranks, 2)
    if per_rank[:, 0].sum().item() > 0:
        first = int(per_rank[:, 1].min().item())
        good = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is not None
            else "there is no checkpoint: it diverged before the first one"
        )
        raise Diverged(
            first,
            f"non-finite loss or gradient at step {first}: stopped (train.on_nonfinite=stop); "
            + good,
        )


def status(stop: Stopped | None) -> dict:
    """summary.json's record of how the run ended early (empty when it did not)."""
    if stop is None:
        return {}
    return {
        "step": stop.step,
        "preempted": isinstance(stop, Preempted),
        "diverged": isinstance(stop, Diverged),
        "stopped": str(stop),
    }

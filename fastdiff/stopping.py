"""How a run ends early, and with which exit code.

A signal (SIGTERM, SIGINT) finishes the current step, checkpoints and exits with
``EXIT_PREEMPTED``; a non-finite step under ``train.on_nonfinite=stop`` exits with
``EXIT_DIVERGED``; resuming a finished run is not an error.
"""

from __future__ import annotations

import contextlib
import signal
import threading

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


class Signals:
    """Records SIGTERM/SIGINT instead of dying mid-step; ``received`` is the signal
    number (0: none). Outside the main thread (signals cannot be caught there) it
    records nothing."""

    def __init__(self):
        self.received = 0

    @contextlib.contextmanager
    def caught(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            self.received = signum

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


def agreed_signal(acc, signals: Signals, done: int, every: int) -> int:
    """The signal any rank received (0: none). Under several processes the ranks agree
    every ``every`` steps (a collective, not every step) and stop at the same step."""
    if acc.num_processes == 1:
        return signals.received
    if done % every:
        return 0
    flag = torch.tensor(float(signals.received), device=acc.device)
    return int(acc.reduce(flag, reduction="sum").item())


def check_finite(acc, window, checkpoints_dir) -> None:
    """Raise Diverged if any rank had a non-finite step in ``window``."""
    per_rank = acc.gather(torch.stack([window.bad, window.first_bad])[None])  # (ranks, 2)
    if per_rank[:, 0].sum().item() > 0:
        first = int(per_rank[:, 1].min().item())
        raise Diverged(
            first,
            f"non-finite loss or gradient at step {first}: stopped "
            f"(train.on_nonfinite=stop); the last good checkpoint is in {checkpoints_dir}",
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

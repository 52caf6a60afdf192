"""How a run ends early, and with which exit code.

A signal (SIGTERM, SIGINT) finishes the current step, checkpoints and exits with
``EXIT_PREEMPTED``; a non-finite step under ``train.on_nonfinite=stop`` exits with
``EXIT_DIVERGED``; resuming a finished run is not an error.
"""

from __future__ import annotations

import contextlib
import signal
import threading

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

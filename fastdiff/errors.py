"""The errors every entry point reports as one line, and the one handler that does it.

This module sits at the bottom of the package: it imports nothing of fastdiff's, so
any module may raise :class:`ConfigError` without an import cycle.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A bad setting or input, reported as one line before any work starts."""


class FIDUnavailable(RuntimeError):
    """FID was asked for, but its weights or reference statistics cannot be had."""


# Bad input: what the user typed, or a file they named. Anything else keeps its traceback.
BAD_INPUT = (ConfigError, FileNotFoundError, FileExistsError, FIDUnavailable)


def fail(message: str) -> int:
    """Print ``fastdiff: error: MESSAGE`` on stderr; the exit code for bad input."""
    print(f"fastdiff: error: {message}", file=sys.stderr)
    return 2


def guarded(main: Callable[[], int]) -> int:
    """Run an entry point's body; bad input becomes one line on stderr and exit 2."""
    try:
        return main()
    except BAD_INPUT as err:
        return fail(str(err))


# Set by the `fastdiff` command to "fastdiff SUBCOMMAND": help and errors then name the
# command the user typed, not the module behind it.
PROG: str | None = None


class Parser(argparse.ArgumentParser):
    """argparse for every entry point, whose bad input is one line like every other
    error (argparse's own prints the usage too, then the error)."""

    def __init__(self, *args, **kwargs):
        if PROG is not None:
            kwargs["prog"] = PROG
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"fastdiff: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

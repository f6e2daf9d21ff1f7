"""User-facing errors and warnings: one line that names the file (or thing) and the problem.

The command line catches :class:`CellnetError` and prints it without a traceback; anything
else is a bug and keeps its traceback. :func:`warn` reports a problem worth going on with.
Both start on a line of their own, even while a progress bar is drawn.
"""
from __future__ import annotations

import os
import sys

#: The prefix of every reported line; the command line sets it to ``cellnet <command>``.
PROG = "cellnet"


class CellnetError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def bad(path: str | os.PathLike, problem: str) -> CellnetError:
    """Build the standard ``<path>: <problem>`` error."""
    return CellnetError(f"{os.fspath(path)}: {problem}")


def emit(line: str) -> None:
    """Write one line to stderr, starting on a fresh line if a progress bar is drawn.

    A bar left open (an error raised inside its loop) ends with ``\r``, not a newline, so
    the line would be glued to it in a terminal and in a log file alike.
    """
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):
        sys.stderr.write("\n")
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()


def warn(path: str | os.PathLike, problem: str) -> None:
    """A problem worth going on with: ``cellnet <command>: warning: <path>: <problem>``."""
    emit(f"{PROG}: warning: {os.fspath(path)}: {problem}")

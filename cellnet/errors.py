"""User-facing errors and warnings: one line that names the file (or thing) and the problem.

The command line catches :class:`CellnetError` and prints it without a traceback; anything
else is a bug and keeps its traceback. :func:`warn` reports a problem worth going on with.
Both start on a line of their own, even while a progress bar is drawn.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

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


@dataclass
class Problems:
    """Collects skipped items (``on_bad="skip"``) or raises at the first one (``"fail"``)."""

    on_bad: str = "fail"
    items: list[str] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)   # skipped points (or patches) by reason
    notes: Counter = field(default_factory=Counter)      # files used despite a problem, by problem
    first: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (file, line) it names
    files: dict[str, set[str]] = field(default_factory=dict)  # key -> the files it was seen in
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # prepare's threads

    def __post_init__(self) -> None:
        if self.on_bad not in ("fail", "skip"):
            raise CellnetError(f"--on-bad: expected 'fail' or 'skip', got {self.on_bad!r}")

    def report(self, path: str | os.PathLike, problem: str) -> None:
        """A bad item: raise in fail mode, else record it and go on."""
        error = bad(path, problem)
        if self.on_bad == "fail":
            raise error
        self.items.append(str(error))

    def warn(self, key: str, count: int = 1, path: str | os.PathLike | None = None,
             line: int | None = None) -> None:
        """Something a user would rather go on with (unknown descriptions, points outside)."""
        with self._lock:
            self.warnings[key] += count
            self._seen(key, path, line)

    def note(self, path: str | os.PathLike, problem: str) -> None:
        """A file used despite ``problem`` (the :data:`cellnet.data.imageio.Note` of image reads)."""
        with self._lock:
            self.notes[problem] += 1
            self._seen(problem, path, None)

    def _seen(self, key: str, path: str | os.PathLike | None, line: int | None) -> None:
        if path is not None:  # the first by name, so the line is the same whatever the threads did
            where = (os.fspath(path), line or 0)
            self.first[key] = min(self.first.get(key, where), where)
            self.files.setdefault(key, set()).add(where[0])

    def emit_warnings(self, counted: str = "{key}: {n}") -> None:
        """One warning line per kind of problem, naming the first file it was seen in.

        ``counted`` words a :attr:`warnings` entry (``n`` skipped points and the like), as the
        command's summary does.
        """
        for key in sorted(self.warnings.keys() | self.notes.keys()):
            path, line = self.first.get(key, ("input", 0))
            text = counted.format(key=key, n=self.warnings[key]) if key in self.warnings else key
            files = len(self.files.get(key, ()))
            warn(path, (f"line {line}: " if line else "") + text
                 + (f" (in {files} files, first here)" if files > 1 else ""))

    def summary(self) -> str:
        lines = [f"skipped {len(self.items)} bad item(s)"] if self.items else []
        lines += [f"  {item}" for item in self.items[:20]]
        if len(self.items) > 20:
            lines.append(f"  ... and {len(self.items) - 20} more")
        lines += [f"warning: {key}: {n}" for key, n in sorted(self.warnings.items())]
        lines += [f"warning: {key}: {n} file(s)" for key, n in sorted(self.notes.items())]
        return "\n".join(lines)

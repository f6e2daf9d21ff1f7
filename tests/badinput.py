"""Harness of the bad-input table (SPEC 7): one row per case, checked the same way.

A row builds its inputs under ``tmp`` and returns the command line; the check runs
``cellnet.cli.main`` in-process and asserts the exit code, that stderr holds exactly one
``cellnet <command>: error:`` line (or, for a row that goes on, one ``cellnet <command>:
warning:`` line and a count in the summary on stdout) naming the file, no traceback, and that
every input file is byte-for-byte unchanged.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest


@dataclass
class Setup:
    """What a row's ``build`` returns."""

    argv: list[str]
    names: str                         # text the error (or warning) line must contain: the file
    inputs: list[Path] = field(default_factory=list)   # files/folders whose bytes must not change
    problem: str = ""                  # text the line must also contain: the problem
    summary: str = ""                  # text stdout must contain (a warning row's count)


@dataclass
class Case:
    id: str
    build: Callable[[Path], Setup]
    code: int = 2                      # 2: refused with an error; 0: went on with a warning
    level: str = "error"               # "error" or "warning"
    fault: Callable[[pytest.MonkeyPatch, Path], None] | None = None   # inject a fault (disk full, ...)
    clean: bool = True                 # refused: leaves no file behind (an interrupted run keeps its folder)

    def __str__(self) -> str:
        return self.id


def checksums(paths: list[Path]) -> dict[str, str]:
    sums = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            sums[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return sums


def files_under(root: Path) -> set[str]:
    """Every file and folder under ``root`` (links are not followed)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        found |= {os.path.relpath(os.path.join(folder, name), root) for name in dirs + files}
    return found


def check(case: Case, tmp: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run one row; returns the reported line (for extra assertions)."""
    from cellnet.cli import main

    setup = case.build(tmp)
    capsys.readouterr()
    before = checksums(setup.inputs)
    existing = files_under(tmp)
    with monkeypatch.context() as patched:
        if case.fault is not None:
            case.fault(patched, tmp)
        code = main(setup.argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert code == case.code, f"exit {code}, expected {case.code}; stderr: {err!r}"
    lines = [line for line in err.splitlines() if f": {case.level}:" in line]
    assert len(lines) == 1, f"expected one {case.level} line, got: {err!r}"
    line = lines[0]
    assert line.startswith("cellnet "), f"not at the start of a line: {line!r}"
    assert setup.names in line, f"{setup.names!r} not named in {line!r}"
    assert setup.problem in line, f"{setup.problem!r} not in {line!r}"
    if case.level == "error":
        assert len([l for l in err.splitlines() if l.strip()]) == 1, f"more than one line: {err!r}"
    assert setup.summary in out, f"{setup.summary!r} not in the summary {out!r}"
    assert checksums(setup.inputs) == before, "an input file changed"
    if case.level == "error":  # (a warning may name the torn temporary it removed)
        assert ".tmp" not in line, f"names a temporary file: {line!r}"
    if case.code != 0 and case.clean:  # refused: no file written, no temporary left behind
        left = sorted(files_under(tmp) - existing)
        assert all((tmp / p).is_dir() and ".tmp" not in p for p in left), f"left behind: {left}"
    return line

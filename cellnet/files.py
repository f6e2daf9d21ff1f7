"""The one way cellnet writes: to a temporary sibling, renamed over the final name on success.

An interrupted or failed write (kill -9, a full disk) therefore never leaves a half-written
file or folder under the name a user or a later command reads. :func:`writing` turns a write
the environment refused into one line naming the file the user asked for, whatever library
did the writing (Python, TensorFlow, h5py, XGBoost). No TensorFlow import: the command line
uses this before it loads TensorFlow.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cellnet.errors import CellnetError, bad, warn

#: Names of the temporaries below (``.<stem>.tmp<pid><suffix>``, ``.<name>.tmp<random>``) and of
#: the ``tmpXXXXXXXX`` files Keras writes beside a ``.keras`` file while saving it.
LEFTOVER = re.compile(r"^\..+\.tmp[\w]*(\.\w+)?$|^tmp[a-z0-9_]{8}$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; it becomes ``path`` (empty or absent) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success its files move into ``folder``.

    ``folder`` may exist and hold other files: none is ever replaced (one that appeared
    meanwhile is refused). A folder this made for nothing is removed again.
    """
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    fresh = not final.exists()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for file in files:
            if (final / file.relative_to(tmp)).exists():
                raise bad(final / file.relative_to(tmp), "already exists; cellnet never overwrites it")
        for file in files:
            target = final / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fresh and final.is_dir() and not any(final.iterdir()):
            final.rmdir()


def write_text(path: str | os.PathLike, text: str, after: str = "nothing was written") -> None:
    """Write a text file atomically; a refused write is one line naming ``path``."""
    with writing(path, after), atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes, after: str = "nothing was written") -> None:
    """Write a binary file atomically; a refused write is one line naming ``path``."""
    with writing(path, after), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_leftovers(folder: Path) -> None:
    """Delete the temporaries an interrupted write left in ``folder`` (with a warning each)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if LEFTOVER.match(path.name):
            warn(path, "incomplete file left by an interrupted write; removed")
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


def _reason(exc: BaseException) -> str:
    if _is_disk_full(exc):  # h5py and TensorFlow bury it in a long message
        return "No space left on device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = getattr(exc, "message", None) or str(exc)  # TensorFlow's OpError keeps it in .message
    last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    last = re.sub(r"\s*\[Op:\w+\]$", "", last)
    return last.rsplit("; ", 1)[-1] if "; " in last else last


def write_failure(path: str | os.PathLike, exc: BaseException,
                  after: str = "nothing was written") -> CellnetError:
    """A write the environment refused, as one line naming ``path``: the file the user knows.

    The error itself usually names a temporary file, or none (Python's ENOSPC).
    """
    hint = "free space and run the same command again" if _is_disk_full(exc) \
        else "fix that and run the same command again"
    return bad(path, f"cannot write ({_reason(exc)[:100]}); {after}; {hint}")


def _is_write_error(exc: BaseException) -> bool:
    """Python reports a full disk as OSError; TensorFlow's writers as ResourceExhaustedError
    "...; No space left on device" (the class it also uses for out-of-memory, which is no write
    failure) or PermissionDeniedError; h5py (Keras's HDF5 saves) as RuntimeError "... write
    failed"."""
    if isinstance(exc, OSError):
        return True
    name = type(exc).__name__
    if name == "PermissionDeniedError":
        return True
    return name in ("ResourceExhaustedError", "RuntimeError") and any(
        words in str(exc) for words in ("No space left", "write failed"))


@contextlib.contextmanager
def writing(path: str | os.PathLike, after: str = "nothing was written") -> Iterator[None]:
    """Turn a refused write inside the block into :func:`write_failure` naming ``path``."""
    try:
        yield
    except CellnetError:
        raise
    except Exception as exc:
        if not _is_write_error(exc):
            raise
        raise write_failure(path, exc, after) from None

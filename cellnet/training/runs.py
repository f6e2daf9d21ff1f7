"""Run folders: what a training run leaves on disk, and the one way to read and resume it.

A run folder holds ``config.json`` (the resolved configuration), ``logs/`` (TensorBoard),
``best.keras`` / ``last.keras``, ``history.csv``, ``backup/`` while a run is in progress (resume
with optimizer state), and ``run.json`` (kind, status, timings, final metrics). Nothing a
finished run wrote is overwritten: a complete run folder is refused as a new ``--run``.

A run survives a kill at any instant (SPEC 7): every file is written under a temporary name and
renamed, and an epoch counts only once its backup is committed (``backup/<phase>/state.json``
names the epoch and its weights file). A full disk stops the run with one line naming the file;
the same command resumes it once there is space.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import keras
import numpy as np

from cellnet.errors import bad
from cellnet.files import LEFTOVER, atomic_path, remove_leftovers, write_text, writing
from cellnet.training.config import CONFIGS, FLAGS, RunConfig

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
#: Keys an interrupted run must keep: resuming with others would continue another model.
RESUME_KEYS = ("task", "decoder", "unit", "disc", "group_by", "stain_norm", "arch", "head", "regression_activation",
               "preset", "seg")
#: Written when a full disk stops a run: nothing already committed is lost.
RESUMABLE = "what was saved before is kept, and the same command resumes the run"


def read_run(run: str | os.PathLike) -> dict:
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise bad(run, "not a cellnet run folder (no run.json); train one with `cellnet train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise bad(path, f"unreadable run file ({exc})") from None


def write_run(run: str | os.PathLike, **fields) -> dict:
    path = Path(run) / RUN_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    _write_json(path, info)
    return info


def _write_json(path: Path, value: dict) -> None:
    write_text(path, json.dumps(value, indent=2, default=_json_default), RESUMABLE)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _saved_config(run: Path) -> dict | None:
    try:
        return json.loads((run / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _has_progress(run: Path) -> bool:
    """Whether an interrupted run holds anything worth resuming (a committed epoch, a checkpoint)."""
    return any(run.glob(f"backup/*/{STATE_FILE}")) or any(run.glob("*last.keras"))


def check_run(cfg: RunConfig) -> bool:
    """Refuse a ``--run`` that cannot be used, before any work; returns whether it resumes.

    A complete run is never touched; an interrupted one resumes with the same model settings;
    one that never committed an epoch (it failed early) starts again with the settings given.
    """
    run = Path(cfg.run)
    if (run / RUN_FILE).is_file():
        if read_run(run).get("status") == "complete":
            raise bad(run, "holds a complete run; choose a new --run (nothing was overwritten)")
        saved = _saved_config(run)
        if saved is None or not _has_progress(run):
            return False
        for key in RESUME_KEYS:
            if key == "task" or hasattr(cfg, key):
                if saved.get(key) != getattr(cfg, key):
                    raise bad(run, f"holds an interrupted run with {key}={saved.get(key)!r}, "
                                   f"not {getattr(cfg, key)!r}; resume it with `{resume_command(run)}` "
                                   "or choose a new --run")
        return True
    if run.exists() and not run.is_dir():
        raise bad(run, "is a file, not a run folder; choose a new --run")
    if run.exists() and any(not LEFTOVER.match(p.name) for p in run.iterdir()):
        raise bad(run, "exists and is not a cellnet run folder; choose a new --run")
    return False


def open_run(cfg: RunConfig) -> tuple[Path, bool]:
    """Create the run folder, or reopen an interrupted one; returns (path, resuming).

    ``config.json`` is rewritten with the command's resolved settings either way, so it always
    holds those the run goes on with (``--epochs`` may grow on a resume).
    """
    resuming = check_run(cfg)
    run = Path(cfg.run)
    with writing(run, RESUMABLE):
        run.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run)
    if not resuming:  # a fresh run.json: one left by an attempt that failed early holds nothing
        _write_json(run / RUN_FILE, {"task": cfg.task, "status": "running",
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    _write_json(run / CONFIG_FILE, asdict(cfg))
    return run, resuming


def finish_run(run: Path, **fields) -> dict:
    """Mark the run complete, then drop its backups (a kill in between only leaves them behind)."""
    info = write_run(run, status="complete", finished=time.strftime("%Y-%m-%d %H:%M:%S"), **fields)
    shutil.rmtree(run / "backup", ignore_errors=True)
    return info


def run_progress(run: Path) -> tuple[int, int | None]:
    """(committed epochs, planned epochs) of a run, all phases together; planned is None for GBT."""
    saved = _saved_config(run) or {}
    done = 0
    for state in run.glob(f"backup/*/{STATE_FILE}"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            done += int(json.loads(state.read_text())["epoch"])
    if saved.get("epochs") is None:
        return done, None
    return done, int(saved["epochs"]) + (int(saved.get("finetune_epochs") or 0) if saved.get("seg") else 0)


def resume_command(run: str | os.PathLike) -> str:
    """The ``cellnet train`` command that resumes ``run``, rebuilt from its ``config.json``."""
    from cellnet.training.presets import PRESETS

    run = Path(run)
    saved = _saved_config(run) or {}
    task = saved.get("task", "segmentation")
    command = "cellularity" if task == "cascade" else task
    preset_task = "cascade" if command == "cellularity" and saved.get("seg") else command
    config = CONFIGS.get(preset_task, RunConfig)
    defaults = {f.name: f.default for f in fields(config)}
    defaults.update(PRESETS.get(preset_task, {}).get(saved.get("preset", "cpu"), {}))
    words = ["cellnet", "train", command, "--data", str(saved.get("data", "DATA")), "--run", str(run)]
    for name, flag in FLAGS.items():
        value = saved.get(name)
        if value is None or name not in defaults or (value == defaults[name] and name != "seg"):
            continue
        words += [flag] if value is True else [] if value is False else [flag, str(value)]
    return shlex.join(words)


def require_complete(run: str | os.PathLike, purpose: str) -> dict:
    """The ``run.json`` of a finished run; an unfinished one is refused with how to resume it.

    ``purpose`` completes "so it cannot ...", e.g. "be exported".
    """
    info = read_run(run)
    if info.get("status") != "running":  # complete, or not a training run's (the caller checks its kind)
        return info
    done, planned = run_progress(Path(run))
    where = f" (epoch {done} of {planned})" if planned else ""
    raise bad(run, f"run is not finished{where}, so it cannot {purpose}: resume with "
                   f"`{resume_command(run)}`")


def save_model_atomic(model: keras.Model, path: Path) -> None:
    with writing(path, RESUMABLE), atomic_path(path) as tmp:
        model.save(tmp)


def copy_atomic(src: Path, dst: Path) -> None:
    with writing(dst, RESUMABLE), atomic_path(dst) as tmp:
        tmp.write_bytes(src.read_bytes())


@contextlib.contextmanager
def timed(run: Path, key: str):
    start = time.time()
    yield
    write_run(run, **{key: round(time.time() - start, 1)})


def load_run_model(run: str | Path, which: str = "best") -> keras.Model:
    """The trained model of a run folder (``best.keras`` or ``last.keras``).

    Importing :mod:`cellnet.models` registers the custom classes the file needs. A missing or
    damaged file is the run's problem, reported in one line that names it.
    """
    import cellnet.models  # noqa: F401  (registration of the custom classes)

    path = Path(run) / f"{which}.keras"
    if not path.is_file():
        raise bad(run, f"has no {which}.keras (is the run finished? `cellnet train ... --run {run}` resumes it)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise bad(path, f"damaged or not a Keras model file ({type(exc).__name__}); "
                        "resume or retrain the run") from None

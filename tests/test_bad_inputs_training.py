"""Bad-input table, training (SPEC 7): bad options, unfinished runs, full disks, kills.

Every row goes through ``cellnet.cli.main`` with the ``cpu`` presets shrunk to tiny models. A
row that stops a run (a full disk) is followed by the same command, which must resume it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from badinput import Case, Setup, check
from conftest import REPO, TINY_BLOCKS
from test_tasks import interrupt_after

TINY_PRESETS = {
    "segmentation": dict(width=0.125, batch_size=4, steps_per_epoch=2, epochs=2, crop=64, stage_blocks=TINY_BLOCKS),
    "cellularity": dict(width=0.125, batch_size=4, steps_per_epoch=2, epochs=2, stage_blocks=TINY_BLOCKS),
    "cascade": dict(width=0.125, batch_size=4, steps_per_epoch=2, epochs=1, finetune_epochs=1,
                    stage_blocks=TINY_BLOCKS),
    "gbt": dict(rounds=5, batch_size=4),
}


def use_tiny_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellnet.training.presets import PRESETS

    for task, values in TINY_PRESETS.items():
        monkeypatch.setitem(PRESETS[task], "cpu", {**PRESETS[task]["cpu"], **values})


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    use_tiny_presets(monkeypatch)


def train_argv(task: str, data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", task, "--data", str(data), "--run", str(run), "--quiet", *extra]


def leftovers(run: Path) -> list[Path]:
    from cellnet.files import LEFTOVER

    return [p for p in run.rglob("*") if LEFTOVER.match(p.name)]


@pytest.fixture(scope="module")
def interrupted(synth_prepared, tmp_path_factory) -> Path:
    """A tiny segmentation run stopped after epoch 1 of 2 (rows copy it)."""
    from cellnet.cli import main

    run = tmp_path_factory.mktemp("interrupted") / "seg"
    with pytest.MonkeyPatch.context() as patched:
        use_tiny_presets(patched)
        interrupt_after(patched, 1)
        assert main(train_argv("segmentation", synth_prepared, run)) == 130
    return run


def copy_run(interrupted: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(interrupted, tmp / "runs" / "seg"))


def committed(run: Path, phase: str = "main") -> int:
    return json.loads((run / "backup" / phase / "state.json").read_text())["epoch"]


# ----------------------------------------------------------------------------- options

OPTIONS = [("segmentation", "--batch-size", "0"), ("segmentation", "--batch-size", "-2"),
           ("cellularity", "--batch-size", "0"), ("segmentation", "--epochs", "0"),
           ("cellularity", "--epochs", "-1"), ("segmentation", "--seed", "-1"),
           ("segmentation", "--ema", "1"), ("cellularity", "--ema", "-0.5"),
           ("segmentation", "--jaccard-weight", "1.5"), ("segmentation", "--jaccard-weight", "-0.1")]


def option_case(task: str, flag: str, value: str) -> Case:
    def build(tmp: Path) -> Setup:
        data = tmp / "data"
        data.mkdir()
        (data / "manifest.json").write_text("{}")
        return Setup(train_argv(task, data, tmp / "run", flag, value), names=flag, inputs=[data],
                     problem=f"got {value}")
    return Case(f"{task} {flag} {value}", build)


@pytest.mark.parametrize("case", [option_case(*o) for o in OPTIONS], ids=str)
def test_counts_must_be_positive(case, tmp_path, capsys, monkeypatch):
    check(case, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "run").exists()


def test_gbt_counts_are_checked_before_its_seg_run(tmp_path, capsys, monkeypatch):
    def build(tmp: Path) -> Setup:
        return Setup(train_argv("gbt", tmp, tmp / "run", "--seg", str(tmp / "seg"), "--batch-size", "0"),
                     names="--batch-size", problem="must be a positive number")
    check(Case("gbt --batch-size 0", build), tmp_path, capsys, monkeypatch)


# ----------------------------------------------------------------------------- unfinished runs

UNFINISHED = {  # what refuses an unfinished run: argv from (the run, the row's tmp, the data)
    "export": lambda run, tmp, data: ["export", "--run", str(run), "--out", str(tmp / "out")],
    "gbt --seg": lambda run, tmp, data: train_argv("gbt", data, tmp / "out", "--seg", str(run)),
    "cascade --seg": lambda run, tmp, data: train_argv("cellularity", data, tmp / "out", "--seg", str(run)),
}


@pytest.mark.parametrize("name", UNFINISHED)
def test_an_unfinished_run_says_how_to_resume_it(name, interrupted, synth_prepared, tmp_path, capsys, monkeypatch):
    def build(tmp: Path) -> Setup:
        run = copy_run(interrupted, tmp)
        return Setup(UNFINISHED[name](run, tmp, synth_prepared), names=str(run), inputs=[run],
                     problem="run is not finished (epoch 1 of 2)")

    line = check(Case(name, build, clean=False), tmp_path, capsys, monkeypatch)
    run = tmp_path / "runs" / "seg"
    assert line.endswith(f"resume with `cellnet train segmentation --data {synth_prepared} --run {run}`"), line
    assert not (tmp_path / "out").exists()


def test_the_resume_command_keeps_the_options_given(tmp_path):
    from cellnet.training.config import make_config
    from cellnet.training.runs import open_run, resume_command

    cfg = make_config("cellularity", data="my data", run=str(tmp_path / "r"), head="classification",
                      epochs=9, jit=True).resolve()
    open_run(cfg)
    assert resume_command(tmp_path / "r") == (f"cellnet train cellularity --data 'my data' --run {tmp_path / 'r'} "
                                              "--head classification --epochs 9 --jit")


# ----------------------------------------------------------------------------- kills, torn files

def test_resume_ignores_a_torn_backup_write_and_history(interrupted, synth_prepared, tmp_path, capsys, monkeypatch):
    torn = {}

    def build(tmp: Path) -> Setup:
        run = copy_run(interrupted, tmp)
        backup = run / "backup" / "main"
        whole = (backup / "epoch-0001.npz").read_bytes()
        torn["file"] = backup / ".epoch-0002.tmp4242.npz"  # a kill while the epoch-2 backup was written
        torn["file"].write_bytes(whole[: len(whole) // 2])
        with (run / "history.csv").open("a") as f:  # a row of the epoch that never committed, torn
            f.write("1,0.1,0.2,0.3\n1,0.")
        return Setup(train_argv("segmentation", synth_prepared, run), names=str(torn["file"]),
                     inputs=[synth_prepared], problem="incomplete file left by an interrupted write")

    check(Case("torn backup", build, code=0, level="warning", clean=False), tmp_path, capsys, monkeypatch)
    run = tmp_path / "runs" / "seg"
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1] and history["loss"].notna().all()
    assert history["learning_rate"].is_monotonic_decreasing  # optimizer state restored
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert not leftovers(run) and not (run / "backup").exists()


def test_a_damaged_committed_backup_is_one_line(interrupted, synth_prepared, tmp_path, capsys, monkeypatch):
    def build(tmp: Path) -> Setup:
        run = copy_run(interrupted, tmp)
        weights = run / "backup" / "main" / "epoch-0001.npz"
        weights.write_bytes(weights.read_bytes()[:1000])
        return Setup(train_argv("segmentation", synth_prepared, run), names=str(weights),
                     inputs=[synth_prepared], problem="damaged backup")
    check(Case("damaged backup", build, clean=False), tmp_path, capsys, monkeypatch)


KILL = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import pytest
from test_bad_inputs_training import use_tiny_presets

target, occurrence, mode = sys.argv[2].split(":")
seen = 0
real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    # SIGKILL at the n-th rename onto a file named like `target`: "torn" halves the temporary
    # file first (a kill mid-write), "before" leaves it whole, "after" lets the rename happen
    global seen
    if target in os.path.basename(dst):
        seen += 1
        if seen == int(occurrence):
            if mode == "torn":
                os.truncate(src, os.path.getsize(src) // 2)
            if mode == "after":
                real_replace(src, dst, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
use_tiny_presets(pytest.MonkeyPatch())
from cellnet.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_kill_9_at_any_instant_resumes(synth_prepared, tmp_path, capsys):
    """SIGKILL mid-write of a backup, between a backup and its commit, and before history lands."""
    from cellnet.cli import main

    run = tmp_path / "seg"
    argv = train_argv("segmentation", synth_prepared, run, "--epochs", "3")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for kill, epochs_committed in (("epoch-0002.npz:1:torn", 1), ("state.json:1:after", 2),
                                   ("history.csv:1:before", 2)):
        result = subprocess.run([sys.executable, "-c", KILL, str(REPO / "tests"), kill, *argv],
                                capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert result.returncode == -9, f"{kill}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert committed(run) == epochs_committed, kill
        assert json.loads((run / "run.json").read_text())["status"] == "running"
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "run complete" in out and "Traceback" not in err
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert history["learning_rate"].is_monotonic_decreasing
    assert not leftovers(run) and not (run / "backup").exists()
    keras.saving.load_model(run / "best.keras", compile=False)


# ----------------------------------------------------------------------------- full disk

def disk_full_on(monkeypatch: pytest.MonkeyPatch, owner, name: str, at_call: int, error) -> None:
    """Make ``owner.name`` raise ``error`` from its ``at_call``-th call on."""
    real = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= at_call:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


DISK_FULL = [
    # a fresh run: epoch 1 saves last.keras and best.keras; the third save is epoch 2's last.keras
    ("fresh", "last.keras",
     lambda mp, tmp: disk_full_on(mp, keras.Model, "save", 3, enospc())),
    # a resumed run (epoch 1 committed): epoch 2's backup cannot be written
    ("resumed", "backup/main/epoch-0002.npz",
     lambda mp, tmp: disk_full_on(mp, np, "savez", 1, enospc())),
]


@pytest.mark.parametrize("start, path, fault", DISK_FULL, ids=[d[1] for d in DISK_FULL])
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(start, path, fault, interrupted, synth_prepared,
                                                              tmp_path, capsys, monkeypatch):
    from cellnet.cli import main

    run = tmp_path / "runs" / "seg"

    def build(tmp: Path) -> Setup:
        if start == "resumed":
            copy_run(interrupted, tmp)
        return Setup(train_argv("segmentation", synth_prepared, run), names=str(run / path),
                     inputs=[synth_prepared], problem="cannot write (No space left on device); what was saved before is kept")

    check(Case(f"disk full: {path}", build, fault=fault, clean=False), tmp_path, capsys, monkeypatch)
    assert not leftovers(run)  # the half-written file is gone: its space is free again
    assert committed(run) == 1 and (run / "last.keras").is_file() and (run / "best.keras").is_file()
    assert main(train_argv("segmentation", synth_prepared, run)) == 0  # space again: the same command
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]


@pytest.mark.parametrize("error", [
    RuntimeError("Can't decrement id ref count (file write failed: errno = 28, error message = "
                 "'No space left on device')"),  # h5py
    tf.errors.ResourceExhaustedError(None, None, "/r/logs/events.out.tfevents.1; No space left on device"),
], ids=["hdf5", "tensorflow"])
def test_write_failures_of_other_libraries_name_the_file(error, tmp_path):
    from cellnet.errors import CellnetError
    from cellnet.files import writing

    with pytest.raises(CellnetError, match=fr"^{tmp_path / 'last.keras'}: cannot write \(No space left on device\)"):
        with writing(tmp_path / "last.keras"):
            raise error
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        with writing(tmp_path / "last.keras"):
            raise RuntimeError("a bug")


def test_out_of_memory_is_not_a_full_disk(tmp_path):
    from cellnet.files import writing

    with pytest.raises(tf.errors.ResourceExhaustedError):
        with writing(tmp_path / "last.keras"):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,64]")


def test_out_of_memory_while_training_is_one_line(synth_prepared, tmp_path, capsys, monkeypatch):
    from cellnet.training.trainer import AugmentedTrainer

    def oom(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,64,128,128]")

    def build(tmp: Path) -> Setup:
        return Setup(train_argv("segmentation", synth_prepared, tmp / "run"), names=str(tmp / "run"),
                     inputs=[synth_prepared], problem="out of memory while training (OOM when allocating")
    check(Case("out of memory", build, fault=lambda mp, tmp: mp.setattr(AugmentedTrainer, "fit", oom),
               clean=False),  # the run folder stays, to resume with a smaller batch
          tmp_path, capsys, monkeypatch)


# ----------------------------------------------------------------------------- failed first attempts

def test_a_failed_prepare_leaves_no_run_and_the_corrected_command_works(synth_data, tmp_path, capsys, monkeypatch):
    from cellnet.cli import main

    data, run = tmp_path / "data", tmp_path / "runs" / "cell"
    image = data / "train" / sorted(p.name for p in (synth_data / "train").glob("*.tif"))[0]

    def build(tmp: Path) -> Setup:
        shutil.copytree(synth_data, data)
        image.write_bytes(image.read_bytes()[:300])  # truncated
        return Setup(train_argv("cellularity", data, run), names=str(image), inputs=[data],
                     problem="unreadable or truncated image")

    check(Case("bad image in --data", build), tmp_path, capsys, monkeypatch)
    assert not run.exists()
    shutil.copyfile(synth_data / "train" / image.name, image)
    assert main(train_argv("cellularity", data, run, "--head", "classification")) == 0
    assert json.loads((run / "run.json").read_text())["kind"] == "classification"


def test_a_run_that_never_committed_an_epoch_takes_new_settings(tmp_path):
    from cellnet.training.config import make_config
    from cellnet.training.runs import check_run, open_run

    cfg = lambda head: make_config("cellularity", data="d", run=str(tmp_path / "r"), head=head)  # noqa: E731
    open_run(cfg("regression"))  # then the attempt failed before its first epoch
    assert check_run(cfg("classification")) is False
    run, resuming = open_run(cfg("classification"))
    assert not resuming and json.loads((run / "config.json").read_text())["head"] == "classification"

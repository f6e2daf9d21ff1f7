"""The training machinery shared by every method: run folders, runtime options, callbacks.

A run folder holds ``config.json`` (the resolved configuration), ``logs/`` (TensorBoard),
``best.keras`` / ``last.keras``, ``history.csv``, ``backup/`` while a run is in progress (resume
with optimizer state), and ``run.json`` (kind, status, timings, final metrics). Nothing a
finished run wrote is overwritten: a complete run folder is refused as a new ``--run``.

A run survives a kill at any instant (SPEC 7): every file is written under a temporary name and
renamed, and an epoch counts only once its backup is committed (``backup/<phase>/state.json``
names the epoch and its weights file). ``history.csv`` keeps only committed epochs, so an
epoch cut short is simply trained again. A full disk stops the run with one line naming the
file; the same command resumes it once there is space.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import keras
import numpy as np
import tensorflow as tf

from .augment import BatchAugment
from .errors import CellnetError, bad, warn
from .imageio import atomic_path, write_text
from .preprocess import to_model_range

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
#: Config fields that must be positive (counts, rates, sizes).
POSITIVE = ("epochs", "batch_size", "steps_per_epoch", "lr", "lr_final", "finetune_lr", "width",
            "crop", "rounds", "learning_rate", "max_depth", "max_leaves")
#: Config fields set by a ``cellnet train`` option, in the order a resume command lists them.
FLAGS = {"preset": "--preset", "decoder": "--decoder", "arch": "--arch", "head": "--head", "seg": "--seg",
         "epochs": "--epochs", "batch_size": "--batch-size", "seed": "--seed", "init": "--init",
         "strategy": "--strategy", "precision": "--precision", "jit": "--jit",
         "augment_on": "--augment-on", "on_bad": "--on-bad"}
#: Keys an interrupted run must keep: resuming with others would continue another model.
RESUME_KEYS = ("task", "decoder", "arch", "head", "preset", "seg")
#: Names of files an interrupted write leaves: ours (``atomic_path``) and Keras's own temporaries.
LEFTOVER = re.compile(r"^\..+\.tmp\d*(\.\w+)?$|^tmp[a-z0-9_]{8}$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _flag(name: str) -> str:
    return FLAGS.get(name, name)


@dataclass
class RunConfig:
    """Everything that defines a training run; saved resolved as ``config.json``."""

    task: str                      # segmentation | cellularity | cascade | gbt
    data: str
    run: str
    preset: str = "cpu"
    decoder: str = "fpn"
    arch: str = "resnet34"
    head: str = "regression"
    seg: str | None = None
    epochs: int | None = None
    finetune_epochs: int | None = None
    batch_size: int | None = None
    steps_per_epoch: int | None = None
    lr: float | None = None
    lr_final: float | None = None
    finetune_lr: float | None = None
    width: float | None = None
    unit: str | None = None
    crop: int | None = None
    rounds: int | None = None
    learning_rate: float | None = None
    max_depth: int | None = None
    max_leaves: int | None = None
    seed: int = 0
    init: str = "random"
    strategy: str = "default"
    precision: str = "float32"
    jit: bool = False
    augment_on: str = "device"
    on_bad: str = "fail"
    target: str = "y"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolve(self, preset_values: dict) -> "RunConfig":
        """Fill every unset field from the preset, then refuse values no run can use."""
        for key, value in preset_values.items():
            if getattr(self, key, None) is None:
                setattr(self, key, value)
        self.validate()
        return self

    def validate(self) -> None:
        """Counts and rates must be positive (``--epochs 0`` would "complete" with no model)."""
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CellnetError(f"{_flag(name)}: must be a positive number, got {value}")
        for name in ("finetune_epochs", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CellnetError(f"{_flag(name)}: must be 0 or more, got {value}")

    @property
    def init_path(self) -> str | None:
        if self.init == "random":
            return None
        if self.init.startswith("imagenet:"):
            path = Path(self.init.split(":", 1)[1])
            if not path.is_file():
                raise bad(path, "ImageNet weights file not found (--init imagenet:PATH needs a local "
                                "weights file; cellnet never downloads; see README 'ImageNet initialisation')")
            return str(path)
        raise CellnetError(f"--init: expected 'random' or 'imagenet:PATH', got {self.init!r}")


# ----------------------------------------------------------------------------- writes

def write_failure(path: str | os.PathLike, exc: BaseException) -> CellnetError:
    """A write the environment refused, as one line naming ``path`` (the file the user knows)."""
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in DISK_FULL) or "No space left" in text:
        return bad(path, "no space left on device; free some space and run the same command again "
                         "to resume (what was saved before is kept)")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text.strip().splitlines()[-1][:100]
    return bad(path, f"cannot write ({reason}); fix that and run the same command again to resume")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``path`` into :func:`write_failure`.

    Python reports a full disk as OSError (without the file's name), TensorFlow's writers as
    ResourceExhaustedError "...; No space left on device" (the same class as running out of
    memory, which is no write failure), h5py (Keras saves large weights through an HDF5
    temporary file) as RuntimeError "... file write failed ...".
    """
    try:
        yield
    except CellnetError:
        raise
    except OSError as exc:
        raise write_failure(path, exc) from None
    except (tf.errors.ResourceExhaustedError, RuntimeError) as exc:
        if not any(words in str(exc) for words in ("No space left", "write failed")):
            raise
        raise write_failure(path, exc) from None


def save_model_atomic(model: keras.Model, path: Path) -> None:
    with writing(path), atomic_path(path) as tmp:
        model.save(tmp)


def copy_atomic(src: Path, dst: Path) -> None:
    with writing(dst), atomic_path(dst) as tmp:
        tmp.write_bytes(src.read_bytes())


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files an interrupted write left in ``folder`` (with a warning each)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_file() and LEFTOVER.match(path.name):
            warn(path, "incomplete file left by an interrupted write; removed")
            path.unlink()


# ----------------------------------------------------------------------------- run folders

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
    with writing(path):
        write_text(path, json.dumps(value, indent=2, default=_json_default))


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
    with writing(run):
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
    from .presets import PRESETS

    run = Path(run)
    saved = _saved_config(run) or {}
    task = saved.get("task", "segmentation")
    command = "cellularity" if task == "cascade" else task
    preset_task = "cascade" if command == "cellularity" and saved.get("seg") else command
    defaults = {f.name: f.default for f in fields(RunConfig)}
    defaults.update(PRESETS.get(preset_task, {}).get(saved.get("preset", "cpu"), {}))
    only = {"decoder": ("segmentation",), "arch": ("cellularity",), "head": ("cellularity",),
            "seg": ("cellularity", "gbt")}
    words = ["cellnet", "train", command, "--data", str(saved.get("data", "DATA")), "--run", str(run)]
    for name, flag in FLAGS.items():
        value = saved.get(name)
        if value is None or value == defaults.get(name) or command not in only.get(name, (command,)):
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


# ----------------------------------------------------------------------------- runtime

def configure_runtime(cfg: RunConfig) -> tf.distribute.Strategy:
    """Seeds, precision policy and the distribution strategy (SPEC 4)."""
    keras.utils.set_random_seed(cfg.seed)
    if not tf.config.list_physical_devices("GPU"):
        # on the CPU, seeds fix results only with deterministic kernels (threaded reductions
        # otherwise sum in varying order); on a GPU this would cost speed, so it stays off there
        tf.config.experimental.enable_op_determinism()
    policies = {"float32": "float32", "mixed_float16": "mixed_float16", "float16": "mixed_float16",
                "mixed_bfloat16": "mixed_bfloat16", "bfloat16": "mixed_bfloat16"}
    if cfg.precision not in policies:
        raise CellnetError(f"--precision: expected one of {', '.join(policies)}, got {cfg.precision!r}")
    keras.mixed_precision.set_global_policy(policies[cfg.precision])
    if cfg.strategy == "default":
        return tf.distribute.get_strategy()
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if cfg.strategy == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise CellnetError("--strategy multi-worker: set TF_CONFIG (cluster and task) for every worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise CellnetError(f"--strategy: expected default, mirrored or multi-worker, got {cfg.strategy!r}")


def lr_schedule(lr: float, lr_final: float, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Exponential decay from ``lr`` to ``lr_final`` over the run (the paper's 1e-4 -> 1e-5)."""
    return keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=max(1, total_steps),
                                                       decay_rate=lr_final / lr)


# ----------------------------------------------------------------------------- the wrapper

@keras.saving.register_keras_serializable(package="cellnet")
class AugmentedTrainer(keras.Model):
    """Wraps a model for training: augments the batch inside the step, then scales to [-1, 1].

    The pipeline delivers uint8 (device augmentation) or float [0, 1] (CPU augmentation); the
    wrapped model always sees [-1, 1], like the exported graph. Only the wrapped model is saved
    as ``best.keras`` / ``last.keras``.
    """

    def __init__(self, model: keras.Model, augment: bool = True, with_mask: bool = False,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.with_mask = with_mask
        self.augment = BatchAugment(seed=seed, name="augment") if augment else None

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    @staticmethod
    def unit(x):
        return tf.cast(x, tf.float32) / 255.0 if x.dtype == tf.uint8 else tf.cast(x, tf.float32)

    def call(self, x, training=False):
        return self.model(to_model_range(self.unit(x)), training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = self.unit(x)
        if self.augment is not None:
            if self.with_mask:
                x, y = self.augment(x, y, training=True)
            else:
                x = self.augment(x, training=True)
        return super().train_step((x, y) if sample_weight is None else (x, y, sample_weight))

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return super().test_step((self.unit(x), y) if sample_weight is None else (self.unit(x), y, sample_weight))


# ----------------------------------------------------------------------------- resumable training

class TrainingState:
    """The backup that resumes a run: weights, optimizer and RNG state after each epoch.

    Like ``keras.callbacks.BackupAndRestore``, but safe to kill at any instant: Keras rewrites
    ``latest.weights.h5`` in place (a kill leaves a truncated file that no resume can read, and
    HDF5 can crash on a full disk), while here each epoch's variables go to a new
    ``epoch-NNNN.npz`` under a temporary name, and ``state.json`` — written last, atomically —
    is what commits it. Variables are matched by order and shape: the resumed model is built by
    the same code.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.state = folder / STATE_FILE

    @staticmethod
    def variables(trainer: keras.Model) -> list:
        """The model's variables (weights, BatchNorm statistics, augmentation seeds), then the optimizer's."""
        seen, out = set(), []
        for v in [*trainer.variables, *trainer.optimizer.variables]:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def committed(self) -> tuple[int, Path | None]:
        """(epochs committed, their weights file)."""
        if not self.state.is_file():
            return 0, None
        try:
            state = json.loads(self.state.read_text())
            return int(state["epoch"]), self.folder / str(state["weights"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise bad(self.state, f"unreadable backup state ({exc}); delete {self.folder} to train "
                                  "this phase again from epoch 1, or choose a new --run") from None

    def restore(self, trainer: keras.Model) -> int:
        """Load the last committed epoch into ``trainer`` (built and compiled); returns its count."""
        remove_leftovers(self.folder)
        epoch, weights = self.committed()
        for stale in self.folder.glob("epoch-*.npz"):
            if stale != weights:  # written, but its epoch never committed (or already superseded)
                stale.unlink()
        if weights is None:
            return 0
        with trainer.distribute_strategy.scope():
            if not trainer.optimizer.built:
                trainer.optimizer.build(trainer.trainable_variables)
            variables = self.variables(trainer)
        try:
            with np.load(weights) as npz:
                values = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except Exception as exc:  # a damaged file: zipfile, numpy and OS errors all mean the same
            raise bad(weights, f"damaged backup ({type(exc).__name__}); delete {self.folder} to train this "
                               "phase again from epoch 1, or choose a new --run") from None
        if [tuple(v.shape) for v in variables] != [x.shape for x in values]:
            raise bad(self.folder, "backup was written by a different model (another width, preset or "
                                   "cellnet version); choose a new --run")
        for variable, value in zip(variables, values):
            variable.assign(value)
        return epoch

    def commit(self, trainer: keras.Model, epochs: int) -> None:
        """Save the state after ``epochs`` epochs; the previous backup stays until this one is whole."""
        previous = self.committed()[1]
        weights = self.folder / f"epoch-{epochs:04d}.npz"
        values = [keras.ops.convert_to_numpy(v) for v in self.variables(trainer)]
        with writing(weights), atomic_path(weights) as tmp:
            with tmp.open("wb") as f:
                np.savez(f, *values)
                f.flush()
                os.fsync(f.fileno())
        with writing(self.state):
            write_text(self.state, json.dumps({"epoch": epochs, "weights": weights.name}))
        if previous is not None and previous != weights and previous.exists():
            previous.unlink()


class Checkpoints(keras.callbacks.Callback):
    """Per epoch, in this order: ``last.keras``, ``best.keras`` (when ``monitor`` improves),
    ``history.csv`` (rewritten whole), then the backup commit.

    A kill before the commit trains the epoch again on resume: its history row is dropped and
    its checkpoints are overwritten. ``restore`` must run before ``fit`` (its epoch count is
    ``fit``'s ``initial_epoch``).
    """

    def __init__(self, inner: keras.Model, run: Path, monitor: str, mode: str = "min", prefix: str = ""):
        super().__init__()
        self.inner, self.run, self.monitor, self.mode, self.prefix = inner, run, monitor, mode, prefix
        self.name = prefix.rstrip("_") or "main"
        self.state = TrainingState(run / "backup" / self.name)
        self.history = run / f"{prefix}history.csv"
        self.rows: list[dict] = []
        self.best = math.inf if mode == "min" else -math.inf

    def restore(self, trainer: keras.Model) -> int:
        epoch = self.state.restore(trainer)
        if self.history.is_file():
            with self.history.open(newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if _epoch(row) is not None and _epoch(row) < epoch]
        values = [float(row[self.monitor]) for row in self.rows if row.get(self.monitor)]
        values = [v for v in values if math.isfinite(v)]
        if values:
            self.best = min(values) if self.mode == "min" else max(values)
        return epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        save_model_atomic(self.inner, self.run / f"{self.prefix}last.keras")
        value = logs.get(self.monitor)
        best = self.run / f"{self.prefix}best.keras"
        if value is not None and math.isfinite(value) and (
                (value < self.best if self.mode == "min" else value > self.best) or not best.is_file()):
            self.best = value
            save_model_atomic(self.inner, best)
            write_run(self.run, best_epoch=epoch + 1, best={self.monitor: float(value)})
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        self._write_history()
        self.state.commit(self.model, epoch + 1)

    def _write_history(self) -> None:
        keys = sorted({k for row in self.rows for k in row} - {"epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, ["epoch", *keys], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        with writing(self.history):
            write_text(self.history, text.getvalue())


def _epoch(row: dict) -> int | None:
    try:
        return int(row["epoch"])
    except (KeyError, TypeError, ValueError):  # a torn line
        return None


class LogLearningRate(keras.callbacks.Callback):
    """Put the optimizer's current learning rate into the epoch logs (history.csv, TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class MaskImages(keras.callbacks.Callback):
    """TensorBoard images: input | malignant probability | overlay of predicted cell classes."""

    def __init__(self, images: tf.Tensor, log_dir: Path, every: int = 1):
        super().__init__()
        self.images = images  # uint8 [n, h, w, 3]
        self.log_dir = log_dir / "images"
        self.every = every
        self.writer = None

    def on_train_begin(self, logs=None):
        with writing(self.log_dir):
            self.writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        x = tf.cast(self.images, tf.float32) / 255.0
        maps = tf.cast(self.model(x, training=False), tf.float32)
        colour = tf.stack([maps[..., 2], maps[..., 0], maps[..., 1]], axis=-1)  # R malignant, G normal, B lymph
        overlay = tf.clip_by_value(0.55 * x + 0.45 * colour, 0.0, 1.0)
        malignant = tf.repeat(maps[..., 2:3], 3, axis=-1)
        with writing(self.log_dir), self.writer.as_default():
            tf.summary.image("input|malignant|overlay", tf.concat([x, malignant, overlay], axis=2),
                             step=epoch, max_outputs=4)
            self.writer.flush()


def standard_callbacks(checkpoints: Checkpoints, preview: tf.Tensor | None = None) -> list[keras.callbacks.Callback]:
    """Learning rate, checkpoints + history + backup, TensorBoard (+ mask images for segmenters)."""
    log_dir = checkpoints.run / "logs" / checkpoints.name
    callbacks = [
        LogLearningRate(),
        checkpoints,
        keras.callbacks.TensorBoard(str(log_dir), write_graph=False, update_freq="epoch"),
        keras.callbacks.TerminateOnNaN(),
    ]
    if preview is not None:
        callbacks.append(MaskImages(preview, log_dir))
    return callbacks


def fit(trainer: AugmentedTrainer, train_ds, val_ds, run: Path, *, epochs: int, steps: int, monitor: str,
        mode: str = "min", prefix: str = "", preview: tf.Tensor | None = None, verbose: int = 0) -> None:
    """``trainer.fit`` from the last committed epoch of this phase (``prefix``) to ``epochs``."""
    checkpoints = Checkpoints(trainer.model, run, monitor, mode, prefix)
    initial = checkpoints.restore(trainer)
    if initial >= epochs:
        return
    # an explicit count of validation batches: Keras warns "ran out of data" on a finite set otherwise
    val_steps = None if val_ds is None else int(val_ds.reduce(0, lambda n, _: n + 1))
    try:
        with writing(run):  # what no callback names (TensorBoard's writers): the run folder
            trainer.fit(train_ds, epochs=epochs, initial_epoch=initial, steps_per_epoch=steps,
                        validation_data=val_ds, validation_steps=val_steps, shuffle=False,
                        callbacks=standard_callbacks(checkpoints, preview), verbose=verbose)
    except tf.errors.ResourceExhaustedError as exc:  # out of (device) memory
        raise bad(run, f"out of memory while training ({exc.message.strip().splitlines()[0][:80]}); "
                       "try a smaller --batch-size and run the command again to resume") from None


@contextlib.contextmanager
def timed(run: Path, key: str):
    start = time.time()
    yield
    write_run(run, **{key: round(time.time() - start, 1)})

"""Callbacks of every training run: the resumable training state, checkpoints and history,
the learning rate, TensorBoard mask images, and the weights' moving average (``--ema``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cellnet.errors import bad
from cellnet.preprocess import to_unit_range
from cellnet.files import atomic_path, remove_leftovers, write_text, writing
from cellnet.training.runs import RESUMABLE, STATE_FILE, save_model_atomic, write_run


def averaging(optimizer: keras.optimizers.Optimizer | None) -> keras.optimizers.Optimizer | None:
    """The optimizer (a LossScaleOptimizer's inner one) when it keeps a moving average of the weights, else None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if getattr(inner, "use_ema", False) else None


@contextlib.contextmanager
def averaged_weights(optimizer: keras.optimizers.Optimizer | None):
    """Inside the block the model's trainable variables hold the optimizer's moving average of
    them (``use_ema``); after it, the raw weights again, bit for bit. Without ``use_ema``: nothing.

    Why not ``keras.callbacks.SwapEMAWeights``: it swaps by adding and subtracting, which rounds
    the raw weights at every swap, and it leaves the averages in the model at the end of an
    epoch, so the resumable backup would hold them in place of the raw weights.
    """
    inner = averaging(optimizer)
    averages = getattr(inner, "_model_variables_moving_average", None) if inner is not None else None
    if not averages:
        yield
        return
    variables = inner._trainable_variables
    raw = [keras.ops.convert_to_numpy(v) for v in variables]
    for variable, average in zip(variables, averages):
        variable.assign(average)
    try:
        yield
    finally:
        for variable, value in zip(variables, raw):
            variable.assign(value)


class AveragedValidation(keras.callbacks.Callback):
    """Validate the moving average of the weights (``--ema``): the checkpoint it picks is what is saved."""

    def __init__(self):
        super().__init__()
        self._stack = contextlib.ExitStack()

    def on_test_begin(self, logs=None):
        self._stack.enter_context(averaged_weights(self.model.optimizer))

    def on_test_end(self, logs=None):
        self._stack.close()


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
        with writing(weights, RESUMABLE), atomic_path(weights) as tmp:
            with tmp.open("wb") as f:
                np.savez(f, *values)
                f.flush()
                os.fsync(f.fileno())
        with writing(self.state, RESUMABLE):
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
        value = logs.get(self.monitor)
        best = self.run / f"{self.prefix}best.keras"
        with averaged_weights(self.model.optimizer):  # the .keras files hold the average (--ema)
            save_model_atomic(self.inner, self.run / f"{self.prefix}last.keras")
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
        with writing(self.history, RESUMABLE):
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
        with writing(self.log_dir, RESUMABLE):
            self.writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        x = to_unit_range(self.images)
        with averaged_weights(self.model.optimizer):
            maps = tf.cast(self.model(x, training=False), tf.float32)
        colour = tf.stack([maps[..., 2], maps[..., 0], maps[..., 1]], axis=-1)  # R malignant, G normal, B lymph
        overlay = tf.clip_by_value(0.55 * x + 0.45 * colour, 0.0, 1.0)
        malignant = tf.repeat(maps[..., 2:3], 3, axis=-1)
        with writing(self.log_dir, RESUMABLE), self.writer.as_default():
            tf.summary.image("input|malignant|overlay", tf.concat([x, malignant, overlay], axis=2),
                             step=epoch, max_outputs=4)
            self.writer.flush()


def standard_callbacks(checkpoints: Checkpoints, preview: tf.Tensor | None = None,
                       optimizer: keras.optimizers.Optimizer | None = None) -> list[keras.callbacks.Callback]:
    """Learning rate, checkpoints + history + backup, TensorBoard (+ mask images for segmenters,
    + validation of the averaged weights when ``optimizer`` keeps them)."""
    log_dir = checkpoints.run / "logs" / checkpoints.name
    callbacks = [
        LogLearningRate(),
        checkpoints,
        keras.callbacks.TensorBoard(str(log_dir), write_graph=False, update_freq="epoch"),
        keras.callbacks.TerminateOnNaN(),
    ]
    if averaging(optimizer) is not None:
        callbacks.append(AveragedValidation())
    if preview is not None:
        callbacks.append(MaskImages(preview, log_dir))
    return callbacks

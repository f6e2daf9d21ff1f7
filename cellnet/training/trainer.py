"""How a model is trained: runtime options, the augmenting wrapper, and the resumable ``fit``.

The wrapper augments each batch inside the training step (on the GPU when there is one) and
scales it to [-1, 1] on the pixel path every model shares (``cellnet.preprocess``).
"""
from __future__ import annotations

import os
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from cellnet.data.augment import BatchAugment, StainAugment
from cellnet.errors import CellnetError, bad
from cellnet.files import writing
from cellnet.preprocess import to_model_range, to_unit_range
from cellnet.training.callbacks import Checkpoints, standard_callbacks
from cellnet.training.config import RunConfig
from cellnet.training.runs import RESUMABLE

def configure_runtime(cfg: RunConfig) -> tf.distribute.Strategy:
    """Seeds, precision policy and the distribution strategy (SPEC 4)."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.jit:
        # Keras silently trains without XLA while op determinism is on; TF has no public switch
        # back for a process that turned it on (an earlier run in the same Python)
        tf_config.disable_op_determinism()
    elif not tf.config.list_physical_devices("GPU"):
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


def adam(learning_rate, ema: float | None = None) -> keras.optimizers.Adam:
    """Adam (the paper's optimizer); ``ema`` in (0, 1) also keeps a moving average of the weights
    with that momentum, which validation, ``best.keras`` and ``last.keras`` then use (``--ema``)."""
    if ema:
        return keras.optimizers.Adam(learning_rate, use_ema=True, ema_momentum=float(ema))
    return keras.optimizers.Adam(learning_rate)


# ----------------------------------------------------------------------------- the wrapper

@keras.saving.register_keras_serializable(package="cellnet")
class AugmentedTrainer(keras.Model):
    """Wraps a model for training: augments the batch inside the step, then scales to [-1, 1].

    The pipeline delivers uint8 (device augmentation) or float [0, 1] (CPU augmentation); the
    wrapped model always sees [-1, 1], like the exported graph. Only the wrapped model is saved
    as ``best.keras`` / ``last.keras``. ``stain`` adds the stain ops to the augmentation (None:
    none, as before).
    """

    def __init__(self, model: keras.Model, augment: bool = True, with_mask: bool = False,
                 seed: int = 0, stain: StainAugment | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.with_mask = with_mask
        stain_kwargs = stain.as_kwargs() if stain is not None else {}
        self.augment = BatchAugment(seed=seed, name="augment", **stain_kwargs) if augment else None

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras's, except that a refused ``jit_compile=True`` is an error: Keras would train
        without XLA with only a warning (it refuses under op determinism or an unsupported layer)."""
        super().compile(*args, jit_compile=jit_compile, **kwargs)
        if jit_compile is True and not self.jit_compile:
            raise CellnetError("--jit: Keras will not compile this model with XLA (a layer without XLA "
                               "support, or op determinism on); run without --jit")

    @staticmethod
    def unit(x):
        return to_unit_range(x) if x.dtype == tf.uint8 else tf.cast(x, tf.float32)

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


def fit(trainer: AugmentedTrainer, train_ds, val_ds, run: Path, *, epochs: int, steps: int, monitor: str,
        mode: str = "min", prefix: str = "", preview: tf.Tensor | None = None, verbose: int = 0) -> None:
    """``trainer.fit`` from the last committed epoch of this phase (``prefix``) to ``epochs``."""
    checkpoints = Checkpoints(trainer.model, run, monitor, mode, prefix)
    initial = checkpoints.restore(trainer)
    if initial >= epochs:
        return
    if not trainer.optimizer.built:
        # Keras would create the optimizer's slots inside the first train step, which then traces
        # twice (once creating variables, once without): building them first halves the start-up.
        with trainer.distribute_strategy.scope():  # slots beside their variables (tf.distribute)
            trainer.optimizer.build(trainer.trainable_variables)
    # an explicit count of validation batches: Keras warns "ran out of data" on a finite set otherwise
    val_steps = None if val_ds is None else int(val_ds.reduce(0, lambda n, _: n + 1))
    try:
        with writing(run, RESUMABLE):  # what no callback names (TensorBoard's writers): the run folder
            trainer.fit(train_ds, epochs=epochs, initial_epoch=initial, steps_per_epoch=steps,
                        validation_data=val_ds, validation_steps=val_steps, shuffle=False,
                        callbacks=standard_callbacks(checkpoints, preview, trainer.optimizer), verbose=verbose)
    except tf.errors.ResourceExhaustedError as exc:  # out of (device) memory
        raise bad(run, f"out of memory while training ({exc.message.strip().splitlines()[0][:80]}); "
                       "try a smaller --batch-size and run the command again to resume") from None

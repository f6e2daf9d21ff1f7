"""Runtime options of the training machinery: seeds, XLA, the weights' moving average; the augmenting wrapper."""
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from cellnet.data.augment import StainAugment
from cellnet.training import trainer as trainer_module
from cellnet.training.callbacks import TrainingState
from cellnet.training.tasks import train_segmentation
from cellnet.training.trainer import AugmentedTrainer, adam, fit
from conftest import tiny_config
from test_tasks import StopAfter


def test_seeded_runs_repeat_exactly(synth_prepared, tmp_path):
    histories = []
    for i in range(2):
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / f"run{i}", seed=7))
        histories.append(pd.read_csv(tmp_path / f"run{i}" / "history.csv"))
    assert histories[0][["loss", "val_loss"]].equals(histories[1][["loss", "val_loss"]])


def test_xla_compiled_training_step(synth_prepared, tmp_path, monkeypatch):
    """--jit compiles on the CPU too (Keras would silently not, were op determinism left on)."""
    compiled = []
    compile_ = AugmentedTrainer.compile
    monkeypatch.setattr(AugmentedTrainer, "compile",
                        lambda self, **kw: (compile_(self, **kw), compiled.append(self.jit_compile)))
    tf.config.experimental.enable_op_determinism()  # as an earlier run in this process leaves it
    info = train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "jit", epochs=1, jit=True))
    assert compiled == [True]
    assert info["status"] == "complete"
    assert pd.read_csv(tmp_path / "jit" / "history.csv")["loss"].notna().all()


def test_augmented_trainer_passes_stain_settings_to_the_step():
    """A train step with the stain ops on, on a tiny segmenter (masks ride along)."""
    assert AugmentedTrainer(keras.Sequential([keras.layers.Dense(1)])).augment.stain_settings == StainAugment.off()
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs))
    stain = StainAugment(blur_prob=1.0)
    trainer = AugmentedTrainer(model, with_mask=True, seed=1, stain=stain)
    assert trainer.augment.stain_settings == stain
    trainer.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    y = (x[..., :1] > 127).astype(np.float32)
    history = trainer.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def _averaging_trainer(ema: float) -> AugmentedTrainer:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="conv")(inputs)
    trainer = AugmentedTrainer(keras.Model(inputs, outputs), augment=False)
    trainer.compile(optimizer=adam(1e-2, ema), loss="mse")
    trainer(tf.zeros([1, 8, 8, 3], tf.uint8))
    return trainer


def _averaging_data() -> tuple[tf.data.Dataset, tf.data.Dataset]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    y = (x[..., :1] > 100).astype(np.float32)
    return (tf.data.Dataset.from_tensor_slices((x[:12], y[:12])).batch(4).repeat(),
            tf.data.Dataset.from_tensor_slices((x[12:], y[12:])).batch(4))


def test_ema_validates_and_saves_the_average_and_backs_up_the_raw_weights(tmp_path):
    train, val = _averaging_data()
    trainer = _averaging_trainer(0.5)
    fit(trainer, train, val, tmp_path, epochs=2, steps=3, monitor="val_loss")
    optimizer = trainer.optimizer
    average = [keras.ops.convert_to_numpy(v) for v in optimizer._model_variables_moving_average]
    saved = keras.saving.load_model(tmp_path / "last.keras", compile=False).get_layer("conv").get_weights()
    backup = TrainingState(tmp_path / "backup" / "main")
    with np.load(backup.committed()[1]) as npz:
        raw = [npz[f"arr_{i}"] for i in range(2)]  # the model's variables come first: kernel, bias
    for s, a, r in zip(saved, average, raw):
        np.testing.assert_array_equal(s, a)  # the .keras file holds the average ...
        assert np.abs(r - a).max() > 1e-4  # ... the backup the raw weights, which differ from it
    # history's val_loss is the average's loss (Keras's fit leaves the average in the model at the end)
    np.testing.assert_array_equal(trainer.model.get_layer("conv").get_weights()[0], average[0])
    val_loss = pd.read_csv(tmp_path / "history.csv")["val_loss"].iloc[-1]
    assert trainer.evaluate(val, verbose=0) == pytest.approx(val_loss, rel=1e-6)


def test_ema_run_resumed_after_a_kill_ends_where_an_unbroken_one_does(tmp_path, monkeypatch):
    train, val = _averaging_data()
    fit(_averaging_trainer(0.5), train, val, tmp_path / "whole", epochs=3, steps=3, monitor="val_loss")
    with monkeypatch.context() as patched:
        standard = trainer_module.standard_callbacks
        patched.setattr(trainer_module, "standard_callbacks", lambda *a, **k: [*standard(*a, **k), StopAfter(1)])
        with pytest.raises(KeyboardInterrupt):
            fit(_averaging_trainer(0.5), train, val, tmp_path / "resumed", epochs=3, steps=3, monitor="val_loss")
    fit(_averaging_trainer(0.5), train, val, tmp_path / "resumed", epochs=3, steps=3, monitor="val_loss")
    whole, resumed = (pd.read_csv(tmp_path / r / "history.csv") for r in ("whole", "resumed"))
    assert list(resumed["epoch"]) == [0, 1, 2]
    np.testing.assert_allclose(resumed[["loss", "val_loss"]], whole[["loss", "val_loss"]], rtol=1e-6)

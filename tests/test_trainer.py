"""Runtime options of the training machinery: seeds, XLA; the augmenting wrapper."""
import keras
import numpy as np
import pandas as pd

from cellnet.data.augment import StainAugment
from cellnet.training.tasks import train_segmentation
from cellnet.training.trainer import AugmentedTrainer
from conftest import tiny_config


def test_seeded_runs_repeat_exactly(synth_prepared, tmp_path):
    histories = []
    for i in range(2):
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / f"run{i}", seed=7))
        histories.append(pd.read_csv(tmp_path / f"run{i}" / "history.csv"))
    assert histories[0][["loss", "val_loss"]].equals(histories[1][["loss", "val_loss"]])


def test_xla_compiled_training_step(synth_prepared, tmp_path):
    info = train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "jit", epochs=1, jit=True))
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

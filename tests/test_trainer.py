"""Runtime options of the training machinery: seeds, XLA."""
import pandas as pd

from cellnet.training.tasks import train_segmentation
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

"""Training commands end to end on tiny models (seconds each)."""
import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest


from cellnet.errors import CellnetError
from cellnet.training.tasks import train_cascade, train_cellularity, train_gbt, train_segmentation
from conftest import REPO, tiny_config


def test_segmentation_run_folder(tiny_seg_run):
    for name in ("config.json", "run.json", "history.csv", "best.keras", "last.keras"):
        assert (tiny_seg_run / name).is_file(), name
    assert list((tiny_seg_run / "logs").rglob("events.out.tfevents*"))
    info = json.loads((tiny_seg_run / "run.json").read_text())
    assert info["status"] == "complete" and info["kind"] == "segmentation"
    history = pd.read_csv(tiny_seg_run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert {"loss", "val_loss", "jaccard_malignant", "val_jaccard_malignant", "learning_rate"} <= set(history.columns)
    # the learning rate decays over the run
    assert history["learning_rate"].iloc[-1] < history["learning_rate"].iloc[0]
    config = json.loads((tiny_seg_run / "config.json").read_text())
    assert config["width"] == 0.125 and config["lr"] == 2e-3  # preset values resolved into the file
    assert config["jaccard_weight"] == 0.15  # the paper's a, from the preset
    assert not (tiny_seg_run / "backup" / "main").exists() or not any((tiny_seg_run / "backup" / "main").iterdir())


def test_short_training_learns_malignant_cells(synth_prepared, tmp_path):
    run = tmp_path / "seg"
    train_segmentation(tiny_config("segmentation", synth_prepared, run, epochs=8, steps_per_epoch=4,
                                   width=0.25, crop=128))
    history = pd.read_csv(run / "history.csv")
    assert history["loss"].iloc[-1] < 0.8 * history["loss"].iloc[0]
    assert history["jaccard_malignant"].iloc[-3:].mean() > history["jaccard_malignant"].iloc[0] + 0.1


class StopAfter(keras.callbacks.Callback):
    """Simulate a crash once ``epochs`` epochs are committed (the last callback of an epoch)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            raise KeyboardInterrupt(f"simulated interruption after epoch {epoch + 1}")


def interrupt_after(monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    """Make every training of this test stop with KeyboardInterrupt after ``epochs`` epochs."""
    from cellnet.training import trainer

    standard = trainer.standard_callbacks
    monkeypatch.setattr(trainer, "standard_callbacks", lambda *a, **k: [*standard(*a, **k), StopAfter(epochs)])


def test_kill_and_resume_continues_at_the_right_epoch(synth_prepared, tmp_path, monkeypatch):
    run = tmp_path / "seg"
    cfg = lambda: tiny_config("segmentation", synth_prepared, run, epochs=4)  # noqa: E731
    with monkeypatch.context() as patched:
        interrupt_after(patched, 2)
        with pytest.raises(KeyboardInterrupt):
            train_segmentation(cfg())
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]
    train_segmentation(cfg())
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    # resumed with optimizer state: the decayed learning rate continues, it does not restart
    assert history["learning_rate"].is_monotonic_decreasing
    with pytest.raises(CellnetError, match="holds a complete run"):
        train_segmentation(cfg())


def test_direct_models_both_heads(synth_prepared, tmp_path):
    for head in ("regression", "classification"):
        run = tmp_path / head
        info = train_cellularity(tiny_config("cellularity", synth_prepared, run, arch="resnet34", head=head))
        assert info["kind"] == head
        model = keras.saving.load_model(run / "best.keras")
        out = model.predict(np.zeros((2, 256, 256, 3), np.float32), verbose=0)
        assert out.shape == ((2, 1) if head == "regression" else (2, 101))
        assert "val_mse" in pd.read_csv(run / "history.csv").columns


def test_cascade_freezes_then_unfreezes(tiny_seg_run, synth_prepared, tmp_path):
    run = tmp_path / "cascade"
    info = train_cascade(tiny_config("cascade", synth_prepared, run, seg=str(tiny_seg_run), epochs=1,
                                     finetune_epochs=1))
    assert info["kind"] == "cascade"
    assert 0 < info["head_trainable_weights"] < info["finetune_trainable_weights"]
    assert (run / "head_history.csv").is_file() and (run / "finetune_history.csv").is_file()
    assert (run / "best.keras").is_file()


def test_gbt_run(tiny_seg_run, synth_prepared, tmp_path):
    run = tmp_path / "gbt"
    info = train_gbt(tiny_config("gbt", synth_prepared, run, seg=str(tiny_seg_run), rounds=30))
    importance = pd.read_csv(run / "feature_importance.csv")
    assert len(importance) == 81 and (run / "feature_importance.png").is_file()
    assert info["features"] == 81
    model = keras.saving.load_model(run / "best.keras")
    assert model.predict(np.zeros((1, 256, 256, 3), np.float32), verbose=0).shape == (1, 1)


def test_gbt_needs_a_segmentation_run(tiny_seg_run, synth_prepared, tmp_path):
    gbt = tmp_path / "gbt"
    train_gbt(tiny_config("gbt", synth_prepared, gbt, seg=str(tiny_seg_run), rounds=5))
    with pytest.raises(CellnetError, match="not a segmentation run"):
        train_gbt(tiny_config("gbt", synth_prepared, tmp_path / "g2", seg=str(gbt), rounds=5))


def test_imagenet_init_without_a_file_is_a_clear_error(synth_prepared, tmp_path):
    with pytest.raises(CellnetError, match="ImageNet weights file not found.*never downloads"):
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "s",
                                       init=f"imagenet:{tmp_path / 'missing.weights.h5'}", stage_blocks=None))
    assert not (tmp_path / "s").exists()


def test_mixed_precision_keeps_float32_outputs(synth_prepared, tmp_path):
    run = tmp_path / "seg"
    try:
        train_segmentation(tiny_config("segmentation", synth_prepared, run, epochs=1, precision="mixed_bfloat16"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model = keras.saving.load_model(run / "best.keras")
    assert model.output.dtype == "float32"


MIRRORED = r"""
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[3])
from conftest import tiny_config
from cellnet.training.tasks import train_segmentation
info = train_segmentation(tiny_config("segmentation", sys.argv[1], sys.argv[2], epochs=1, strategy="mirrored"))
print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync, info["status"])
"""


def test_mirrored_strategy_on_two_logical_cpus(synth_prepared, tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(synth_prepared), str(tmp_path / "seg"),
                             str(REPO / "tests")], capture_output=True, text=True, timeout=300)
    assert "REPLICAS 2 complete" in result.stdout, result.stderr[-2000:]


def test_segmentation_starts_from_a_torchvision_imagenet_file(synth_prepared, tmp_path):
    """`--unit torchvision --init imagenet:X.safetensors`: the file's tensors start the run."""
    from test_pretrained import _state_dict, _write_safetensors

    state = _state_dict(seed=3)
    weights = _write_safetensors(state, tmp_path / "model.safetensors")
    run = tmp_path / "seg"
    train_segmentation(tiny_config("segmentation", synth_prepared, run, width=1.0, unit="torchvision",
                                   init=f"imagenet:{weights}", epochs=1, steps_per_epoch=1, batch_size=2,
                                   stage_blocks=None))  # ImageNet files are ResNet34s
    model = keras.saving.load_model(run / "best.keras", compile=False)
    backbone = model.backbone
    assert backbone.unit == "torchvision" and backbone.input_norm == "imagenet"
    kernel = backbone.get_layer("stage3_unit1_downsample_conv").get_weights()[0]
    source = state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0)
    assert np.abs(kernel - source).max() < 0.01 < np.abs(source).max()  # one Adam step away
    assert json.loads((run / "config.json").read_text())["unit"] == "torchvision"


def test_a_torchvision_file_needs_the_torchvision_unit(synth_prepared, tmp_path):
    weights = tmp_path / "resnet34.pth"
    weights.write_bytes(b"")
    with pytest.raises(CellnetError, match=r"^--init imagenet:.*resnet34.pth: a torchvision/timm ResNet34 file "
                                           r"needs --unit torchvision \(not preact\)"):
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "seg", init=f"imagenet:{weights}",
                                       stage_blocks=None))
    assert not (tmp_path / "seg").exists()


def test_stain_normalisation_is_fitted_once_kept_in_the_run_and_built_into_the_model(synth_prepared, tmp_path):
    run = tmp_path / "seg"
    train_segmentation(tiny_config("segmentation", synth_prepared, run, stain_norm="reinhard", epochs=1,
                                   steps_per_epoch=1))
    record = json.loads((run / "stain.json").read_text())
    assert record["method"] == "reinhard" and record["reference"] == "training regions" and record["images"] > 0
    model = keras.saving.load_model(run / "best.keras", compile=False)
    assert model.get_config()["stain_norm"] == {"method": "reinhard", "params": record["params"]}
    assert model.get_layer("stain_norm").__class__.__name__ == "ReinhardNormalization"


class LossBuilt(Exception):
    """Raised by a spy loss once it is built: the test needs no training step."""


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_jaccard_weight_is_the_loss_alpha(synth_prepared, tmp_path, monkeypatch, weight):
    from cellnet.training import losses

    class Spy(losses.SegmentationLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            raise LossBuilt(self.alpha)

    monkeypatch.setattr(losses, "SegmentationLoss", Spy)
    with pytest.raises(LossBuilt) as built:
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "seg", jaccard_weight=weight))
    assert built.value.args == (weight,)
    assert json.loads((tmp_path / "seg" / "config.json").read_text())["jaccard_weight"] == weight


@pytest.mark.parametrize("values, needle", [
    (dict(stain_ref="{tmp}"), "--stain-ref: needs --stain-norm reinhard or macenko"),
    (dict(stain_norm="macenko", stain_ref="{tmp}/nope"), "nope: not a folder of reference images"),
    (dict(stain_norm="macenko", stain_ref="{tmp}"), "holds no .tif/.png/.jpg images"),
])
def test_bad_stain_reference_is_refused_before_the_run(synth_prepared, tmp_path, values, needle):
    values = {k: v.format(tmp=tmp_path) for k, v in values.items()}
    with pytest.raises(CellnetError, match=needle):
        train_segmentation(tiny_config("segmentation", synth_prepared, tmp_path / "seg", **values))
    assert not (tmp_path / "seg").exists()

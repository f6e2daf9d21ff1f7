"""CellSegmenter with FPN and U-Net decoders: paper structure, outputs, freezing, saving."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.training.losses import ClassJaccard, SegmentationLoss
from cellnet.models import FPN, BilinearUpSampling2D, CellSegmenter, ResNet34Backbone, Unet, load_backbone_weights
from conftest import calibrate_batchnorm

TINY = 0.125
REPO = Path(__file__).resolve().parents[1]
RELOAD_SCRIPT = """
import sys
import numpy as np
import keras
import cellnet.training.losses, cellnet.models  # registers the cellnet classes
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    model = keras.saving.load_model(path)
    np.save(path + ".npy", model(x, training=False).numpy())
    np.save(path + ".trainable.npy", len(model.trainable_weights))
"""


#: Fitted Reinhard values of an H&E patch (any plausible values do here).
REINHARD = {"method": "reinhard",
            "params": {"target_mean": [-0.68, -0.073, 0.028], "target_std": [0.31, 0.06, 0.0105]}}


def _images(n: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype("float32")


def test_paper_fpn_structure_from_layer_configs():
    model = FPN()  # width 1.0, never run
    for level, factor in zip((2, 3, 4, 5), (1, 2, 4, 8)):
        conv = model.get_layer(f"fpn_p{level}_conv")
        assert conv.filters == 64 and conv.kernel_size == (3, 3)
        if factor > 1:
            assert model.get_layer(f"fpn_p{level}_upsample").size == (factor, factor)
    assert sum(isinstance(layer, keras.layers.SpatialDropout2D) for layer in model.layers) == 1
    dropout = model.get_layer("fpn_dropout")
    assert isinstance(dropout, keras.layers.SpatialDropout2D) and dropout.rate == 0.5
    concat = model.get_layer("fpn_concat")
    assert concat.output.shape[-1] == 4 * 64 and dropout.input is concat.output
    assert model.get_layer("fpn_upsample").size == (4, 4)
    head = model.get_layer("masks")
    assert head.activation.__name__ == "sigmoid" and head.dtype_policy.compute_dtype == "float32"
    assert model.input.shape[1:] == (None, None, 3) and model.output.shape[-1] == 4


@pytest.mark.parametrize("build", [FPN, Unet])
def test_outputs_are_float32_probabilities_at_input_size(build):
    model = build(width=TINY)
    x = _images(h=64, w=96)
    masks = model(x, training=False)
    assert masks.dtype == "float32" and tuple(masks.shape) == (2, 64, 96, 4)
    masks = masks.numpy()
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    train_masks = model(x, training=True).numpy()
    assert 0.0 <= train_masks.min() and train_masks.max() <= 1.0
    assert model.output_names == ["masks"]


@pytest.mark.parametrize("build", [FPN, Unet])
def test_traces_with_unknown_image_size(build):
    """Serving signatures take any size: the graph must trace with None height and width."""
    model = build(width=TINY)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    serve = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    x = _images(n=1, h=32, w=96)
    np.testing.assert_allclose(serve(x).numpy(), model(x, training=False).numpy(), atol=1e-5)


def test_bilinear_upsampling_matches_keras_on_known_shapes():
    x = _images(n=2, h=5, w=7)
    ours = BilinearUpSampling2D(4)(x).numpy()
    reference = keras.layers.UpSampling2D(4, interpolation="bilinear")(x).numpy()
    assert ours.shape == (2, 20, 28, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert BilinearUpSampling2D.from_config(BilinearUpSampling2D(4).get_config()).size == (4, 4)


def test_unet_is_the_standard_decoder():
    model = Unet(width=TINY, unit="authors")
    # Skips: P4, P3, P2 into the first three blocks, the input image into the last.
    for block, skip_channels in zip((1, 2, 3), (32, 16, 16)):  # P4, P3, P2 at width 0.125
        concat = model.get_layer(f"unet_block{block}_concat")
        assert concat.input[1].shape[-1] == skip_channels
    assert "unet_block4_concat" not in [layer.name for layer in model.layers]
    assert model.get_layer("unet_block5_concat").input[1] is model.input
    assert isinstance(model.get_layer("unet_dropout"), keras.layers.SpatialDropout2D)
    assert model.get_layer("masks").activation.__name__ == "sigmoid"


def test_decoder_width_follows_the_backbone():
    model = FPN(width=0.25)
    assert model.get_layer("fpn_p2_conv").filters == 16
    assert model.get_layer("fpn_concat").output.shape[-1] == 64


def test_freezing_switches_dropout_off():
    model = FPN(width=TINY)
    x = _images()
    calibrate_batchnorm(model, x)
    inference = model(x, training=False).numpy()
    assert not np.allclose(model(x, training=True).numpy(), inference, atol=1e-4)
    model.trainable = False
    np.testing.assert_allclose(model(x, training=True).numpy(), inference, atol=1e-5)


def test_bad_arguments():
    backbone = ResNet34Backbone(width=TINY)
    with pytest.raises(CellnetError, match="decoder 'linknet'"):
        CellSegmenter(backbone, decoder="linknet")
    with pytest.raises(CellnetError, match="dropout"):
        CellSegmenter(backbone, dropout=1.0)


def test_builds_under_mixed_precision_with_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        for build in (FPN, Unet):
            model = build(width=TINY)
            assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
            masks = model(_images(n=1), training=False)
            assert masks.dtype == "float32" and np.isfinite(masks.numpy()).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_file_reloads_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(1)
    x = _images(n=2, seed=3)
    models = {
        "fpn": FPN(width=TINY),
        "unet_authors": CellSegmenter(
            ResNet34Backbone(unit="authors", width=TINY), decoder="unet", dropout=0.2
        ),
    }
    models["fpn"].backbone.trainable = False  # the frozen encoder must survive the round trip
    expected = {}
    for name, model in models.items():
        calibrate_batchnorm(model, x)
        model.compile(optimizer="adam", loss=SegmentationLoss(), metrics=[ClassJaccard(2)])
        expected[name] = (model(x, training=False).numpy(), len(model.trainable_weights))
        model.save(tmp_path / f"{name}.keras")
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "x.npy")]
        + [str(tmp_path / f"{name}.keras") for name in models],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        check=True,
        capture_output=True,
    )
    for name, (predictions, trainable) in expected.items():
        assert 0.01 < predictions.std()  # not saturated, so the comparison means something
        reloaded = np.load(tmp_path / f"{name}.keras.npy")
        np.testing.assert_allclose(reloaded, predictions, rtol=1e-5, atol=1e-5)
        assert int(np.load(tmp_path / f"{name}.keras.trainable.npy")) == trainable
    assert expected["fpn"][1] < len(FPN(width=TINY).trainable_weights)


def test_files_without_stain_norm_rebuild_the_plain_graph():
    model = FPN(width=TINY)
    config = model.get_config()
    assert config["stain_norm"] is None
    del config["stain_norm"]  # a file saved before stain normalisation existed
    rebuilt = CellSegmenter.from_config(config)
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in model.layers]
    assert "stain_norm" not in [layer.name for layer in rebuilt.layers]
    none = CellSegmenter(ResNet34Backbone(width=TINY), stain_norm={"method": "none", "params": {}})
    assert none.get_config()["stain_norm"] is None
    assert [layer.name for layer in none.layers] == [layer.name for layer in model.layers]


def test_stain_norm_feeds_encoder_and_unet_skip_and_keeps_freezing(tmp_path):
    model = CellSegmenter(ResNet34Backbone(width=TINY), decoder="unet", stain_norm=REINHARD)
    stain = model.get_layer("stain_norm")
    assert stain.input is model.input
    assert model.get_layer("unet_block5_concat").input[1] is stain.output
    assert model.get_config()["stain_norm"] == REINHARD
    trainable = len(model.trainable_weights)
    model.backbone.trainable = False
    assert len(model.trainable_weights) < trainable
    x = _images(n=1)
    frozen = len(model.trainable_weights)
    model.save(tmp_path / "stain.keras")
    reloaded = keras.saving.load_model(tmp_path / "stain.keras", compile=False)
    assert len(reloaded.trainable_weights) == frozen
    np.testing.assert_allclose(reloaded(x, training=False).numpy(), model(x, training=False).numpy(),
                               atol=1e-6)
    # a cascade's or a direct model's encoder still initialises from this file
    backbone = ResNet34Backbone(width=TINY)
    load_backbone_weights(backbone, tmp_path / "stain.keras")
    for ours, theirs in zip(backbone.get_weights(), model.backbone.get_weights()):
        np.testing.assert_array_equal(ours, theirs)

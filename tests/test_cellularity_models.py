"""Direct cellularity models, bin decoding and the SR cascade."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.models import (
    FPN,
    NUM_BINS,
    DirectCellularity,
    ResNet34Backbone,
    SRCascade,
    decode_bins,
    decode_bins_np,
)
from cellnet.models.cellularity import CaffePreprocessing
from conftest import calibrate_batchnorm

TINY = 0.125
REPO = Path(__file__).resolve().parents[1]
RELOAD_SCRIPT = """
import sys
import numpy as np
import keras
import cellnet.models  # registers the cellnet classes
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    model = keras.saving.load_model(path)
    np.save(path + ".npy", model(x, training=False).numpy())
    np.save(path + ".trainable.npy", len(model.trainable_weights))
"""


def _images(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


# --- decode_bins ---------------------------------------------------------------------------


def _decoded(probs) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in decode_bins(tf.constant(probs, tf.float32)).items()}


def test_decode_one_hot():
    probs = np.zeros((1, NUM_BINS), "float32")
    probs[0, 37] = 1.0
    out = _decoded(probs)
    assert out["cellularity"].shape == (1,)
    got = [out["cellularity"][0], out["low"][0], out["high"][0]]
    np.testing.assert_allclose(got, [0.37] * 3, atol=1e-6)


def test_decode_uniform():
    out = _decoded(np.full((2, NUM_BINS), 1 / NUM_BINS, "float32"))
    np.testing.assert_allclose(out["cellularity"], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(out["low"], [0.1, 0.1], atol=0.011)
    np.testing.assert_allclose(out["high"], [0.9, 0.9], atol=0.011)


def test_decode_bimodal():
    probs = np.zeros((1, NUM_BINS), "float32")
    probs[0, 20] = 0.7
    probs[0, 80] = 0.3
    out = _decoded(probs)
    np.testing.assert_allclose(out["cellularity"], [0.7 * 0.2 + 0.3 * 0.8], atol=1e-6)
    np.testing.assert_allclose(out["low"], [0.2], atol=1e-6)
    np.testing.assert_allclose(out["high"], [0.8], atol=1e-6)


def test_decode_matches_numpy_twin_on_random_distributions():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(NUM_BINS, 0.3), size=64).astype("float32")
    tf_out, np_out = _decoded(probs), decode_bins_np(probs)
    for key in ("cellularity", "low", "high"):
        np.testing.assert_allclose(tf_out[key], np_out[key], atol=1e-5)
    assert (np_out["low"] <= np_out["cellularity"] + 1e-6).all()
    assert (np_out["cellularity"] <= np_out["high"] + 1e-6).all()


def test_decode_runs_inside_a_tf_function():
    decode = tf.function(decode_bins, input_signature=[tf.TensorSpec([None, NUM_BINS], tf.float32)])
    probs = np.full((3, NUM_BINS), 1 / NUM_BINS, "float32")
    np.testing.assert_allclose(decode(probs)["cellularity"].numpy(), [0.5] * 3, atol=1e-6)


# --- DirectCellularity ---------------------------------------------------------------------


@pytest.mark.parametrize("arch, head", [("resnet50", "regression"), ("xception", "classification")])
def test_keras_applications_archs_build_randomly_initialised(arch, head):
    model = DirectCellularity(arch, head, input_shape=(72, 72, 3))
    assert model.output.shape[-1] == (1 if head == "regression" else NUM_BINS)
    assert model.get_layer(arch).count_params() > 1_000_000
    assert ("caffe_preprocessing" in [layer.name for layer in model.layers]) == (arch == "resnet50")


def test_caffe_preprocessing_maps_minus_one_one_to_bgr_minus_means():
    x = _images(n=1, size=4)
    expected = (x + 1) * 127.5
    expected = expected[..., ::-1] - np.array([103.939, 116.779, 123.68])
    np.testing.assert_allclose(CaffePreprocessing()(x).numpy(), expected, rtol=1e-5, atol=1e-3)


def test_weights_are_local_files_only(tmp_path):
    with pytest.raises(CellnetError, match="imagenet.*local"):
        DirectCellularity("xception", weights="imagenet")
    with pytest.raises(CellnetError, match=r"nope\.h5: no such file"):
        DirectCellularity("resnet50", weights=str(tmp_path / "nope.h5"), input_shape=(64, 64, 3))
    with pytest.raises(CellnetError, match=r"nope\.weights\.h5: no such file"):
        DirectCellularity("resnet34", weights=str(tmp_path / "nope.weights.h5"), width=TINY)
    with pytest.raises(CellnetError, match="arch 'vgg16'"):
        DirectCellularity("vgg16")
    with pytest.raises(CellnetError, match="head 'ordinal'"):
        DirectCellularity(head="ordinal")


def test_resnet34_encoder_weights_from_a_local_file(tmp_path):
    source = ResNet34Backbone(width=TINY)
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    target = DirectCellularity(
        "resnet34", "classification", input_shape=(64, 64, 3), width=TINY, weights=str(path)
    )
    for ours, theirs in zip(target.encoder.weights, source.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


# --- SRCascade -----------------------------------------------------------------------------


def test_cascade_phases_freeze_and_unfreeze_the_segmenter():
    segmenter = FPN(width=TINY)
    x = _images()
    calibrate_batchnorm(segmenter, x)
    segmenter_weights = {id(v) for v in segmenter.trainable_weights}
    cascade = SRCascade(segmenter, width=TINY)
    assert cascade.phase == "head" and cascade.regressor.input.shape[-1] == 4
    calibrate_batchnorm(cascade, x)
    out = cascade(x, training=False).numpy()
    assert out.shape == (2, 1) and np.isfinite(out).all()  # linear head: raw, not in [0, 1]
    # Head phase: only the regressor and the output layer train ...
    head = {id(v) for v in cascade.trainable_weights}
    assert head and not head & segmenter_weights
    assert head == {id(v) for v in cascade.regressor.trainable_weights} | {
        id(v) for v in cascade.get_layer("cellularity").trainable_weights
    }
    # ... and the frozen segmenter gives the same maps in training as at inference.
    in_training = cascade(x, training=True).numpy()
    np.testing.assert_allclose(in_training, cascade(x, training=False).numpy(), atol=1e-5)
    cascade.set_phase("finetune")
    finetune = {id(v) for v in cascade.trainable_weights}
    assert len(head) < len(finetune) and segmenter_weights <= finetune
    cascade.set_phase("head")
    assert {id(v) for v in cascade.trainable_weights} == head
    with pytest.raises(CellnetError, match="phase 'all'"):
        cascade.set_phase("all")
    # segmenter_maps: the segmenter's output inside the cascade's graph.
    score, maps = keras.Model(cascade.input, [cascade.output, cascade.segmenter_maps])(x, training=False)
    np.testing.assert_allclose(maps.numpy(), segmenter(x, training=False).numpy(), atol=1e-5)
    np.testing.assert_allclose(score.numpy(), out, atol=1e-5)


def test_models_build_under_mixed_precision_with_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        x = _images(n=1)
        direct = DirectCellularity("resnet34", "classification", input_shape=(64, 64, 3), width=TINY)
        cascade = SRCascade(FPN(width=TINY), width=TINY, drop_background=True)
        for model in (direct, cascade):
            out = model(x, training=False)
            assert out.dtype == "float32" and np.isfinite(out.numpy()).all()
        assert cascade.regressor.get_layer("stem_conv").compute_dtype == "bfloat16"
        # Without background the regressor sees normal, lymphocyte and malignant only.
        assert cascade.get_layer("drop_background").output.shape[-1] == 3
        assert cascade.regressor.input.shape[-1] == 3
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_heads_and_keras_files_reloading_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(2)
    x = _images(n=2, seed=9)
    segmenter = FPN(width=TINY)
    calibrate_batchnorm(segmenter, x)
    models = {
        "regression": DirectCellularity("resnet34", "regression", input_shape=(64, 64, 3), width=TINY),
        "classification": DirectCellularity(
            "resnet34", "classification", input_shape=(64, 64, 3), width=TINY
        ),
        "cascade": SRCascade(segmenter, width=TINY, drop_background=True),
    }
    expected = {}
    for name, model in models.items():
        calibrate_batchnorm(model, x)
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
    for name, units in (("regression", 1), ("classification", NUM_BINS), ("cascade", 1)):
        predictions = expected[name][0]
        assert predictions.shape == (2, units) and predictions.dtype == np.float32
    probs = expected["classification"][0]
    assert ((0 <= probs) & (probs <= 1)).all()
    np.testing.assert_allclose(expected["classification"][0].sum(axis=1), 1.0, atol=1e-5)
    assert models["regression"].output_names == ["cellularity"]
    assert models["classification"].output_names == ["class_probs"]
    for name, (predictions, trainable) in expected.items():
        # Predictions must differ between images, or equality below would prove little.
        assert np.abs(predictions[0] - predictions[1]).max() > 1e-4, name
        reloaded = np.load(tmp_path / f"{name}.keras.npy")
        np.testing.assert_allclose(reloaded, predictions, rtol=1e-5, atol=1e-5)
        assert int(np.load(tmp_path / f"{name}.keras.trainable.npy")) == trainable



# --- regression output activation ----------------------------------------------------------


def _activation(model: keras.Model, layer: str = "cellularity") -> str:
    return model.get_layer(layer).activation.__name__


def test_regression_heads_are_linear_by_default_and_sigmoid_on_request():
    segmenter = FPN(width=TINY)
    direct = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=TINY)
    cascade = SRCascade(segmenter, width=TINY)
    for model in (direct, cascade):
        head = model.get_layer("cellularity")
        assert isinstance(head, keras.layers.Dense) and head.units == 1
        assert _activation(model) == "linear" and head.dtype_policy.compute_dtype == "float32"
        assert model.get_config()["regression_activation"] == "linear"
    sigmoid = {
        "direct": DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=TINY,
                                    regression_activation="sigmoid"),
        "cascade": SRCascade(segmenter, width=TINY, regression_activation="sigmoid"),
    }
    for model in sigmoid.values():
        assert _activation(model) == "sigmoid"
        assert model.get_config()["regression_activation"] == "sigmoid"
    # The classification head keeps its softmax whatever the regression activation.
    classification = DirectCellularity("resnet34", "classification", input_shape=(32, 32, 3),
                                       width=TINY, regression_activation="sigmoid")
    assert _activation(classification, "class_probs") == "softmax"
    with pytest.raises(CellnetError, match="regression_activation 'relu'.*linear, sigmoid"):
        DirectCellularity(width=TINY, input_shape=(32, 32, 3), regression_activation="relu")
    with pytest.raises(CellnetError, match="regression_activation 'tanh'"):
        SRCascade(segmenter, width=TINY, regression_activation="tanh")


def _drop_config_key(path: Path, key: str) -> None:
    """Rewrite a .keras file as an older cellnet wrote it: the top-level model config without ``key``."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    del config["config"][key]
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_models_saved_before_the_regression_activation_reload_with_their_sigmoid(tmp_path):
    keras.utils.set_random_seed(4)
    x = _images(n=2, size=64, seed=11)
    segmenter = FPN(width=TINY)
    calibrate_batchnorm(segmenter, x)
    models = {
        "direct": DirectCellularity("resnet34", "regression", input_shape=(64, 64, 3), width=TINY,
                                    regression_activation="sigmoid"),
        "cascade": SRCascade(segmenter, width=TINY, regression_activation="sigmoid"),
    }
    for name, model in models.items():
        calibrate_batchnorm(model, x)
        expected = model(x, training=False).numpy()
        path = tmp_path / f"{name}.keras"
        model.save(path)
        _drop_config_key(path, "regression_activation")  # as written by cellnet 0.2
        with zipfile.ZipFile(path) as archive:
            assert "regression_activation" not in json.loads(archive.read("config.json"))["config"]
        old = keras.saving.load_model(path)
        assert type(old) is type(model) and old.regression_activation == "sigmoid"
        assert _activation(old) == "sigmoid"
        got = old(x, training=False).numpy()
        assert np.abs(got[0] - got[1]).max() > 1e-4, name  # distinct outputs: equality means something
        np.testing.assert_array_equal(got, expected)


def test_direct_resnet34_from_a_torchvision_file_normalises_its_input_like_imagenet(tmp_path):
    from test_pretrained import _state_dict, _write_safetensors

    state = _state_dict(seed=5)
    weights = _write_safetensors(state, tmp_path / "model.safetensors")
    model = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), unit="torchvision",
                              input_norm="imagenet", weights=weights)
    encoder = model.get_layer("encoder")
    assert encoder.get_layer("imagenet_norm") is not None
    np.testing.assert_array_equal(encoder.get_layer("stem_conv").get_weights()[0],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    path = tmp_path / "direct.keras"
    model.save(path)
    again = keras.saving.load_model(path, compile=False)
    assert again.get_config()["input_norm"] == "imagenet"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)

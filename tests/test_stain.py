"""Stain normalisation layers against an independent float64 NumPy implementation written here.

Images: centre crops of real BRCA-M2C patches when ``../shared/real`` is there, otherwise tiles
rendered by ``cellnet.data.synth`` with three different slide stains. Tolerances of the float32
layers against the float64 reference, in [0, 255] levels: max |diff| < 0.05 (Reinhard) and
< 0.5 (Macenko); measured on CPU, 0.0008 and 0.0006 (real), 0.0015 and 0.0003 (synthetic).
Per-image stain vectors: cosine > 0.9999.
"""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.models import CellSegmenter, MacenkoNormalization, ReinhardNormalization, ResNet34Backbone
from cellnet.models import SRCascade, fit_stain, stain_layer
from cellnet.models.stain import _macenko_stains, _tissue_mask, _tf_optical_density
from conftest import REAL, calibrate_batchnorm

BRCA = REAL / "brca-m2c" / "images"
CROP = 128
TINY = 0.125
BETA, ALPHA, MIN_PIXELS = 0.15, 1.0, 64


# ----------------------------------------------------------------------------- images

def _centre_crop(image: np.ndarray, size: int = CROP) -> np.ndarray:
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def _synthetic_tiles() -> list[np.ndarray]:
    from cellnet.data.synth import render_tissue, sample_stain

    tiles = []
    for seed in (3, 11, 12):
        rng = np.random.default_rng(seed)
        tiles.append(render_tissue(rng, CROP, CROP, burden=0.5, stain=sample_stain(rng)).image)
    return tiles


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """Three uint8 RGB tiles, CROP x CROP: real patches when available, synthetic otherwise."""
    files = sorted(BRCA.glob("*.png"))[::30][:3] if BRCA.is_dir() else []
    if len(files) < 3:
        return _synthetic_tiles()
    from cellnet.data.imageio import read_rgb

    return [_centre_crop(read_rgb(path)) for path in files]


def _model_range(images) -> np.ndarray:
    return np.stack(images).astype("float32") / 127.5 - 1.0


def _levels(x) -> np.ndarray:
    """[-1, 1] model input -> [0, 255] float64."""
    return (np.asarray(x, np.float64) + 1.0) * 127.5


# ----------------------------------------------------------------------------- NumPy reference

LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
s3, s6, s2 = np.sqrt(3.0), np.sqrt(6.0), np.sqrt(2.0)
LAB = np.array([[1 / s3, 1 / s3, 1 / s3], [1 / s6, 1 / s6, -2 / s6], [1 / s2, -1 / s2, 0.0]])
LAB_INV = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -2.0, 0.0]]) @ np.diag([s3 / 3, s6 / 6, s2 / 2])


def ref_od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb + 1.0) / 256.0)


def ref_tissue(rgb: np.ndarray) -> np.ndarray:
    return (ref_od(rgb) >= BETA).all(axis=1)


def ref_lab(rgb: np.ndarray) -> np.ndarray:
    return np.log10(((rgb + 1.0) / 256.0) @ LMS.T) @ LAB.T


def ref_rgb_from_lab(lab: np.ndarray) -> np.ndarray:
    lms = 10.0 ** (lab @ LAB_INV.T)
    return np.linalg.solve(LMS, lms.T).T * 256.0 - 1.0


def ref_fit_reinhard(images) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    lab = ref_lab(rgb[ref_tissue(rgb)])
    return lab.mean(0), lab.std(0)


def ref_reinhard(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per image: l-alpha-beta statistics of its tissue pixels moved to (mean, std)."""
    out = []
    for image in images:
        rgb = image.reshape(-1, 3).astype(np.float64)
        tissue = ref_tissue(rgb)
        if tissue.sum() < MIN_PIXELS:
            out.append(image.astype(np.float64))
            continue
        lab = ref_lab(rgb)
        own_mean, own_std = lab[tissue].mean(0), lab[tissue].std(0)
        lab = (lab - own_mean) / own_std * std + mean
        out.append(np.clip(ref_rgb_from_lab(lab), 0, 255).reshape(image.shape))
    return np.stack(out)


def ref_stains(od: np.ndarray) -> np.ndarray:
    """Macenko's two vectors, H (larger red OD) first, via an SVD of the centred tissue OD."""
    _, _, vt = np.linalg.svd(od - od.mean(0), full_matrices=False)
    first, second = vt[0] * np.sign(vt[0].sum()), vt[1]
    plane = od @ np.stack([first, second]).T
    phi = np.arctan2(plane[:, 1], plane[:, 0])
    vectors = [np.cos(a) * first + np.sin(a) * second for a in np.percentile(phi, [ALPHA, 100 - ALPHA])]
    return np.array(sorted(vectors, key=lambda v: -v[0]))


def ref_fit_macenko(images) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    od = ref_od(rgb[ref_tissue(rgb)])
    stains = ref_stains(od)
    concentrations = od @ np.linalg.pinv(stains)
    return stains, np.percentile(concentrations, 99, axis=0)


def ref_macenko(images: np.ndarray, stains_ref: np.ndarray, max_ref: np.ndarray) -> np.ndarray:
    """Per image: unmix with its own vectors, rescale to the reference, recolour."""
    out = []
    for image in images:
        rgb = image.reshape(-1, 3).astype(np.float64)
        tissue = ref_tissue(rgb)
        if tissue.sum() < MIN_PIXELS:
            out.append(image.astype(np.float64))
            continue
        od = ref_od(rgb)
        stains = ref_stains(od[tissue])
        concentrations = od @ np.linalg.pinv(stains)
        concentrations *= max_ref / np.percentile(concentrations[tissue], 99, axis=0)
        out.append(np.clip(256.0 * np.exp(-concentrations @ stains_ref) - 1.0, 0, 255).reshape(image.shape))
    return np.stack(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ----------------------------------------------------------------------------- fitting

def test_fit_reinhard_matches_reference(tiles):
    params = fit_stain("reinhard", tiles[:2])
    mean, std = ref_fit_reinhard(tiles[:2])
    np.testing.assert_allclose(params["target_mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(params["target_std"], std, rtol=1e-9)
    assert json.loads(json.dumps(params)) == params  # plain lists: stain.json and the config


def test_fit_macenko_matches_reference(tiles):
    params = fit_stain("macenko", tiles[:2])
    stains, maxima = ref_fit_macenko(tiles[:2])
    assert np.shape(params["stain_matrix"]) == (2, 3)
    assert _cosines(params["stain_matrix"], stains).min() > 0.999999
    np.testing.assert_allclose(params["max_concentrations"], maxima, rtol=1e-6)
    h, e = np.asarray(params["stain_matrix"])
    assert h[0] > e[0] and e[1] > e[0]  # hematoxylin absorbs red more, eosin green most
    assert json.loads(json.dumps(params)) == params


def test_fit_on_many_pixels_subsamples_them_evenly(tiles):
    from cellnet.models.stain import MAX_FIT_PIXELS

    big = np.tile(tiles[0], (17, 17, 1))  # 2176 x 2176: more than MAX_FIT_PIXELS
    assert big.shape[0] * big.shape[1] > MAX_FIT_PIXELS
    for method in ("reinhard", "macenko"):
        for ours, theirs in zip(fit_stain(method, [big]).values(), fit_stain(method, tiles[:1]).values()):
            np.testing.assert_allclose(ours, theirs, rtol=0.02, atol=1e-3)


def test_fit_refuses_images_without_tissue():
    white = np.full((64, 64, 3), 255, np.uint8)
    for method in ("reinhard", "macenko"):
        with pytest.raises(CellnetError, match="tissue pixels"):
            fit_stain(method, [white])
    with pytest.raises(CellnetError, match="'vahadane'"):
        fit_stain("vahadane", [white])
    assert fit_stain("none", [white]) == {}


# ----------------------------------------------------------------------------- layers vs reference

def test_reinhard_layer_matches_reference(tiles):
    params = fit_stain("reinhard", tiles[:1])
    layer = stain_layer("reinhard", params)
    ours = _levels(layer(_model_range(tiles)))
    reference = ref_reinhard(np.stack(tiles), *ref_fit_reinhard(tiles[:1]))
    assert np.abs(ours - reference).max() < 0.05
    assert np.abs(ours - np.stack(tiles)).max() > 10  # the other tiles did change


def test_macenko_layer_matches_reference(tiles):
    params = fit_stain("macenko", tiles[:1])
    layer = stain_layer("macenko", params)
    ours = _levels(layer(_model_range(tiles)))
    reference = ref_macenko(np.stack(tiles), *ref_fit_macenko(tiles[:1]))
    assert np.abs(ours - reference).max() < 0.5
    assert np.abs(ours - np.stack(tiles)).max() > 10


def test_macenko_per_image_stain_vectors_match_reference(tiles):
    pixels = tf.reshape(tf.constant(np.stack(tiles), tf.float32), [len(tiles), -1, 3])
    od = _tf_optical_density(pixels)
    mask, count = _tissue_mask(od)
    ours = _macenko_stains(od, mask, count).numpy()
    for image, vectors in zip(tiles, ours):
        rgb = image.reshape(-1, 3).astype(np.float64)
        assert _cosines(vectors, ref_stains(ref_od(rgb[ref_tissue(rgb)]))).min() > 0.9999


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_reference_normalised_with_its_own_fit_is_nearly_unchanged(tiles, method):
    layer = stain_layer(method, fit_stain(method, tiles[:1]))
    x = _model_range(tiles[:1])
    out = _levels(layer(x))[0]
    diff = np.abs(out - tiles[0])
    if method == "reinhard":
        assert diff.max() < 0.01  # the same statistics: an identity up to float32
        return
    # Macenko keeps only the part of each pixel's OD in the H-E plane: the reference comes back
    # as its own projection on that plane (measured: mean 1.6, 99th percentile 8 levels).
    assert diff.mean() < 2.5 and np.percentile(diff, 99) < 12.0
    rgb = tiles[0].reshape(-1, 3).astype(np.float64)
    stains, _ = ref_fit_macenko(tiles[:1])
    projected = 256.0 * np.exp(-(ref_od(rgb) @ np.linalg.pinv(stains)) @ stains) - 1.0
    np.testing.assert_allclose(out.reshape(-1, 3), np.clip(projected, 0, 255), atol=0.05)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_images_are_normalised_independently_and_blank_ones_pass_through(tiles, method):
    layer = stain_layer(method, fit_stain(method, tiles[:1]))
    tissue = _model_range(tiles[1:2])
    white = np.ones_like(tissue)
    black = -np.ones_like(tissue)
    flat = np.full_like(tissue, 0.2)
    batch = layer(np.concatenate([white, tissue, black, flat])).numpy()
    assert np.isfinite(batch).all()
    np.testing.assert_array_equal(batch[0], white[0])
    np.testing.assert_array_equal(batch[2], black[0])
    np.testing.assert_array_equal(batch[3], flat[0])
    np.testing.assert_allclose(batch[1], layer(tissue).numpy()[0], atol=1e-5)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_traces_with_unknown_size_and_compiles_with_xla(tiles, method):
    layer = stain_layer(method, fit_stain(method, tiles[:1]))
    x = _model_range(tiles)[:, :96, :64]
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    expected = layer(x).numpy()
    graph = tf.function(layer, input_signature=[spec])
    np.testing.assert_allclose(graph(x).numpy(), expected, atol=1e-5)
    xla = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), expected, atol=2e-3)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_mixed_precision_output_is_float32_and_finite(tiles, method):
    params = fit_stain(method, tiles[:1])
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = stain_layer(method, params)
        assert layer.compute_dtype == "float32"
        x = _model_range(tiles)
        out = layer(tf.cast(x, tf.float16))
        assert out.dtype == tf.float32 and np.isfinite(out.numpy()).all()
        segmenter = CellSegmenter(ResNet34Backbone(width=TINY), stain_norm={"method": method, "params": params})
        assert segmenter.get_layer("stain_norm").compute_dtype == "float32"
        masks = segmenter(x[:, :64, :64], training=False)
        assert masks.dtype == tf.float32 and np.isfinite(masks.numpy()).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------- saving and config

@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_layer_round_trips_through_a_keras_file(tiles, method, tmp_path):
    layer = stain_layer(method, fit_stain(method, tiles[:1]))
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, layer(inputs))
    x = _model_range(tiles)
    model.save(tmp_path / "stain.keras")
    reloaded = keras.saving.load_model(tmp_path / "stain.keras")
    np.testing.assert_array_equal(reloaded(x).numpy(), model(x).numpy())
    again = type(layer).from_config(layer.get_config())
    assert again.params == layer.params and again.name == "stain_norm"


def test_bad_parameters_are_refused():
    with pytest.raises(CellnetError, match="'histogram'"):
        stain_layer("histogram", {})
    with pytest.raises(CellnetError, match="3 positive target stds"):
        ReinhardNormalization([0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    with pytest.raises(CellnetError, match="2x3 stain_matrix"):
        MacenkoNormalization([[0.6, 0.7, 0.3]], [1.0, 1.0])
    with pytest.raises(CellnetError, match="bad parameters"):
        stain_layer("macenko", {"target_mean": [0, 0, 0]})
    with pytest.raises(CellnetError, match="stain_norm"):
        CellSegmenter(ResNet34Backbone(width=TINY), stain_norm={"params": {}})
    assert stain_layer("none", {}) is None


@pytest.fixture(scope="module")
def stain_segmenter(tiles):
    keras.utils.set_random_seed(2)
    stain_norm = {"method": "macenko", "params": fit_stain("macenko", tiles[:1])}
    segmenter = CellSegmenter(ResNet34Backbone(width=TINY), stain_norm=stain_norm)
    calibrate_batchnorm(segmenter, _model_range(tiles)[:, :64, :64])
    return segmenter


def test_segmenter_normalises_before_the_encoder(stain_segmenter, tiles):
    layer = stain_segmenter.get_layer("stain_norm")
    assert stain_segmenter.layers[1] is layer and layer.input is stain_segmenter.input
    config = stain_segmenter.get_config()
    assert config["stain_norm"]["method"] == "macenko"
    assert json.loads(json.dumps(config["stain_norm"])) == config["stain_norm"]
    # the same weights without the layer see other input and give other masks
    x = _model_range(tiles)[:, :64, :64]
    plain = CellSegmenter(ResNet34Backbone(width=TINY))
    plain.set_weights(stain_segmenter.get_weights())
    assert np.abs(plain(x, training=False).numpy() - stain_segmenter(x, training=False).numpy()).max() > 1e-3
    np.testing.assert_allclose(plain(layer(x), training=False).numpy(),
                               stain_segmenter(x, training=False).numpy(), atol=1e-5)


def test_segmenter_with_stain_round_trips(stain_segmenter, tiles, tmp_path):
    x = _model_range(tiles)[:, :64, :64]
    expected = stain_segmenter(x, training=False).numpy()
    assert expected.std() > 0.01
    stain_segmenter.save(tmp_path / "seg.keras")
    reloaded = keras.saving.load_model(tmp_path / "seg.keras", compile=False)
    assert reloaded.get_config()["stain_norm"] == stain_segmenter.get_config()["stain_norm"]
    np.testing.assert_allclose(reloaded(x, training=False).numpy(), expected, atol=1e-6)


def test_cascade_on_a_stain_segmenter_calls_it_once(stain_segmenter, tiles):
    cascade = SRCascade(stain_segmenter, width=TINY)
    x = _model_range(tiles)[:, :64, :64]
    heads = keras.Model(cascade.input, [cascade.output, cascade.segmenter_maps])
    score, maps = heads(x, training=False)
    assert np.isfinite(score.numpy()).all()
    np.testing.assert_allclose(maps.numpy(), stain_segmenter(x, training=False).numpy(), atol=1e-6)


def test_exported_savedmodel_normalises_as_the_keras_model(stain_segmenter, tiles, tmp_path):
    from cellnet.preprocess import full_res_to_model_input
    from cellnet.serving.export import IMAGES_SIGNATURE, export_model

    images = np.stack([_centre_crop(t, 128) for t in tiles])  # full resolution: 64x64 working
    path = export_model(stain_segmenter, "segmentation", tmp_path / "1", {})
    served = tf.saved_model.load(str(path)).signatures[IMAGES_SIGNATURE](images=tf.constant(images))["masks"]
    expected = stain_segmenter(full_res_to_model_input(images), training=False).numpy()
    assert served.shape == expected.shape == (3, 64, 64, 4)
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-4)

"""Test-time augmentation and ensembles in the graph (``cellnet.models.tta``, ``--tta``).

Tolerance: 1e-5 absolute on float32 outputs (the variants' sums are reassociated, nothing more).
Models are tiny (width 0.125) with calibrated BatchNorm so that outputs spread over (0, 1) and a
wrong inverse transform cannot match by chance.
"""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.models import CellSegmenter, DirectCellularity, ResNet34Backbone, decode_bins_np
from cellnet.serving.export import serving_fn
from cellnet.models.tta import D4, GROUPS, same_shape_groups, symmetries
from conftest import TINY_BLOCKS, calibrate, graph_preprocess, spread_head

TOLERANCE = 1e-5
WIDTH = 0.125


def numpy_d4(image: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of an H x W image, from NumPy's own flips and rotations."""
    rotations = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return rotations + [np.flip(r, axis=1) for r in rotations]


def as_key(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes() + str(a.shape).encode()


def test_d4_is_the_eight_symmetries_of_the_square_and_inverse_undoes_each():
    image = np.arange(3 * 5 * 2, dtype=np.float32).reshape(1, 3, 5, 2)
    ours = {as_key(v.forward(tf.constant(image)).numpy()[0]) for v in D4}
    assert ours == {as_key(a) for a in numpy_d4(image[0])}
    assert len(ours) == 8
    for variant in D4:
        np.testing.assert_array_equal(variant.inverse(variant.forward(tf.constant(image))).numpy(), image)
    assert [len(GROUPS[m]) for m in ("none", "flips", "d4")] == [1, 2, 8]
    assert [v.name for v in symmetries("flips")] == ["identity", "flip_lr"]
    assert [len(g) for g in same_shape_groups(D4)] == [4, 4]


def test_unknown_mode_is_refused_in_one_line():
    with pytest.raises(CellnetError, match=r"--tta 'd8': expected one of none, flips, d4"):
        symmetries("d8")


@pytest.fixture(scope="module")
def tiny_models():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    segmenter = CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="fpn", name="fpn_segmenter")
    calibrate(segmenter, rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8))
    regression = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    classification = DirectCellularity("resnet34", "classification", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    small = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    calibrate(regression, small)
    calibrate(classification, small)
    spread_head(regression, small)
    return {"segmentation": segmenter, "regression": regression, "classification": classification}


def test_d4_masks_are_exactly_equivariant_on_a_non_square_image(tiny_models):
    image = np.random.default_rng(1).integers(0, 256, (1, 96, 160, 3), dtype=np.uint8)  # 48x80 working
    serve = serving_fn(tiny_models["segmentation"], "segmentation", tta="d4")
    masks = serve(tf.constant(image))["masks"].numpy()[0]
    plain = serving_fn(tiny_models["segmentation"], "segmentation")(tf.constant(image))["masks"].numpy()[0]
    assert np.abs(masks - plain).max() > 1e-3  # without TTA the model is not equivariant: a real test
    for transformed_image, transformed_masks in zip(numpy_d4(image[0]), numpy_d4(masks)):
        got = serve(tf.constant(np.ascontiguousarray(transformed_image)[None]))["masks"].numpy()[0]
        np.testing.assert_allclose(got, transformed_masks, atol=TOLERANCE, rtol=0)


def test_d4_cellularity_is_invariant_and_its_spread_is_served(tiny_models):
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for kind in ("regression", "classification"):
        serve = serving_fn(tiny_models[kind], kind, tta="d4")
        reference = serve(tf.constant(images))
        assert set(reference) >= {"cellularity", "cellularity_std"}
        for variant in numpy_d4(np.moveaxis(images, 0, -1)):  # every image of the batch at once
            batch = np.ascontiguousarray(np.moveaxis(variant, -1, 0))
            got = serve(tf.constant(batch))
            for name in ("cellularity", "cellularity_std"):
                np.testing.assert_allclose(got[name].numpy(), reference[name].numpy(), atol=TOLERANCE,
                                           rtol=0, err_msg=f"{kind} {name}")


def test_tta_mean_and_spread_are_those_of_the_variants(tiny_models):
    model = tiny_models["regression"]
    images = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    scores = np.stack([np.clip(np.asarray(model(graph_preprocess(np.ascontiguousarray(
        np.moveaxis(v, -1, 0)))))[:, 0], 0, 1) for v in numpy_d4(np.moveaxis(images, 0, -1))])
    assert scores.std(axis=0).min() > 1e-4  # the variants disagree, so the spread is measured
    served = serving_fn(model, "regression", tta="d4")(tf.constant(images))
    np.testing.assert_allclose(served["cellularity"].numpy(), scores.mean(axis=0), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served["cellularity_std"].numpy(), scores.std(axis=0), atol=TOLERANCE, rtol=0)


def test_classification_tta_averages_the_distribution_and_reads_the_interval_from_it(tiny_models):
    model = tiny_models["classification"]
    images = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    probs = (np.asarray(model(graph_preprocess(images))) + np.asarray(model(graph_preprocess(flipped)))) / 2
    decoded = decode_bins_np(probs)
    served = serving_fn(model, "classification", tta="flips")(tf.constant(images))
    np.testing.assert_allclose(served["class_probs"].numpy(), probs, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served["cellularity"].numpy(), decoded["cellularity"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served["interval"].numpy(), np.stack([decoded["low"], decoded["high"]], -1),
                               atol=TOLERANCE, rtol=0)


def test_no_tta_serves_what_it_served_before(tiny_models):
    images = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    served = serving_fn(tiny_models["regression"], "regression")(tf.constant(images))
    assert set(served) == {"cellularity"}
    expected = np.clip(np.asarray(tiny_models["regression"](graph_preprocess(images)))[:, 0], 0, 1)
    np.testing.assert_allclose(served["cellularity"].numpy(), expected, atol=TOLERANCE, rtol=0)

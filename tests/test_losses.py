"""SegmentationLoss and soft Jaccard against NumPy transcriptions; ClassJaccard global accumulation."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.training.losses import (
    SMOOTH,
    BinnedCrossentropy,
    CellularityMSE,
    ClassJaccard,
    SegmentationLoss,
    soft_jaccard,
)

EPS = 1e-7


def _numpy_jaccard(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The authors' soft Jaccard, one image and class at a time: (N, C)."""
    out = np.zeros((y.shape[0], y.shape[-1]))
    for n in range(y.shape[0]):
        for c in range(y.shape[-1]):
            yc, pc = y[n, ..., c].astype(np.float64).ravel(), p[n, ..., c].astype(np.float64).ravel()
            intersection = np.sum(yc * pc)
            out[n, c] = (intersection + SMOOTH) / (np.sum(yc) + np.sum(pc) - intersection + SMOOTH)
    return out


def _numpy_loss(y: np.ndarray, p: np.ndarray, alpha: float, weights) -> float:
    """Eqs. 1 and 3 per class with BCE over every pixel of the batch and J per image, averaged."""
    y = y.astype(np.float64)
    p = p.astype(np.float64)
    jaccard = _numpy_jaccard(y, p).mean(axis=0)
    total = 0.0
    for c, v in enumerate(weights):
        yc, pc = y[..., c].ravel(), p[..., c].ravel()
        q = np.clip(pc, EPS, 1 - EPS)
        bce = np.mean(-(yc * np.log(q) + (1 - yc) * np.log(1 - q)))
        total += v * ((1 - alpha) * bce - alpha * jaccard[c])
    return total / sum(weights)


def _batch(seed: int, n: int = 3, size: int = 16, channels: int = 4):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, size, size, channels)) < 0.3).astype("float32")
    p = rng.random((n, size, size, channels)).astype("float32")
    p[0, :4, :4] = 0.0  # y = p = 0 somewhere: the log clipping
    p[1, :2, :2] = 1.0
    return y, p


@pytest.mark.parametrize(
    "alpha, weights", [(0.15, (1, 1, 4, 1)), (0.5, (2, 0, 1, 3)), (0.0, (1, 1, 1, 1))]
)
def test_loss_matches_numpy_transcription(alpha, weights):
    y, p = _batch(seed=int(alpha * 100))
    loss = SegmentationLoss(alpha=alpha, class_weights=weights)(y, p)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), _numpy_loss(y, p, alpha, weights), rtol=1e-5, atol=1e-5)


def test_defaults_are_the_papers():
    loss = SegmentationLoss()
    assert loss.alpha == 0.15 and loss.class_weights == [1.0, 1.0, 4.0, 1.0]
    y, p = _batch(seed=7)
    expected = _numpy_loss(y, p, 0.15, (1, 1, 4, 1))
    np.testing.assert_allclose(float(loss(y, p)), expected, rtol=1e-5, atol=1e-5)


def _per_pixel_eq2(y: np.ndarray, p: np.ndarray) -> float:
    """Eq. 2 as printed: the mean of y p / (y + p - y p), 0 where y = p = 0."""
    denominator = y + p - y * p
    return float(np.mean(np.divide(y * p, denominator, out=np.zeros_like(y), where=denominator > 0)))


def test_soft_jaccard_of_a_mask_with_itself_is_one():
    rng = np.random.default_rng(1)
    y = (rng.random((2, 32, 32, 4)) < 0.2).astype("float32")
    np.testing.assert_allclose(soft_jaccard(y, y).numpy(), 1.0, atol=1e-6)
    empty = np.zeros((1, 8, 8, 4), "float32")
    assert (soft_jaccard(empty, empty).numpy() == 1.0).all()  # the smoothing: 1 / 1


def test_all_ones_scores_the_positive_fraction_not_the_best():
    rng = np.random.default_rng(2)
    y = (rng.random((1, 64, 64, 1)) < 0.02).astype("float32")
    fraction = float(y.mean())
    ones = np.ones_like(y)
    all_ones, perfect = float(soft_jaccard(y, ones)[0, 0]), float(soft_jaccard(y, y)[0, 0])
    assert all_ones == pytest.approx((y.sum() + SMOOTH) / (y.size + SMOOTH), rel=1e-6)
    assert all_ones == pytest.approx(fraction, abs=1e-3)
    assert perfect > 40 * all_ones
    # Eq. 2 as printed prefers all-ones to a good soft prediction; the per-image form does not.
    good = np.where(y > 0, 0.9, 0.1).astype("float32")
    assert _per_pixel_eq2(y, ones) == pytest.approx(fraction)
    assert _per_pixel_eq2(y, good) < _per_pixel_eq2(y, ones)
    assert float(soft_jaccard(y, good)[0, 0]) > 5 * all_ones


def test_soft_jaccard_matches_numpy_per_image_and_class():
    rng = np.random.default_rng(3)
    y = rng.random((3, 12, 10, 4)).astype("float32")  # soft labels too
    p = rng.random((3, 12, 10, 4)).astype("float32")
    got = soft_jaccard(y, p).numpy()
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, _numpy_jaccard(y, p), atol=1e-6, rtol=0)


def test_soft_jaccard_pushes_predictions_down_where_the_label_is_zero():
    y, p = _batch(seed=8)
    p_var = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(soft_jaccard(y, p_var))
    grad = tape.gradient(value, p_var).numpy()
    # dJ/dp_i = -(I + s) / (U + s)^2 on y_i = 0 pixels: the same for every such pixel of an image.
    intersection = np.sum(y * p, axis=(1, 2))
    union = np.sum(y, axis=(1, 2)) + np.sum(p, axis=(1, 2)) - intersection
    expected = np.broadcast_to((-(intersection + SMOOTH) / (union + SMOOTH) ** 2)[:, None, None], y.shape)
    background = y == 0
    assert (grad[background] < 0).all()
    np.testing.assert_allclose(grad[background], expected[background], rtol=1e-4)


def test_loss_is_weighted_bce_minus_alpha_jaccard():
    y, p = _batch(seed=9)
    weights = np.array([1.0, 2.0, 4.0, 1.0])
    alpha = 0.3
    bce = SegmentationLoss(alpha=0.0, class_weights=weights)(y, p)
    jaccard = soft_jaccard(y, p).numpy().mean(axis=0)
    expected = (1 - alpha) * float(bce) - alpha * float(jaccard @ weights / weights.sum())
    assert float(SegmentationLoss(alpha=alpha, class_weights=weights)(y, p)) == pytest.approx(expected, rel=1e-5)
    only_jaccard = SegmentationLoss(alpha=1.0, class_weights=weights)(y, p)
    assert float(only_jaccard) == pytest.approx(-float(jaccard @ weights / weights.sum()), rel=1e-5)


def test_gradients_are_finite_where_label_and_prediction_are_zero():
    y, p = _batch(seed=4)
    p_var = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = SegmentationLoss()(y, p_var)
    assert np.isfinite(tape.gradient(value, p_var).numpy()).all()


def test_low_precision_predictions_give_float32_loss():
    y, p = _batch(seed=5)
    low = tf.cast(p, tf.bfloat16)
    value = SegmentationLoss()(y, low)
    assert value.dtype == tf.float32
    reference = _numpy_loss(y, tf.cast(low, tf.float32).numpy(), 0.15, (1, 1, 4, 1))
    np.testing.assert_allclose(float(value), reference, rtol=1e-5, atol=1e-5)


def test_loss_config_round_trip_and_errors():
    loss = SegmentationLoss(alpha=0.3, class_weights=(1, 2, 3, 4))
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, SegmentationLoss)
    assert clone.alpha == 0.3 and clone.class_weights == [1.0, 2.0, 3.0, 4.0]
    y, p = _batch(seed=6, channels=3)
    with pytest.raises(CellnetError, match="4 class weights for 3 mask channels"):
        loss(y, p)
    with pytest.raises(CellnetError, match="alpha"):
        SegmentationLoss(alpha=1.5)
    with pytest.raises(CellnetError, match="class_weights"):
        SegmentationLoss(class_weights=(0, 0, 0, 0))


def test_class_jaccard_accumulates_globally_over_batches():
    rng = np.random.default_rng(11)
    # Two batches of very different sizes and overlaps: the mean of per-batch values differs.
    batches = [
        ((rng.random((1, 8, 8, 4)) < 0.5).astype("float32"), rng.random((1, 8, 8, 4)).astype("float32")),
        (
            (rng.random((3, 32, 32, 4)) < 0.1).astype("float32"),
            rng.random((3, 32, 32, 4)).astype("float32"),
        ),
    ]
    metric = ClassJaccard(2, threshold=0.6)
    assert metric.name == "jaccard_malignant"
    intersection = union = 0
    per_batch = []
    for y, p in batches:
        metric.update_state(y, p)
        truth, predicted = y[..., 2] >= 0.5, p[..., 2] >= 0.6
        i, u = np.sum(truth & predicted), np.sum(truth | predicted)
        intersection, union = intersection + i, union + u
        per_batch.append(i / u)
    assert float(metric.result()) == pytest.approx(intersection / union, rel=1e-6)
    assert abs(np.mean(per_batch) - intersection / union) > 1e-3
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_class_jaccard_sample_weight_and_config():
    y, p = _batch(seed=12)
    metric = ClassJaccard(1)
    metric.update_state(y, p, sample_weight=np.array([1.0, 0.0, 2.0]))
    truth, predicted = y[..., 1] >= 0.5, p[..., 1] >= 0.5
    w = np.array([1.0, 0.0, 2.0])[:, None, None]
    expected = np.sum(w * (truth & predicted)) / np.sum(w * (truth | predicted))
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    clone = ClassJaccard.from_config(metric.get_config())
    assert (clone.class_index, clone.threshold, clone.name) == (1, 0.5, "jaccard_lymphocyte")


def test_binned_crossentropy_targets_the_nearest_bin():
    rng = np.random.default_rng(21)
    probs = rng.dirichlet(np.ones(101), size=5).astype("float32")
    scores = np.array([[0.0], [0.374], [0.376], [1.0], [0.5]], "float32")
    value = BinnedCrossentropy()(scores, probs)
    bins = [0, 37, 38, 100, 50]
    expected = np.mean([-np.log(probs[i, b]) for i, b in enumerate(bins)])
    assert value.dtype == tf.float32
    assert float(value) == pytest.approx(expected, rel=1e-5)
    clone = keras.losses.deserialize(keras.losses.serialize(BinnedCrossentropy()))
    assert isinstance(clone, BinnedCrossentropy)


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_cellularity_mse_for_both_heads(head):
    rng = np.random.default_rng(22)
    metric = CellularityMSE(head=head, name="mse")
    errors = []
    for n in (3, 5):  # two batches: Mean weights them by size
        truth = rng.random((n, 1)).astype("float32")
        if head == "regression":
            pred = rng.random((n, 1)).astype("float32")
            score = pred[:, 0]
        else:
            pred = rng.dirichlet(np.ones(101), size=n).astype("float32")
            score = pred @ np.linspace(0, 1, 101)
        metric.update_state(truth, pred)
        errors.extend((score - truth[:, 0]) ** 2)
    assert float(metric.result()) == pytest.approx(np.mean(errors), rel=1e-5)
    clone = CellularityMSE.from_config(metric.get_config())
    assert (clone.head, clone.name) == (head, "mse")
    with pytest.raises(CellnetError, match="head 'bins'"):
        CellularityMSE(head="bins")

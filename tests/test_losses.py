"""SegmentationLoss against a NumPy transcription of eqs. 1-3; ClassJaccard global accumulation."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.training.losses import (
    BinnedCrossentropy,
    CellularityMSE,
    ClassJaccard,
    SegmentationLoss,
    soft_jaccard,
)

EPS = 1e-7


def _numpy_loss(y: np.ndarray, p: np.ndarray, alpha: float, weights) -> float:
    """Eqs. 1-3 of the paper written out per class, with N = every pixel of the batch."""
    y = y.astype(np.float64)
    p = p.astype(np.float64)
    total = 0.0
    for c, v in enumerate(weights):
        yc, pc = y[..., c].ravel(), p[..., c].ravel()
        q = np.clip(pc, EPS, 1 - EPS)
        bce = np.mean(-(yc * np.log(q) + (1 - yc) * np.log(1 - q)))
        denominator = yc + pc - yc * pc
        ratio = np.zeros_like(yc)
        np.divide(yc * pc, denominator, out=ratio, where=denominator != 0)
        jaccard = ratio.mean()
        total += v * ((1 - alpha) * bce - alpha * jaccard)
    return total / sum(weights)


def _batch(seed: int, n: int = 3, size: int = 16, channels: int = 4):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, size, size, channels)) < 0.3).astype("float32")
    p = rng.random((n, size, size, channels)).astype("float32")
    p[0, :4, :4] = 0.0  # y = p = 0 somewhere: the 0/0 guard
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


def test_soft_jaccard_is_eq2_per_image_and_class():
    y, p = _batch(seed=3)
    got = soft_jaccard(y, p).numpy()
    assert got.shape == (3, 4)
    for n in range(3):
        for c in range(4):
            yc, pc = y[n, ..., c].astype(np.float64), p[n, ..., c].astype(np.float64)
            den = yc + pc - yc * pc
            expected = np.where(den > 0, yc * pc / np.where(den > 0, den, 1), 0).mean()
            assert got[n, c] == pytest.approx(expected, abs=1e-6)


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

"""Losses and metrics: segmentation (paper 3.1, eqs. 1-3) and cellularity (paper 3.4).

Segmentation, per class c: ``L_c = (1 - alpha) * BCE_c - alpha * J_c``; the total is
``sum_c v_c L_c / sum_c v_c``. ``J_c`` is the soft Jaccard of the authors' released code, per
image and class over its pixels: ``(sum y p + s) / (sum y + sum p - sum y p + s)``. Eq. 2 as
printed divides pixel by pixel, which for binary labels is ``mean(y p)``: no gradient where
y = 0 and an all-ones prediction scores best (README, deviations).
Cellularity: MSE for the regression head, cross-entropy over 101 bins for the classification
head. Everything is computed in float32, also under a mixed-precision policy.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from cellnet.classes import CLASSES
from cellnet.errors import CellnetError

#: The cross-entropy clips p and 1 - p at EPSILON inside its logs.
EPSILON = 1e-7
SPATIAL_AXES = (1, 2)
#: Added to the soft Jaccard's intersection and union: one pixel's worth.
SMOOTH = 1.0


def soft_jaccard(y_true, y_pred, smooth: float = SMOOTH) -> tf.Tensor:
    """Soft Jaccard per image and class, shape (N, C).

    ``(sum_i y_i p_i + smooth) / (sum_i y_i + sum_i p_i - sum_i y_i p_i + smooth)`` over the pixels
    i of each image; ``smooth`` (one pixel) makes an empty mask with an empty prediction score 1
    and changes other values by at most 1 / (pixels of the union).
    """
    y = tf.cast(y_true, tf.float32)
    p = tf.cast(y_pred, tf.float32)
    intersection = tf.reduce_sum(y * p, axis=SPATIAL_AXES)
    union = tf.reduce_sum(y, axis=SPATIAL_AXES) + tf.reduce_sum(p, axis=SPATIAL_AXES) - intersection
    return (intersection + smooth) / (union + smooth)


def binary_crossentropy(y_true, y_pred) -> tf.Tensor:
    """Mean pixel binary cross-entropy per image and class, shape (N, C)."""
    y = tf.cast(y_true, tf.float32)
    p = tf.cast(y_pred, tf.float32)
    # Clipping p and 1 - p separately keeps the full EPSILON floor near 1 in float32.
    log_p = tf.math.log(tf.maximum(p, EPSILON))
    log_not_p = tf.math.log(tf.maximum(1.0 - p, EPSILON))
    return tf.reduce_mean(-(y * log_p + (1.0 - y) * log_not_p), axis=SPATIAL_AXES)


@keras.saving.register_keras_serializable(package="cellnet")
class SegmentationLoss(keras.losses.Loss):
    """Weighted BCE minus soft Jaccard over the mask channels (paper eqs. 1-3).

    Per image ``sum_c v_c ((1 - alpha) BCE_c - alpha J_c) / sum_c v_c``, with ``J_c`` the
    per-image :func:`soft_jaccard` of the authors' code rather than eq. 2's per-pixel ratio.

    Args:
        alpha: weight of the soft Jaccard term (0.15 in the paper).
        class_weights: one weight per channel (normal 1, lymphocyte 1, malignant 4,
            background 1 in the paper).

    Returns one value per image; Keras averages them over the batch. For the BCE that equals
    eq. 1's pixel mean over the whole batch (all images have the same size); the Jaccard term
    is the mean of the per-image values, as in the authors' code.
    """

    def __init__(
        self,
        alpha: float = 0.15,
        class_weights: Sequence[float] = (1.0, 1.0, 4.0, 1.0),
        name: str = "segmentation_loss",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        weights = [float(w) for w in class_weights]
        if not 0.0 <= alpha <= 1.0:
            raise CellnetError(f"SegmentationLoss alpha {alpha}: expected a value in [0, 1]")
        if min(weights) < 0 or sum(weights) <= 0:
            raise CellnetError(
                f"SegmentationLoss class_weights {weights}: need non-negative weights, not all 0"
            )
        self.alpha = float(alpha)
        self.class_weights = weights

    def call(self, y_true, y_pred):
        channels = y_pred.shape[-1]
        if channels is not None and channels != len(self.class_weights):
            raise CellnetError(
                f"SegmentationLoss: {len(self.class_weights)} class weights for {channels} mask channels"
            )
        bce = binary_crossentropy(y_true, y_pred)
        per_class = (1.0 - self.alpha) * bce - self.alpha * soft_jaccard(y_true, y_pred)
        weights = tf.constant(self.class_weights, tf.float32)
        return tf.reduce_sum(per_class * weights, axis=-1) / tf.reduce_sum(weights)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alpha": self.alpha, "class_weights": list(self.class_weights)})
        return config


@keras.saving.register_keras_serializable(package="cellnet")
class ClassJaccard(keras.metrics.Metric):
    """Jaccard index of one channel at a threshold, over every pixel seen since the last reset.

    Intersection and union are summed over all batches of the epoch before dividing, so the
    result is the global Jaccard of the set, not a mean of per-batch values. Labels count as
    positive at >= 0.5, predictions at >= ``threshold``. With no positive pixel at all the
    result is 0.

    Args:
        class_index: channel to score (0 normal, 1 lymphocyte, 2 malignant, 3 background).
        threshold: probability at which a prediction counts as positive.
        name: defaults to ``jaccard_<class>``.
    """

    def __init__(self, class_index: int, threshold: float = 0.5, name: str | None = None, **kwargs):
        if name is None:
            label = CLASSES[class_index] if 0 <= class_index < len(CLASSES) else str(class_index)
            name = f"jaccard_{label}"
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        self.class_index = int(class_index)
        self.threshold = float(threshold)
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.union = self.add_variable(shape=(), initializer="zeros", name="union")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = tf.cast(y_true[..., self.class_index], tf.float32) >= 0.5
        predicted = tf.cast(y_pred[..., self.class_index], tf.float32) >= self.threshold
        intersection = tf.cast(truth & predicted, tf.float32)
        union = tf.cast(truth | predicted, tf.float32)
        if sample_weight is not None:
            weight = tf.cast(sample_weight, tf.float32)
            weight = tf.reshape(weight, tf.concat([tf.shape(weight), [1] * (3 - weight.shape.rank)], 0))
            intersection *= weight
            union *= weight
        self.intersection.assign_add(tf.reduce_sum(intersection))
        self.union.assign_add(tf.reduce_sum(union))

    def result(self):
        return tf.math.divide_no_nan(self.intersection, self.union)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"class_index": self.class_index, "threshold": self.threshold})
        return config


def _scores(y) -> tf.Tensor:
    """Cellularity targets of any shape (N,) / (N, 1) as float32 (N,)."""
    return tf.reshape(tf.cast(y, tf.float32), [-1])


def _bin_centres(probs: tf.Tensor) -> tf.Tensor:
    """Centres 0, 1/(B-1), ..., 1 of the B bins of ``probs`` (0.00..1.00 for 101 bins)."""
    return tf.linspace(0.0, 1.0, tf.shape(probs)[-1])


@keras.saving.register_keras_serializable(package="cellnet")
class BinnedCrossentropy(keras.losses.Loss):
    """Cross-entropy of the classification head (paper 3.4): the score's nearest bin is the class.

    ``y_true`` holds cellularity scores in [0, 1], shape (N,) or (N, 1); ``y_pred`` holds the
    (N, B) bin probabilities (B = 101: bins 0.00, 0.01, ..., 1.00).
    """

    def __init__(self, name: str = "binned_crossentropy", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        probs = tf.cast(y_pred, tf.float32)
        last_bin = tf.cast(tf.shape(probs)[-1] - 1, tf.float32)
        classes = tf.cast(tf.round(tf.clip_by_value(_scores(y_true), 0.0, 1.0) * last_bin), tf.int32)
        return keras.losses.sparse_categorical_crossentropy(classes, probs)


@keras.saving.register_keras_serializable(package="cellnet")
class CellularityMSE(keras.metrics.Mean):
    """Mean squared error of the cellularity score, whichever head made it.

    Args:
        head: ``"regression"`` (``y_pred`` is the score, (N, 1)) or ``"classification"``
            (``y_pred`` is (N, B) bin probabilities; the score is their expectation).
    """

    def __init__(self, head: str = "regression", name: str = "cellularity_mse", **kwargs):
        if head not in ("regression", "classification"):
            raise CellnetError(f"CellularityMSE head {head!r}: expected regression or classification")
        super().__init__(name=name, **kwargs)
        self.head = head

    def update_state(self, y_true, y_pred, sample_weight=None):
        predicted = tf.cast(y_pred, tf.float32)
        if self.head == "classification":
            predicted = tf.reduce_sum(predicted * _bin_centres(predicted), axis=-1)
        error = tf.square(tf.reshape(predicted, [-1]) - _scores(y_true))
        return super().update_state(error, sample_weight=sample_weight)

    def get_config(self) -> dict:
        config = super().get_config()
        config["head"] = self.head
        return config

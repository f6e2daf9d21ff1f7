"""The 81 hand-crafted features of the paper's GBT method (SPEC 3, paper 3.3), in TF ops.

Per cell channel (normal, lymphocyte, malignant) of a segmentation map:

- ``<c>_activation_total``: the sum of the map;
- for each t in ``THRESHOLDS_AREA``: ``<c>_area@t`` (pixels with value > t) and
  ``<c>_activation@t`` (sum of the values > t);
- for each t in ``THRESHOLDS_BLOB``: ``<c>_blobs@t`` (Laplacian-of-Gaussian blobs whose
  scale-normalised response > t) and ``<c>_blob_activation@t`` (sum of the map at their centres).

The blob step follows ``skimage.feature.blob_log(map, min_sigma=1, max_sigma=4, num_sigma=4,
threshold=t)``, the call of the Kaggle sea-lion solution the paper borrows its features from:
the scale space is ``-sigma**2 * LoG(map)`` for sigma in ``LOG_SIGMAS`` (Gaussian truncated at
4 sigma, borders mirrored like SciPy's ``reflect``), a blob is a point of that space equal to the
maximum of its 3x3x3 (space x scale) neighbourhood, and ``t`` applies to the LoG response, not to
the map value. Unlike ``blob_log`` there is no overlap pruning afterwards (the same as
``blob_log(..., overlap=1)``): skimage's pruning walks a KD-tree pair list in an order-dependent
way that cannot be batched. On maps of separated nuclei both agree; on noisy maps pruning would
drop overlapping maxima (measured: up to ~12% of the blobs at t <= 0.08 on white noise, none at
t >= 0.16).

How (CPU cost in mind, same values as the direct convolution to float32 rounding):

- the scale space is one FFT of the mirror-padded planes, then per sigma a product with the
  separable LoG transfer function and an inverse FFT (no per-tap convolution passes);
- peaks: a dense max over (sigma, y) neighbours, candidates equal to it, then the x neighbours
  of those few candidates, gathered;
- each peak falls in one level (how many blob thresholds its response exceeds): one segment sum
  per plane and level, and reverse cumulative sums give every threshold.

Everything is batched (no loop over images) and shape-agnostic, so the function runs inside a
``tf.function`` with unknown batch size and map size, and inside the exported SavedModel (plain
TF ops, no XLA, so TF Serving runs it as is).
"""
from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from cellnet.classes import CELL_CLASSES
from cellnet.errors import CellnetError

THRESHOLDS_AREA: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.5)
THRESHOLDS_BLOB: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.5)
LOG_SIGMAS: tuple[float, ...] = (1, 2, 3, 4)
#: Gaussian kernels stop at this many sigmas (SciPy's default, used by ``blob_log``).
TRUNCATE = 4.0
#: Half-width of the widest kernel; maps must be at least this large in H and W (mirror padding).
MAX_RADIUS = int(TRUNCATE * max(LOG_SIGMAS) + 0.5)


def _channel_feature_names(channel: str) -> list[str]:
    names = [f"{channel}_activation_total"]
    for t in THRESHOLDS_AREA:
        names += [f"{channel}_area@{t}", f"{channel}_activation@{t}"]
    for t in THRESHOLDS_BLOB:
        names += [f"{channel}_blobs@{t}", f"{channel}_blob_activation@{t}"]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(
    name for channel in CELL_CLASSES for name in _channel_feature_names(channel))
NUM_FEATURES = len(FEATURE_NAMES)


def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Sampled 1-D Gaussian and its second derivative on ``[-r, r]``, ``r = TRUNCATE * sigma``."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    # d^2/dx^2 exp(-x^2 / 2 s^2) = (x^2 / s^4 - 1 / s^2) exp(-x^2 / 2 s^2)
    return g, g * (x**2 / sigma**4 - 1.0 / sigma**2)


_KERNELS = tuple(_gaussian_kernels(float(sigma)) for sigma in LOG_SIGMAS)


def _centred_dft(kernel: np.ndarray, length: tf.Tensor, bins: tf.Tensor) -> tf.Tensor:
    """DFT of a symmetric kernel centred on index 0 of a circle of ``length``: (bins,) float64.

    Real because the kernel is even. Built in the graph, so ``length`` may be unknown until run
    time.
    """
    radius = len(kernel) // 2
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    frequency = tf.cast(tf.range(bins), tf.float64)
    phase = (2.0 * np.pi / tf.cast(length, tf.float64)) * frequency[:, None] * taps[None, :]
    return tf.linalg.matvec(tf.cos(phase), kernel)


def log_scale_space(planes: tf.Tensor) -> list[tf.Tensor]:
    """``-sigma^2 * LoG`` of every plane, one (P, H, W) tensor per sigma in ``LOG_SIGMAS``.

    One FFT of the mirror-padded planes, then per sigma a product with the separable transfer
    function ``-sigma^2 (G_y G''_x + G''_y G_x)`` and an inverse FFT. The padding (``MAX_RADIUS``,
    SciPy's ``reflect``) covers the widest kernel, so the circular convolution equals the
    mirrored one on the crop. One tensor per sigma rather than one stacked tensor: measured about
    twice as fast on CPU (16 maps of 256x256), the 4x larger buffers being slow to allocate.
    """
    shape = tf.shape(planes)
    h, w = shape[1], shape[2]
    r = MAX_RADIUS
    padded = tf.pad(planes, [[0, 0], [r, r], [r, r]], mode="SYMMETRIC")
    length_y, length_x = h + 2 * r, w + 2 * r
    spectrum = tf.signal.rfft2d(padded)
    space = []
    for sigma, (g, g2) in zip(LOG_SIGMAS, _KERNELS):
        g_y, g2_y = _centred_dft(g, length_y, length_y), _centred_dft(g2, length_y, length_y)
        g_x, g2_x = (_centred_dft(g, length_x, length_x // 2 + 1),
                     _centred_dft(g2, length_x, length_x // 2 + 1))
        transfer = -(sigma**2) * (g_y[:, None] * g2_x[None, :] + g2_y[:, None] * g_x[None, :])
        filtered = tf.signal.irfft2d(spectrum * tf.complex(tf.cast(transfer, tf.float32), 0.0),
                                     fft_length=[length_y, length_x])
        space.append(filtered[:, r:r + h, r:r + w])
    return space


def _scale_y_max(space: list[tf.Tensor]) -> list[tf.Tensor]:
    """Per sigma, the max over (sigma - 1..sigma + 1) x (y - 1..y + 1) at the same x.

    The y max is a (3, 1) max-pool with x as the channel axis (vectorised; pooling planes with a
    single channel is tens of times slower on CPU); the edge sigmas see one neighbour and the
    edge rows two, like SciPy's ``maximum_filter(mode="nearest")``.
    """
    pooled = [tf.reshape(tf.nn.max_pool2d(tf.expand_dims(s, 2), ksize=(3, 1), strides=1,
                                          padding="SAME"), tf.shape(s)) for s in space]
    pairs = [tf.maximum(a, b) for a, b in zip(pooled[:-1], pooled[1:])]
    inner = [tf.maximum(pair, above) for pair, above in zip(pairs[:-1], pooled[2:])]
    return [pairs[0], *inner, pairs[-1]]


def scale_space_peaks(space: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Points above ``min(THRESHOLDS_BLOB)`` equal to the max of their 3x3x3 (y, x, sigma) box.

    space: ``log_scale_space`` output. Returns (K,) int64 flat indices into the (P, H, W) planes
    and (K,) float32 responses; a pixel that peaks at two sigmas is listed twice, ties are all
    kept. Dense: the (sigma, y) max, and candidates equal to it; sparse: the x neighbours of the
    candidates (a few percent of the points), gathered, where a dense x max would need a shifted
    copy of every plane.
    """
    shape = tf.shape(space[0], out_type=tf.int64)
    w, size = shape[2], tf.reduce_prod(shape)
    indices, responses, peaks = [], [], []
    for response, box in zip(space, _scale_y_max(space)):
        candidate = tf.logical_and(tf.equal(response, box), response > min(THRESHOLDS_BLOB))
        index = tf.where(tf.reshape(candidate, [-1]))[:, 0]
        value = tf.gather(tf.reshape(response, [-1]), index)
        flat_box = tf.reshape(box, [-1])
        x = index % w
        left = tf.gather(flat_box, tf.maximum(index - 1, 0))
        right = tf.gather(flat_box, tf.minimum(index + 1, size - 1))
        peaks.append(tf.logical_and(tf.logical_or(x == 0, value >= left),
                                    tf.logical_or(x == w - 1, value >= right)))
        indices.append(index)
        responses.append(value)
    keep = tf.where(tf.concat(peaks, 0))[:, 0]
    return tf.gather(tf.concat(indices, 0), keep), tf.gather(tf.concat(responses, 0), keep)


def _check_maps(maps: tf.Tensor) -> None:
    shape = maps.shape
    if shape.rank != 4 or shape[-1] not in (3, 4):
        raise CellnetError(
            f"segmentation maps: expected shape (N, H, W, 4) or (N, H, W, 3), got {shape}")
    for size in shape[1:3]:
        if size is not None and size < MAX_RADIUS:
            raise CellnetError(
                f"segmentation maps: height and width must be at least {MAX_RADIUS} px, "
                f"got {shape}")


def _threshold_features(planes: tf.Tensor) -> list[tf.Tensor]:
    """Total activation, then area and activation above each area threshold: (P,) each."""
    columns = [tf.reduce_sum(planes, axis=[1, 2])]
    for t in THRESHOLDS_AREA:
        above = planes > t
        columns.append(tf.reduce_sum(tf.cast(above, tf.float32), axis=[1, 2]))
        columns.append(tf.reduce_sum(tf.where(above, planes, 0.0), axis=[1, 2]))
    return columns


def _blob_features(planes: tf.Tensor) -> list[tf.Tensor]:
    """Blob count and centre activation above each blob threshold: (P,) each.

    Each peak falls in one level, the number of thresholds below its response (strictly, like
    ``response > t``); one segment sum per plane and level, then reverse cumulative sums over the
    levels give every threshold.
    """
    index, response = scale_space_peaks(log_scale_space(planes))
    shape = tf.shape(planes, out_type=tf.int64)
    levels = len(THRESHOLDS_BLOB) + 1
    level = tf.searchsorted(tf.constant(THRESHOLDS_BLOB, tf.float32), response, side="left",
                            out_type=tf.int64)
    segment = index // (shape[1] * shape[2]) * levels + level
    centre_value = tf.gather(tf.reshape(planes, [-1]), index)
    counts, sums = (
        tf.cumsum(tf.reshape(tf.math.unsorted_segment_sum(per_blob, segment, shape[0] * levels),
                             [-1, levels]), axis=1, reverse=True)
        for per_blob in (tf.ones_like(response), centre_value))
    columns = []
    for k in range(1, levels):
        columns += [counts[:, k], sums[:, k]]
    return columns


def extract_features(maps: tf.Tensor | np.ndarray) -> tf.Tensor:
    """The 81 features of a batch of segmentation maps, in ``FEATURE_NAMES`` order.

    maps: (N, H, W, 4) in channel order normal, lymphocyte, malignant, background (background
    is ignored) or (N, H, W, 3) without it; values are sigmoid activations. Returns (N, 81)
    float32.
    """
    maps = tf.convert_to_tensor(maps)
    _check_maps(maps)
    cells = tf.cast(maps[..., :len(CELL_CLASSES)], tf.float32)
    shape = tf.shape(cells)
    planes = tf.reshape(tf.transpose(cells, [0, 3, 1, 2]), [-1, shape[1], shape[2]])  # (N*C, H, W)
    columns = _threshold_features(planes) + _blob_features(planes)
    return tf.reshape(tf.stack(columns, axis=-1), [-1, NUM_FEATURES])  # channel-major per map


def feature_frame(features: np.ndarray | tf.Tensor) -> pd.DataFrame:
    """A (N, 81) feature array as a DataFrame with ``FEATURE_NAMES`` columns."""
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[1] != NUM_FEATURES:
        raise CellnetError(f"features: expected shape (N, {NUM_FEATURES}), got {array.shape}")
    return pd.DataFrame(array, columns=list(FEATURE_NAMES))


@keras.saving.register_keras_serializable(package="cellnet")
class FeatureExtractor(keras.layers.Layer):
    """``extract_features`` as a layer, so the 81 features live inside saved models."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, maps):
        return extract_features(tf.cast(maps, tf.float32))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], NUM_FEATURES)

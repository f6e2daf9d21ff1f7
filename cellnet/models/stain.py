"""Stain normalisation as Keras layers fitted once on a reference, so they travel with the model.

Two methods (``cellnet.choices.STAIN_NORMS``):

- ``"reinhard"`` (Reinhard et al. 2001): each image's per-channel mean and standard deviation in
  Reinhard's l-alpha-beta space (RGB -> LMS -> log10 -> decorrelating rotation; not CIE-Lab) are
  matched to the reference's.
- ``"macenko"`` (Macenko et al. 2009): each image's hematoxylin and eosin optical-density (OD)
  vectors are estimated from the plane of the two largest eigenvectors of its OD covariance, the
  pixels are unmixed into H and E concentrations, the concentrations are scaled so their 99th
  percentiles match the reference's, and the image is re-coloured with the reference's vectors.

Statistics of both methods come from tissue pixels only: a pixel is tissue when its OD is at
least ``OD_THRESHOLD`` (0.15, Macenko's beta) in every channel, so white background and glass do
not dilute them. The normalisation itself is applied to every pixel: Macenko leaves background
nearly as it was (its OD, hence its concentrations, are near zero); Reinhard's transfer, set by
the tissue, moves it too, mostly towards white (clipped at 255). An image with fewer than
``MIN_TISSUE_PIXELS`` tissue pixels (blank, white) passes through unchanged.

Fitting (``fit_stain``) is NumPy over the pooled tissue pixels of one or more RGB images;
the layers run per image in TF ops (batched, graph- and XLA-friendly), take and return RGB in
[-1, 1] like every cellnet model, and compute in float32 under mixed precision. Pixel values
map to OD as ``-ln((I + 1) / 256)`` for I in [0, 255], which is finite everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from cellnet.choices import STAIN_NORMS
from cellnet.errors import CellnetError

#: Macenko's beta: a pixel is tissue when its OD is at least this in every channel.
OD_THRESHOLD = 0.15
#: Macenko's alpha: robust extreme angles at the 1st and 99th percentiles.
ANGLE_PERCENTILE = 1.0
#: Reference and image concentrations are compared at this percentile.
CONCENTRATION_PERCENTILE = 99.0
#: Fewer tissue pixels than this and an image passes through unchanged.
MIN_TISSUE_PIXELS = 64
#: Fitting pools at most this many pixels (an even stride over all of them), bounding memory.
MAX_FIT_PIXELS = 1 << 22
#: Below this the image's statistics are degenerate (flat channel, parallel stain vectors).
EPSILON = 1e-6

#: Reinhard et al. 2001: RGB -> LMS cone space and log10 LMS -> l-alpha-beta.
RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402],
                       [0.1967, 0.7244, 0.0782],
                       [0.0241, 0.1288, 0.8444]])
LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])


# ----------------------------------------------------------------------------- pixel spaces

def _pixels(images) -> np.ndarray:
    """RGB images in [0, 255] (uint8 or float; an array or a list of differently sized ones)
    -> their pooled pixels, float64 [N, 3], at most ``MAX_FIT_PIXELS`` of them."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    arrays = [np.asarray(image) for image in images]
    if not arrays or any(a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise CellnetError("stain fitting: expected one or more RGB images [H, W, 3]")
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays])
    return pixels[::-(-len(pixels) // MAX_FIT_PIXELS)].astype(np.float64)


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] -> OD ``-ln((I + 1) / 256)``, 0 for white."""
    return -np.log((np.clip(pixels, 0.0, 255.0) + 1.0) / 256.0)


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] -> Reinhard's l-alpha-beta (of ``(I + 1) / 256``, so the log is finite)."""
    rgb = (np.clip(pixels, 0.0, 255.0) + 1.0) / 256.0
    return np.log10(rgb @ RGB_TO_LMS.T) @ LOG_LMS_TO_LAB.T


def _tissue(od: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``od`` that are tissue; a CellnetError when the reference has too few."""
    mask = np.all(od >= OD_THRESHOLD, axis=-1)
    if mask.sum() < MIN_TISSUE_PIXELS:
        raise CellnetError(f"{what}: the reference images hold {int(mask.sum())} tissue pixels "
                           f"(OD >= {OD_THRESHOLD} in every channel), fewer than "
                           f"{MIN_TISSUE_PIXELS}; choose images with tissue in them")
    return mask


# ----------------------------------------------------------------------------- fitting (NumPy)

def fit_reinhard(images) -> dict:
    """Target per-channel mean and std in l-alpha-beta over the images' pooled tissue pixels."""
    pixels = _pixels(images)
    lab = rgb_to_lab(pixels[_tissue(optical_density(pixels), "fit_reinhard")])
    return {"target_mean": lab.mean(axis=0).tolist(), "target_std": lab.std(axis=0).tolist()}


def macenko_stain_vectors(od: np.ndarray) -> np.ndarray:
    """Macenko's H and E unit OD vectors [2, 3] (H first) of tissue OD pixels [N, 3]."""
    _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))
    principal, second = vectors[:, 2], vectors[:, 1]
    principal = principal if principal.sum() >= 0 else -principal
    angles = np.arctan2(od @ second, od @ principal)
    extremes = np.percentile(angles, [ANGLE_PERCENTILE, 100.0 - ANGLE_PERCENTILE])
    stains = np.cos(extremes)[:, None] * principal + np.sin(extremes)[:, None] * second
    return stains if stains[0, 0] >= stains[1, 0] else stains[::-1]


def fit_macenko(images) -> dict:
    """Reference H and E vectors and the 99th percentiles of their tissue concentrations."""
    od = optical_density(_pixels(images))
    od = od[_tissue(od, "fit_macenko")]
    stains = macenko_stain_vectors(od)
    concentrations = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return {"stain_matrix": stains.tolist(),
            "max_concentrations": np.percentile(concentrations, CONCENTRATION_PERCENTILE, axis=1).tolist()}


def fit_stain(method: str, images) -> dict:
    """The fitted parameters of ``method`` on reference ``images`` ({} for ``"none"``)."""
    _check_method(method)
    if method == "none":
        return {}
    return {"reinhard": fit_reinhard, "macenko": fit_macenko}[method](images)


# ----------------------------------------------------------------------------- TF pieces

def _check_method(method: str) -> None:
    if method not in STAIN_NORMS:
        raise CellnetError(f"stain normalisation {method!r}: expected one of {', '.join(STAIN_NORMS)}")


def _flat_pixels(inputs: tf.Tensor) -> tf.Tensor:
    """[-1, 1] RGB [B, H, W, 3] -> [0, 255] RGB [B, H*W, 3], clipped."""
    pixels = (tf.clip_by_value(inputs, -1.0, 1.0) + 1.0) * 127.5
    return tf.reshape(pixels, [tf.shape(inputs)[0], -1, 3])


def _restore(pixels: tf.Tensor, inputs: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
    """[0, 255] RGB [B, N, 3] -> [-1, 1] in the inputs' shape; images not ``ok`` unchanged."""
    out = tf.reshape(tf.clip_by_value(pixels, 0.0, 255.0) / 127.5 - 1.0, tf.shape(inputs))
    return tf.where(ok[:, None, None, None], out, inputs)


def _tf_optical_density(pixels: tf.Tensor) -> tf.Tensor:
    return -tf.math.log((pixels + 1.0) / 256.0)


def _tissue_mask(od: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Tissue pixels [B, N] (bool) and their count per image [B] (float)."""
    mask = tf.reduce_all(od >= OD_THRESHOLD, axis=-1)
    return mask, tf.reduce_sum(tf.cast(mask, od.dtype), axis=-1)


def _masked_moments(values: tf.Tensor, mask: tf.Tensor, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image mean [B, C] and centred, masked values [B, N, C] (zero off the mask)."""
    weights = tf.cast(mask, values.dtype)[..., None]
    mean = tf.reduce_sum(values * weights, axis=1) / tf.maximum(count, 1.0)[:, None]
    return mean, (values - mean[:, None, :]) * weights


def masked_percentiles(values: tf.Tensor, mask: tf.Tensor, percentiles: Sequence[float]) -> tf.Tensor:
    """NumPy's linear-interpolation percentiles of ``values[mask]`` along the last axis
    (``mask`` broadcasts to ``values``).

    Excluded values become +inf so that, sorted, the ``n`` included ones come first; the
    percentile is then read at position ``q / 100 * (n - 1)``. Returns ``[..., len(percentiles)]``
    (0 where nothing is included).
    """
    mask = tf.broadcast_to(mask, tf.shape(values))
    ordered = tf.sort(tf.where(mask, values, tf.constant(np.inf, values.dtype)), axis=-1)
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=-1, keepdims=True)
    last = tf.maximum(count - 1, 0)
    position = tf.constant(percentiles, values.dtype) / 100.0 * tf.cast(last, values.dtype)
    low = tf.cast(tf.floor(position), tf.int32)
    high = tf.minimum(low + 1, last)
    batch_dims = len(values.shape) - 1
    below = tf.gather(ordered, low, batch_dims=batch_dims)
    above = tf.gather(ordered, high, batch_dims=batch_dims)
    result = below + (position - tf.cast(low, values.dtype)) * (above - below)
    return tf.where(count > 0, result, tf.zeros_like(result))


def _macenko_stains(od: tf.Tensor, mask: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Per-image H and E unit OD vectors [B, 2, 3], H first (``macenko_stain_vectors``)."""
    _, centred = _masked_moments(od, mask, count)
    covariance = tf.einsum("bni,bnj->bij", centred, centred) / tf.maximum(count - 1.0, 1.0)[:, None, None]
    _, vectors = tf.linalg.eigh(covariance)  # columns, eigenvalues ascending
    principal, second = vectors[..., 2], vectors[..., 1]
    sign = tf.where(tf.reduce_sum(principal, axis=-1, keepdims=True) >= 0, 1.0, -1.0)
    principal = principal * sign
    angles = tf.atan2(tf.einsum("bni,bi->bn", od, second), tf.einsum("bni,bi->bn", od, principal))
    extremes = masked_percentiles(angles, mask, [ANGLE_PERCENTILE, 100.0 - ANGLE_PERCENTILE])
    stains = (tf.cos(extremes)[..., None] * principal[:, None, :]
              + tf.sin(extremes)[..., None] * second[:, None, :])
    h_first = stains[:, 0, 0] >= stains[:, 1, 0]
    return tf.where(h_first[:, None, None], stains, stains[:, ::-1, :])


def _unmix(od: tf.Tensor, stains: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Least-squares concentrations [B, N, 2] of ``od`` [B, N, 3] on ``stains`` [B, 2, 3], and
    whether the two vectors are far enough from parallel to unmix [B]."""
    # The 2x2 inverse is written out: XLA has no kernel for tf.linalg.det / inv.
    squares = tf.reduce_sum(tf.square(stains), axis=-1)
    hh, ee = squares[:, 0], squares[:, 1]
    he = tf.reduce_sum(stains[:, 0] * stains[:, 1], axis=-1)
    determinant = hh * ee - he * he
    separable = determinant > EPSILON
    inverse = tf.reshape(tf.stack([ee, -he, -he, hh], axis=-1), [-1, 2, 2])
    inverse = inverse / tf.where(separable, determinant, 1.0)[:, None, None]
    projections = tf.einsum("bni,bki->bnk", od, stains)
    return tf.einsum("bnk,bkl->bnl", projections, inverse), separable


def _float32_dtype(kwargs: dict) -> dict:
    """Compute in float32 whatever the global policy: logs, exponentials and sorting need it."""
    kwargs.setdefault("dtype", "float32")
    return kwargs


# ----------------------------------------------------------------------------- layers

@keras.saving.register_keras_serializable(package="cellnet")
class ReinhardNormalization(keras.layers.Layer):
    """Reinhard colour transfer: match each image's l-alpha-beta mean and std to the target's.

    Args:
        target_mean, target_std: the reference's per-channel statistics (``fit_reinhard``).
        **kwargs: passed to ``keras.layers.Layer`` (``name``; ``dtype`` defaults to float32).

    Input and output: RGB in [-1, 1], ``(N, H, W, 3)``; statistics over each image's tissue
    pixels, the transfer applied to every pixel.
    """

    def __init__(self, target_mean: Sequence[float], target_std: Sequence[float], **kwargs):
        super().__init__(**_float32_dtype(kwargs))
        if len(target_mean) != 3 or len(target_std) != 3 or min(target_std) <= 0:
            raise CellnetError("ReinhardNormalization: expected 3 target means and 3 positive "
                               f"target stds, got {list(target_mean)} and {list(target_std)}")
        self.target_mean = [float(v) for v in target_mean]
        self.target_std = [float(v) for v in target_std]

    def call(self, inputs):
        pixels = _flat_pixels(inputs)
        mask, count = _tissue_mask(_tf_optical_density(pixels))
        lab = self._to_lab(pixels)
        mean, centred = _masked_moments(lab, mask, count)
        std = tf.sqrt(tf.reduce_sum(tf.square(centred), axis=1) / tf.maximum(count, 1.0)[:, None])
        ok = (count >= MIN_TISSUE_PIXELS) & tf.reduce_all(std > EPSILON, axis=-1)
        scale = tf.constant(self.target_std, lab.dtype) / tf.maximum(std, EPSILON)
        lab = (lab - mean[:, None, :]) * scale[:, None, :] + tf.constant(self.target_mean, lab.dtype)
        return _restore(self._to_rgb(lab), inputs, ok)

    @staticmethod
    def _to_lab(pixels: tf.Tensor) -> tf.Tensor:
        to_lms = tf.constant(RGB_TO_LMS.T, pixels.dtype)
        to_lab = tf.constant(LOG_LMS_TO_LAB.T, pixels.dtype)
        lms = ((pixels + 1.0) / 256.0) @ to_lms
        return (tf.math.log(lms) / np.log(10.0)) @ to_lab

    @staticmethod
    def _to_rgb(lab: tf.Tensor) -> tf.Tensor:
        to_log_lms = tf.constant(np.linalg.inv(LOG_LMS_TO_LAB).T, lab.dtype)
        to_rgb = tf.constant(np.linalg.inv(RGB_TO_LMS).T, lab.dtype)
        return tf.exp(lab @ to_log_lms * np.log(10.0)) @ to_rgb * 256.0 - 1.0

    @property
    def params(self) -> dict:
        """The fitted values, as ``fit_reinhard`` returns them."""
        return {"target_mean": self.target_mean, "target_std": self.target_std}

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), **self.params}


@keras.saving.register_keras_serializable(package="cellnet")
class MacenkoNormalization(keras.layers.Layer):
    """Macenko stain normalisation: unmix each image with its own H and E vectors, re-colour
    with the reference's at the reference's concentration range.

    Args:
        stain_matrix: the reference's H and E unit OD vectors, ``[[h_r, h_g, h_b], [e_r, e_g,
            e_b]]`` (``fit_macenko``).
        max_concentrations: the reference's 99th-percentile H and E concentrations.
        **kwargs: passed to ``keras.layers.Layer`` (``name``; ``dtype`` defaults to float32).

    Input and output: RGB in [-1, 1], ``(N, H, W, 3)``. An image whose vectors cannot be
    estimated (too little tissue, parallel vectors) passes through unchanged.
    """

    def __init__(self, stain_matrix: Sequence[Sequence[float]], max_concentrations: Sequence[float],
                 **kwargs):
        super().__init__(**_float32_dtype(kwargs))
        matrix = np.asarray(stain_matrix, dtype=np.float64)
        if matrix.shape != (2, 3) or len(max_concentrations) != 2 or min(max_concentrations) <= 0:
            raise CellnetError("MacenkoNormalization: expected a 2x3 stain_matrix (H, E rows) and 2 "
                               f"positive max_concentrations, got {np.asarray(stain_matrix).tolist()} "
                               f"and {list(max_concentrations)}")
        self.stain_matrix = matrix.tolist()
        self.max_concentrations = [float(v) for v in max_concentrations]

    def call(self, inputs):
        pixels = _flat_pixels(inputs)
        od = _tf_optical_density(pixels)
        mask, count = _tissue_mask(od)
        concentrations, separable = _unmix(od, _macenko_stains(od, mask, count))
        maxima = masked_percentiles(tf.transpose(concentrations, [0, 2, 1]), mask[:, None, :],
                                    [CONCENTRATION_PERCENTILE])[..., 0]
        ok = (count >= MIN_TISSUE_PIXELS) & separable & tf.reduce_all(maxima > EPSILON, axis=-1)
        scale = tf.constant(self.max_concentrations, od.dtype) / tf.maximum(maxima, EPSILON)
        od = (concentrations * scale[:, None, :]) @ tf.constant(self.stain_matrix, od.dtype)
        return _restore(256.0 * tf.exp(-od) - 1.0, inputs, ok)

    @property
    def params(self) -> dict:
        """The fitted values, as ``fit_macenko`` returns them."""
        return {"stain_matrix": self.stain_matrix, "max_concentrations": self.max_concentrations}

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), **self.params}


LAYERS: dict[str, type[keras.layers.Layer]] = {"reinhard": ReinhardNormalization,
                                               "macenko": MacenkoNormalization}


def stain_layer(method: str, params: dict, name: str = "stain_norm") -> keras.layers.Layer | None:
    """The normalisation layer of ``method`` with fitted ``params`` (None for ``"none"``)."""
    _check_method(method)
    if method == "none":
        return None
    try:
        return LAYERS[method](**params, name=name)
    except TypeError as exc:
        raise CellnetError(f"stain normalisation {method!r}: bad parameters {sorted(params)} ({exc})") from None

"""Batched augmentation in TF ops (SPEC 2.5; the paper's Albumentations set, section 4.2).

Flips, rot90, small-angle rotation, gamma 0.8-1.5, hue and saturation jitter, each drawn per
example but computed for the whole batch at once, so it runs wherever the batch lives: inside
the training step on the GPU (``--augment-on device``, the default) or in the tf.data pipeline
on the CPU (``--augment-on cpu``, for the benchmark). Geometric ops move image and mask with
the same parameters: the image is resampled bilinearly, the mask with nearest neighbour.

Optional stain augmentation (issue 13), off unless asked for (``StainAugment``): HED jitter
(Tellez et al. 2018/2019), brightness, contrast, Gaussian blur and Gaussian noise, photometric
only, so masks never see them.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class StainAugment:
    """The stain-augmentation settings, one place for CLI flags and presets to map onto.

    Field names are ``BatchAugment`` argument names; 0 disables an op, ``StainAugment.off()``
    all of them. The defaults are a light real-tissue setting; HED scale and shift 0.05 are
    Tellez et al.'s "HED-light" (2019, sigma 0.05 for both alpha and beta).

    Args:
        hed_scale: per-stain concentration factor alpha ~ U(1 - hed_scale, 1 + hed_scale).
        hed_shift: per-stain optical-density shift beta ~ U(-hed_shift, hed_shift).
        brightness: additive brightness ~ U(-brightness, brightness).
        contrast: contrast factor ~ U(1 - contrast, 1 + contrast) about each image's mean.
        blur_sigma: largest Gaussian blur sigma in pixels; sigma ~ U(0, blur_sigma).
        blur_prob: probability that an example is blurred.
        noise: largest Gaussian noise std; std ~ U(0, noise).
    """

    hed_scale: float = 0.05
    hed_shift: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    blur_sigma: float = 1.0
    blur_prob: float = 0.3
    noise: float = 0.02

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"stain augmentation {field.name}: expected a number >= 0, got {value!r}")
        for name in ("hed_scale", "contrast"):  # factors must stay positive
            if getattr(self, name) >= 1:
                raise ValueError(f"stain augmentation {name}: expected < 1, got {getattr(self, name)!r}")
        if self.blur_prob > 1:
            raise ValueError(f"stain augmentation blur_prob: expected <= 1, got {self.blur_prob!r}")

    @classmethod
    def off(cls) -> StainAugment:
        return cls(**{field.name: 0.0 for field in dataclasses.fields(cls)})

    def as_kwargs(self) -> dict[str, float]:
        """The ``BatchAugment`` arguments: ``BatchAugment(seed=..., **stain.as_kwargs())``."""
        return {name: float(value) for name, value in dataclasses.asdict(self).items()}


@keras.saving.register_keras_serializable(package="cellnet")
class BatchAugment(keras.layers.Layer):
    """Augment ``images`` [B, H, W, 3] in [0, 1] (and ``masks`` [B, H, W, C]) when ``training``.

    Args:
        max_rotation: largest small-angle rotation in degrees (both directions).
        gamma: (low, high) range of the gamma exponent.
        hue: largest hue shift as a fraction of the colour circle.
        saturation: (low, high) range of the saturation factor.
        hed_scale, hed_shift, brightness, contrast, blur_sigma, blur_prob, noise: the stain
            ops, as in ``StainAugment``; 0 (the default) disables each (blur runs only where
            both ``blur_sigma`` and ``blur_prob`` are above 0), and a disabled op draws
            nothing, so the other ops' random stream stays as it was without stain ops.
        seed: seed of the layer's random stream.
    """

    def __init__(self, max_rotation: float = 15.0, gamma: tuple[float, float] = (0.8, 1.5),
                 hue: float = 0.04, saturation: tuple[float, float] = (0.75, 1.25),
                 hed_scale: float = 0.0, hed_shift: float = 0.0, brightness: float = 0.0,
                 contrast: float = 0.0, blur_sigma: float = 0.0, blur_prob: float = 0.0,
                 noise: float = 0.0, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # pixels stay float32 under a mixed-precision policy
        super().__init__(**kwargs)
        self.max_rotation = float(max_rotation)
        self.gamma = tuple(float(g) for g in gamma)
        self.hue = float(hue)
        self.saturation = tuple(float(s) for s in saturation)
        self.stain_settings = StainAugment(hed_scale=hed_scale, hed_shift=hed_shift, brightness=brightness,
                                           contrast=contrast, blur_sigma=blur_sigma, blur_prob=blur_prob,
                                           noise=noise)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, shape, low=0.0, high=1.0):
        return keras.random.uniform(shape, low, high, seed=self.seed_generator)

    def call(self, images, masks=None, training=True):
        if not training:
            return images if masks is None else (images, masks)
        images = tf.convert_to_tensor(images)
        batch = tf.shape(images)[0]
        images, masks = self.geometric(images, masks, batch)
        images = self.photometric(images, batch)
        images = self.stain(images, batch)
        return images if masks is None else (images, masks)

    # ------------------------------------------------------------------ geometric
    def geometric(self, images, masks, batch):
        flip_h = self._uniform((batch,)) < 0.5
        flip_v = self._uniform((batch,)) < 0.5
        k = tf.cast(tf.floor(self._uniform((batch,), 0.0, 4.0)), tf.int32)
        angle = self._uniform((batch,), -1.0, 1.0) * (self.max_rotation * math.pi / 180.0)
        images = _rotate(_rot90(_flip(images, flip_h, flip_v), k), angle, "BILINEAR")
        if masks is not None:
            masks = tf.convert_to_tensor(masks)
            dtype = masks.dtype
            masks = _rotate(_rot90(_flip(tf.cast(masks, tf.float32), flip_h, flip_v), k), angle, "NEAREST")
            masks = tf.cast(masks, dtype)
        return images, masks

    # ------------------------------------------------------------------ photometric
    def photometric(self, images, batch):
        images = tf.cast(images, tf.float32)
        gamma = self._uniform((batch,), *self.gamma)[:, None, None, None]
        images = tf.pow(tf.clip_by_value(images, 1e-6, 1.0), gamma)
        hsv = tf.image.rgb_to_hsv(images)
        hue_shift = self._uniform((batch,), -self.hue, self.hue)[:, None, None]
        saturation = self._uniform((batch,), *self.saturation)[:, None, None]
        h = tf.math.floormod(hsv[..., 0] + hue_shift, 1.0)
        s = tf.clip_by_value(hsv[..., 1] * saturation, 0.0, 1.0)
        return tf.image.hsv_to_rgb(tf.stack([h, s, hsv[..., 2]], axis=-1))

    # ------------------------------------------------------------------ stain
    def stain(self, images, batch):
        """The enabled stain ops, after the paper's photometric ones (geometric -> photometric -> stain).

        In the order an image is made: stain amounts on the slide (HED), exposure (brightness,
        contrast), optics (blur), sensor (noise last, so blur does not smooth it away).
        """
        s = self.stain_settings
        images = tf.cast(images, tf.float32)
        if s.hed_scale or s.hed_shift:
            alpha = self._uniform((batch, 3), 1.0 - s.hed_scale, 1.0 + s.hed_scale)
            beta = self._uniform((batch, 3), -s.hed_shift, s.hed_shift)
            images = _hed_jitter(images, alpha, beta)
        if s.brightness:
            images = _brightness(images, self._uniform((batch,), -s.brightness, s.brightness))
        if s.contrast:
            images = _contrast(images, self._uniform((batch,), 1.0 - s.contrast, 1.0 + s.contrast))
        if s.blur_sigma and s.blur_prob:
            sigma = self._uniform((batch,), 0.0, s.blur_sigma)
            blurred = self._uniform((batch,)) < s.blur_prob
            images = _gaussian_blur(images, tf.where(blurred, sigma, 0.0), _blur_radius(s.blur_sigma))
        if s.noise:
            std = self._uniform((batch,), 0.0, s.noise)
            images = _add_noise(images, std, keras.random.normal(tf.shape(images), seed=self.seed_generator))
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_rotation": self.max_rotation, "gamma": self.gamma,
                "hue": self.hue, "saturation": self.saturation, **self.stain_settings.as_kwargs(),
                "seed": self.seed}


def _select(condition, a, b):
    return tf.where(condition[:, None, None, None], a, b)


def _flip(x, flip_h, flip_v):
    x = _select(flip_h, tf.reverse(x, axis=[2]), x)
    return _select(flip_v, tf.reverse(x, axis=[1]), x)


def _rot90(x, k):
    """Per-example rotation by k*90 degrees (square images): rot90 = transpose + flip."""
    transposed = tf.transpose(x, [0, 2, 1, 3])
    r1 = tf.reverse(transposed, axis=[1])
    r2 = tf.reverse(x, axis=[1, 2])
    r3 = tf.reverse(transposed, axis=[2])
    out = _select(tf.equal(k, 1), r1, x)
    out = _select(tf.equal(k, 2), r2, out)
    return _select(tf.equal(k, 3), r3, out)


def _reflect(coord, size):
    """Mirror coordinates into [0, size - 1] ("dcba|abcd|dcba" about the pixel edges)."""
    period = 2.0 * size
    c = tf.math.floormod(coord + 0.5, period)
    c = tf.where(c >= size, period - c, c) - 0.5
    return tf.clip_by_value(c, 0.0, size - 1.0)


def _rotate(x, angle, interpolation: str):
    """Rotate each image about its centre by ``angle`` radians, reflecting at the borders.

    Written with gathers rather than ``ImageProjectiveTransformV3`` so the training step also
    compiles with XLA (``--jit``), which has no kernel for that op.
    """
    shape = tf.shape(x)
    batch, h, w, c = shape[0], shape[1], shape[2], shape[3]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    cx, cy = (wf - 1.0) / 2.0, (hf - 1.0) / 2.0
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    # output (x, y) samples input (cos*(x-cx) - sin*(y-cy) + cx, sin*(x-cx) + cos*(y-cy) + cy)
    src_x = _reflect(cos * (xs - cx) - sin * (ys - cy) + cx, wf)
    src_y = _reflect(sin * (xs - cx) + cos * (ys - cy) + cy, hf)
    flat = tf.reshape(x, [batch, h * w, c])

    def gather(yi, xi):
        index = tf.reshape(yi * w + xi, [batch, h * w])
        return tf.reshape(tf.gather(flat, index, batch_dims=1), shape)

    if interpolation == "NEAREST":
        return gather(tf.cast(tf.round(src_y), tf.int32), tf.cast(tf.round(src_x), tf.int32))
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    wx, wy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    x0i, y0i = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1i, y1i = tf.minimum(x0i + 1, w - 1), tf.minimum(y0i + 1, h - 1)
    top = gather(y0i, x0i) * (1.0 - wx) + gather(y0i, x1i) * wx
    bottom = gather(y1i, x0i) * (1.0 - wx) + gather(y1i, x1i) * wx
    return top * (1.0 - wy) + bottom * wy


# ----------------------------------------------------------------------------- stain ops

# Ruifrok & Johnston (2001) optical-density vectors, one row per stain (haematoxylin, eosin,
# DAB): the values of skimage.color.rgb_from_hed. An RGB pixel's OD row = stains @ _RGB_FROM_HED.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                          [0.07, 0.99, 0.11],
                          [0.27, 0.57, 0.78]], np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
# OD = -ln((I + eps) / (1 + eps)), natural log: white is OD 0 and black ln(256) ~ 5.5 with eps one
# 8-bit grey level, which keeps the darkest pixels' OD (and their jitter) finite.
_OD_EPS = 1.0 / 255.0


def _to_od(x: tf.Tensor) -> tf.Tensor:
    return -tf.math.log((x + _OD_EPS) / (1.0 + _OD_EPS))


def _from_od(od: tf.Tensor) -> tf.Tensor:
    return (1.0 + _OD_EPS) * tf.exp(-od) - _OD_EPS


def _hed_jitter(x: tf.Tensor, alpha: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
    """Scale each stain's concentration by ``alpha`` and shift it by ``beta`` ([B, 3]: H, E, DAB)."""
    stains = tf.einsum("bhwc,cs->bhws", _to_od(x), tf.constant(_HED_FROM_RGB))
    stains = stains * alpha[:, None, None, :] + beta[:, None, None, :]
    od = tf.einsum("bhws,sc->bhwc", stains, tf.constant(_RGB_FROM_HED))
    return tf.clip_by_value(_from_od(od), 0.0, 1.0)


def _brightness(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(x + delta[:, None, None, None], 0.0, 1.0)


def _contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Stretch about each image's mean over pixels and channels, which keeps its colour balance."""
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((x - mean) * factor[:, None, None, None] + mean, 0.0, 1.0)


def _blur_radius(sigma_max: float) -> int:
    return max(1, math.ceil(3.0 * sigma_max))


def _gaussian_kernels(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """[B, 2 radius + 1] normalised 1-D Gaussians; sigma 0 gives a unit impulse (no blur)."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernels = tf.exp(-0.5 * tf.square(taps / tf.maximum(sigma, 1e-3)[:, None]))
    return kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)


def _blur_axis(x: tf.Tensor, kernels: tf.Tensor, axis: int, radius: int) -> tf.Tensor:
    """Convolve along ``axis`` (1 or 2) with each example's own kernel: a weighted sum of shifts.

    A per-example depthwise convolution written as 2 radius + 1 multiply-adds of shifted
    copies (borders mirrored as "dcba|abcd", like ``_rotate``), batched and XLA-friendly.
    """
    paddings = [[0, 0]] * 4
    paddings[axis] = [radius, radius]
    padded = tf.pad(x, paddings, mode="SYMMETRIC")
    n = tf.shape(x)[axis]
    out = tf.zeros_like(x)
    for i in range(2 * radius + 1):
        window = padded[:, i:i + n] if axis == 1 else padded[:, :, i:i + n]
        out += kernels[:, i, None, None, None] * window
    return out


def _gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur with per-example ``sigma`` [B] (0: unchanged), truncated at ``radius``."""
    kernels = _gaussian_kernels(sigma, radius)
    return _blur_axis(_blur_axis(x, kernels, 1, radius), kernels, 2, radius)


def _add_noise(x: tf.Tensor, std: tf.Tensor, unit_noise: tf.Tensor) -> tf.Tensor:
    """Add ``unit_noise`` (standard normal, like ``x``) scaled by each example's ``std`` [B]."""
    return tf.clip_by_value(x + std[:, None, None, None] * unit_noise, 0.0, 1.0)

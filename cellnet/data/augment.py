"""Batched augmentation in TF ops (SPEC 2.5; the paper's Albumentations set, section 4.2).

Flips, rot90, small-angle rotation, gamma 0.8-1.5, hue and saturation jitter, each drawn per
example but computed for the whole batch at once, so it runs wherever the batch lives: inside
the training step on the GPU (``--augment-on device``, the default) or in the tf.data pipeline
on the CPU (``--augment-on cpu``, for the benchmark). Geometric ops move image and mask with
the same parameters: the image is resampled bilinearly, the mask with nearest neighbour.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="cellnet")
class BatchAugment(keras.layers.Layer):
    """Augment ``images`` [B, H, W, 3] in [0, 1] (and ``masks`` [B, H, W, C]) when ``training``.

    Args:
        max_rotation: largest small-angle rotation in degrees (both directions).
        gamma: (low, high) range of the gamma exponent.
        hue: largest hue shift as a fraction of the colour circle.
        saturation: (low, high) range of the saturation factor.
        seed: seed of the layer's random stream.
    """

    def __init__(self, max_rotation: float = 15.0, gamma: tuple[float, float] = (0.8, 1.5),
                 hue: float = 0.04, saturation: tuple[float, float] = (0.75, 1.25),
                 seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # pixels stay float32 under a mixed-precision policy
        super().__init__(**kwargs)
        self.max_rotation = float(max_rotation)
        self.gamma = tuple(float(g) for g in gamma)
        self.hue = float(hue)
        self.saturation = tuple(float(s) for s in saturation)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, batch, low=0.0, high=1.0):
        return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

    def call(self, images, masks=None, training=True):
        if not training:
            return images if masks is None else (images, masks)
        images = tf.convert_to_tensor(images)
        batch = tf.shape(images)[0]
        images, masks = self.geometric(images, masks, batch)
        images = self.photometric(images, batch)
        return images if masks is None else (images, masks)

    # ------------------------------------------------------------------ geometric
    def geometric(self, images, masks, batch):
        flip_h = self._uniform(batch) < 0.5
        flip_v = self._uniform(batch) < 0.5
        k = tf.cast(tf.floor(self._uniform(batch, 0.0, 4.0)), tf.int32)
        angle = self._uniform(batch, -1.0, 1.0) * (self.max_rotation * math.pi / 180.0)
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
        gamma = self._uniform(batch, *self.gamma)[:, None, None, None]
        images = tf.pow(tf.clip_by_value(images, 1e-6, 1.0), gamma)
        hsv = tf.image.rgb_to_hsv(images)
        hue_shift = self._uniform(batch, -self.hue, self.hue)[:, None, None]
        saturation = self._uniform(batch, *self.saturation)[:, None, None]
        h = tf.math.floormod(hsv[..., 0] + hue_shift, 1.0)
        s = tf.clip_by_value(hsv[..., 1] * saturation, 0.0, 1.0)
        return tf.image.hsv_to_rgb(tf.stack([h, s, hsv[..., 2]], axis=-1))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_rotation": self.max_rotation, "gamma": self.gamma,
                "hue": self.hue, "saturation": self.saturation, "seed": self.seed}


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

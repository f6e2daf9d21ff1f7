"""The one pixel path: uint8 RGB at full resolution -> the models' input, used everywhere.

Training steps, evaluation, GBT feature fitting, the exported SavedModels, ``predict`` and
``slide`` all go through these functions, so a served model sees exactly what the trained one
saw. The constants are defined here once.
"""
from __future__ import annotations

import tensorflow as tf

#: Patches are 512x512 at 0.5 um/px; models work at half that resolution (paper 4.2).
DOWNSAMPLE = 2
PATCH_SIZE = 512
WORKING_SIZE = PATCH_SIZE // DOWNSAMPLE
#: The encoder's total stride: a segmenter's input sides must be multiples of it.
STRIDE = 32
#: A batch of uint8 RGB images of any size: the one input signature of every traced model call,
#: so each is traced once (no retracing as batch or image sizes change).
IMAGES_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")


def downsample(images: tf.Tensor, factor: int = DOWNSAMPLE) -> tf.Tensor:
    """Area-downsample ``[..., H, W, C]`` by ``factor`` (ceil size) -> float32 in the input's range."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    size = (shape[-3] + factor - 1) // factor, (shape[-2] + factor - 1) // factor
    return tf.image.resize(tf.cast(images, tf.float32), size, method="area")


def to_unit_range(images: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] (or float in [0, 255]) -> float32 in [0, 1]."""
    return tf.cast(images, tf.float32) / 255.0


def to_model_range(images: tf.Tensor) -> tf.Tensor:
    """[0, 1] float -> [-1, 1], the models' input range (paper section 4.2)."""
    return images * 2.0 - 1.0


def to_model_input(images: tf.Tensor) -> tf.Tensor:
    """uint8 RGB at working resolution -> model input in [-1, 1]."""
    return to_model_range(to_unit_range(images))


def full_res_to_model_input(images: tf.Tensor, factor: int = DOWNSAMPLE) -> tf.Tensor:
    """uint8 RGB at full resolution -> model input at working resolution in [-1, 1]."""
    return to_model_range(downsample(images, factor) / 255.0)


def pad_to_multiple(images: tf.Tensor, multiple: int = STRIDE, value: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Pad [N, H, W, C] at the bottom/right to multiples of ``multiple``; returns (padded, (H, W))."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    padded = tf.pad(images, [[0, 0], [0, ph], [0, pw], [0, 0]], constant_values=value)
    return padded, tf.stack([h, w])

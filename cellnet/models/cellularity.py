"""Cellularity models: direct CNNs on the image (paper 3.4) and the SR cascade (paper 3.2).

All take float images scaled to [-1, 1] and output float32 values, also under mixed precision.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from cellnet.choices import REGRESSION_ACTIVATIONS
from cellnet.errors import CellnetError
from cellnet.models.backbone import (CHANNEL_MULTIPLE, STAGE_BLOCKS, ResNet34Backbone, load_backbone_weights,
                                     set_trainable)
from cellnet.models.segmenter import CellSegmenter

#: Classification head: bins 0.00, 0.01, ..., 1.00.
NUM_BINS = 101
BIN_CENTRES = np.linspace(0.0, 1.0, NUM_BINS)
#: The 80% interval is the 10th to the 90th percentile of the bin distribution.
INTERVAL_QUANTILES = (0.1, 0.9)
#: CDF values this close below a quantile count as reaching it (float32 cumulative sums).
CDF_TOLERANCE = 1e-6
ARCHS: tuple[str, ...] = ("resnet34", "resnet50", "xception")
HEADS: tuple[str, ...] = ("regression", "classification")
PHASES: tuple[str, ...] = ("head", "finetune")
#: Regression output activation of files saved before the choice existed (cellnet <= 0.2).
LEGACY_REGRESSION_ACTIVATION = "sigmoid"
#: Per-channel BGR means of the Caffe-style ImageNet preprocessing used by keras ResNet50.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="cellnet")
class CaffePreprocessing(layers.Layer):
    """[-1, 1] RGB -> ResNet50's ImageNet input: [0, 255] BGR minus the channel means.

    Keeps the caller's contract (always [-1, 1]) while ``keras.applications.ResNet50``
    weights see the input they were trained on.
    """

    def call(self, inputs):
        pixels = (inputs + 1.0) * 127.5
        bgr = pixels[..., ::-1]
        return bgr - tf.constant(CAFFE_BGR_MEANS, dtype=bgr.dtype)


@keras.saving.register_keras_serializable(package="cellnet")
class SelectChannels(layers.Layer):
    """Keeps the first ``channels`` channels (drops background from a 4-channel mask)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def call(self, inputs):
        return inputs[..., : self.channels]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.channels)

    def get_config(self) -> dict:
        config = super().get_config()
        config["channels"] = self.channels
        return config


def check_regression_activation(activation: str) -> str:
    if activation not in REGRESSION_ACTIVATIONS:
        raise CellnetError(f"regression_activation {activation!r}: expected one of "
                           f"{', '.join(REGRESSION_ACTIVATIONS)}")
    return activation


def cellularity_head(x, head: str, regression_activation: str = "linear"):
    """Global average pooling -> Dense(1, linear|sigmoid) or Dense(101, softmax), float32.

    The regression output is raw (linear by default, as in the authors' code): losses and
    metrics see it unclipped; ``clip_score`` bounds it where a score reaches a user.
    """
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head == "regression":
        return layers.Dense(1, activation=check_regression_activation(regression_activation),
                            dtype="float32", name="cellularity")(x)
    return layers.Dense(NUM_BINS, activation="softmax", dtype="float32", name="class_probs")(x)


def clip_score(score):
    """A cellularity score as users get it: clipped to [0, 1] (export, evaluation).

    A linear head and the GBT's tree sums can leave [0, 1]; a cellularity cannot.
    """
    return tf.clip_by_value(tf.cast(score, tf.float32), 0.0, 1.0)


def _applications_encoder(arch: str, weights: str | None, input_shape: tuple) -> keras.Model:
    """ResNet50 or Xception without top from keras.applications; weights from a local file only."""
    if weights is not None and not os.path.isfile(weights):
        raise CellnetError(
            f"{weights}: no such file; expected {arch} no-top weights (.h5) saved locally"
        )
    build = keras.applications.ResNet50 if arch == "resnet50" else keras.applications.Xception
    try:
        return build(include_top=False, weights=weights, input_shape=input_shape)
    except ValueError as error:
        raise CellnetError(
            f"{weights}: not {arch} no-top weights for input {input_shape} ({error})"
        ) from None


@keras.saving.register_keras_serializable(package="cellnet")
class DirectCellularity(keras.Model):
    """Cellularity straight from the image, without segmentation (paper 3.4, Table 2).

    Args:
        arch: ``"resnet34"`` (our ResNet34-ELU backbone), ``"resnet50"`` or ``"xception"``
            (``keras.applications``, randomly initialised unless ``weights`` is given;
            resnet50 converts its [-1, 1] input to the Caffe-style input of its ImageNet
            weights inside the model).
        head: ``"regression"`` -> ``cellularity`` (N, 1), raw (``clip_score`` bounds it
            to [0, 1] when served); ``"classification"`` -> ``class_probs`` (N, 101) over
            bins 0.00..1.00 (turn into a score and an interval with ``decode_bins``).
        regression_activation: the regression head's output, ``"linear"`` (the default, as
            in the authors' code) or ``"sigmoid"`` (cellnet <= 0.2; files saved then reload
            with it). The classification head ignores it (softmax).
        input_shape: image shape; inputs are float images in [-1, 1].
        width: channel multiplier of the resnet34 backbone (other archs ignore it).
        unit: residual unit of the resnet34 backbone (``"preact"``, ``"authors"``,
            ``"torchvision"``).
        channel_multiple: channel rounding of the resnet34 backbone (see ``scaled_filters``).
        input_norm: the resnet34 backbone's input scaling: ``"none"``, or ``"imagenet"`` for
            torchvision/timm ImageNet weights (their mean/std normalisation, inside the model).
        stage_blocks: units per stage of the resnet34 backbone (ResNet34's by default).
        weights: ``None`` (He initialisation) or a LOCAL weights file for the encoder:
            for resnet34 see ``load_backbone_weights``, for resnet50/xception a
            keras.applications no-top ``.h5``. Never downloaded: ``"imagenet"`` is refused.
        **kwargs: passed to ``keras.Model``.

    Example:
    ```python
    import numpy as np
    from cellnet.models import DirectCellularity, decode_bins

    model = DirectCellularity("resnet34", "classification", input_shape=(64, 64, 3), width=0.125)
    probs = model.predict(np.zeros((2, 64, 64, 3), "float32"), verbose=0)  # (2, 101)
    decoded = decode_bins(probs)  # cellularity, low, high: (2,) each
    ```
    """

    def __init__(
        self,
        arch: str = "resnet34",
        head: str = "regression",
        input_shape: tuple = (256, 256, 3),
        width: float = 1.0,
        weights: str | None = None,
        unit: str = "preact",
        channel_multiple: int | None = CHANNEL_MULTIPLE,
        regression_activation: str = "linear",
        input_norm: str = "none",
        stage_blocks: Sequence[int] = STAGE_BLOCKS,
        **kwargs,
    ):
        check_regression_activation(regression_activation)
        if arch not in ARCHS:
            raise CellnetError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
        if head not in HEADS:
            raise CellnetError(f"head {head!r}: expected one of {', '.join(HEADS)}")
        if weights == "imagenet":
            raise CellnetError(
                "weights 'imagenet': nothing is downloaded; "
                "pass the path of a local ImageNet weights file"
            )
        input_shape = tuple(input_shape)
        trainable = kwargs.pop("trainable", True)
        if weights is not None:
            weights = os.fspath(weights)

        # === Layers ===
        if arch == "resnet34":
            self.encoder = ResNet34Backbone(input_channels=input_shape[-1], unit=unit, width=width,
                                            channel_multiple=channel_multiple, input_norm=input_norm,
                                            stage_blocks=stage_blocks, name="encoder")
            if weights is not None:
                load_backbone_weights(self.encoder, weights)
        else:
            self.encoder = _applications_encoder(arch, weights, input_shape)

        # === Functional Model ===
        inputs = keras.Input(shape=input_shape, name="image")
        x = inputs
        if arch == "resnet50":
            x = CaffePreprocessing(name="caffe_preprocessing")(x)
        x = self.encoder(x)
        outputs = cellularity_head(x, head, regression_activation)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        if not trainable:
            set_trainable(self, False)

        # === Config ===
        self.arch = arch
        self.head = head
        self.image_shape = input_shape
        self.width = width
        self.unit = unit
        self.channel_multiple = channel_multiple
        self.regression_activation = regression_activation
        self.input_norm = input_norm
        self.stage_blocks = tuple(stage_blocks)

    def get_config(self) -> dict:
        # Weights travel in the .keras file; the config rebuilds a randomly initialised model.
        return {
            "name": self.name,
            "trainable": self.trainable,
            "arch": self.arch,
            "head": self.head,
            "input_shape": list(self.image_shape),
            "width": self.width,
            "unit": self.unit,
            "channel_multiple": self.channel_multiple,
            "regression_activation": self.regression_activation,
            "input_norm": self.input_norm,
            "stage_blocks": list(self.stage_blocks),
        }

    @classmethod
    def from_config(cls, config: dict) -> "DirectCellularity":
        # files saved before channel_multiple existed keep their old channel counts, and those
        # saved before regression_activation existed their sigmoid (their weights learnt with it)
        return cls(**{"channel_multiple": None,
                      "regression_activation": LEGACY_REGRESSION_ACTIVATION, **config})


@keras.saving.register_keras_serializable(package="cellnet")
class SRCascade(keras.Model):
    """Segmentation -> regression cascade (paper 3.2, "ResNet34 (SR)").

    image [-1, 1] -> ``segmenter`` -> its 4 maps (3 without background) -> a randomly
    initialised ResNet34-ELU -> global average pooling -> ``cellularity`` (N, 1), raw
    (``clip_score`` bounds it to [0, 1] when served).

    Train in two phases: ``set_phase("head")`` (the default) freezes the segmenter, which then
    runs in inference mode (BatchNormalization and its dropout are off); ``set_phase("finetune")``
    unfreezes everything for end-to-end training. Compile after changing the phase. The
    segmenter is used, not copied: freezing it here freezes the object passed in.

    Args:
        segmenter: a trained ``CellSegmenter``.
        width: channel multiplier of the regression ResNet34.
        unit: its residual unit (``"preact"``, ``"authors"``).
        channel_multiple: its channel rounding (see ``scaled_filters``).
        drop_background: feed only normal/lymphocyte/malignant (for a 3-channel encoder,
            e.g. one initialised from ImageNet).
        phase: ``"head"`` or ``"finetune"``.
        regression_activation: ``"linear"`` (the default, as in the authors' code) or
            ``"sigmoid"`` (cellnet <= 0.2; files saved then reload with it).
        stage_blocks: units per stage of the regression ResNet34 (ResNet34's by default).
        **kwargs: passed to ``keras.Model``.

    Attributes:
        segmenter_maps: the symbolic 4-channel maps where this graph calls the segmenter, so
            ``keras.Model(cascade.input, [cascade.output, cascade.segmenter_maps])`` serves
            both with one segmenter pass.
    """

    def __init__(
        self,
        segmenter: CellSegmenter,
        width: float = 1.0,
        drop_background: bool = False,
        phase: str = "head",
        unit: str = "preact",
        channel_multiple: int | None = CHANNEL_MULTIPLE,
        regression_activation: str = "linear",
        stage_blocks: Sequence[int] = STAGE_BLOCKS,
        **kwargs,
    ):
        check_regression_activation(regression_activation)
        channels = segmenter.output.shape[-1] - (1 if drop_background else 0)
        trainable = kwargs.pop("trainable", True)

        # === Layers ===
        self.segmenter = segmenter
        self.select = SelectChannels(channels, name="drop_background") if drop_background else None
        self.regressor = ResNet34Backbone(input_channels=channels, unit=unit, width=width,
                                          channel_multiple=channel_multiple, stage_blocks=stage_blocks,
                                          name="regressor")

        # === Functional Model ===
        inputs = keras.Input(shape=segmenter.input.shape[1:], name="image")
        maps = self.segmenter(inputs)
        x = maps
        if self.select is not None:
            x = self.select(x)
        x = self.regressor(x)
        outputs = cellularity_head(x, "regression", regression_activation)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.segmenter_maps = maps
        self.width = width
        self.unit = unit
        self.channel_multiple = channel_multiple
        self.drop_background = drop_background
        self.regression_activation = regression_activation
        self.stage_blocks = tuple(stage_blocks)
        self.set_phase(phase)
        if not trainable:
            set_trainable(self, False)

    def set_phase(self, phase: str) -> None:
        """``"head"``: freeze the segmenter; ``"finetune"``: train everything."""
        if phase not in PHASES:
            raise CellnetError(f"SRCascade phase {phase!r}: expected one of {', '.join(PHASES)}")
        self.phase = phase
        set_trainable(self.segmenter, phase == "finetune")

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "segmenter": keras.saving.serialize_keras_object(self.segmenter),
            "width": self.width,
            "drop_background": self.drop_background,
            "phase": self.phase,
            "unit": self.unit,
            "channel_multiple": self.channel_multiple,
            "regression_activation": self.regression_activation,
            "stage_blocks": list(self.stage_blocks),
        }

    @classmethod
    def from_config(cls, config: dict) -> "SRCascade":
        # files saved before these keys existed keep their shapes and their sigmoid
        config = {"channel_multiple": None,
                  "regression_activation": LEGACY_REGRESSION_ACTIVATION, **config}
        config["segmenter"] = keras.saving.deserialize_keras_object(config["segmenter"])
        return cls(**config)


def decode_bins(probs) -> dict[str, tf.Tensor]:
    """Score and 80% interval from a (N, 101) bin distribution, in TF ops (exportable).

    ``cellularity`` is the expectation over the bin centres 0.00..1.00; ``low`` and ``high``
    are the 10th and 90th percentiles: the first bin whose cumulative probability reaches
    0.1 (0.9). Each output has shape (N,). Rows are renormalised to sum to 1.
    """
    p = tf.cast(probs, tf.float32)
    p = p / tf.maximum(tf.reduce_sum(p, axis=-1, keepdims=True), 1e-12)
    centres = tf.constant(BIN_CENTRES, tf.float32)
    cdf = tf.cumsum(p, axis=-1)

    def quantile(q: float) -> tf.Tensor:
        reached = tf.cast(cdf >= q - CDF_TOLERANCE, tf.int32)
        return tf.gather(centres, tf.argmax(reached, axis=-1, output_type=tf.int32))

    low, high = INTERVAL_QUANTILES
    return {
        "cellularity": tf.reduce_sum(p * centres, axis=-1),
        "low": quantile(low),
        "high": quantile(high),
    }


def decode_bins_np(probs: np.ndarray) -> dict[str, np.ndarray]:
    """NumPy twin of ``decode_bins`` (an independent check for tests and offline analysis)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
    cdf = np.cumsum(p, axis=-1)

    def quantile(q: float) -> np.ndarray:
        return np.array([BIN_CENTRES[np.searchsorted(row, q - CDF_TOLERANCE)] for row in cdf])

    low, high = INTERVAL_QUANTILES
    return {"cellularity": p @ BIN_CENTRES, "low": quantile(low), "high": quantile(high)}

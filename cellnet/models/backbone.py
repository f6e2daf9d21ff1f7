"""ResNet34 encoder with ELU activations (paper section 3.1, SPEC section 3).

Three residual units are available:

- ``"preact"`` (default): pre-activation units, BN -> ELU -> conv, identity shortcuts and a 1x1
  projection where the stride or the width changes (He et al. 2016, "Identity Mappings").
- ``"authors"``: the unit of the authors' released Keras code, conv -> ELU -> BN, with a 3x3
  projection shortcut in the first unit of every stage.
- ``"torchvision"``: torchvision's resnet34 (conv -> BN -> ELU, 1x1 projection "downsample"
  where the stride changes) with PyTorch's symmetric padding, so that ImageNet weights loaded
  by :mod:`cellnet.models.pretrained` see the computation they were trained with (ELU instead
  of ReLU, as in the paper).

The pyramid taps ``P2..P5`` (strides 4, 8, 16, 32) feed the segmentation decoders.

``stage_blocks`` sets the units per stage: ResNet34's ``(3, 4, 6, 3)`` unless given (keras-hub's
``stackwise_num_blocks``). Fewer units (e.g. ``(1, 1, 1, 1)``) make the tiny networks the test
suite trains, whose graphs trace in a third of the time; every model cellnet trains by default,
and every ImageNet file it loads, has ResNet34's.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import h5py
import keras
from keras import layers, ops

from cellnet.choices import RESNET34_BLOCKS, UNITS, is_torch_weights
from cellnet.errors import CellnetError

#: BatchNormalization momentum. Keras's (and the authors' Keras 2 code's) 0.99 keeps the first
#: steps' statistics in the moving averages for hundreds of steps; in short runs evaluation then
#: sees statistics far from the trained network's (leave-one-site-out on BRCA-M2C, 240 steps:
#: held-out malignant Jaccard 0.45 with 0.9, 0.20 with 0.99; README, "Real tissue").
BN_MOMENTUM = 0.9

STAGE_BLOCKS: tuple[int, ...] = RESNET34_BLOCKS
STAGE_FILTERS: tuple[int, ...] = (64, 128, 256, 512)
STEM_FILTERS = 64
KERNEL_INITIALIZER = "he_normal"
#: torchvision's BatchNorm2d epsilon (Keras's default is 1e-3), used by the torchvision unit.
TORCH_BN_EPSILON = 1e-5
INPUT_NORMS: tuple[str, ...] = ("none", "imagenet")
#: torchvision's ImageNet normalisation of [0, 1] RGB input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Every channel count is a multiple of this. oneDNN's AVX-512 float32 kernels work on blocks of
#: 16 channels; at width 0.125 the 8-channel stem and stage 2 killed the process (SIGSEGV) in the
#: first training step on AVX-512 CPUs, while 16-channel blocks run on every x86 CPU (README,
#: "Known issues"). So no width a config can reach yields a channel count oneDNN mishandles.
CHANNEL_MULTIPLE = 16


def check_stage_blocks(stage_blocks: Sequence[int]) -> tuple[int, ...]:
    """Four positive unit counts, as a tuple; one line naming the value otherwise."""
    blocks = tuple(stage_blocks)
    if len(blocks) != len(STAGE_FILTERS) or not all(type(b) is int and b > 0 for b in blocks):
        raise CellnetError(f"stage_blocks {list(blocks)}: expected {len(STAGE_FILTERS)} positive integers "
                           f"(ResNet34: {list(STAGE_BLOCKS)})")
    return blocks


def scaled_filters(filters: int, width: float, multiple: int | None = CHANNEL_MULTIPLE) -> int:
    """Channel count ``filters * width`` rounded to the nearest multiple of ``multiple`` (>= one).

    ``multiple=None`` is the rounding of models saved before the multiple existed (nearest
    integer, never below 8), so their ``.keras`` files rebuild with their own shapes.
    """
    if multiple is None:
        return max(8, int(round(filters * width)))
    return max(multiple, multiple * int(round(filters * width / multiple)))


def _conv(filters: int, kernel_size: int, strides: int, use_bias: bool, name: str) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        kernel_initializer=KERNEL_INITIALIZER,
        name=name,
    )


@keras.saving.register_keras_serializable(package="cellnet")
class ImageNetNormalization(layers.Layer):
    """[-1, 1] RGB -> torchvision's ImageNet input ``(x01 - mean) / std``.

    Keeps the caller's contract (always [-1, 1]) while torchvision/timm weights see the input
    they were trained on.
    """

    def call(self, inputs):
        mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=inputs.dtype)
        std = ops.convert_to_tensor(IMAGENET_STD, dtype=inputs.dtype)
        return ((inputs + 1.0) * 0.5 - mean) / std


@keras.saving.register_keras_serializable(package="cellnet")
class NegInfPadding2D(layers.Layer):
    """Symmetric spatial padding with -inf: a following max-pool ignores the border, as
    PyTorch's ``MaxPool2d(padding=...)`` does (zeros would win over negative ELU outputs)."""

    def __init__(self, padding: int, **kwargs):
        super().__init__(**kwargs)
        self.padding = padding

    def call(self, inputs):
        p = self.padding
        return ops.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=float("-inf"))

    def get_config(self) -> dict:
        config = super().get_config()
        config["padding"] = self.padding
        return config


def set_trainable(model: keras.layers.Layer, trainable: bool) -> None:
    """Set ``trainable`` on ``model`` and every layer inside it.

    Keras's TF backend skips assigning the value an attribute already has
    (``KerasAutoTrackable.__setattr__``), so a model built with ``trainable=False`` keeps
    trainable sublayers and ``model.trainable = False`` does not fix it; flipping the value
    first makes the setter run and reach every sublayer.
    """
    model.trainable = not trainable
    model.trainable = trainable


def stem(x, filters: int, use_bias: bool):
    """7x7/2 convolution -> BN -> ELU -> 3x3/2 max-pool (stride 4)."""
    x = _conv(filters, 7, 2, use_bias, "stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.Activation("elu", name="stem_elu")(x)
    return layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)


def _torch_conv(x, filters: int, kernel_size: int, strides: int, name: str):
    """Bias-free conv with PyTorch's padding ``kernel_size // 2`` on every side.

    At stride 1 that is Keras's "same"; at stride 2 "same" pads (0, 1) on even inputs, so the
    padding is explicit (``<name>_pad``) and the convolution "valid".
    """
    pad = kernel_size // 2
    if strides != 1 and pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    padding = "same" if strides == 1 else "valid"
    return layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                         kernel_initializer=KERNEL_INITIALIZER, name=name)(x)


def _torch_bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=TORCH_BN_EPSILON, name=name)


def torchvision_stem(x, filters: int):
    """torchvision's stem: 7x7/2 conv (pad 3) -> BN -> ELU -> 3x3/2 max-pool (pad 1)."""
    x = _torch_conv(x, filters, 7, 2, "stem_conv")
    x = _torch_bn("stem_bn")(x)
    x = layers.Activation("elu", name="stem_elu")(x)
    x = NegInfPadding2D(1, name="stem_pool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_pool")(x)


def torchvision_unit(x, filters: int, strides: int, name: str):
    """torchvision's BasicBlock with ELU: (3x3 conv -> BN) -> ELU -> (3x3 conv -> BN), add the
    shortcut (1x1 conv -> BN "downsample" where the stride or the width changes), ELU."""
    y = _torch_conv(x, filters, 3, strides, f"{name}_conv1")
    y = _torch_bn(f"{name}_bn1")(y)
    y = layers.Activation("elu", name=f"{name}_elu1")(y)
    y = _torch_conv(y, filters, 3, 1, f"{name}_conv2")
    y = _torch_bn(f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _torch_conv(x, filters, 1, strides, f"{name}_downsample_conv")
        shortcut = _torch_bn(f"{name}_downsample_bn")(shortcut)
    else:
        shortcut = x
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("elu", name=f"{name}_out")(y)


def preact_unit(x, filters: int, strides: int, name: str):
    """Pre-activation basic unit: (BN -> ELU -> 3x3 conv) x 2 plus shortcut.

    Returns ``(output, preact)``; ``preact`` is the normalised, activated input of the unit,
    which is what the decoders tap (the raw residual sum is not normalised).
    """
    preact = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(x)
    preact = layers.Activation("elu", name=f"{name}_elu1")(preact)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, False, f"{name}_shortcut")(preact)
    else:
        shortcut = x
    y = _conv(filters, 3, strides, False, f"{name}_conv1")(preact)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    y = layers.Activation("elu", name=f"{name}_elu2")(y)
    y = _conv(filters, 3, 1, False, f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([shortcut, y]), preact


def authors_unit(x, filters: int, strides: int, project: bool, name: str):
    """The released code's unit: (3x3 conv -> ELU -> BN) x 2, add shortcut, ELU."""
    y = _conv(filters, 3, strides, True, f"{name}_conv1")(x)
    y = layers.Activation("elu", name=f"{name}_elu1")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = _conv(filters, 3, 1, True, f"{name}_conv2")(y)
    y = layers.Activation("elu", name=f"{name}_elu2")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if project:
        shortcut = _conv(filters, 3, strides, True, f"{name}_shortcut_conv")(x)
        shortcut = layers.Activation("elu", name=f"{name}_shortcut_elu")(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_shortcut_bn")(shortcut)
    else:
        # The released code passes identity shortcuts through an ELU too; kept for fidelity.
        shortcut = layers.Activation("elu", name=f"{name}_shortcut_elu")(x)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("elu", name=f"{name}_out")(y)


@keras.saving.register_keras_serializable(package="cellnet")
class ResNet34Backbone(keras.Model):
    """ResNet34 encoder with ELU, stages [3, 4, 6, 3] x {64, 128, 256, 512} * width.

    Args:
        input_channels: channels of the input image (3 for RGB, 4 for segmentation maps).
        unit: ``"preact"`` (BN -> ELU -> conv), ``"authors"`` (conv -> ELU -> BN) or
            ``"torchvision"`` (torchvision's resnet34 with ELU; loads ImageNet weights with
            ``cellnet.models.pretrained``).
        width: channel multiplier for small CPU presets; channel counts are rounded to
            multiples of ``channel_multiple``.
        channel_multiple: 16 (``CHANNEL_MULTIPLE``); ``None`` rebuilds models saved before it.
        input_norm: ``"none"``, or ``"imagenet"``: the [-1, 1] RGB input is converted to
            torchvision's ImageNet normalisation first (layer ``imagenet_norm``; 3 channels).
        stage_blocks: residual units in each of the four stages, ``STAGE_BLOCKS`` (ResNet34's
            3, 4, 6, 3) unless given; fewer make small networks for tests.
        **kwargs: passed to ``keras.Model`` (``name``, ``trainable``, ``dtype``).

    Attributes:
        pyramid_outputs: ``{"P2": ..., "P5": ...}`` symbolic features at strides 4, 8, 16, 32.
            The model's own output is ``P5``.

    Example:
    ```python
    import numpy as np
    from cellnet.models import ResNet34Backbone

    backbone = ResNet34Backbone(width=0.125)
    features = backbone(np.zeros((1, 64, 64, 3), "float32"))  # (1, 2, 2, 64)
    ```
    """

    def __init__(self, input_channels: int = 3, unit: str = "preact", width: float = 1.0,
                 channel_multiple: int | None = CHANNEL_MULTIPLE, input_norm: str = "none",
                 stage_blocks: Sequence[int] = STAGE_BLOCKS, **kwargs):
        trainable = kwargs.pop("trainable", True)
        stage_blocks = check_stage_blocks(stage_blocks)
        if unit not in UNITS:
            raise CellnetError(f"ResNet34Backbone unit {unit!r}: expected one of {', '.join(UNITS)}")
        if input_channels < 1 or width <= 0:
            raise CellnetError(
                f"ResNet34Backbone: input_channels ({input_channels}) and width ({width}) "
                "must be positive"
            )
        if input_norm not in INPUT_NORMS:
            raise CellnetError(
                f"ResNet34Backbone input_norm {input_norm!r}: expected one of {', '.join(INPUT_NORMS)}"
            )
        if input_norm == "imagenet" and input_channels != 3:
            raise CellnetError(
                f"ResNet34Backbone input_norm 'imagenet' needs 3 RGB input channels, "
                f"not {input_channels}"
            )
        preact = unit == "preact"

        # === Functional Model ===
        inputs = keras.Input(shape=(None, None, input_channels), name="image")
        x = inputs
        if input_norm == "imagenet":
            x = ImageNetNormalization(name="imagenet_norm")(x)
        stem_filters = scaled_filters(STEM_FILTERS, width, channel_multiple)
        if unit == "torchvision":
            x = torchvision_stem(x, stem_filters)
        else:
            x = stem(x, stem_filters, use_bias=not preact)
        pyramid = {}
        for stage, (blocks, filters) in enumerate(zip(stage_blocks, STAGE_FILTERS), start=2):
            filters = scaled_filters(filters, width, channel_multiple)
            for block in range(blocks):
                strides = 2 if block == 0 and stage > 2 else 1
                name = f"stage{stage}_unit{block + 1}"
                if preact:
                    x, unit_preact = preact_unit(x, filters, strides, name)
                    if block == 0 and stage > 2:
                        # Tap the previous stage where the next one normalises and activates it.
                        pyramid[f"P{stage - 1}"] = unit_preact
                elif unit == "authors":
                    x = authors_unit(x, filters, strides, project=block == 0, name=name)
                else:
                    x = torchvision_unit(x, filters, strides, name)
            if not preact:
                pyramid[f"P{stage}"] = x
        if preact:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="post_bn")(x)
            x = layers.Activation("elu", name="post_elu")(x)
            pyramid["P5"] = x
        super().__init__(inputs=inputs, outputs=x, **kwargs)
        if not trainable:
            set_trainable(self, False)

        # === Config ===
        self.input_channels = input_channels
        self.unit = unit
        self.width = width
        self.channel_multiple = channel_multiple
        self.input_norm = input_norm
        self.stage_blocks = stage_blocks
        self.pyramid_outputs = pyramid

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_channels": self.input_channels,
            "unit": self.unit,
            "width": self.width,
            "channel_multiple": self.channel_multiple,
            "input_norm": self.input_norm,
            "stage_blocks": list(self.stage_blocks),
        }

    @classmethod
    def from_config(cls, config: dict) -> "ResNet34Backbone":
        # files saved before channel_multiple existed keep their old channel counts (and,
        # before input_norm, take the default "none")
        return cls(**{"channel_multiple": None, **config})


_HOW_TO_MAKE = (
    "expected a '.weights.h5' file written by ResNet34Backbone(...).save_weights(path) with the same "
    "input_channels/unit/width, a '.keras'/'.h5' model whose layers carry the backbone's layer names "
    "(e.g. a saved CellSegmenter or resnet34 DirectCellularity), or torchvision's resnet34 '.pth' / "
    "timm's resnet34 '.safetensors' ImageNet state dict for unit 'torchvision' (width 1.0, "
    "3 channels); weights are never downloaded"
)


def _models_in(model: keras.Model) -> list[keras.Model]:
    """``model`` and every model nested in it, outermost first."""
    found, pending = [], [model]
    while pending:
        current = pending.pop(0)
        found.append(current)
        pending.extend(layer for layer in current.layers if isinstance(layer, keras.Model))
    return found


def _match_layers(backbone: ResNet34Backbone, source: keras.Model):
    """Pairs (backbone layer, source layer) by name and weight shapes, plus what is missing."""
    by_name = {layer.name: layer for layer in source.layers}
    pairs, missing, mismatched = [], [], []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        match = by_name.get(layer.name)
        if match is None:
            missing.append(layer.name)
        elif [tuple(w.shape) for w in match.weights] != [tuple(w.shape) for w in layer.weights]:
            mismatched.append(layer.name)
        else:
            pairs.append((layer, match))
    return pairs, missing, mismatched


def _copy_by_name(backbone: ResNet34Backbone, source: keras.Model, path: str) -> None:
    # All weights come from one (possibly nested) model, never a mix of two encoders.
    best = None
    for candidate in _models_in(source):
        pairs, missing, mismatched = _match_layers(backbone, candidate)
        if not missing and not mismatched:
            for layer, match in pairs:
                layer.set_weights(match.get_weights())
            return
        if best is None or len(pairs) > len(best[0]):
            best = (pairs, missing, mismatched)
    _, missing, mismatched = best
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone layers missing (first: {missing[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} layers with other weight shapes (first: {mismatched[0]})")
    raise CellnetError(f"{path}: {'; '.join(problems)}; {_HOW_TO_MAKE}")


def _h5_datasets(path: str) -> list[tuple[str, tuple]]:
    """(path, shape) of every array in an HDF5 file, sorted."""
    found: list[tuple[str, tuple]] = []

    def collect(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj.shape))

    with h5py.File(path, "r") as f:
        f.visititems(collect)
    return sorted(found)


def _load_weights_file(backbone: ResNet34Backbone, path: str) -> None:
    # Keras maps .weights.h5 entries by position and may load a foreign file partially without
    # an error, so the file must hold exactly the arrays this backbone writes.
    with tempfile.TemporaryDirectory() as scratch:
        reference = os.path.join(scratch, "reference.weights.h5")
        backbone.save_weights(reference)
        expected = _h5_datasets(reference)
    try:
        found = _h5_datasets(path)
    except OSError:
        raise CellnetError(f"{path}: not an HDF5 weights file; {_HOW_TO_MAKE}") from None
    if found != expected:
        config = (
            f"input_channels={backbone.input_channels}, unit={backbone.unit!r}, width={backbone.width}"
        )
        raise CellnetError(
            f"{path}: holds {len(found)} arrays that do not fit this backbone "
            f"({config}: {len(expected)} arrays); {_HOW_TO_MAKE}"
        )
    backbone.load_weights(path)


def load_backbone_weights(backbone: ResNet34Backbone, path: str | os.PathLike) -> None:
    """Load encoder weights (ImageNet or any) into ``backbone`` from a local file.

    ``.weights.h5`` files must come from a backbone of the same configuration; ``.keras`` and
    ``.h5`` models are matched layer by layer by name and weight shape, and every backbone layer
    must be found. ``.pth``/``.pt`` (torchvision) and ``.safetensors`` (timm) resnet34 state
    dicts load into a ``unit="torchvision"`` backbone (``cellnet.models.pretrained``). Raises
    ``CellnetError`` for a missing or unsuitable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CellnetError(f"{path}: no such file; {_HOW_TO_MAKE}")
    if path.endswith(".weights.h5"):
        _load_weights_file(backbone, path)
    elif path.endswith((".keras", ".h5", ".hdf5")):
        try:
            source = keras.saving.load_model(path, compile=False)
        except Exception as error:  # any unreadable model file is the user's input problem
            raise CellnetError(
                f"{path}: cannot be read as a Keras model ({error}); {_HOW_TO_MAKE}"
            ) from None
        _copy_by_name(backbone, source, path)
    elif is_torch_weights(path):
        from cellnet.models.pretrained import load_torchvision_weights  # it imports this module

        load_torchvision_weights(backbone, path)
    else:
        raise CellnetError(f"{path}: unknown weights format; {_HOW_TO_MAKE}")

"""The names a user may choose, in one TF-free place: the models validate against these and the
command line offers them, so ``cellnet --help`` lists them without importing TensorFlow."""
from __future__ import annotations

#: Residual units of the ResNet34 encoder (``cellnet.models.backbone``).
UNITS: tuple[str, ...] = ("preact", "authors", "torchvision")
#: Segmentation decoders.
DECODERS: tuple[str, ...] = ("fpn", "unet")
#: Direct cellularity models and their heads (``cellnet.models.cellularity``).
ARCHS: tuple[str, ...] = ("resnet34", "resnet50", "xception")
HEADS: tuple[str, ...] = ("regression", "classification")
#: Output activation of the regression head (clipped to [0, 1] only when decoding and serving).
REGRESSION_ACTIVATIONS: tuple[str, ...] = ("linear", "sigmoid")

"""The names a user may choose, in one TF-free place: the models validate against these and the
command line offers them, so ``cellnet --help`` lists them without importing TensorFlow."""
from __future__ import annotations

import os

#: Residual units of the ResNet34 encoder (``cellnet.models.backbone``).
UNITS: tuple[str, ...] = ("preact", "authors", "torchvision")
#: Segmentation decoders.
DECODERS: tuple[str, ...] = ("fpn", "unet")
#: Direct cellularity models and their heads (``cellnet.models.cellularity``).
ARCHS: tuple[str, ...] = ("resnet34", "resnet50", "xception")
HEADS: tuple[str, ...] = ("regression", "classification")
#: Output activation of the regression head (clipped to [0, 1] only when decoding and serving).
REGRESSION_ACTIVATIONS: tuple[str, ...] = ("linear", "sigmoid")
#: Stain normalisation fitted on a reference and built into the segmenter (``cellnet.models.stain``).
STAIN_NORMS: tuple[str, ...] = ("none", "reinhard", "macenko")
#: Test-time augmentation built into an export (``cellnet.models.tta``): 1, 2 and 8 variants.
TTA_MODES: tuple[str, ...] = ("none", "flips", "d4")
#: Which of a run's models an export serves: ``best.keras`` (the epoch with the best validation
#: loss) or ``last.keras`` (the last epoch; for cascade and GBT runs the two are the same model).
CHECKPOINTS: tuple[str, ...] = ("best", "last")
#: Compute precision of an export (``cellnet.serving.export.with_precision``); I/O stays uint8/float32.
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Suffixes of PyTorch-world ResNet34 files (torchvision ``.pth``, timm ``.safetensors``).
TORCH_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")


def is_torch_weights(path: str | os.PathLike | None) -> bool:
    """A torchvision/timm state dict: it needs ``unit="torchvision"`` and ImageNet input scaling."""
    return path is not None and os.fspath(path).endswith(TORCH_SUFFIXES)
#: Apache Beam runners ``cellnet cohort`` offers (each takes its own options after cellnet's).
BEAM_RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner")
#: ResNet34's residual units per stage (``stage_blocks``; test presets use fewer).
RESNET34_BLOCKS = (3, 4, 6, 3)

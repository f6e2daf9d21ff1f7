"""A training run's configuration: every value that defines it, saved resolved as ``config.json``.

Each task has its own configuration holding only its own fields (``SegmentationConfig``,
``CellularityConfig``, ``CascadeConfig``, ``GBTConfig``) on top of what every run has
(``RunConfig``). The command line fills what the user gave; ``resolve`` fills the rest from the
task's preset (``cellnet.training.presets``: data, not code) and refuses values no run can use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from cellnet.choices import RESNET34_BLOCKS, STAIN_NORMS, is_torch_weights
from cellnet.errors import CellnetError, bad
from cellnet.training.presets import preset

#: Config fields that must be positive (counts, rates, sizes).
POSITIVE = ("epochs", "batch_size", "steps_per_epoch", "lr", "lr_final", "finetune_lr", "width",
            "crop", "disc", "rounds", "learning_rate", "max_depth", "max_leaves")
#: Config fields set by a ``cellnet train`` option, in the order a resume command lists them.
FLAGS = {"preset": "--preset", "decoder": "--decoder", "unit": "--unit", "disc": "--disc",
         "arch": "--arch", "head": "--head", "regression_activation": "--regression-activation",
         "seg": "--seg", "epochs": "--epochs", "batch_size": "--batch-size", "seed": "--seed",
         "init": "--init", "strategy": "--strategy", "precision": "--precision", "jit": "--jit",
         "augment_on": "--augment-on", "on_bad": "--on-bad", "group_by": "--group-by",
         "stain_norm": "--stain-norm", "stain_ref": "--stain-ref", "stain_aug": "--stain-aug", "hed": "--hed", "brightness": "--brightness", "contrast": "--contrast",
         "blur": "--blur", "blur_prob": "--blur-prob", "noise": "--noise", "ema": "--ema",
         "jaccard_weight": "--jaccard-weight"}


def _flag(name: str) -> str:
    return FLAGS.get(name, name)


@dataclass
class RunConfig:
    """What every training run has: data, run folder, preset, and how it runs."""

    data: str
    run: str
    preset: str = "cpu"
    batch_size: int | None = None
    seed: int = 0
    init: str = "random"
    strategy: str = "default"
    precision: str = "float32"
    jit: bool = False
    augment_on: str = "device"
    on_bad: str = "fail"
    #: How ``--data`` prepared on the fly splits validation off (``prepare --group-by``).
    group_by: str | None = None
    progress: bool = True
    task: str = ""

    def resolve(self) -> "RunConfig":
        """Fill every unset field from the task's preset, then refuse values no run can use."""
        for key, value in preset(self.task, self.preset).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()
        return self

    def validate(self) -> None:
        """Counts and rates must be positive (``--epochs 0`` would "complete" with no model)."""
        for name in POSITIVE:
            value = getattr(self, name, None)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CellnetError(f"{_flag(name)}: must be a positive number, got {value}")
        for name in ("finetune_epochs", "seed"):
            value = getattr(self, name, None)
            if value is not None and value < 0:
                raise CellnetError(f"{_flag(name)}: must be 0 or more, got {value}")

    @property
    def init_path(self) -> str | None:
        if self.init == "random":
            return None
        if self.init.startswith("imagenet:"):
            path = Path(self.init.split(":", 1)[1])
            if not path.is_file():
                raise bad(path, "ImageNet weights file not found (--init imagenet:PATH needs a local "
                                "weights file; cellnet never downloads; see README 'ImageNet initialisation')")
            return str(path)
        raise CellnetError(f"--init: expected 'random' or 'imagenet:PATH', got {self.init!r}")


@dataclass
class NetworkConfig(RunConfig):
    """What every neural network's run has on top: its schedule and its ResNet34's shape."""

    epochs: int | None = None
    steps_per_epoch: int | None = None
    lr: float | None = None
    lr_final: float | None = None
    width: float | None = None
    unit: str | None = None
    #: Residual units per stage of the ResNet34s; None is ResNet34's (3, 4, 6, 3). Set by presets
    #: only: the test suite's tiny ones use (1, 1, 1, 1).
    stage_blocks: tuple[int, ...] | None = None
    #: Stain augmentation (``cellnet.data.augment.StainAugment``): ``stain_aug`` turns on its light
    #: defaults; each value set on its own overrides them, 0 disables one op.
    stain_aug: bool | None = None
    hed: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    blur: float | None = None
    blur_prob: float | None = None
    noise: float | None = None
    #: Momentum of the weights' moving average (Polyak averaging) that validation and the saved
    #: models use; 0: the raw weights (``cellnet.training.trainer.adam``).
    ema: float | None = None

    def stain_settings(self) -> dict[str, float] | None:
        """StainAugment fields given by the flags or the preset; None when stain augmentation is off."""
        given = {"hed_scale": self.hed, "hed_shift": self.hed, "brightness": self.brightness,
                 "contrast": self.contrast, "blur_sigma": self.blur, "blur_prob": self.blur_prob,
                 "noise": self.noise}
        given = {k: float(v) for k, v in given.items() if v is not None}
        if not self.stain_aug and not any(given.values()):
            return None
        return {"defaults": bool(self.stain_aug), **given}

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(self.stage_blocks or RESNET34_BLOCKS)

    def validate(self) -> None:
        super().validate()
        if self.ema is not None and not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise CellnetError(f"--ema: must be a momentum in [0, 1) (0: off), got {self.ema}")
        if self.init.startswith("imagenet:") and self.blocks != RESNET34_BLOCKS:
            raise CellnetError(f"--init {self.init}: ImageNet files are ResNet34s; this preset's network has "
                               f"{list(self.blocks)} units per stage, not {list(RESNET34_BLOCKS)}")
        if self.init.startswith("imagenet:") and is_torch_weights(self.init) and self.unit != "torchvision":
            raise CellnetError(f"--init {self.init}: a torchvision/timm ResNet34 file needs --unit torchvision "
                               f"(not {self.unit}): its layers are conv -> BN -> activation")


@dataclass
class SegmentationConfig(NetworkConfig):
    """``cellnet train segmentation``: ResNet34-ELU encoder + FPN or U-Net decoder."""

    task: str = "segmentation"
    decoder: str = "fpn"
    crop: int | None = None
    #: Weak-mask disc diameter (working-resolution px) for data prepared on the fly; None: 15, or
    #: what a prepared ``--data`` was drawn with.
    disc: float | None = None
    #: Stain normalisation built into the segmenter (``cellnet.models.stain``), fitted on
    #: ``stain_ref`` (a folder of images) or, without it, on the training regions.
    stain_norm: str | None = None
    stain_ref: str | None = None
    #: The loss's soft-Jaccard weight a in (1 - a) BCE - a J (paper eq. 3: 0.15).
    jaccard_weight: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.jaccard_weight is not None and not (isinstance(self.jaccard_weight, (int, float))
                                                    and 0 <= self.jaccard_weight <= 1):
            raise CellnetError(f"--jaccard-weight: must be in [0, 1] (the paper's 0.15), got {self.jaccard_weight}")
        if self.stain_norm not in (None, *STAIN_NORMS):
            raise CellnetError(f"--stain-norm: expected one of {', '.join(STAIN_NORMS)}, got {self.stain_norm!r}")
        if self.stain_ref is not None:
            if self.stain_norm in (None, "none"):
                raise CellnetError("--stain-ref: needs --stain-norm reinhard or macenko")
            from cellnet.data.breastpathq import list_images

            if not Path(self.stain_ref).is_dir():
                raise bad(self.stain_ref, "not a folder of reference images (--stain-ref DIR)")
            if not list_images(Path(self.stain_ref)):
                raise bad(self.stain_ref, "holds no .tif/.png/.jpg images to fit --stain-norm on")


@dataclass
class CellularityConfig(NetworkConfig):
    """``cellnet train cellularity``: a direct model (ResNet34 / ResNet50 / Xception)."""

    task: str = "cellularity"
    arch: str = "resnet34"
    head: str = "regression"
    regression_activation: str | None = None
    target: str = "y"


@dataclass
class CascadeConfig(NetworkConfig):
    """``cellnet train cellularity --seg RUN``: the SR cascade on a trained segmenter."""

    task: str = "cascade"
    seg: str | None = None
    finetune_epochs: int | None = None
    finetune_lr: float | None = None
    regression_activation: str | None = None
    target: str = "y"


@dataclass
class GBTConfig(RunConfig):
    """``cellnet train gbt --seg RUN``: XGBoost on 81 features of the segmenter's maps."""

    task: str = "gbt"
    seg: str | None = None
    rounds: int | None = None
    learning_rate: float | None = None
    max_depth: int | None = None
    max_leaves: int | None = None


CONFIGS: dict[str, type[RunConfig]] = {"segmentation": SegmentationConfig, "cellularity": CellularityConfig,
                                       "cascade": CascadeConfig, "gbt": GBTConfig}


def field_names(task: str) -> set[str]:
    return {f.name for f in fields(CONFIGS[task])}


def make_config(task: str, **values) -> RunConfig:
    """The configuration of ``task`` from ``values``; one that does not apply is refused.

    ``None`` means "not given" (the preset decides), so it never counts as not applying.
    """
    if task not in CONFIGS:
        raise CellnetError(f"unknown training task {task!r} (expected one of {', '.join(CONFIGS)})")
    names = field_names(task)
    wrong = sorted(k for k, v in values.items() if k not in names and v is not None)
    if wrong:
        raise CellnetError(f"{_flag(wrong[0])}: does not apply to the {task} task")
    if values.get("head") == "classification" and values.get("regression_activation") is not None:
        raise CellnetError("--regression-activation: does not apply to --head classification (softmax over bins)")
    return CONFIGS[task](**{k: v for k, v in values.items() if k in names and k != "task" and v is not None})

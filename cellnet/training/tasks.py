"""The four training commands: segmentation, direct cellularity, SR cascade, GBT (SPEC 4)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cellnet.choices import is_torch_weights
from cellnet.classes import CELL_CLASSES, CLASSES
from cellnet.data.augment import StainAugment
from cellnet.data.breastpathq import list_images
from cellnet.data.imageio import read_rgb
from cellnet.data.pipeline import (cellularity_dataset, patch_records, region_records, segmentation_dataset,
                                   split_count)
from cellnet.data.records import ensure_prepared
from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_path, write_text, writing
from cellnet.preprocess import IMAGES_SPEC, WORKING_SIZE, downsample, to_model_input
from cellnet.training.config import (CascadeConfig, CellularityConfig, GBTConfig, NetworkConfig, RunConfig,
                                     SegmentationConfig)
from cellnet.training.runs import (RESUMABLE, check_run, copy_atomic, finish_run, load_run_model, open_run,
                                   read_run, require_complete, save_model_atomic, timed, write_run)
from cellnet.training.trainer import AugmentedTrainer, adam, configure_runtime, fit, lr_schedule


def _open(cfg: RunConfig) -> tuple[Path, Path]:
    """(run folder, prepared data): the data is read and checked before the run folder exists,
    so a bad dataset leaves no run behind; a refused ``--run`` is refused before that work."""
    _stain(cfg)  # refuse impossible stain settings before anything is written
    check_run(cfg)
    prepared = ensure_prepared(cfg.data, Path(cfg.run).parent, seed=cfg.seed, on_bad=cfg.on_bad,
                               progress=cfg.progress, diameter=getattr(cfg, "disc", None),
                               group_by=cfg.group_by)
    return open_run(cfg)[0], prepared


#: StainAugment fields and the flags that set them (for error messages).
_STAIN_FLAGS = {"hed_scale": "--hed", "hed_shift": "--hed", "brightness": "--brightness", "contrast": "--contrast",
                "blur_sigma": "--blur", "blur_prob": "--blur-prob", "noise": "--noise"}


def _stain(cfg: RunConfig) -> StainAugment | None:
    """The run's stain augmentation, from ``--stain-aug`` / ``--hed`` ... or the preset; None if off."""
    # StainAugment validates the values (one place); GBT runs have no augmentation at all
    settings = cfg.stain_settings() if isinstance(cfg, NetworkConfig) else None
    if settings is None:
        return None
    base = StainAugment() if settings.pop("defaults") else StainAugment.off()
    try:
        return dataclasses.replace(base, **settings)
    except ValueError as exc:
        field = str(exc).split(":")[0].removeprefix("stain augmentation ")
        raise CellnetError(f"{_STAIN_FLAGS.get(field, field)}: {str(exc).split(': ', 1)[-1]}") from None


def _segmentation_run(seg: str) -> dict:
    """The run.json of the finished segmentation run given as ``--seg``."""
    info = require_complete(seg, "serve as --seg")
    if info.get("kind") != "segmentation":
        raise bad(seg, f"is a {info.get('kind')} run, not a segmentation run (--seg)")
    return info


def _require(prepared: Path, split: str, what: str) -> int:
    n = split_count(prepared, split)
    if n == 0:
        raise bad(prepared, f"has no '{split}' examples to {what}")
    return n


def _fit(trainer: AugmentedTrainer, train_ds, val_ds, cfg: RunConfig, run: Path, epochs: int,
         steps: int, monitor: str, mode: str, prefix: str = "", preview=None) -> None:
    fit(trainer, train_ds, val_ds, run, epochs=epochs, steps=steps, monitor=monitor, mode=mode,
        prefix=prefix, preview=preview, verbose=2 if cfg.progress else 0)


# ----------------------------------------------------------------------------- segmentation

#: The fitted stain normalisation of a run (method, params, what it was fitted on).
STAIN_FILE = "stain.json"
#: Reference images a stain normalisation is fitted on, at most (pixels are pooled).
MAX_STAIN_REFERENCES = 64


def _stain_reference(cfg: SegmentationConfig, prepared: Path) -> tuple[list[np.ndarray], str]:
    """Full-resolution reference images: ``--stain-ref DIR``'s, else the training regions."""
    if cfg.stain_ref:
        files = list_images(Path(cfg.stain_ref))[:MAX_STAIN_REFERENCES]
        return [read_rgb(f) for f in files], str(cfg.stain_ref)
    records = region_records(prepared, "cells_train").take(MAX_STAIN_REFERENCES)
    return [ex["image"].numpy() for ex in records], "training regions"


def _stain_norm(cfg: SegmentationConfig, run: Path, prepared: Path) -> dict | None:
    """``--stain-norm``'s layer config, fitted once at working resolution and kept in the run."""
    from cellnet.models.stain import fit_stain

    if cfg.stain_norm in (None, "none"):
        return None
    path = run / STAIN_FILE
    if path.is_file():  # a resumed run keeps the normalisation it started with
        record = json.loads(path.read_text())
        return {"method": record["method"], "params": record["params"]}
    images, source = _stain_reference(cfg, prepared)
    working = [downsample(tf.constant(image[None]))[0].numpy() for image in images]
    params = fit_stain(cfg.stain_norm, working)
    record = {"method": cfg.stain_norm, "params": params, "reference": source, "images": len(images)}
    write_text(path, json.dumps(record, indent=2), RESUMABLE)
    return {"method": cfg.stain_norm, "params": params}


def train_segmentation(cfg: SegmentationConfig) -> dict:
    from cellnet.training.losses import ClassJaccard, SegmentationLoss
    from cellnet.models import CellSegmenter, ResNet34Backbone, load_backbone_weights

    cfg.resolve()
    if cfg.decoder not in ("fpn", "unet"):
        raise CellnetError(f"--decoder: expected fpn or unet, got {cfg.decoder!r}")
    init_path = cfg.init_path
    run, prepared = _open(cfg)
    n_train = _require(prepared, "cells_train", "train a segmenter on (no cells/ regions?)")
    n_val = split_count(prepared, "cells_val")
    strategy = configure_runtime(cfg)
    stain = _stain(cfg)
    batch = min(cfg.batch_size, n_train)
    steps = cfg.steps_per_epoch or max(1, n_train // batch)
    train_ds = segmentation_dataset(prepared, "cells_train", batch, training=True, seed=cfg.seed,
                                    crop=cfg.crop, augment_on=cfg.augment_on, repeat=True, stain=stain)
    val_ds = (segmentation_dataset(prepared, "cells_val", min(batch, n_val), crop=cfg.crop)
              if n_val else None)
    preview = next(iter((val_ds or train_ds).take(1)))[0][:4]
    if preview.dtype != tf.uint8:
        preview = tf.cast(preview * 255.0, tf.uint8)
    stain_norm = _stain_norm(cfg, run, prepared)
    with strategy.scope():
        backbone = ResNet34Backbone(unit=cfg.unit, width=cfg.width, stage_blocks=cfg.blocks, name="backbone",
                                    input_norm="imagenet" if is_torch_weights(init_path) else "none")
        if init_path:
            load_backbone_weights(backbone, init_path)
        model = CellSegmenter(backbone, decoder=cfg.decoder, stain_norm=stain_norm, name=f"{cfg.decoder}_segmenter")
        trainer = AugmentedTrainer(model, augment=cfg.augment_on == "device", with_mask=True, seed=cfg.seed,
                                   stain=stain)
        trainer.compile(
            optimizer=adam(lr_schedule(cfg.lr, cfg.lr_final, cfg.epochs * steps), cfg.ema),
            loss=SegmentationLoss(alpha=cfg.jaccard_weight),
            metrics=[ClassJaccard(CLASSES.index(c), name=f"jaccard_{c}") for c in CELL_CLASSES],
            jit_compile=cfg.jit)
        trainer(tf.zeros([1, cfg.crop, cfg.crop, 3], tf.uint8))
    monitor = "val_loss" if val_ds is not None else "loss"
    with timed(run, "train_seconds"):
        _fit(trainer, train_ds, val_ds, cfg, run, cfg.epochs, steps, monitor, "min", preview=preview)
    return finish_run(run, kind="segmentation", decoder=cfg.decoder, init=cfg.init,
                      params=int(model.count_params()), prepared=str(prepared))


# ----------------------------------------------------------------------------- direct models

def _cellularity_compile(trainer: AugmentedTrainer, head: str, lr, jit: bool, ema: float | None) -> None:
    from cellnet.training.losses import BinnedCrossentropy, CellularityMSE

    loss = BinnedCrossentropy() if head == "classification" else keras.losses.MeanSquaredError()
    trainer.compile(optimizer=adam(lr, ema), loss=loss,
                    metrics=[CellularityMSE(head=head, name="mse")], jit_compile=jit)


def _cellularity_data(cfg: RunConfig, prepared: Path, stain: StainAugment | None):
    n_train = _require(prepared, "train", "train a cellularity model on")
    n_val = split_count(prepared, "val")
    batch = min(cfg.batch_size, n_train)
    steps = cfg.steps_per_epoch or max(1, n_train // batch)
    train_ds = cellularity_dataset(prepared, "train", batch, training=True, seed=cfg.seed,
                                   augment_on=cfg.augment_on, target=cfg.target, repeat=True, stain=stain)
    val_ds = cellularity_dataset(prepared, "val", min(batch, n_val), target=cfg.target) if n_val else None
    return train_ds, val_ds, steps


def train_cellularity(cfg: CellularityConfig | CascadeConfig) -> dict:
    """Direct models (paper 3.4) or, given a ``CascadeConfig`` (``--seg``), the SR cascade (3.2)."""
    if isinstance(cfg, CascadeConfig):
        return train_cascade(cfg)
    from cellnet.models import DirectCellularity

    cfg.resolve()
    if cfg.arch not in ("resnet34", "resnet50", "xception"):
        raise CellnetError(f"--arch: expected resnet34, resnet50 or xception, got {cfg.arch!r}")
    if cfg.head not in ("regression", "classification"):
        raise CellnetError(f"--head: expected regression or classification, got {cfg.head!r}")
    init_path = cfg.init_path
    run, prepared = _open(cfg)
    strategy = configure_runtime(cfg)
    stain = _stain(cfg)
    train_ds, val_ds, steps = _cellularity_data(cfg, prepared, stain)
    with strategy.scope():
        model = DirectCellularity(arch=cfg.arch, head=cfg.head, width=cfg.width, unit=cfg.unit,
                                  stage_blocks=cfg.blocks, regression_activation=cfg.regression_activation,
                                  input_norm="imagenet" if is_torch_weights(init_path) else "none",
                                  weights=init_path, name=f"{cfg.arch}_{cfg.head}")
        trainer = AugmentedTrainer(model, augment=cfg.augment_on == "device", seed=cfg.seed, stain=stain)
        _cellularity_compile(trainer, cfg.head, lr_schedule(cfg.lr, cfg.lr_final, cfg.epochs * steps), cfg.jit, cfg.ema)
        trainer(tf.zeros([1, WORKING_SIZE, WORKING_SIZE, 3], tf.uint8))
    monitor = "val_mse" if val_ds is not None else "mse"
    with timed(run, "train_seconds"):
        _fit(trainer, train_ds, val_ds, cfg, run, cfg.epochs, steps, monitor, "min")
    return finish_run(run, kind=cfg.head, arch=cfg.arch, init=cfg.init,
                      params=int(model.count_params()), prepared=str(prepared))


# ----------------------------------------------------------------------------- SR cascade

def train_cascade(cfg: CascadeConfig) -> dict:
    """Frozen segmenter -> ResNet34 regressor (phase ``head``), then end-to-end (``finetune``)."""
    from cellnet.models import SRCascade

    cfg.resolve()
    if not cfg.seg:
        raise CellnetError("the SR cascade needs --seg RUN (a trained segmentation run)")
    _segmentation_run(cfg.seg)
    init_path = cfg.init_path
    run, prepared = _open(cfg)
    info = read_run(run)
    strategy = configure_runtime(cfg)
    stain = _stain(cfg)
    train_ds, val_ds, steps = _cellularity_data(cfg, prepared, stain)
    monitor = "val_mse" if val_ds is not None else "mse"
    with strategy.scope():
        if info.get("head_complete"):
            cascade = load_run_model(run, "head_best")
        else:
            # ImageNet weights take 3 channels: the background map is dropped, as in the paper
            cascade = SRCascade(load_run_model(cfg.seg), width=cfg.width, unit=cfg.unit,
                                stage_blocks=cfg.blocks, regression_activation=cfg.regression_activation,
                                drop_background=init_path is not None, name="sr_cascade")
            if init_path:
                from cellnet.models import load_backbone_weights
                load_backbone_weights(cascade.regressor, init_path)
        trainer = AugmentedTrainer(cascade, augment=cfg.augment_on == "device", seed=cfg.seed,
                                       stain=stain)
    if not info.get("head_complete"):
        with strategy.scope():
            cascade.set_phase("head")
            _cellularity_compile(trainer, "regression", lr_schedule(cfg.lr, cfg.lr_final, cfg.epochs * steps), cfg.jit,
                                 cfg.ema)
            trainer(tf.zeros([1, WORKING_SIZE, WORKING_SIZE, 3], tf.uint8))
        write_run(run, head_trainable_weights=len(cascade.trainable_weights))
        with timed(run, "head_seconds"):
            _fit(trainer, train_ds, val_ds, cfg, run, cfg.epochs, steps, monitor, "min", prefix="head_")
        write_run(run, head_complete=True)
        cascade = load_run_model(run, "head_best")
        with strategy.scope():
            trainer = AugmentedTrainer(cascade, augment=cfg.augment_on == "device", seed=cfg.seed,
                                       stain=stain)
    with strategy.scope():
        cascade.set_phase("finetune")
        _cellularity_compile(trainer, "regression", cfg.finetune_lr, cfg.jit, cfg.ema)
        trainer(tf.zeros([1, WORKING_SIZE, WORKING_SIZE, 3], tf.uint8))
    write_run(run, finetune_trainable_weights=len(cascade.trainable_weights))
    if cfg.finetune_epochs:
        with timed(run, "finetune_seconds"):
            _fit(trainer, train_ds, val_ds, cfg, run, cfg.finetune_epochs, steps, monitor, "min",
                 prefix="finetune_")
        best = "finetune_best" if _best_value(run, "finetune_", monitor) <= _best_value(run, "head_", monitor) else "head_best"
    else:
        best = "head_best"
    copy_atomic(run / f"{best}.keras", run / "best.keras")
    copy_atomic(run / f"{best}.keras", run / "last.keras")
    return finish_run(run, kind="cascade", arch="resnet34", seg=str(cfg.seg), init=cfg.init,
                      best_phase=best.split("_")[0], params=int(cascade.count_params()),
                      prepared=str(prepared))


def _best_value(run: Path, prefix: str, monitor: str) -> float:
    import pandas as pd

    path = run / f"{prefix}history.csv"
    if not path.is_file():
        return float("inf")
    values = pd.read_csv(path).get(monitor)
    return float(values.min()) if values is not None and len(values) else float("inf")


# ----------------------------------------------------------------------------- GBT

def segmenter_features(segmenter: keras.Model, prepared: Path, split: str, batch_size: int = 16):
    """81 features (TF ops) of every patch of a split -> (features [N, 81], y [N], ids)."""
    from cellnet.models.features import extract_features

    @tf.function(input_signature=[IMAGES_SPEC])
    def features(images):
        maps = segmenter(to_model_input(images), training=False)
        return extract_features(tf.cast(maps, tf.float32))

    xs, ys, ids = [], [], []
    for batch in patch_records(prepared, split, batch_size):
        xs.append(features(batch["image"]).numpy())
        ys.append(batch["y"].numpy())
        ids += [f"{s.decode()}_{r.decode()}" for s, r in zip(batch["slide"].numpy(), batch["rid"].numpy())]
    return np.concatenate(xs), np.concatenate(ys), ids


def train_gbt(cfg: GBTConfig) -> dict:
    from cellnet.evaluation import plots
    from cellnet.models.features import FEATURE_NAMES, feature_frame
    from cellnet.models.gbt import GBTCellularity
    from cellnet.training.boosting import dmatrix, feature_importance, fit_booster, save_gbt

    cfg.resolve()
    if not cfg.seg:
        raise CellnetError("cellnet train gbt needs --seg RUN (a trained segmentation run)")
    seg_info = _segmentation_run(cfg.seg)
    run, prepared = _open(cfg)
    configure_runtime(cfg)
    _require(prepared, "train", "train a GBT on")
    segmenter = load_run_model(cfg.seg)
    with timed(run, "feature_seconds"):
        data = {split: segmenter_features(segmenter, prepared, split, cfg.batch_size)
                for split in ("train", "val") if split_count(prepared, split)}
    for split, (x, y, ids) in data.items():
        frame = feature_frame(x)
        frame.insert(0, "id", ids)
        frame.insert(1, "y", y)
        _write_csv(frame, run / f"features_{split}.csv")
    x_val, y_val = data["val"][:2] if "val" in data else (None, None)
    with timed(run, "train_seconds"):
        booster = fit_booster(data["train"][0], data["train"][1], x_val, y_val, seed=cfg.seed,
                              rounds=cfg.rounds, learning_rate=cfg.learning_rate,
                              max_depth=cfg.max_depth, max_leaves=cfg.max_leaves)
    with writing(run / "gbt.json", RESUMABLE):
        save_gbt(booster, run / "gbt.json")
    importance = feature_importance(booster)
    _write_csv(importance, run / "feature_importance.csv")
    with writing(run / "feature_importance.png", RESUMABLE):
        plots.feature_importance(importance, run / "feature_importance.png")
    model = GBTCellularity(segmenter, booster, name="gbt_cellularity")
    save_model_atomic(model, run / "best.keras")
    copy_atomic(run / "best.keras", run / "last.keras")
    metrics = {}
    if x_val is not None:
        metrics["val_mse"] = float(np.mean((booster.predict(dmatrix(x_val)) - y_val) ** 2))
    return finish_run(run, kind="gbt", seg=str(cfg.seg), init=seg_info.get("init", "random"),
                      features=len(FEATURE_NAMES), top_feature=str(importance.iloc[0]["feature"]),
                      prepared=str(prepared), **metrics)


def _write_csv(frame, path: Path) -> None:
    with writing(path, RESUMABLE), atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)

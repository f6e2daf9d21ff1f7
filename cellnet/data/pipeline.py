"""tf.data pipelines over prepared TFRecords (SPEC 2.5).

The pipeline only reads, decodes, downsamples, caches, crops, shuffles and batches (tf.data
always runs on the CPU). It yields uint8 images — a quarter of the bytes of float32 to move to
the accelerator — and the training step augments and scales them there. With
``augment_on="cpu"`` the batch is augmented here instead (float32 in [0, 1]); the benchmark
compares the two.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from cellnet.data.augment import BatchAugment, StainAugment
from cellnet.errors import bad
from cellnet.preprocess import DOWNSAMPLE, WORKING_SIZE, downsample, to_unit_range
from cellnet.data.records import load_manifest

AUTOTUNE = tf.data.AUTOTUNE

PATCH_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "y": tf.io.FixedLenFeature([], tf.float32),
    "truth": tf.io.FixedLenFeature([], tf.float32),
    "slide": tf.io.FixedLenFeature([], tf.string),
    "rid": tf.io.FixedLenFeature([], tf.string),
    "patient": tf.io.FixedLenFeature([], tf.string),
}
REGION_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "name": tf.io.FixedLenFeature([], tf.string),
}


def split_files(prepared: str | os.PathLike, split: str) -> list[str]:
    manifest = load_manifest(prepared)
    if split not in manifest["splits"]:
        raise bad(prepared, f"has no '{split}' split (it has: {', '.join(manifest['splits']) or 'none'})")
    return [str(Path(prepared) / name) for name in manifest["splits"][split]["shards"]]


def split_count(prepared: str | os.PathLike, split: str) -> int:
    return load_manifest(prepared)["splits"].get(split, {}).get("count", 0)


def _records(files: list[str], training: bool, seed: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    return ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                         num_parallel_calls=AUTOTUNE, deterministic=not training or seed is not None)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def decode_patch(serialized: tf.Tensor) -> dict:
    """One patch record -> dict(image uint8 [256,256,3] at working resolution, y, truth, ids)."""
    ex = tf.io.parse_single_example(serialized, PATCH_FEATURES)
    image = tf.io.decode_png(ex.pop("image"), channels=3)
    ex["image"] = _to_uint8(downsample(image, DOWNSAMPLE))
    return ex


def decode_region(serialized: tf.Tensor) -> dict:
    """One region record -> dict(image uint8 [h,w,3] working res, mask uint8 [h,w,4], name)."""
    ex = tf.io.parse_single_example(serialized, REGION_FEATURES)
    image = tf.io.decode_png(ex["image"], channels=3)
    mask = tf.io.decode_png(ex["mask"], channels=4)
    image = _to_uint8(downsample(image, DOWNSAMPLE))
    return {"image": image, "mask": mask, "name": ex["name"]}


def _finish(ds: tf.data.Dataset, batch_size: int, training: bool, augment_on: str, seed: int,
            with_mask: bool, drop_remainder: bool, stain: StainAugment | None = None) -> tf.data.Dataset:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    if training and augment_on == "cpu":
        augment = BatchAugment(seed=seed, **(stain.as_kwargs() if stain else {}))
        if with_mask:
            ds = ds.map(lambda x, m: augment(to_unit_range(x), m, training=True),
                        num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda x, y: (augment(to_unit_range(x), training=True), y),
                        num_parallel_calls=AUTOTUNE)
    elif augment_on not in ("cpu", "device"):
        raise ValueError(f"augment_on must be 'cpu' or 'device', got {augment_on!r}")
    return ds.prefetch(AUTOTUNE)


def _decoded(prepared: str | os.PathLike, split: str, decode, training: bool, seed: int,
             repeat: bool) -> tf.data.Dataset:
    """Records of a split, decoded and cached once; shuffled each epoch when training."""
    ds = _records(split_files(prepared, split), training, seed)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(max(1, split_count(prepared, split)), seed=seed, reshuffle_each_iteration=True)
    return ds.repeat() if repeat else ds


def cellularity_dataset(prepared: str | os.PathLike, split: str, batch_size: int = 16,
                        training: bool = False, seed: int = 0, augment_on: str = "device",
                        target: str = "y", repeat: bool = False,
                        stain: StainAugment | None = None) -> tf.data.Dataset:
    """(image uint8 [B,256,256,3], score float32 [B,1]) batches; whole 512 patch -> x2 -> 256.

    ``target`` is ``"y"`` (the rater's score, what the paper trains on) or ``"truth"``; ``stain``
    adds stain augmentation to the ``augment_on="cpu"`` path (the device path gets it from
    ``AugmentedTrainer``).
    """
    ds = _decoded(prepared, split, decode_patch, training, seed, repeat)
    ds = ds.map(lambda ex: (ex["image"], tf.reshape(ex[target], [1])), num_parallel_calls=AUTOTUNE)
    return _finish(ds, batch_size, training, augment_on, seed, with_mask=False, drop_remainder=training,
                   stain=stain)


def patch_records(prepared: str | os.PathLike, split: str, batch_size: int = 16) -> tf.data.Dataset:
    """Unshuffled patch dicts (image, y, truth, slide, rid, patient) for evaluation."""
    ds = _records(split_files(prepared, split), training=False, seed=0)
    return ds.map(decode_patch, num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(AUTOTUNE)


def split_mean(prepared: str | os.PathLike, split: str = "train", target: str = "y") -> float:
    """Mean cellularity score of a split (the baseline, and where a linear head starts)."""
    values = [float(v) for batch in patch_records(prepared, split, 64) for v in batch[target].numpy()]
    return float(np.mean(values))


def _pad_to(image: tf.Tensor, mask: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Pad a region smaller than the crop: image with white (glass), mask with background."""
    shape = tf.shape(image)
    ph, pw = tf.maximum(size - shape[0], 0), tf.maximum(size - shape[1], 0)
    paddings = [[ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]]
    image = tf.pad(image, paddings, constant_values=255)
    background = tf.pad(mask[..., 3:], paddings, constant_values=1)
    cells = tf.pad(mask[..., :3], paddings, constant_values=0)
    return image, tf.concat([cells, background], axis=-1)


def segmentation_dataset(prepared: str | os.PathLike, split: str = "cells_train", batch_size: int = 8,
                         training: bool = False, seed: int = 0, crop: int = WORKING_SIZE,
                         augment_on: str = "device", repeat: bool = False,
                         stain: StainAugment | None = None) -> tf.data.Dataset:
    """(image uint8 [B,crop,crop,3], mask float32 [B,crop,crop,4]) from the cell regions.

    Training draws a random ``crop`` (paper: 256) per region per epoch; evaluation takes the
    centre crop so scores are comparable between epochs.
    """
    ds = _decoded(prepared, split, decode_region, training, seed, repeat)

    def crop_fn(ex):
        image, mask = _pad_to(ex["image"], ex["mask"], crop)
        both = tf.concat([image, mask], axis=-1)
        if training:
            both = tf.image.random_crop(both, [crop, crop, 7], seed=seed)
        else:
            both = tf.image.resize_with_crop_or_pad(both, crop, crop)
        return both[..., :3], tf.cast(both[..., 3:], tf.float32)

    ds = ds.map(crop_fn, num_parallel_calls=AUTOTUNE)
    return _finish(ds, batch_size, training, augment_on, seed, with_mask=True, drop_remainder=training,
                   stain=stain)


def region_records(prepared: str | os.PathLike, split: str = "cells_val") -> tf.data.Dataset:
    """Whole regions (image uint8 [h,w,3], mask [h,w,4], name), one at a time, for evaluation."""
    ds = _records(split_files(prepared, split), training=False, seed=0)
    return ds.map(decode_region, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

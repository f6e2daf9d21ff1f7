"""The evaluation engine: a trained Keras model applied over a prepared split.

Patches and regions come from the TFRecords at working resolution (uint8) and go through the
shared pixel path (``cellnet.preprocess``), as in the training step and the exported graph.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from cellnet.data.pipeline import patch_records, region_records, split_count
from cellnet.models.tta import Averaged, Member
from cellnet.preprocess import IMAGES_SPEC, pad_to_multiple, to_model_input


def predict_patches(model, kind: str, prepared: Path, split: str, batch_size: int = 16,
                    progress: bool = True, tta: str = "none") -> pd.DataFrame:
    """Cellularity of every patch of a split (working-resolution uint8 -> [-1, 1] -> model)."""
    return predict_averaged(Averaged([Member(model, kind)], tta), prepared, split, batch_size, progress)


def predict_averaged(averaged: Averaged, prepared: Path, split: str, batch_size: int = 16,
                     progress: bool = True) -> pd.DataFrame:
    """Cellularity of every patch of a split from one model or an ensemble, with or without TTA.

    The outputs are the export's own (``cellnet.models.tta.Averaged``): ``p`` is clipped to
    [0, 1] as served (``clip_score``), so evaluation scores what users get from a linear head or
    the GBT's tree sums; ``low``/``high`` (80% interval) come with classification heads,
    ``cellularity_std`` with TTA or an ensemble, ``member<i>_cellularity`` with an ensemble.
    """
    @tf.function(input_signature=[IMAGES_SPEC])
    def run(images):
        out = averaged(to_model_input(images))
        out.pop("masks", None)
        out.pop("class_probs", None)
        return out

    rows = []
    total = split_count(prepared, split)
    with tqdm(total=total, desc=f"predict {split}", unit="patch", disable=not progress) as bar:
        for batch in patch_records(prepared, split, batch_size):
            out = {k: v.numpy() for k, v in run(batch["image"]).items()}
            for i in range(len(out["cellularity"])):
                row = {"slide": batch["slide"][i].numpy().decode(), "rid": batch["rid"][i].numpy().decode(),
                       "patient": batch["patient"][i].numpy().decode(),
                       "y_true": float(batch["y"][i]), "truth": float(batch["truth"][i]),
                       "p": float(out["cellularity"][i])}
                if "interval" in out:
                    row.update(low=float(out["interval"][i, 0]), high=float(out["interval"][i, 1]))
                row.update({k: float(v[i]) for k, v in out.items() if k not in ("cellularity", "interval")})
                rows.append(row)
            bar.update(len(out["cellularity"]))
    return pd.DataFrame(rows)


def segment_regions(model, prepared: Path, split: str = "cells_val", progress: bool = True):
    """Whole-region predictions: yields (image uint8 [h,w,3], mask [h,w,4], maps [h,w,4], name)."""
    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def run(image):
        x = to_model_input(image[None])
        padded, size = pad_to_multiple(x, value=1.0)
        maps = tf.cast(model(padded, training=False), tf.float32)
        return maps[0, : size[0], : size[1]]

    for ex in tqdm(region_records(prepared, split), total=split_count(prepared, split),
                   desc=f"segment {split}", unit="region", disable=not progress):
        yield ex["image"].numpy(), ex["mask"].numpy(), run(ex["image"]).numpy(), ex["name"].numpy().decode()

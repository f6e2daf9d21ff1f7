import numpy as np
import tensorflow as tf

from cellnet.data.pipeline import cellularity_dataset, patch_records, region_records, segmentation_dataset


def test_cellularity_batch(tiny_prepared):
    x, y = next(iter(cellularity_dataset(tiny_prepared, "train", batch_size=4, training=True)))
    assert x.shape == (4, 256, 256, 3) and x.dtype == tf.uint8
    assert y.shape == (4, 1) and y.dtype == tf.float32
    assert np.all((y.numpy() >= 0) & (y.numpy() <= 1))


def test_cellularity_batch_cpu_augmented_is_unit_float(tiny_prepared):
    x, _ = next(iter(cellularity_dataset(tiny_prepared, "train", batch_size=2, training=True, augment_on="cpu")))
    assert x.dtype == tf.float32 and 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


def test_labels_follow_the_images(tiny_prepared):
    # the hand-made layout darkens patches with the label: the pipeline must keep the pairing
    xs, ys = [], []
    for x, y in cellularity_dataset(tiny_prepared, "train", batch_size=2, training=True):
        xs += list(x.numpy().mean(axis=(1, 2, 3)))
        ys += list(y.numpy()[:, 0])
    assert np.corrcoef(xs, ys)[0, 1] < -0.95


def test_segmentation_batch(tiny_prepared):
    x, m = next(iter(segmentation_dataset(tiny_prepared, "cells_train", batch_size=2, training=True, crop=128)))
    assert x.shape == (2, 128, 128, 3) and x.dtype == tf.uint8
    assert m.shape == (2, 128, 128, 4) and m.dtype == tf.float32
    values = np.unique(m.numpy())
    assert set(values) <= {0.0, 1.0}
    assert np.all(m.numpy()[..., :3].max(-1) + m.numpy()[..., 3] == 1)


def test_small_regions_are_padded_to_the_crop(tiny_prepared):
    x, m = next(iter(segmentation_dataset(tiny_prepared, "cells_val", batch_size=1, crop=288)))
    assert x.shape == (1, 288, 288, 3) and m.shape == (1, 288, 288, 4)
    assert x.numpy()[0, 0, 0].tolist() == [255, 255, 255] and m.numpy()[0, 0, 0].tolist() == [0, 0, 0, 1]


def test_eval_records_keep_ids(tiny_prepared):
    batch = next(iter(patch_records(tiny_prepared, "eval", batch_size=8)))
    assert batch["image"].shape[1:] == (256, 256, 3)
    assert all(s.decode() == "1003" for s in batch["slide"].numpy())
    region = next(iter(region_records(tiny_prepared, "cells_val")))
    assert region["image"].shape[-1] == 3 and region["mask"].shape[-1] == 4
    assert region["image"].shape[:2] == region["mask"].shape[:2]

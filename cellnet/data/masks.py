"""Weak masks from point annotations (SPEC 2.3, paper section 4.1).

A mask lives at the working resolution (full resolution / ``downsample``): a filled disc of
``diameter`` px at every point, one channel per class; background is the pixels no disc covers.
Overlapping discs of different classes both stay set: the loss is per-channel binary, as in
the paper, so a pixel may belong to two classes.
"""
from __future__ import annotations

import cv2
import numpy as np

from cellnet.classes import BACKGROUND, CLASSES
from cellnet.preprocess import DOWNSAMPLE

DISC_DIAMETER = 15


def points_to_mask(points_xy: np.ndarray, labels: np.ndarray, full_shape: tuple[int, int],
                   diameter: float = DISC_DIAMETER, downsample: int = DOWNSAMPLE) -> np.ndarray:
    """Render a uint8 {0,1} mask [h, w, 4] at working resolution from full-resolution points.

    ``full_shape`` is the (H, W) of the full-resolution image; the mask has the shape of its x2
    downsampling (ceil division, matching ``tf.image.resize`` of the pipeline).
    """
    h = -(-full_shape[0] // downsample)
    w = -(-full_shape[1] // downsample)
    mask = np.zeros((len(CLASSES), h, w), np.uint8)
    # cv2 draws on an integer grid: use 4 bits of sub-pixel precision so centres keep their
    # fractional position; the radius is in working-resolution pixels.
    shift = 4
    radius = int(round(diameter / 2 * (1 << shift)))
    for (x, y), label in zip(np.asarray(points_xy, np.float64), np.asarray(labels)):
        cx = int(round((x + 0.5) / downsample * (1 << shift) - 0.5 * (1 << shift)))
        cy = int(round((y + 0.5) / downsample * (1 << shift) - 0.5 * (1 << shift)))
        cv2.circle(mask[int(label)], (cx, cy), radius, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)
    mask[BACKGROUND] = 1 - mask[:BACKGROUND].max(axis=0)
    return np.ascontiguousarray(mask.transpose(1, 2, 0))

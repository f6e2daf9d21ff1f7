"""Point detection: peaks of a class map matched one-to-one to annotated cell centres.

A *peak* is a pixel of the class map above :data:`PEAK_THRESHOLD` (0.5, the segmentation
threshold) that equals the maximum of its :data:`PEAK_WINDOW` x :data:`PEAK_WINDOW`
neighbourhood (3 working-resolution px = 3 um either side, at 0.5 um/px full resolution):
less than a nucleus's radius, so touching nuclei keep a peak each, yet wider than a map's
pixel noise. Pixels of one flat top (a plateau, as in a binary mask) are one peak, at their centroid.

Peaks and points are matched one-to-one (Hungarian, :func:`scipy.optimize.linear_sum_assignment`)
within :data:`MATCH_RADIUS` (6 working px = 12 full-res px = 6 um, distance <= radius): about the
radius of a tumour nucleus and inside the 15-px training disc (radius 7.5) of the point, so a
matched peak lies on the annotated cell. The matching has the most pairs possible, and among
those the smallest total distance; each point and each peak counts once, so two peaks on one
cell are one true positive and one false positive.

All coordinates here are (x, y) at working resolution, pixel centres at integers, as
:func:`cellnet.data.masks.points_to_mask` draws its discs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from cellnet.preprocess import DOWNSAMPLE

PEAK_THRESHOLD = 0.5
PEAK_WINDOW = 7
MATCH_RADIUS = 6.0


def to_working(points_xy: np.ndarray, downsample: int = DOWNSAMPLE) -> np.ndarray:
    """Full-resolution (x, y) -> working resolution, the disc centres of ``points_to_mask``."""
    return (np.asarray(points_xy, np.float64).reshape(-1, 2) + 0.5) / downsample - 0.5


def to_full(points_xy: np.ndarray, downsample: int = DOWNSAMPLE) -> np.ndarray:
    """Working-resolution (x, y) -> full resolution (the inverse of :func:`to_working`)."""
    return (np.asarray(points_xy, np.float64).reshape(-1, 2) + 0.5) * downsample - 0.5


def find_peaks(class_map: np.ndarray, threshold: float = PEAK_THRESHOLD,
               window: int = PEAK_WINDOW) -> np.ndarray:
    """(x, y) [K, 2] of the local maxima of an [h, w] map above ``threshold``; one per plateau.

    Two neighbouring maxima of a window of 3 or more are equal, so the connected groups of
    maxima are exactly the plateaus.
    """
    class_map = np.asarray(class_map, np.float32)
    peaks = (class_map > threshold) & (class_map == ndimage.maximum_filter(class_map, size=window))
    labels, count = ndimage.label(peaks, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros((0, 2))
    rows_cols = np.asarray(ndimage.center_of_mass(peaks, labels, range(1, count + 1)))
    return rows_cols[:, ::-1].copy()


@dataclass(frozen=True)
class Detection:
    """Counts of one class over one region or a set; they add up across regions."""

    tp: int = 0
    predicted: int = 0
    annotated: int = 0

    def __add__(self, other: "Detection") -> "Detection":
        return Detection(self.tp + other.tp, self.predicted + other.predicted, self.annotated + other.annotated)

    @property
    def precision(self) -> float:
        """NaN without predictions (nothing to be precise about)."""
        return self.tp / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        """NaN without annotated points (nothing to find)."""
        return self.tp / self.annotated if self.annotated else float("nan")

    @property
    def f1(self) -> float:
        """2 TP / (predicted + annotated): 0 when only one side is empty, NaN when both are."""
        total = self.predicted + self.annotated
        return 2 * self.tp / total if total else float("nan")


def match_points(peaks: np.ndarray, points: np.ndarray,
                 radius: float = MATCH_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Matched (peak index, point index) pairs, one-to-one, each within ``radius`` (inclusive).

    Pairs farther than ``radius`` cost more than any set of real distances could, so the
    assignment first maximises the number of pairs within the radius, then minimises their
    total distance. Only peaks and points with a partner within reach enter the assignment.
    """
    peaks = np.asarray(peaks, np.float64).reshape(-1, 2)
    points = np.asarray(points, np.float64).reshape(-1, 2)
    none = np.zeros(0, np.int64)
    if len(peaks) == 0 or len(points) == 0:
        return none, none
    pairs = cKDTree(peaks).sparse_distance_matrix(cKDTree(points), radius, output_type="ndarray")
    if len(pairs) == 0:
        return none, none
    rows, i = np.unique(pairs["i"], return_inverse=True)
    cols, j = np.unique(pairs["j"], return_inverse=True)
    cost = np.full((len(rows), len(cols)), radius * (min(len(rows), len(cols)) + 1) + 1.0)
    cost[i, j] = pairs["v"]
    r, c = linear_sum_assignment(cost)
    kept = cost[r, c] <= radius
    return rows[r[kept]], cols[c[kept]]


def detect(class_map: np.ndarray, points: np.ndarray,
           radius: float = MATCH_RADIUS) -> tuple[Detection, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of ``class_map`` scored against ``points`` (working-resolution (x, y)).

    Returns the counts, the peaks, and the indices of matched peaks and of matched points.
    """
    peaks = find_peaks(class_map)
    matched_peaks, matched_points = match_points(peaks, points, radius)
    counts = Detection(len(matched_peaks), len(peaks), len(np.asarray(points).reshape(-1, 2)))
    return counts, peaks, matched_peaks, matched_points

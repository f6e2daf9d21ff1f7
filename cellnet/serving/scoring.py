"""``cellnet evaluate --data DIR --model SAVEDMODEL --out OUT``: a segmenter on any cells folder.

``DIR`` is a folder ``cellnet import`` writes (or any BreastPathQ-layout folder): its
``cells/`` regions, read by :func:`cellnet.data.breastpathq.read_regions`, are all scored,
whatever ``split.csv`` says. Each whole region goes through the SavedModel's
``serving_default`` signature on its own, at full resolution, as a server would receive it;
the signature pads to a multiple of 32 and crops back to ``ceil(H/2) x ceil(W/2)``, the shape
:func:`cellnet.data.masks.points_to_mask` draws the truth at, so odd sizes need nothing here.
(``cellnet evaluate --runs`` pads the same way, but feeds the Keras model the prepared records'
working-resolution images, rounded to uint8 after the downsampling; the served graph keeps
floats, so the two may differ in a few pixels.)

The truth is training's: 15-px discs at working resolution, points outside their image dropped
(with a warning), as ``cellnet prepare`` does. ``OUT/segmentation_metrics.csv`` has a row
``all`` for the set and one per region:

* ``jaccard_<class>``: intersection / union of truth > 0.5 and prediction > 0.5 (summed over
  the set in ``all``), ``jaccard_mean`` over the cell classes; ``jaccard_image_<class>`` and
  ``jaccard_image_weighted`` (1, 1, 4, 0): the per-image measure
  (:func:`cellnet.evaluation.metrics.jaccard_per_image_from_counts`);
* ``precision_/recall_/f1_<class>``: peaks of the class map matched to its annotated points
  (:mod:`cellnet.evaluation.points`: 7x7 local maxima above 0.5, one-to-one within 6
  working px), from counts summed over the set in ``all``;
* the counts behind them: ``intersection_``, ``union_``, ``tp_``, ``predicted_``, ``annotated_<class>``.

An undefined score is empty (NaN), never 0 or 1: Jaccard with an empty union, precision
without peaks, recall without points, F1 when there are neither. ``OUT/overlays/`` holds the
first regions as image | truth discs | predicted masks (> 0.5) with the matching drawn on the
last panel; ``OUT/evaluation.json`` the settings and the ``all`` row.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cellnet.classes import CELL_CLASSES, CLASSES
from cellnet.data.breastpathq import Region, read_regions
from cellnet.data.imageio import read_rgb, write_image
from cellnet.data.masks import DISC_DIAMETER, points_to_mask
from cellnet.errors import Problems, bad
from cellnet.evaluation import metrics
from cellnet.evaluation.plots import overlay_rgb
from cellnet.evaluation.points import (MATCH_RADIUS, PEAK_THRESHOLD, PEAK_WINDOW, Detection, detect,
                                       to_full, to_working)
from cellnet.files import atomic_dir, writing
from cellnet.preprocess import DOWNSAMPLE
from cellnet.serving.predict import ServedModel, load_served

THRESHOLD = 0.5
OVERLAYS = 4
CSV_NAME = "segmentation_metrics.csv"
#: Overlay markers (RGB): matched point, missed point, peak matched to no point.
MATCHED, MISSED, FALSE_PEAK = (255, 255, 255), (255, 230, 0), (0, 230, 230)


@dataclass
class Scored:
    """One region's counts: pixels per channel (all four) and detections per cell class."""

    name: str
    case: str
    size: tuple[int, int]  # full-resolution (H, W)
    intersection: np.ndarray
    union: np.ndarray
    detections: list[Detection]


# ----------------------------------------------------------------------------- inputs

def cells_root(data: str | os.PathLike) -> Path:
    """The folder holding ``cells/``: ``DIR`` itself, or its parent when ``DIR`` is ``cells/``."""
    data = Path(data)
    if not data.is_dir():
        raise bad(data, "no such folder (expected a folder written by `cellnet import`, holding cells/)")
    if (data / "cells").is_dir():
        return data
    if data.name == "cells":
        return data.parent
    raise bad(data, "has no cells/ folder of <case>_Region <M>_crop.tif and _key.xml regions "
                    "(write one with `cellnet import`)")


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or holds anything: evaluate never overwrites."""
    if out.exists() and not out.is_dir():
        raise bad(out, "is a file; expected a new folder for the evaluation")
    if out.is_dir() and any(out.iterdir()):
        raise bad(out, "exists and is not empty; choose a new --out (nothing was overwritten)")


def segmenter(model_dir: str | os.PathLike) -> ServedModel:
    model = load_served(model_dir)
    if not model.has_masks:
        raise bad(model.path, f"is a {model.kind} model without masks; evaluate --model scores segmenters")
    return model


def region_points(region: Region, size: tuple[int, int], problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """The points inside the image, as ``cellnet prepare`` keeps them for training."""
    x, y = region.points[:, 0], region.points[:, 1]
    inside = (x >= 0) & (x < size[1]) & (y >= 0) & (y < size[0])
    if not inside.all():
        problems.warn("points outside their image dropped", int((~inside).sum()), path=region.xml_path)
    return region.points[inside], region.labels[inside]


def served_masks(model: ServedModel, image: np.ndarray, region: Region) -> np.ndarray:
    """The model's [h, w, 4] masks of one whole region at working resolution."""
    if model.patch_size is not None and image.shape[:2] != (model.patch_size,) * 2:
        patch = model.patch_size
        raise bad(region.image_path, f"is {image.shape[1]}x{image.shape[0]} px; this {model.kind} model takes "
                                     f"{patch}x{patch} patches only (score its segmenter's export)")
    masks = model.run(image[None], region.image_path)["masks"]
    expected = (1, -(-image.shape[0] // DOWNSAMPLE), -(-image.shape[1] // DOWNSAMPLE), len(CLASSES))
    if masks.shape != expected:
        raise bad(model.path, f"returned masks of shape {list(masks.shape)} for {region.image_path.name} "
                              f"({image.shape[1]}x{image.shape[0]} px); expected {list(expected)}")
    return masks[0]


# ----------------------------------------------------------------------------- scores

def score_region(region: Region, size: tuple[int, int], truth: np.ndarray, masks: np.ndarray,
                 points: np.ndarray, labels: np.ndarray) -> tuple[Scored, list[tuple]]:
    """Pixel counts and detections of one region; also each class's matching (for overlays)."""
    intersection, union = metrics.jaccard_counts(truth, masks, THRESHOLD)
    detections, matchings = [], []
    for index in range(len(CELL_CLASSES)):
        mine = to_working(points[labels == index])
        counts, peaks, matched_peaks, matched_points = detect(masks[..., index], mine)
        detections.append(counts)
        matchings.append((mine, peaks, matched_peaks, matched_points))
    return Scored(region.name, region.case, size, intersection, union, detections), matchings


def metric_row(name: str, case: str, size: tuple[int, int] | None, intersection: np.ndarray,
               union: np.ndarray, detections: list[Detection]) -> dict:
    """One CSV row from [R, 4] pixel counts (R regions) and per-class detection counts."""
    total_i, total_u = intersection.sum(axis=0), union.sum(axis=0)
    jaccard = metrics.jaccard_from_counts(total_i, total_u)
    per_image = metrics.jaccard_per_image_from_counts(intersection, union)
    row = {"region": name, "case": case, "height": size[0] if size else "", "width": size[1] if size else ""}
    row.update({f"jaccard_{c}": jaccard[c] for c in CELL_CLASSES})
    row["jaccard_mean"] = jaccard["mean"]
    row.update({f"jaccard_image_{c}": per_image[c] for c in CELL_CLASSES})
    row["jaccard_image_weighted"] = per_image["weighted"]
    for score in ("precision", "recall", "f1"):
        row.update({f"{score}_{c}": getattr(d, score) for c, d in zip(CELL_CLASSES, detections)})
    for i, c in enumerate(CELL_CLASSES):
        row.update({f"intersection_{c}": int(total_i[i]), f"union_{c}": int(total_u[i])})
    for count in ("tp", "predicted", "annotated"):
        row.update({f"{count}_{c}": getattr(d, count) for c, d in zip(CELL_CLASSES, detections)})
    return row


def set_row(scored: list[Scored]) -> dict:
    """The ``all`` row: pixel and detection counts summed over every region."""
    detections = [sum((s.detections[i] for s in scored), Detection()) for i in range(len(CELL_CLASSES))]
    return metric_row("all", "", None, np.stack([s.intersection for s in scored]),
                      np.stack([s.union for s in scored]), detections)


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.6f}"
    return str(value)


def _no_nan(summary: dict) -> dict:
    """NaN as null: JSON has no NaN."""
    row = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in summary["all"].items()}
    return {**summary, "all": row}


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(rows[0])
        writer.writerows([_cell(v) for v in row.values()] for row in rows)


# ----------------------------------------------------------------------------- overlays

def _mark(panel: np.ndarray, xy_full: np.ndarray, colour: tuple[int, int, int], marker: int, size: int) -> None:
    for x, y in np.rint(xy_full).astype(int):
        cv2.drawMarker(panel, (int(x), int(y)), colour, marker, size, thickness=max(1, size // 6))


def overlay(image: np.ndarray, truth: np.ndarray, masks: np.ndarray, matchings: list[tuple]) -> np.ndarray:
    """image | truth discs | predicted masks > 0.5, with matched points (cross), missed points
    (diamond) and peaks matched to no point (tilted cross)."""
    predicted = overlay_rgb(image, (masks > THRESHOLD).astype(np.float32))
    size = max(5, min(image.shape[:2]) // 40)
    for points, peaks, matched_peaks, matched_points in matchings:
        missed = np.setdiff1d(np.arange(len(points)), matched_points)
        false = np.setdiff1d(np.arange(len(peaks)), matched_peaks)
        _mark(predicted, to_full(points[matched_points]), MATCHED, cv2.MARKER_CROSS, size)
        _mark(predicted, to_full(points[missed]), MISSED, cv2.MARKER_DIAMOND, size)
        _mark(predicted, to_full(peaks[false]), FALSE_PEAK, cv2.MARKER_TILTED_CROSS, size)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, overlay_rgb(image, truth.astype(np.float32)), gap, predicted], axis=1)


# ----------------------------------------------------------------------------- the command

def settings(data: Path, model: ServedModel, regions: int) -> dict:
    return {"data": str(data), "model": str(model.path), "regions": regions, "threshold": THRESHOLD,
            "disc_diameter": DISC_DIAMETER, "peak_threshold": PEAK_THRESHOLD, "peak_window": PEAK_WINDOW,
            "match_radius": MATCH_RADIUS, "units": "working-resolution px (full resolution / 2)",
            "overlay_markers": {"cross": "matched point", "diamond": "missed point", "tilted cross": "false peak"}}


def evaluate_folder(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
                    progress: bool = True) -> dict:
    """Score a segmenting SavedModel on every region of a cells folder; write ``out`` atomically.

    Returns the settings, the ``all`` row and the output paths.
    """
    out = Path(out)
    check_out(out)
    root = cells_root(data)
    problems = Problems("fail")
    regions = read_regions(root, problems)
    if not regions:
        raise bad(root / "cells", "holds no regions (<case>_Region <M>_crop.tif with a _key.xml)")
    served = segmenter(model)
    scored: list[Scored] = []
    with writing(out), atomic_dir(out) as tmp:
        (tmp / "overlays").mkdir()
        for region in tqdm(regions, desc="evaluate", unit="region", disable=not progress):
            image = read_rgb(region.image_path, problems.note)
            size = image.shape[:2]
            points, labels = region_points(region, size, problems)
            truth = points_to_mask(points, labels, size)
            masks = served_masks(served, image, region)
            result, matchings = score_region(region, size, truth, masks, points, labels)
            scored.append(result)
            if len(scored) <= OVERLAYS:
                write_image(tmp / "overlays" / f"{region.name.replace(' ', '_')}.png",
                            overlay(image, truth, masks, matchings))
        rows = [set_row(scored)] + [metric_row(s.name, s.case, s.size, s.intersection[None], s.union[None],
                                               s.detections) for s in scored]
        write_rows(tmp / CSV_NAME, rows)
        summary = {**settings(root, served, len(scored)), "all": rows[0]}
        (tmp / "evaluation.json").write_text(json.dumps(_no_nan(summary), indent=2))
    problems.emit_warnings()
    return {**summary, "csv": str(out / CSV_NAME), "overlays": min(len(scored), OVERLAYS)}

"""``evaluate_folder``: a segmenting SavedModel scored on a cells folder (pixels and points).

Point matching on hand-made cases; a tiny exported ``CellSegmenter`` checked against NumPy
counts of its own served masks; "oracle" SavedModels (a ``tf.Module`` with the serving
signature that returns each region's truth) that must score 1; refusals as one line.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial import cKDTree

from cellnet.classes import CELL_CLASSES
from cellnet.data.breastpathq import read_regions, region_file_stem, write_key_xml
from cellnet.data.imageio import read_rgb, write_image
from cellnet.data.masks import DISC_DIAMETER, points_to_mask
from cellnet.errors import CellnetError, Problems
from cellnet.serving.scoring import CSV_NAME, evaluate_folder
from cellnet.evaluation.points import MATCH_RADIUS, Detection, detect, find_peaks, match_points, to_working
from cellnet.models import CellSegmenter, ResNet34Backbone
from cellnet.preprocess import IMAGES_SPEC
from cellnet.serving.export import METADATA_FILE, export_model
from cellnet.serving.predict import load_served
from conftest import REAL, TINY_BLOCKS, calibrate

ONE = 1 - 1e-6


# ----------------------------------------------------------------------------- helpers

def write_folder(root: Path, regions: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """``root/cells/`` with one ``<case>_Region 1`` per (image, points (x, y) full-res, labels)."""
    for case, (image, points, labels) in enumerate(regions, 1):
        stem = region_file_stem(str(case), 1)
        write_image(root / "cells" / f"{stem}_crop.tif", image)
        write_key_xml(root / "cells" / f"{stem}_key.xml", points, labels)
    return root


def spaced_points(rng: np.random.Generator, height: int, width: int, spacing: int = 24) -> np.ndarray:
    """Jittered grid points (x, y) at least ``spacing - 8`` full-res px apart."""
    ys, xs = np.mgrid[spacing // 2:height - 4:spacing, spacing // 2:width - 4:spacing]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    return grid + rng.uniform(-4, 4, grid.shape).astype(np.float32)


def inside(points: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    keep = (points[:, 0] >= 0) & (points[:, 0] < shape[1]) & (points[:, 1] >= 0) & (points[:, 1] < shape[0])
    return points[keep], labels[keep]


def cone_truth(points: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The truth discs, each cell channel shaped as a cone (1 at the point, >= 0.6 inside).

    Above 0.5 it is exactly ``points_to_mask``; the cones give touching discs a peak each.
    """
    truth = points_to_mask(points, labels, shape).astype(np.float32)
    h, w = truth.shape[:2]
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), axis=-1).reshape(-1, 2)
    for c in range(len(CELL_CLASSES)):
        mine = to_working(points[labels == c])
        if len(mine):
            distance = cKDTree(mine).query(grid)[0].reshape(h, w)
            truth[..., c] *= 1 - 0.4 * np.minimum(distance / (DISC_DIAMETER / 2), 1)
    return truth


class Oracle(tf.Module):
    """The serving signature, returning the stored maps of the image with the same pixel sum."""

    def __init__(self, images: list[np.ndarray], maps: list[np.ndarray]):
        super().__init__()
        keys = [int(image.astype(np.int64).sum()) for image in images]
        assert len(set(keys)) == len(keys)
        h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
        stack = np.zeros((len(maps), h, w, 4), np.float32)
        for i, m in enumerate(maps):
            stack[i, :m.shape[0], :m.shape[1]] = m
        self.keys = tf.constant(keys, tf.int64)
        self.maps = tf.Variable(stack, trainable=False)

    @tf.function(input_signature=[IMAGES_SPEC])
    def serve(self, images):
        def one(image):
            index = tf.argmax(tf.cast(tf.equal(self.keys, tf.reduce_sum(tf.cast(image, tf.int64))), tf.int32),
                              output_type=tf.int32)
            size = (tf.shape(image)[:2] + 1) // 2
            return self.maps[index, :size[0], :size[1]]

        return {"masks": tf.map_fn(one, images, fn_output_signature=tf.float32)}


def save_oracle(path: Path, data: Path) -> Path:
    """An oracle SavedModel for the regions of ``data`` (points as read back from their key XML),
    with a cellnet export description, as ``load_served`` expects."""
    regions = [(read_rgb(r.image_path), r.points, r.labels) for r in read_regions(data, Problems())]
    maps = [cone_truth(*inside(points, labels, image.shape[:2]), image.shape[:2]) for image, points, labels in regions]
    module = Oracle([image for image, _, _ in regions], maps)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve.get_concrete_function()})
    (path / "assets").mkdir(exist_ok=True)
    (path / "assets" / METADATA_FILE).write_text(json.dumps({"kind": "segmentation", "outputs": ["masks"],
                                                             "patch_size": None}))
    return path


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / CSV_NAME).open() as f:
        return {row["region"]: row for row in csv.DictReader(f)}


def number(cell: str) -> float:
    return float(cell) if cell else float("nan")


def one_line(exc: pytest.ExceptionInfo, names: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(names) in message, message


# ----------------------------------------------------------------------------- points

def test_two_peaks_near_one_point_are_one_true_positive():
    peaks, points = np.array([[10.0, 10.0], [12.0, 10.0]]), np.array([[11.0, 10.0]])
    matched_peaks, matched_points = match_points(peaks, points)
    assert len(matched_peaks) == 1 and list(matched_points) == [0]


def test_matching_maximises_pairs_not_greedy_nearest():
    # peak 0 is nearest point 0, but taking that pair would leave peak 1 (near point 0 only) alone
    peaks, points = np.array([[0.0, 0.0], [5.5, 0.0]]), np.array([[1.0, 0.0], [-5.0, 0.0]])
    matched_peaks, matched_points = match_points(peaks, points)
    assert sorted(zip(matched_peaks, matched_points)) == [(0, 1), (1, 0)]


def test_distance_exactly_at_the_radius_matches_and_beyond_does_not():
    assert len(match_points([[0.0, 0.0]], [[MATCH_RADIUS, 0.0]])[0]) == 1
    assert len(match_points([[0.0, 0.0]], [[MATCH_RADIUS + 1e-6, 0.0]])[0]) == 0


def test_no_peaks_or_no_points():
    empty = np.zeros((16, 16), np.float32)
    counts, peaks, _, _ = detect(empty, np.array([[5.0, 5.0]]))
    assert (counts.tp, counts.predicted, counts.annotated) == (0, 0, 1) and len(peaks) == 0
    assert np.isnan(counts.precision) and counts.recall == 0 and counts.f1 == 0
    spot = empty.copy()
    spot[4, 9] = 0.9
    counts, peaks, _, _ = detect(spot, np.zeros((0, 2)))
    assert peaks.tolist() == [[9.0, 4.0]]
    assert counts.precision == 0 and np.isnan(counts.recall) and counts.f1 == 0
    nothing = Detection()
    assert np.isnan(nothing.precision) and np.isnan(nothing.recall) and np.isnan(nothing.f1)


def test_peaks_are_window_maxima_above_threshold_one_per_plateau():
    maps = np.zeros((40, 40), np.float32)
    maps[10:13, 20:24] = 1.0      # a flat top: one peak at its centre
    maps[30, 5], maps[30, 8] = 0.8, 0.7  # 3 px apart: inside one 7x7 window, the lower one is no peak
    maps[2, 2] = 0.5              # not above 0.5
    assert find_peaks(maps).tolist() == [[21.5, 11.0], [5.0, 30.0]]


# ----------------------------------------------------------------------------- evaluate_folder

def synthetic_regions(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three regions (one of odd size) of lymphocytes and malignant cells; no normal cells."""
    rng = np.random.default_rng(seed)
    regions = []
    for height, width in ((96, 128), (101, 75), (64, 64)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        points = spaced_points(rng, height, width)
        labels = rng.integers(1, 3, len(points)).astype(np.int32)
        regions.append((image, points, labels))
    image, points, labels = regions[0]
    regions[0] = (image, np.vstack([points, [[500.0, 20.0]]]).astype(np.float32), np.append(labels, 2))  # outside
    return regions


@pytest.fixture(scope="module")
def oracle_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    data = write_folder(root / "data", synthetic_regions())
    return data, save_oracle(root / "oracle", data)


def test_oracle_scores_one_and_absent_class_is_empty(oracle_folder, tmp_path, capsys):
    data, model = oracle_folder
    summary = evaluate_folder(data, model, tmp_path / "out", progress=False)
    rows = read_rows(tmp_path / "out")
    assert list(rows) == ["all", "1_Region 1", "2_Region 1", "3_Region 1"]
    for row in rows.values():
        for c in ("lymphocyte", "malignant"):
            for column in (f"jaccard_{c}", f"jaccard_image_{c}", f"precision_{c}", f"recall_{c}", f"f1_{c}"):
                assert number(row[column]) > ONE, (row["region"], column)
        for column in ("jaccard_normal", "jaccard_image_normal", "precision_normal", "recall_normal", "f1_normal"):
            assert row[column] == "", column  # no normal cell annotated nor predicted: NaN, not 0 or 1
        assert number(row["jaccard_image_weighted"]) > ONE
    annotated = sum(int(rows["all"][f"annotated_{c}"]) for c in CELL_CLASSES)
    regions = synthetic_regions()
    assert annotated == sum(len(labels) for _, _, labels in regions) - 1  # the point outside is dropped
    assert "points outside their image dropped" in capsys.readouterr().err
    assert summary["all"]["f1_malignant"] == 1.0 and summary["regions"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == \
        ["1_Region_1.png", "2_Region_1.png", "3_Region_1.png"]
    settings = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert settings["match_radius"] == MATCH_RADIUS and settings["all"]["f1_normal"] is None


@pytest.fixture(scope="module")
def segmenter_folder(tmp_path_factory):
    """A tiny calibrated FPN segmenter exported as a SavedModel, and a folder of three regions."""
    root = tmp_path_factory.mktemp("segmenter")
    regions = synthetic_regions(seed=1)
    keras.utils.set_random_seed(0)
    model = CellSegmenter(ResNet34Backbone(width=0.125, stage_blocks=TINY_BLOCKS), decoder="fpn")
    calibrate(model, np.stack([regions[0][0][:64, :64], regions[2][0]]))
    saved = export_model(model, "segmentation", root / "saved_models" / "tiny" / "1", {})
    return write_folder(root / "data", regions), saved.parent


def test_jaccard_equals_numpy_counts_of_the_served_masks(segmenter_folder, tmp_path):
    data, model = segmenter_folder
    evaluate_folder(data, model, tmp_path / "out", progress=False)
    rows = read_rows(tmp_path / "out")
    served = load_served(model)
    counts = []
    for region in read_regions(data, Problems()):  # the points as the key XML holds them (0.1 px)
        image, points, labels, name = read_rgb(region.image_path), region.points, region.labels, region.name
        masks = served(image[None])["masks"][0]
        truth = points_to_mask(*inside(points, labels, image.shape[:2]), image.shape[:2]) > 0
        assert masks.shape == truth.shape  # odd sizes: ceil(H/2) x ceil(W/2) on both sides
        above = masks > 0.5
        counts.append([((truth & above)[..., c].sum(), (truth | above)[..., c].sum()) for c in range(3)])
        for c, cls in enumerate(CELL_CLASSES):
            i, u = counts[-1][c]
            assert (int(rows[name][f"intersection_{cls}"]), int(rows[name][f"union_{cls}"])) == (i, u)
            assert number(rows[name][f"jaccard_{cls}"]) == pytest.approx(i / u if u else np.nan, abs=1e-6, nan_ok=True)
    counts = np.asarray(counts, np.float64)  # [region, class, (intersection, union)]
    per_image = []
    for c, cls in enumerate(CELL_CLASSES):
        i, u = counts[:, c, 0], counts[:, c, 1]
        assert number(rows["all"][f"jaccard_{cls}"]) == pytest.approx(i.sum() / u.sum(), abs=1e-6)
        per_image.append(np.mean(i[u > 0] / u[u > 0]) if (u > 0).any() else np.nan)
        assert number(rows["all"][f"jaccard_image_{cls}"]) == pytest.approx(per_image[-1], abs=1e-6, nan_ok=True)
    weights = np.array([1.0, 1.0, 4.0])
    scored = ~np.isnan(per_image)
    weighted = np.sum(weights[scored] * np.asarray(per_image)[scored]) / weights[scored].sum()
    assert number(rows["all"]["jaccard_image_weighted"]) == pytest.approx(weighted, abs=1e-6)
    for cls in CELL_CLASSES:  # the set's detection counts are the regions' sums, and F1 follows them
        tp, predicted, annotated = (sum(int(rows[n][f"{k}_{cls}"]) for n in rows if n != "all")
                                    for k in ("tp", "predicted", "annotated"))
        assert [int(rows["all"][f"{k}_{cls}"]) for k in ("tp", "predicted", "annotated")] == [tp, predicted, annotated]
        total = predicted + annotated
        assert number(rows["all"][f"f1_{cls}"]) == pytest.approx(2 * tp / total if total else np.nan, abs=1e-6,
                                                                  nan_ok=True)


def test_out_holding_a_user_file_is_refused_and_untouched(oracle_folder, tmp_path):
    data, model = oracle_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CellnetError) as exc:
        evaluate_folder(data, model, out, progress=False)
    one_line(exc, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_missing_or_invalid_model_is_one_line(oracle_folder, tmp_path):
    data, _ = oracle_folder
    missing = tmp_path / "saved_models" / "nothing"
    with pytest.raises(CellnetError) as exc:
        evaluate_folder(data, missing, tmp_path / "out1", progress=False)
    one_line(exc, missing)
    invalid = tmp_path / "saved_models" / "broken" / "1"
    invalid.mkdir(parents=True)
    (invalid / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(CellnetError) as exc:
        evaluate_folder(data, invalid, tmp_path / "out2", progress=False)
    one_line(exc, invalid)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_folder_without_cells_is_one_line(oracle_folder, tmp_path):
    _, model = oracle_folder
    empty = tmp_path / "patches_only"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(CellnetError) as exc:
        evaluate_folder(empty, model, tmp_path / "out", progress=False)
    one_line(exc, empty)
    assert "cells/" in str(exc.value) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- real tissue

def well_separated(labels_file: Path, full_px: float = 12.0) -> bool:
    """Every two same-class points at least ``full_px`` apart: closer pairs (the set has
    duplicate clicks 1-4 px apart) cannot each be a 7x7 maximum, even of a perfect map."""
    from scipy.spatial.distance import pdist

    rows = np.loadtxt(labels_file, ndmin=2)
    return all(pdist(rows[rows[:, 2] == code, :2]).min(initial=np.inf) >= full_px for code in (1, 2))


@pytest.mark.skipif(not (REAL / "brca-m2c").is_dir(), reason="../shared/real is absent (a fresh clone)")
def test_real_brca_m2c_oracle_scores_f1_one(tmp_path):
    from cellnet.data.importers import import_points

    real = REAL / "brca-m2c"
    labels = [p for p in sorted((real / "labels").glob("*_gt_class_coords.txt")) if well_separated(p)][:3]
    src = tmp_path / "brca"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
    for path in labels:
        shutil.copy(path, src / "labels")
        shutil.copy(real / "images" / f"{path.name[:-len('_gt_class_coords.txt')]}.png", src / "images")
    import_points("brca-m2c", src, tmp_path / "imported")
    model = save_oracle(tmp_path / "oracle", tmp_path / "imported")
    summary = evaluate_folder(tmp_path / "imported", model, tmp_path / "out", progress=False)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 4 and summary["regions"] == 3
    for c in ("lymphocyte", "malignant"):
        assert int(rows["all"][f"annotated_{c}"]) > 0
        assert number(rows["all"][f"f1_{c}"]) == 1.0 and number(rows["all"][f"jaccard_{c}"]) > ONE

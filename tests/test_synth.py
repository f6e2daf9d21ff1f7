"""cellnet.data.synth: a complete, deterministic BreastPathQ-layout dataset whose labels follow its pixels."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.stats import spearmanr
from skimage.color import rgb2hed

from cellnet.data.breastpathq import LABEL_FILES, SPLIT_FOLDERS, read_breastpathq
from cellnet.classes import CELL_CLASSES
from cellnet.errors import CellnetError
from cellnet.data.synth import synthesize


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "bpq"
    return out, synthesize(out, patients=3, seed=0, small=True, progress=False)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def labels(root: Path) -> pd.DataFrame:
    frames = [pd.read_csv(root / LABEL_FILES[split], dtype={"slide": str}).assign(split=split)
              for split in SPLIT_FOLDERS]
    return pd.concat(frames, ignore_index=True)


def test_every_file_of_the_layout_is_written(small_set):
    out, summary = small_set
    for folder in SPLIT_FOLDERS.values():
        images = sorted((out / folder).glob("*_*.tif"))
        assert images, folder
        image = tifffile.imread(images[0])
        assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    for name in (*LABEL_FILES.values(), "patient_ids.csv", "preview.png", "README.txt"):
        assert (out / name).is_file(), name
    crops = sorted((out / "cells").glob("*_Region *_crop.tif"))
    assert len(crops) == summary["regions"] > 0
    assert all(crop.with_name(crop.name.replace("_crop.tif", "_key.xml")).is_file() for crop in crops)
    assert "synthetic" in (out / "README.txt").read_text().lower()
    assert "seed 0" in (out / "README.txt").read_text()


def test_the_reader_loads_it_without_problems(small_set):
    out, summary = small_set
    data = read_breastpathq(out)
    assert data.problems.items == [] and not data.problems.warnings
    for split in SPLIT_FOLDERS:
        assert len(data.split(split)) == summary["splits"][split]["patches"] > 0
        assert len(list((out / SPLIT_FOLDERS[split]).glob("*.tif"))) == summary["splits"][split]["patches"]
    assert len(data.patches) == summary["patches"]
    assert len(data.regions) == summary["regions"]
    assert all(p.truth is not None for p in data.patches)


def test_labels_are_rounded_noisy_truth(small_set):
    out, _ = small_set
    frame = labels(out)
    assert list(frame.columns[:4]) == ["slide", "rid", "y", "truth"]
    assert frame["y"].between(0, 1).all() and frame["truth"].between(0, 1).all()
    assert np.allclose(frame["y"] * 20, np.round(frame["y"] * 20), atol=1e-9)
    assert (frame["y"] - frame["truth"]).abs().max() <= 0.15
    assert frame["truth"].std() > 0.1  # scores spread over the range, not one value


def test_no_patient_is_in_two_split_folders(small_set):
    out, summary = small_set
    patients = pd.read_csv(out / "patient_ids.csv", dtype=str)
    folder_of_slide = {}
    for folder in SPLIT_FOLDERS.values():
        for image in (out / folder).glob("*.tif"):
            folder_of_slide.setdefault(image.stem.rpartition("_")[0], set()).add(folder)
    assert set(folder_of_slide) == set(patients["slide"])
    for _, group in patients.groupby("patient_id"):
        folders = set().union(*(folder_of_slide[s] for s in group["slide"]))
        assert len(folders) == 1
    counted = {split: patients["slide"].isin(
        [s for s, f in folder_of_slide.items() if SPLIT_FOLDERS[split] in f]).sum() for split in SPLIT_FOLDERS}
    assert counted == {split: summary["splits"][split]["slides"] for split in SPLIT_FOLDERS}


def test_region_points_lie_inside_and_cover_all_classes(small_set):
    out, summary = small_set
    data = read_breastpathq(out)
    seen = set()
    for region in data.regions:
        height, width = tifffile.imread(region.image_path).shape[:2]
        assert 450 <= height <= 520 and 450 <= width <= 520
        assert len(region.points) > 0
        assert (region.points >= 0).all()
        assert (region.points[:, 0] < width).all() and (region.points[:, 1] < height).all()
        seen |= set(region.labels.tolist())
    assert seen == set(range(len(CELL_CLASSES)))
    counts = np.bincount(np.concatenate([r.labels for r in data.regions]), minlength=3)
    assert dict(zip(CELL_CLASSES, counts.tolist())) == summary["points"]
    training_patients = set(pd.read_csv(out / "patient_ids.csv", dtype=str).merge(
        pd.DataFrame({"slide": [p.slide for p in data.split("train")]}))["patient_id"])
    assert {r.case for r in data.regions} <= training_patients


def test_truth_follows_the_hematoxylin_in_the_pixels(small_set):
    out, _ = small_set
    frame = labels(out)
    paths = [out / SPLIT_FOLDERS[row.split] / f"{row.slide}_{row.rid}.tif" for row in frame.itertuples()]
    hematoxylin = [rgb2hed(tifffile.imread(path))[..., 0].mean() for path in paths]  # skimage's own deconvolution
    assert spearmanr(frame["truth"], hematoxylin)[0] > 0.5


def test_same_seed_same_bytes_other_seed_other_bytes(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / "again"
    again.mkdir()  # an existing empty folder is fine
    synthesize(again, patients=3, seed=0, small=True, progress=False)
    assert file_hashes(again) == file_hashes(out)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left

    other = tmp_path / "other"
    synthesize(other, patients=3, seed=1, small=True, progress=False)
    first, second = file_hashes(out), file_hashes(other)
    images = [name for name in first if name.endswith(".tif") and name in second]
    assert images and all(second[name] != first[name] for name in images)
    assert read_breastpathq(other).problems.items == []


def test_never_writes_over_a_previous_output(small_set, tmp_path):
    """A previous synth output may hold the user's edits (labels, removed patches): refused."""
    again = tmp_path / "again"
    shutil.copytree(small_set[0], again)
    (again / "train_labels.csv").write_text("slide,rid,y\nedited,1,0.5\n")
    before = file_hashes(again)
    with pytest.raises(CellnetError, match="not empty"):
        synthesize(again, patients=3, seed=1, small=True, progress=False)
    assert file_hashes(again) == before


def test_refuses_foreign_folders_and_bad_arguments(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CellnetError, match="not empty"):
        synthesize(foreign, patients=3, small=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(CellnetError, match="at least 3"):
        synthesize(tmp_path / "two", patients=2, small=True, progress=False)

"""`cellnet import`: every format lands in the BreastPathQ cells layout and reads back exactly."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellnet.data.breastpathq import read_breastpathq
from cellnet.errors import CellnetError
from cellnet.data.imageio import read_rgb, write_image
from cellnet.data.formats import describe_formats
from cellnet.data.importers import FORMATS, import_points, summary_text

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
CHANNEL = {"normal": 0, "lymphocyte": 1, "malignant": 2}  # SPEC 2.3 channel order


def image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def regions_by_case(out: Path) -> dict:
    data = read_breastpathq(out)
    assert not data.problems.items
    return {r.case: r for r in data.regions}


def point_set(points, labels) -> list[tuple[float, float, int]]:
    return sorted((round(float(x), 1), round(float(y), 1), int(c)) for (x, y), c in zip(points, labels))


def one_line_error(call, names: Path) -> str:
    with pytest.raises(CellnetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and str(names) in message
    return message


# ----------------------------------------------------------------------------- BRCA-M2C

def write_brca(root: Path, rows: dict[str, list[tuple[int, int, int]]], size: int = 60) -> Path:
    for i, (stem, stem_rows) in enumerate(rows.items()):
        write_image(root / "images" / f"{stem}.png", image(size, size, i))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}_gt_class_coords.txt").write_text(
            "".join(f"{y} {x} {c}\n" for y, x, c in stem_rows))
    return root


def test_brca_m2c_rows_are_y_x_class_and_stroma_is_counted(tmp_path):
    rows = {"slideA_1": [(5, 40, 1), (50, 3, 2), (20, 20, 3), (7, 9, 2)], "slideB_2": [(1, 2, 3)]}
    src = write_brca(tmp_path / "brca", rows)
    (src / "brca_ds_train.txt").write_text("slideA_1.png\n")
    (src / "brca_ds_val.txt").write_text("slideB_2.png\n\n")
    summary = import_points("brca-m2c", src, tmp_path / "out")
    assert summary["regions"] == 2
    assert summary["points"] == {"normal": 0, "lymphocyte": 1, "malignant": 2}
    assert sum(summary["skipped_points"].values()) == 2
    assert "stromal" in " ".join(summary["skipped_points"])
    regions = regions_by_case(tmp_path / "out")
    assert point_set(regions["slideA_1"].points, regions["slideA_1"].labels) == [
        (3.0, 50.0, CHANNEL["malignant"]), (9.0, 7.0, CHANNEL["malignant"]), (40.0, 5.0, CHANNEL["lymphocyte"])]
    assert len(regions["slideB_2"].points) == 0
    np.testing.assert_array_equal(read_rgb(regions["slideA_1"].image_path), image(60, 60, 0))
    with open(tmp_path / "out" / "cells" / "split.csv") as f:
        assert {r["name"]: r["split"] for r in csv.DictReader(f)} == {
            "slideA_1_Region 1": "train", "slideB_2_Region 1": "val"}
    with open(tmp_path / "out" / "mapping.csv") as f:
        assert [(r["case"], r["region"], r["source_image"]) for r in csv.DictReader(f)] == [
            ("slideA_1", "1", "images/slideA_1.png"), ("slideB_2", "1", "images/slideB_2.png")]
    assert not (tmp_path / "out" / "cells" / "groups.csv").exists()  # no TCGA barcodes, no groups


def read_groups_csv(path: Path) -> dict[str, tuple[str, str]]:
    with open(path) as f:
        return {r["name"]: (r["patient"], r["site"]) for r in csv.DictReader(f)}


TCGA_STEMS = ("TCGA-A7-A0DA-01Z-00-DX1_63501_13001_1000_999_0.9824",
              "TCGA-A7-A0DA-01Z-00-DX2_11501_11001_1000_1000_0.9824", "TCGA-AC-A23C-01Z-00-DX1_1_2_1000_1000_0.93")


def test_brca_m2c_writes_groups_and_imports_without_split_lists(tmp_path):
    src = write_brca(tmp_path / "brca", {stem: [(5 + i, 9, 1 + i % 2)] for i, stem in enumerate(TCGA_STEMS)})
    summary = import_points("brca-m2c", src, tmp_path / "out")
    cells = tmp_path / "out" / "cells"
    assert summary["regions"] == 3 and not (cells / "split.csv").exists()  # prepare splits them by group
    expected = {f"{TCGA_STEMS[0]}_Region 1": ("TCGA-A7-A0DA", "A7"), f"{TCGA_STEMS[1]}_Region 1": ("TCGA-A7-A0DA", "A7"),
                f"{TCGA_STEMS[2]}_Region 1": ("TCGA-AC-A23C", "AC")}
    assert read_groups_csv(cells / "groups.csv") == expected
    assert {r.name: (r.patient, r.site) for r in read_breastpathq(tmp_path / "out").regions} == expected

    import_points("breastpathq", tmp_path / "out", tmp_path / "again")  # a re-import keeps them
    assert read_groups_csv(tmp_path / "again" / "cells" / "groups.csv") == expected
    existing = tmp_path / "third" / "cells" / "groups.csv"
    existing.parent.mkdir(parents=True)
    existing.write_text("mine")
    assert "already exists" in one_line_error(lambda: import_points("brca-m2c", src, tmp_path / "third"), existing)
    assert existing.read_text() == "mine"


def test_brca_m2c_image_and_label_without_partner(tmp_path):
    src = write_brca(tmp_path / "brca", {"a": [(1, 1, 1)], "b": [(2, 2, 2)]})
    (src / "labels" / "c_gt_class_coords.txt").write_text("3 3 1\n")
    (src / "labels" / "a_gt_class_coords.txt").unlink()
    one_line_error(lambda: import_points("brca-m2c", src, tmp_path / "o1"), src / "images" / "a.png")
    summary = import_points("brca-m2c", src, tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and len(summary["skipped_items"]) == 2
    assert any(str(src / "labels" / "c_gt_class_coords.txt") in item for item in summary["skipped_items"])


def test_brca_m2c_malformed_row(tmp_path):
    src = write_brca(tmp_path / "brca", {"a": [(1, 1, 1)], "b": [(2, 2, 2)]})
    (src / "labels" / "a_gt_class_coords.txt").write_text("1 1 1\n4 x 2\n")
    label = src / "labels" / "a_gt_class_coords.txt"
    assert "line 2" in one_line_error(lambda: import_points("brca-m2c", src, tmp_path / "o1"), label)
    summary = import_points("brca-m2c", src, tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and summary["points"]["malignant"] == 1


@pytest.mark.skipif(not (REAL / "brca-m2c").is_dir(), reason="../shared/real is absent (a fresh clone)")
def test_brca_m2c_real_data(tmp_path):
    real = REAL / "brca-m2c"
    listed = {s: (real / f"brca_ds_{s}.txt").read_text().split() for s in ("train", "val")}
    names = listed["train"][:2] + listed["val"][:1]
    src = tmp_path / "brca"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
    for name in names:
        stem = Path(name).stem
        shutil.copy(real / "images" / name, src / "images" / name)
        shutil.copy(real / "labels" / f"{stem}_gt_class_coords.txt", src / "labels")
    for split in ("train", "val"):
        (src / f"brca_ds_{split}.txt").write_text("".join(f"{n}\n" for n in names if n in listed[split]))

    summary = import_points("brca-m2c", src, tmp_path / "out")
    regions = regions_by_case(tmp_path / "out")
    assert summary["regions"] == len(regions) == 3
    totals = {"lymphocyte": 0, "malignant": 0, "stromal": 0}
    for name in names:
        rows = np.loadtxt(real / "labels" / f"{Path(name).stem}_gt_class_coords.txt", ndmin=2)
        region = regions[Path(name).stem]
        keep = rows[:, 2] != 3
        expected = [(x, y, {1: CHANNEL["lymphocyte"], 2: CHANNEL["malignant"]}[c]) for y, x, c in rows[keep]]
        assert point_set(region.points, region.labels) == point_set([e[:2] for e in expected],
                                                                    [e[2] for e in expected])
        np.testing.assert_array_equal(read_rgb(region.image_path), read_rgb(real / "images" / name))
        for code, key in ((1, "lymphocyte"), (2, "malignant"), (3, "stromal")):
            totals[key] += int((rows[:, 2] == code).sum())
    assert summary["points"] == {"normal": 0, "lymphocyte": totals["lymphocyte"], "malignant": totals["malignant"]}
    assert sum(summary["skipped_points"].values()) == totals["stromal"]
    with open(tmp_path / "out" / "cells" / "split.csv") as f:
        splits = {r["name"]: r["split"] for r in csv.DictReader(f)}
    assert splits == {f"{Path(n).stem}_Region 1": "train" if n in listed["train"] else "val" for n in names}
    assert read_groups_csv(tmp_path / "out" / "cells" / "groups.csv") == {
        f"{Path(n).stem}_Region 1": (n[:12], n[5:7]) for n in names}


# ----------------------------------------------------------------------------- QuPath GeoJSON

def feature(geometry: dict, name: str | None = None, object_type: str | None = None, **extra) -> dict:
    properties = {"isLocked": False}
    if name is not None:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    if object_type is not None:
        properties["objectType"] = object_type
    return {"type": "Feature", "geometry": geometry, "properties": properties, **extra}


def square(x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def test_geojson_points_detections_and_skips(tmp_path):
    src = tmp_path / "qp"
    write_image(src / "slide1.png", image(100, 120, 1))
    write_image(src / "slide2.tif", image(80, 80, 2))
    triangle = {"type": "Polygon", "coordinates": [[[10, 10], [40, 10], [10, 70], [10, 10]]]}
    ring_with_hole = {"type": "Polygon", "coordinates": [
        [[0, 0], [60, 0], [60, 60], [0, 60], [0, 0]], [[30, 0], [60, 0], [60, 60], [30, 60], [30, 0]]]}
    collection = {"type": "FeatureCollection", "features": [
        feature({"type": "Point", "coordinates": [12.5, 7.25]}, "Tumor", "annotation"),
        feature({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4], [5, 6]]}, "Lymphocyte", "annotation"),
        feature(square(20, 30, 40, 50), "Immune cells", "detection"),            # QuPath's: lymphocyte
        feature(triangle, "Normal", "detection"),                                 # centroid (20, 30)
        feature(ring_with_hole, "Tumor", "detection"),                            # left half: (15, 30)
        feature(square(0, 0, 100, 90), "Tumor", "annotation"),                    # a region, not a cell
        feature({"type": "Point", "coordinates": [50, 50]}, "Stroma", "annotation"),
        feature({"type": "Point", "coordinates": [60, 60]}, None, "annotation"),  # unclassified
        {"type": "Feature", "geometry": square(0, 0, 10, 10),                      # cell: use its nucleus
         "nucleusGeometry": square(90, 80, 94, 84),
         "properties": {"objectType": "cell", "classification": {"names": ["Tumor", "Positive"]}}},
    ]}
    (src / "slide1.geojson").write_text(json.dumps(collection))
    bare_list = [feature({"type": "Point", "coordinates": [70.0, 3.0]}, "TIL-S"),
                 {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4, 5]},
                  "properties": {"name": "Malignant"}}]
    (src / "slide2.tif.geojson").write_text(json.dumps(bare_list))

    summary = import_points("geojson", src, tmp_path / "out")
    regions = regions_by_case(tmp_path / "out")
    assert point_set(regions["slide1"].points, regions["slide1"].labels) == point_set(
        [(12.5, 7.25), (1, 2), (3, 4), (5, 6), (30, 40), (20, 30), (15, 30), (92, 82)],
        [2, 1, 1, 1, 1, 0, 2, 2])
    assert point_set(regions["slide2"].points, regions["slide2"].labels) == [(4.0, 5.0, 2), (70.0, 3.0, 1)]
    assert summary["points"] == {"normal": 1, "lymphocyte": 5, "malignant": 4}
    skipped = summary["skipped_points"]
    assert sum(skipped.values()) == 3
    assert [n for k, n in skipped.items() if "Stroma" in k] == [1]
    assert [n for k, n in skipped.items() if "annotation" in k] == [1]
    np.testing.assert_array_equal(read_rgb(regions["slide2"].image_path), image(80, 80, 2))


def test_geojson_malformed_file(tmp_path):
    src = tmp_path / "qp"
    for stem in ("a", "b"):
        write_image(src / f"{stem}.png", image(32, 32, 0))
    (src / "a.geojson").write_text(json.dumps([feature({"type": "Point", "coordinates": [1, 1]}, "Tumor")]))
    (src / "b.geojson").write_text('{"type": "FeatureCollection", "features": [')
    message = one_line_error(lambda: import_points("geojson", src, tmp_path / "o1"), src / "b.geojson")
    assert "malformed GeoJSON" in message
    assert not (tmp_path / "o1").exists()  # a failed import leaves nothing behind
    summary = import_points("geojson", src, tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and len(summary["skipped_items"]) == 1
    assert str(src / "b.geojson") in summary["skipped_items"][0]

    (src / "b.geojson").write_text(json.dumps([feature({"type": "Point", "coordinates": ["x", 1]}, "Tumor")]))
    assert "feature 0" in one_line_error(lambda: import_points("geojson", src, tmp_path / "o3"), src / "b.geojson")


def test_geojson_unpaired_files(tmp_path):
    src = tmp_path / "qp"
    write_image(src / "a.png", image(32, 32, 0))
    write_image(src / "b.png", image(32, 32, 1))
    point = json.dumps([feature({"type": "Point", "coordinates": [1, 1]}, "Tumor")])
    (src / "a.json").write_text(point)
    (src / "c.geojson").write_text(point)
    one_line_error(lambda: import_points("geojson", src, tmp_path / "o1"), src / "c.geojson")
    summary = import_points("geojson", src, tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and len(summary["skipped_items"]) == 2
    assert sorted(i.split(":")[0] for i in summary["skipped_items"]) == [str(src / "b.png"), str(src / "c.geojson")]


# ----------------------------------------------------------------------------- CSV

def test_csv_points_with_class_names(tmp_path):
    write_image(tmp_path / "imgs" / "one.png", image(50, 70, 3))
    write_image(tmp_path / "imgs" / "two.jpg", image(40, 40, 4))
    rows = [("imgs/one.png", 10, 20, "Tumor"), ("imgs/one.png", 69.5, 0, "lymphocyte"),
            ("imgs/one.png", 30, 30, "IDC"), ("imgs/one.png", 5, 5, "stroma"),
            ("imgs/two.jpg", 1.5, 2.5, "Normal"), ("imgs/two.jpg", 3, 3, "mitosis")]
    (tmp_path / "points.csv").write_text(
        "Image, X, Y, Class\n" + "".join(f"{i},{x},{y},{c}\n" for i, x, y, c in rows))
    summary = import_points("csv", tmp_path / "points.csv", tmp_path / "out")
    regions = regions_by_case(tmp_path / "out")
    assert sorted(regions) == ["imgs-one", "imgs-two"]
    assert point_set(regions["imgs-one"].points, regions["imgs-one"].labels) == [
        (10.0, 20.0, 2), (30.0, 30.0, 2), (69.5, 0.0, 1)]
    assert point_set(regions["imgs-two"].points, regions["imgs-two"].labels) == [(1.5, 2.5, 0)]
    assert summary["points"] == {"normal": 1, "lymphocyte": 1, "malignant": 2}
    assert sum(summary["skipped_points"].values()) == 2
    with open(tmp_path / "out" / "mapping.csv") as f:
        assert {r["case"]: r["source_image"] for r in csv.DictReader(f)} == {
            "imgs-one": "imgs/one.png", "imgs-two": "imgs/two.jpg"}


def test_csv_missing_column_fails_in_both_modes(tmp_path):
    write_image(tmp_path / "a.png", image(20, 20, 0))
    (tmp_path / "p.csv").write_text("image,x,y\na.png,1,1\n")
    for mode in ("fail", "skip"):
        message = one_line_error(lambda: import_points("csv", tmp_path / "p.csv", tmp_path / "o", mode),
                                 tmp_path / "p.csv")
        assert "missing column" in message and "class" in message


def test_csv_bad_rows_and_missing_image(tmp_path):
    write_image(tmp_path / "a.png", image(20, 20, 0))
    (tmp_path / "p.csv").write_text("image,x,y,class\na.png,1,1,tumor\na.png,one,1,tumor\nb.png,2,2,tumor\n")
    assert "line 3" in one_line_error(lambda: import_points("csv", tmp_path / "p.csv", tmp_path / "o1"),
                                      tmp_path / "p.csv")
    summary = import_points("csv", tmp_path / "p.csv", tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and summary["points"]["malignant"] == 1
    assert len(summary["skipped_items"]) == 2 and str(tmp_path / "b.png") in summary["skipped_items"][1]


def test_point_outside_the_image(tmp_path):
    write_image(tmp_path / "a.png", image(30, 40, 0))
    (tmp_path / "p.csv").write_text(
        "image,x,y,class\na.png,39.5,29.5,tumor\na.png,40,5,tumor\na.png,-1,5,normal\na.png,5,30,til\n")
    message = one_line_error(lambda: import_points("csv", tmp_path / "p.csv", tmp_path / "o1"), tmp_path / "p.csv")
    assert "outside" in message and "40x30" in message
    summary = import_points("csv", tmp_path / "p.csv", tmp_path / "o2", on_bad="skip")
    assert summary["skipped_points"] == {"outside the image": 3}
    assert summary["points"] == {"normal": 0, "lymphocyte": 0, "malignant": 1}
    region = regions_by_case(tmp_path / "o2")["a"]
    assert point_set(region.points, region.labels) == [(39.5, 29.5, 2)]
    assert "warning: skipped 3 point(s): outside the image" in summary_text(summary).splitlines()


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    write_image(tmp_path / "a.png", image(20, 20, 0))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "p.csv").write_text("image,x,y,class\na.png,1,1,tumor\nb.png,2,2,tumor\n")
    one_line_error(lambda: import_points("csv", tmp_path / "p.csv", tmp_path / "o1"), tmp_path / "b.png")
    summary = import_points("csv", tmp_path / "p.csv", tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 1 and len(summary["skipped_items"]) == 1
    assert sorted(p.name for p in (tmp_path / "o2" / "cells").iterdir()) == ["a_Region 1_crop.tif",
                                                                           "a_Region 1_key.xml"]


# ----------------------------------------------------------------------------- BreastPathQ and common rules

def test_breastpathq_cells_are_copied(tmp_path):
    src = tmp_path / "bpq"
    write_brca(tmp_path / "brca", {"x_1": [(4, 5, 1), (6, 7, 2)], "x_2": [(8, 9, 2)]})
    import_points("brca-m2c", tmp_path / "brca", src)
    (src / "cells" / "orphan_key.xml").write_text("<annotations/>")
    one_line_error(lambda: import_points("breastpathq", src, tmp_path / "o1"), src / "cells" / "orphan_key.xml")
    summary = import_points("breastpathq", src, tmp_path / "o2", on_bad="skip")
    assert summary["regions"] == 2 and len(summary["skipped_items"]) == 1
    (src / "cells" / "orphan_key.xml").unlink()
    before, after = regions_by_case(src), regions_by_case(tmp_path / "o2")
    assert sorted(before) == sorted(after)
    for case in before:
        assert point_set(after[case].points, after[case].labels) == point_set(before[case].points, before[case].labels)
        np.testing.assert_array_equal(read_rgb(after[case].image_path), read_rgb(before[case].image_path))


def test_never_overwrites(tmp_path):
    src = write_brca(tmp_path / "brca", {"a": [(1, 1, 1)]})
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    existing = out / "cells" / "a_Region 1_key.xml"
    existing.write_text("mine")
    assert "already exists" in one_line_error(lambda: import_points("brca-m2c", src, out), existing)
    assert existing.read_text() == "mine" and sorted(p.name for p in out.rglob("*")) == ["a_Region 1_key.xml", "cells"]


def test_empty_folder_and_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    for mode in ("fail", "skip"):
        one_line_error(lambda: import_points("geojson", tmp_path / "empty", tmp_path / "o", mode), tmp_path / "empty")
    one_line_error(lambda: import_points("brca-m2c", tmp_path / "empty", tmp_path / "o"), tmp_path / "empty" / "images")
    one_line_error(lambda: import_points("geojson", tmp_path / "nope", tmp_path / "o"), tmp_path / "nope")
    with pytest.raises(CellnetError, match="--format"):
        import_points("xml", tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_describe_formats_names_every_format_and_stroma():
    text = describe_formats()
    assert all(f in text for f in FORMATS) and "stromal" in text and "image,x,y,class" in text


def test_qupath_default_classes_go_through_the_class_table():
    from cellnet.classes import class_for_description
    from cellnet.data.formats import QUPATH_CLASSES

    expected = {"Tumor": "malignant", "Immune cells": "lymphocyte"}  # the rest have no cellnet channel
    for name in QUPATH_CLASSES:
        for spelling in (name, name.upper(), name.lower()):
            assert class_for_description(spelling) == expected.get(name), spelling
    assert set(QUPATH_CLASSES) >= {"Tumor", "Immune cells", "Stroma", "Necrosis", "Other", "Region*", "Ignore*",
                                   "Positive", "Negative"}


def test_skipped_points_name_their_file_and_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cellnet.errors.PROG", "cellnet")
    src = write_brca(tmp_path / "brca", {"a": [(5, 5, 1), (6, 6, 2)], "b": [(1, 1, 2), (2, 2, 9), (3, 3, 9)]})
    summary = import_points("brca-m2c", src, tmp_path / "out")
    assert summary["skipped_points"] == {"unknown BRCA-M2C class 9 (expected 1, 2 or 3)": 2}
    assert capsys.readouterr().err.splitlines() == [
        f"cellnet: warning: {src / 'labels' / 'b_gt_class_coords.txt'}: line 2: skipped 2 point(s): "
        "unknown BRCA-M2C class 9 (expected 1, 2 or 3)"]

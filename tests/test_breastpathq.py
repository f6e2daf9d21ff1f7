"""The BreastPathQ reader (SPEC 2.1) on a small layout written here, and every bad input of SPEC 7."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellnet.data.breastpathq import parse_key_xml, read_breastpathq, write_key_xml
from cellnet.errors import Problems
from cellnet.errors import CellnetError
from cellnet.data.imageio import write_image

# SPEC 2.1, written out again here so the table in cellnet.classes is checked, not reused.
SPEC_DESCRIPTIONS = {
    "malignant": ["IDC", "ILC", "Muc C", "DCIS 1", "DCIS 2", "DCIS 3", "MC- E", "MC - C", "MC - M"],
    "normal": ["normal", "UDH", "ADH"],
    "lymphocyte": ["TIL-E", "TIL-S"],
}
CHANNEL = {"normal": 0, "lymphocyte": 1, "malignant": 2}  # SPEC 2.3 channel order
TRAIN = {"11_1": 0.0, "11_2": 0.35, "12_1": 1.0}
VALIDATION = {"13_1": 0.5, "13_2": 0.05}
TEST = ["14_1"]
REGION_POINTS = [(10.5, 20.0, "IDC"), (300.0, 40.25, "TIL-E"), (55.0, 480.0, "UDH"), (7.0, 8.0, "Stroma")]


def patch_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (512, 512, 3), dtype=np.uint8)


def xml_text(points: list[tuple[float, float, str]]) -> str:
    graphics = "".join(
        f'<graphic type="point" name="n{i}" description="{d}"><point-list><point>{x},{y}</point>'
        f"</point-list></graphic>" for i, (x, y, d) in enumerate(points))
    return f'<?xml version="1.0"?><annotations>{graphics}</annotations>'


def write_dataset(root: Path) -> Path:
    """Three train, two validation ('p' column) and one unlabelled test patch; two cell regions."""
    for folder, stems in (("train", TRAIN), ("validation", VALIDATION), ("test_patches", TEST)):
        for i, stem in enumerate(stems):
            write_image(root / folder / f"{stem}.tif", patch_image(i))
    (root / "train_labels.csv").write_text(
        "slide,rid,y\n" + "".join(f"{s.split('_')[0]},{s.split('_')[1]},{y}\n" for s, y in TRAIN.items()))
    (root / "val_labels.csv").write_text(
        "slide,rid,p\n" + "".join(f"{s.split('_')[0]},{s.split('_')[1]},{y}\n" for s, y in VALIDATION.items()))
    (root / "patient_ids.csv").write_text("patient_id,slide\nP1,11\nP1,12\nP2,13\n")
    for name in ("1_Region 1", "2_Region 3"):
        write_image(root / "cells" / f"{name}_crop.tif", patch_image(9)[:480, :500])
        (root / "cells" / f"{name}_key.xml").write_text(xml_text(REGION_POINTS))
    return root


@pytest.fixture
def layout(tmp_path) -> Path:
    return write_dataset(tmp_path / "bpq")


def expect_one_line_error(root: Path, names: Path, on_bad: str = "fail") -> str:
    with pytest.raises(CellnetError) as info:
        read_breastpathq(root, on_bad=on_bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(names))
    return message


# ----------------------------------------------------------------------------- good input

def test_reads_patches_labels_and_patients(layout):
    data = read_breastpathq(layout)
    assert not data.problems.items
    assert {p.stem: p.y for p in data.split("train")} == TRAIN
    assert {p.stem: p.y for p in data.split("validation")} == VALIDATION  # from the 'p' column
    assert [(p.stem, p.y) for p in data.split("test")] == [("14_1", None)]
    assert all(p.path == layout / {"train": "train", "validation": "validation", "test": "test_patches"}[p.split]
               / f"{p.stem}.tif" for p in data.patches)
    patients = {p.stem: p.patient for p in data.patches}
    assert patients == {"11_1": "P1", "11_2": "P1", "12_1": "P1", "13_1": "P2", "13_2": "P2", "14_1": "14"}
    assert {(p.slide, p.rid) for p in data.split("train")} == {("11", "1"), ("11", "2"), ("12", "1")}


def test_reads_regions_with_case_and_points(layout):
    data = read_breastpathq(layout)
    assert sorted((r.name, r.case) for r in data.regions) == [("1_Region 1", "1"), ("2_Region 3", "2")]
    region = data.regions[0]
    assert region.xml_path == layout / "cells" / "1_Region 1_key.xml"
    np.testing.assert_allclose(region.points, [(10.5, 20.0), (300.0, 40.25), (55.0, 480.0)])
    assert region.labels.tolist() == [CHANNEL["malignant"], CHANNEL["lymphocyte"], CHANNEL["normal"]]
    assert sum(n for key, n in data.problems.warnings.items() if "Stroma" in key) == 2  # once per region


def test_every_spec_description_maps_to_its_class(tmp_path):
    table = [(d, cls) for cls, ds in SPEC_DESCRIPTIONS.items() for d in ds]
    unknown = ["Stroma", "lumen", "", "idc"]  # descriptions are case-sensitive in BreastPathQ XML
    points = [(float(i), float(2 * i), d) for i, (d, _) in enumerate(table)]
    points += [(100.0 + i, 1.0, d) for i, d in enumerate(unknown)]
    (tmp_path / "k.xml").write_text(xml_text(points))
    problems = Problems("fail")
    xy, labels = parse_key_xml(tmp_path / "k.xml", problems)
    np.testing.assert_allclose(xy, [(x, y) for x, y, _ in points[: len(table)]])
    assert labels.tolist() == [CHANNEL[cls] for _, cls in table]
    assert sum(problems.warnings.values()) == len(unknown)
    assert all(any(repr(d) in key for key in problems.warnings) for d in unknown)


def test_xml_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 500, (30, 2)).round(1).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    write_key_xml(tmp_path / "r_key.xml", points, labels)
    xy, back = parse_key_xml(tmp_path / "r_key.xml", Problems("fail"))
    order = np.lexsort((points[:, 1], points[:, 0]))
    back_order = np.lexsort((xy[:, 1], xy[:, 0]))
    np.testing.assert_allclose(xy[back_order], points[order], atol=0.05)
    assert back[back_order].tolist() == labels[order].tolist()


# ----------------------------------------------------------------------------- bad input

def test_missing_column_fails_in_both_modes(layout):
    (layout / "train_labels.csv").write_text("slide,rid,score\n11,1,0.5\n")
    for mode in ("fail", "skip"):  # a file without its label column cannot be skipped around
        message = expect_one_line_error(layout, layout / "train_labels.csv", mode)
        assert "missing column" in message and "y" in message


@pytest.mark.parametrize("bad_value, problem", [("", "not a number"), ("nan", "not a number"),
                                                ("1.5", "outside [0, 1]"), ("-0.1", "outside [0, 1]")])
def test_bad_label_value(layout, bad_value, problem):
    (layout / "train_labels.csv").write_text(f"slide,rid,y\n11,1,0.0\n11,2,{bad_value}\n12,1,1.0\n")
    message = expect_one_line_error(layout, layout / "train_labels.csv")
    assert "line 3" in message and problem in message
    data = read_breastpathq(layout, on_bad="skip")
    assert sorted(p.stem for p in data.split("train")) == ["11_1", "12_1"]
    about_csv = [i for i in data.problems.items if i.startswith(str(layout / "train_labels.csv"))]
    assert len(about_csv) == 1 and "line 3" in about_csv[0]


def test_id_without_image(layout):
    with open(layout / "train_labels.csv", "a") as f:
        f.write("11,9,0.2\n")
    message = expect_one_line_error(layout, layout / "train_labels.csv")
    assert "11_9" in message
    data = read_breastpathq(layout, on_bad="skip")
    assert len(data.problems.items) == 1 and len(data.split("train")) == len(TRAIN)


def test_image_without_label(layout):
    write_image(layout / "validation" / "13_7.tif", patch_image(5))
    expect_one_line_error(layout, layout / "validation" / "13_7.tif")
    data = read_breastpathq(layout, on_bad="skip")
    assert len(data.problems.items) == 1
    assert sorted(p.stem for p in data.split("validation")) == sorted(VALIDATION)


def test_missing_label_file_fails(layout):
    (layout / "val_labels.csv").unlink()
    for mode in ("fail", "skip"):
        expect_one_line_error(layout, layout / "val_labels.csv", mode)


def test_malformed_xml(layout):
    (layout / "cells" / "2_Region 3_key.xml").write_text("<annotations><graphic type='point'>")
    message = expect_one_line_error(layout, layout / "cells" / "2_Region 3_key.xml")
    assert "malformed XML" in message
    data = read_breastpathq(layout, on_bad="skip")
    assert len(data.problems.items) == 1 and [r.name for r in data.regions] == ["1_Region 1"]


def test_bad_point_text(layout):
    (layout / "cells" / "1_Region 1_key.xml").write_text(xml_text([(1.0, 2.0, "IDC")]).replace("1.0,2.0", "1.0;2.0"))
    expect_one_line_error(layout, layout / "cells" / "1_Region 1_key.xml")
    data = read_breastpathq(layout, on_bad="skip")
    assert len(data.problems.items) == 1 and [r.name for r in data.regions] == ["2_Region 3"]


def test_missing_xml(layout):
    (layout / "cells" / "1_Region 1_key.xml").unlink()
    message = expect_one_line_error(layout, layout / "cells" / "1_Region 1_crop.tif")
    assert "1_Region 1_key.xml" in message
    data = read_breastpathq(layout, on_bad="skip")
    assert len(data.problems.items) == 1 and [r.name for r in data.regions] == ["2_Region 3"]


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    for mode in ("fail", "skip"):
        assert "no patches" in expect_one_line_error(tmp_path / "empty", tmp_path / "empty", mode)
    assert "no such" in expect_one_line_error(tmp_path / "nope", tmp_path / "nope")


def test_bad_on_bad_value(layout):
    with pytest.raises(CellnetError, match="--on-bad"):
        read_breastpathq(layout, on_bad="ignore")


def test_two_images_with_one_stem_are_an_error(layout):
    first = layout / "train" / "11_1.tif"
    write_image(first.with_suffix(".png"), patch_image(99))
    message = expect_one_line_error(layout, first)
    assert "11_1.png and 11_1.tif" in message
    data = read_breastpathq(layout, on_bad="skip")  # skip mode keeps the first (by name) and reports
    assert [p.path.name for p in data.split("train") if p.stem == "11_1"] == ["11_1.png"]
    assert len(data.problems.items) == 1 and str(first) in data.problems.items[0]


def test_key_xml_without_points_is_kept_and_noted(layout):
    key = layout / "cells" / "1_Region 1_key.xml"
    key.write_text("<annotations></annotations>\n")
    data = read_breastpathq(layout)
    assert [len(r.points) for r in data.regions if r.xml_path == key] == [0]
    assert list(data.problems.notes.values()) == [1] and "no points" in next(iter(data.problems.notes))
    assert data.problems.first[next(iter(data.problems.notes))] == (str(key), 0)


def test_a_file_given_as_the_dataset_folder(tmp_path):
    (tmp_path / "labels.csv").write_text("slide,rid,y\n")
    with pytest.raises(CellnetError, match="labels.csv: is a file, not a dataset folder"):
        read_breastpathq(tmp_path / "labels.csv")


def test_one_warning_line_per_kind_naming_the_first_file(capsys, monkeypatch):
    monkeypatch.setattr("cellnet.errors.PROG", "cellnet")
    problems = Problems("skip")
    for name in ("b_key.xml", "a_key.xml", "b_key.xml"):
        problems.warn("points outside their image dropped", 2, path=name)
    problems.warn("unknown BRCA-M2C class 9", path="c.txt", line=7)
    problems.note("x.jpg", "named .jpg but holds PNG data; read as PNG")
    problems.emit_warnings()
    assert capsys.readouterr().err.splitlines() == [
        "cellnet: warning: x.jpg: named .jpg but holds PNG data; read as PNG",
        "cellnet: warning: a_key.xml: points outside their image dropped: 6 (in 2 files, first here)",
        "cellnet: warning: c.txt: line 7: unknown BRCA-M2C class 9: 1",
    ]
    assert "warning: named .jpg but holds PNG data; read as PNG: 1 file(s)" in problems.summary()

"""``cellnet cohort``: the Beam pipeline (DirectRunner) over small slides against ``cellnet slide``."""
from __future__ import annotations

import csv
import sys
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="cellnet cohort needs the cohort extra (apache-beam)")

from cellnet.cli import main  # noqa: E402
from cellnet.errors import CellnetError  # noqa: E402
from cellnet.serving.cohort import cohort  # noqa: E402
from cellnet.serving.slide import slide_map  # noqa: E402
from test_slide import cascade, read_rows, slide_image, write_pyramid  # noqa: E402,F401 (fixtures)


def write_manifest(path: Path, slides: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient", "slide"])
        writer.writerows([[f"P{i}", slide] for i, slide in enumerate(slides)])
    return path


def assert_same_tiles(ours: Path, theirs: Path) -> None:
    """Same rows, columns and integers; scores equal up to float rounding of another batching."""
    a, b = read_rows(ours), read_rows(theirs)
    assert len(a) == len(b) and list(a[0]) == list(b[0])
    for x, y in zip(a, b):
        for key in x:
            if key in ("row", "col", "x", "y", "width", "height", "malignant_nuclei"):
                assert x[key] == y[key]
            else:
                assert float(x[key]) == pytest.approx(float(y[key]), abs=1e-5)


def assert_same_geojson(ours: Path, theirs: Path) -> None:
    """Same features (ids are random UUIDs), geometry and classes; measurements (4 decimals) up to rounding."""
    a, b = (json.loads(p.read_text())["features"] for p in (ours, theirs))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["geometry"]["type"] == y["geometry"]["type"]
        assert np.allclose(x["geometry"]["coordinates"], y["geometry"]["coordinates"], atol=1e-3)
        assert x["properties"].get("classification") == y["properties"].get("classification")
        mx, my = ({m["name"]: m["value"] for m in f["properties"]["measurements"]} for f in (x, y))
        assert list(mx) == list(my) and np.allclose(list(mx.values()), list(my.values()), atol=2e-4)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, slide_image) -> Path:
    """Three slides (40x, 20x, no mpp) beside a manifest that names them relative to itself."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    for name, mpp in (("forty", 0.25), ("twenty", 0.5), ("plain", None)):
        write_pyramid(root / "slides" / f"{name}.tif", slide_image, mpp=mpp)
    write_manifest(root / "manifest.csv", ["slides/forty.tif", "slides/twenty.tif", "slides/plain.tif"])
    return root


def test_cohort_writes_what_slide_writes_for_every_slide(cascade, slides, tmp_path, capsys):
    _, saved = cascade
    out = tmp_path / "cohort"
    # a Beam option after cellnet's goes through to the runner
    assert main(["cohort", "--model", str(saved), "--slides", str(slides / "manifest.csv"), "--out", str(out),
                 "--batch-size", "3", "--direct_num_workers=1"]) == 0
    finished = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cohort: ")]
    assert len(finished) == 3 and all(" tiles, mean cellularity " in line for line in finished)

    cohort_rows = read_rows(out / "cohort.csv")
    assert [Path(r["slide"]).stem for r in cohort_rows] == ["forty", "twenty", "plain"]  # the manifest's order
    for stem, summary_row in zip(("forty", "twenty", "plain"), cohort_rows):
        alone = tmp_path / "alone"
        summary = slide_map(saved, slides / "slides" / f"{stem}.tif", alone, batch_size=4, progress=False)
        # per-slide outputs as cellnet slide's (Beam batches tiles of several slides together)
        assert_same_tiles(out / f"{stem}_tiles.csv", alone / f"{stem}_tiles.csv")
        assert_same_geojson(out / f"{stem}.geojson", alone / f"{stem}.geojson")
        assert (out / f"{stem}_heatmap.png").stat().st_size > 1000

        rows = read_rows(out / f"{stem}_tiles.csv")
        scores = np.array([float(r["cellularity"]) for r in rows])
        tissue = np.array([float(r["tissue"]) for r in rows])
        assert int(summary_row["tiles"]) == len(rows) == summary["tiles"]
        assert float(summary_row["mean_cellularity"]) == pytest.approx(scores.mean(), abs=1e-6)
        assert float(summary_row["tissue_weighted_cellularity"]) == pytest.approx(
            (scores * tissue).sum() / tissue.sum(), abs=1e-6)
        assert int(summary_row["nuclei"]) == summary["nuclei"]
        assert float(summary_row["seconds"]) > 0
    assert [r["slide"] for r in cohort_rows] == [str(slides / "slides" / f"{s}.tif") for s in ("forty", "twenty", "plain")]


def test_cohort_refuses_bad_input_in_one_line_before_writing(cascade, slides, tmp_path):
    _, saved = cascade
    out = tmp_path / "out"
    cases = {
        "no 'slide' column": tmp_path / "nocol.csv",
        "no such slide": write_manifest(tmp_path / "missing.csv", ["slides/forty.tif", "nowhere.svs"]),
        "same name as line 2": write_manifest(tmp_path / "dupes.csv", [str(slides / "slides" / "forty.tif"),
                                                                       str(tmp_path / "forty.tif")]),
        "lists no slides": write_manifest(tmp_path / "empty.csv", []),
    }
    cases["no 'slide' column"].write_text("path\nslides/forty.tif\n")
    write_pyramid(tmp_path / "forty.tif", np.full((64, 64, 3), 240, np.uint8), mpp=0.5)
    (tmp_path / "slides").symlink_to(slides / "slides")
    for problem, manifest in cases.items():
        with pytest.raises(CellnetError, match=problem) as info:
            cohort(saved, manifest, out)
        assert "\n" not in str(info.value) and str(manifest) in str(info.value)
    with pytest.raises(CellnetError, match="no such manifest"):
        cohort(saved, tmp_path / "absent.csv", out)
    manifest = slides / "manifest.csv"
    with pytest.raises(CellnetError, match="Beam options: --flink_mastr=x: not one of Beam's pipeline options"):
        cohort(saved, manifest, out, beam_args=["--flink_mastr=x"])
    with pytest.raises(CellnetError, match="Beam options: argument --direct_num_workers: invalid int value"):
        cohort(saved, manifest, out, beam_args=["--direct_num_workers=two"])
    with pytest.raises(CellnetError, match="holds no SavedModel"):
        cohort(tmp_path, manifest, out)
    assert not out.exists()  # nothing was started


def test_a_slide_failing_inside_the_pipeline_is_one_line(cascade, slides, tmp_path):
    _, saved = cascade
    write_pyramid(tmp_path / "glass.tif", np.full((600, 600, 3), 245, np.uint8), mpp=0.5)
    manifest = write_manifest(tmp_path / "manifest.csv", [str(slides / "slides" / "twenty.tif"), "glass.tif"])
    with pytest.raises(CellnetError) as info:
        cohort(saved, manifest, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "glass.tif")) and "no tissue found" in message
    assert "\n" not in message and "while running" not in message
    assert not (tmp_path / "out" / "cohort.csv").exists()


def test_without_beam_the_extra_is_named(cascade, slides, tmp_path, monkeypatch):
    _, saved = cascade
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if the cohort extra were not installed
    with pytest.raises(CellnetError, match=r'pip install "cellnet\[cohort\]"'):
        cohort(saved, slides / "manifest.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()

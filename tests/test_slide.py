"""``cellnet slide`` on a pyramidal TIFF written here, and on the real CMU slide when present."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tifffile

from cellnet.errors import CellnetError
from cellnet.serving.export import export_run
from cellnet.models import CellSegmenter, ResNet34Backbone, SRCascade
from cellnet.serving.slide import Tile, malignant_nuclei, slide_map
from conftest import TINY_BLOCKS, calibrate, graph_preprocess, spread_head

REAL_SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "real" / "wsi" / "CMU-1-Small-Region.svs"
WIDTH = 0.125
HEIGHT_PX, WIDTH_PX = 1536, 2048
#: Tissue drawn on white glass, (x0, y0, x1, y1) in level-0 px: two blocks aligned to the tile
#: grids below and a small fleck that covers too little of its tile to count.
BLOCKS = ((0, 0, 1024, 1024), (1024, 1024, 2048, 1536))
FLECK = (1100, 100, 1300, 300)


def tissue_slide() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(244, 3, (HEIGHT_PX, WIDTH_PX, 3)), 0, 255).astype(np.uint8)
    for x0, y0, x1, y1 in (*BLOCKS, FLECK):  # eosin-pink stroma with hematoxylin-purple nuclei
        h, w = y1 - y0, x1 - x0
        block = np.clip(rng.normal((215, 130, 175), 12, (h, w, 3)), 0, 255).astype(np.uint8)
        for cy, cx in rng.uniform(0, 1, (h * w // 2000, 2)) * (h, w):
            cv2.circle(block, (int(cx), int(cy)), 7, (90, 40, 130), -1)
        image[y0:y1, x0:x1] = block
    return image


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None) -> Path:
    """A tiled TIFF with two levels (full and x2) in SubIFDs; resolution tags give the mpp."""
    options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    if mpp is not None:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, **options)
        tif.write(cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA),
                  subfiletype=1, **options)
    return path


def expected_tiles(tile: int) -> set[tuple[int, int]]:
    """(row, col) of the tiles at least a quarter covered by the drawn blocks (fleck excluded)."""
    covered = np.zeros((HEIGHT_PX, WIDTH_PX), bool)
    for x0, y0, x1, y1 in BLOCKS:
        covered[y0:y1, x0:x1] = True
    tiles = set()
    for row in range(-(-HEIGHT_PX // tile)):
        for col in range(-(-WIDTH_PX // tile)):
            if covered[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile].sum() >= tile * tile / 4:
                tiles.add((row, col))
    return tiles


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, slide_image):
    """A tiny SR cascade (cellularity + masks), calibrated on tiles of the slide, exported."""
    root = tmp_path_factory.mktemp("slide")
    keras.utils.set_random_seed(0)
    tiles = np.stack([slide_image[y:y + 512, x:x + 512] for x, y in ((0, 0), (512, 512), (1024, 1024), (1536, 0))])
    segmenter = CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="fpn")
    calibrate(segmenter, tiles)
    model = SRCascade(segmenter, width=WIDTH, stage_blocks=TINY_BLOCKS, name="sr_cascade")
    calibrate(model, tiles)
    # scores inside (0, 1), where serving's clip leaves them: these tiles and a level-1 one
    half = cv2.resize(slide_image[:1024, :1024], (512, 512), interpolation=cv2.INTER_AREA)
    spread_head(model, np.concatenate([tiles, half[None]]))
    run = root / "run"
    run.mkdir()
    model.save(run / "best.keras")
    (run / "run.json").write_text(json.dumps({"kind": "cascade", "status": "complete"}))
    return model, export_run(run, root / "saved_models" / "cascade")


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    return tissue_slide()


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_slide_with_mpp_reads_the_matching_level(cascade, slide_image, tmp_path):
    model, saved = cascade
    path = write_pyramid(tmp_path / "case.tif", slide_image, mpp=0.25)  # 40x: tiles of 1024 px, level 1
    summary = slide_map(saved, path, tmp_path / "out", batch_size=4, progress=False)
    rows = read_rows(tmp_path / "out" / "case_tiles.csv")
    assert {(int(r["row"]), int(r["col"])) for r in rows} == expected_tiles(1024) == {(0, 0), (1, 1)}
    assert summary["tiles"] == len(rows) and summary["level"] == 1 and summary["mpp"] == 0.25
    assert all(int(r["width"]) == 1024 for r in rows)
    # Tile (0, 0) is exactly the level-1 pixels [0:512, 0:512]: predict them independently.
    level1 = tifffile.TiffFile(path).series[0].levels[1].asarray()
    expected = float(np.asarray(model(graph_preprocess(level1[None, :512, :512])))[0, 0])
    first = next(r for r in rows if (r["row"], r["col"]) == ("0", "0"))
    assert float(first["cellularity"]) == pytest.approx(expected, abs=1e-5)

    collection = json.loads((tmp_path / "out" / "case.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    tiles = [f for f in collection["features"] if f["geometry"]["type"] == "Polygon"]
    points = [f for f in collection["features"] if f["geometry"]["type"] == "Point"]
    assert len(tiles) == len(rows)
    for feature, row in zip(tiles, rows):
        assert feature["properties"]["objectType"] == feature["properties"]["object_type"] == "tile"
        measurements = {m["name"]: m["value"] for m in feature["properties"]["measurements"]}
        assert measurements["cellularity"] == pytest.approx(float(row["cellularity"]))
        x0, y0 = int(row["x"]), int(row["y"])
        assert feature["geometry"]["coordinates"][0][0] == [x0, y0]
        assert feature["geometry"]["coordinates"][0][2] == [x0 + 1024, y0 + 1024]
    assert len(points) == sum(int(r["malignant_nuclei"]) for r in rows) == summary["nuclei"]
    for point in points:
        x, y = point["geometry"]["coordinates"]
        assert point["properties"]["objectType"] == "detection"
        assert point["properties"]["classification"]["name"] == "Tumor"
        assert 0 <= x < WIDTH_PX and 0 <= y < HEIGHT_PX
    heatmap = cv2.imread(str(tmp_path / "out" / "case_heatmap.png"))
    assert heatmap is not None and heatmap.shape[0] > 100 and heatmap.shape[1] > 100


def test_slide_without_mpp_assumes_training_magnification(cascade, slide_image, tmp_path):
    _, saved = cascade
    path = write_pyramid(tmp_path / "plain.tif", slide_image, mpp=None)
    summary = slide_map(saved, path, tmp_path / "out", batch_size=4, progress=False)
    rows = read_rows(tmp_path / "out" / "plain_tiles.csv")
    assert {(int(r["row"]), int(r["col"])) for r in rows} == expected_tiles(512)
    assert len(rows) == 6 and summary["level"] == 0 and "assumed 0.5" in summary["mpp"]


def test_malignant_nuclei_are_maxima_above_half_in_level0_pixels():
    rows, cols = np.mgrid[0:64, 0:64]
    malignant = np.zeros((64, 64), np.float32)
    for (r, c), peak in (((10, 12), 0.9), ((40, 20), 0.7), ((50, 50), 0.4)):  # the last is too faint
        malignant = np.maximum(malignant, peak * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 8.0))
    malignant[20:25, 40:47] = 1.0  # a saturated plateau: one nucleus at its centre (22, 43)
    masks = np.zeros((64, 64, 4), np.float32)
    masks[..., 2] = malignant
    tile = Tile(row=0, col=0, x=1000, y=2000, size=128, tissue=1.0)  # 2 level-0 px per map pixel
    found = sorted(malignant_nuclei(masks, tile, dimensions=(5000, 5000)))
    expected = sorted((1000 + (c + 0.5) * 2, 2000 + (r + 0.5) * 2, a)
                      for (r, c), a in (((10, 12), 0.9), ((40, 20), 0.7), ((22, 43), 1.0)))
    np.testing.assert_allclose(found, expected, atol=1e-6)
    # Points beyond the slide's edge (a padded edge tile) are dropped.
    assert len(malignant_nuclei(masks, tile, dimensions=(1030, 5000))) == 1


def test_unreadable_slide_is_a_one_line_error(cascade, tmp_path):
    _, saved = cascade
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00 this is not a slide")
    with pytest.raises(CellnetError, match="broken.svs: cannot be read as a whole-slide image") as info:
        slide_map(saved, broken, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(CellnetError, match="missing.svs: no such file"):
        slide_map(saved, tmp_path / "missing.svs", tmp_path / "out", progress=False)


def test_real_cmu_slide(cascade, tmp_path):
    # Stays under ~30 s: about a dozen 512 px tissue tiles through a width-0.125 cascade.
    if not REAL_SLIDE.is_file():
        pytest.skip(f"{REAL_SLIDE} not present")
    _, saved = cascade
    summary = slide_map(saved, REAL_SLIDE, tmp_path, batch_size=8, progress=False)
    rows = read_rows(tmp_path / "CMU-1-Small-Region_tiles.csv")
    assert summary["mpp"] == pytest.approx(0.499) and summary["level"] == 0
    assert 5 <= len(rows) == summary["tiles"] < 30  # 5 x 6 grid of 513 px tiles; the tissue is a strip
    assert all(0.0 <= float(r["cellularity"]) <= 1.0 and float(r["tissue"]) >= 0.25 for r in rows)
    collection = json.loads((tmp_path / "CMU-1-Small-Region.geojson").read_text())
    assert sum(f["geometry"]["type"] == "Polygon" for f in collection["features"]) == len(rows)


def test_tta_export_adds_an_uncertainty_heatmap_and_measurement(cascade, slide_image, tmp_path):
    _, saved = cascade
    run = Path(json.loads((saved / "assets" / "cellnet.json").read_text())["run"])
    tta = export_run(run, tmp_path / "saved_models" / "cascade_flips", tta="flips")
    path = write_pyramid(tmp_path / "case.tif", slide_image, mpp=None)
    summary = slide_map(tta, path, tmp_path / "out", batch_size=4, progress=False)
    rows = read_rows(tmp_path / "out" / "case_tiles.csv")
    spreads = [float(r["cellularity_std"]) for r in rows]
    assert max(spreads) > 1e-4 and min(spreads) >= 0  # two variants that disagree somewhere
    uncertainty = cv2.imread(summary["uncertainty"])
    assert summary["uncertainty"].endswith("case_uncertainty.png") and uncertainty.shape[0] > 100
    collection = json.loads((tmp_path / "out" / "case.geojson").read_text())
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    assert [{m["name"]: m["value"] for m in t["properties"]["measurements"]}["cellularity_std"]
            for t in tiles] == pytest.approx(spreads)

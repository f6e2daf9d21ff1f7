"""``cellnet slide`` on a DICOM whole-slide image written here, against the same pixels as a TIFF.

The DICOM WSI is written with pydicom: one VL Whole Slide Microscopy instance per pyramid level
(uncompressed RGB frames of 256 px, TILED_FULL), all in one series and frame of reference, the
level-1 pixels the very ones ``write_pyramid`` puts in the TIFF. So the tile scores must agree.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from cellnet.errors import CellnetError
from cellnet.models import DirectCellularity
from cellnet.serving.export import export_run
from cellnet.serving.slide import open_slide, slide_map
from conftest import TINY_BLOCKS, calibrate, spread_head
from test_slide import WIDTH, read_rows, tissue_slide, write_pyramid

pydicom = pytest.importorskip("pydicom", reason="writing the DICOM slide needs pydicom (a wsidicom dependency)")
pytest.importorskip("wsidicom", reason="DICOM slides are read with wsidicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid  # noqa: E402

DICOM_TILE = 256


def write_level(path: Path, image: np.ndarray, mpp: float, uids: tuple[str, str, str], level: int) -> None:
    """One pyramid level (``mpp`` its own) as a TILED_FULL instance: row-major frames, edges padded white."""
    height, width = image.shape[:2]
    rows, cols = -(-height // DICOM_TILE), -(-width // DICOM_TILE)
    padded = np.full((rows * DICOM_TILE, cols * DICOM_TILE, 3), 255, np.uint8)
    padded[:height, :width] = image
    frames = padded.reshape(rows, DICOM_TILE, cols, DICOM_TILE, 3).swapaxes(1, 2)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality, ds.ContainerIdentifier, ds.InstanceNumber = "SM", "cellnet-test-slide", level + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.Columns = ds.Rows = DICOM_TILE
    ds.NumberOfFrames = rows * cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    spacing = mpp / 1000  # mm per pixel
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing, height * spacing
    measures = Dataset()
    measures.PixelSpacing = [spacing, spacing]  # row spacing, column spacing
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "0"
    ds.OpticalPathSequence = Sequence([optical_path])
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dicom(folder: Path, image: np.ndarray, mpp: float) -> Path:
    """Two levels (full and x2, the latter resized exactly as ``write_pyramid`` does), one file each."""
    folder.mkdir(parents=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    for level, pixels in enumerate((image, half)):
        write_level(folder / f"level{level}.dcm", pixels, mpp * 2 ** level, uids, level)
    return folder


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    return tissue_slide()


@pytest.fixture(scope="module")
def regressor(tmp_path_factory, slide_image) -> Path:
    """A tiny direct-regression export (cellularity only), its scores spread inside (0, 1)."""
    root = tmp_path_factory.mktemp("slide_dicom")
    keras.utils.set_random_seed(0)
    tiles = np.stack([slide_image[y:y + 512, x:x + 512] for x, y in ((0, 0), (512, 512), (1024, 1024), (1536, 0))])
    model = DirectCellularity("resnet34", "regression", input_shape=(256, 256, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    calibrate(model, tiles)
    spread_head(model, tiles)
    run = root / "run"
    run.mkdir()
    model.save(run / "best.keras")
    (run / "run.json").write_text(json.dumps({"kind": "regression", "status": "complete"}))
    return export_run(run, root / "saved_models" / "regression")


@pytest.mark.parametrize("mpp, size", [(0.25, (2048, 1536)), (0.5, (2000, 1500))],
                         ids=["40x-level1", "20x-level0-edge-tiles"])
def test_dicom_slide_scores_match_the_same_pixels_as_tiff(regressor, slide_image, tmp_path, mpp, size):
    image = np.ascontiguousarray(slide_image[:size[1], :size[0]])
    folder = write_dicom(tmp_path / "case_dicom", image, mpp)
    tiff = write_pyramid(tmp_path / "case_tiff.tif", image, mpp=mpp)

    slide = open_slide(folder)
    assert slide.dimensions == size and slide.level_dimensions == (size, (size[0] // 2, size[1] // 2))
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, size, as_array=True), image)

    dicom_summary = slide_map(regressor, folder, tmp_path / "out", batch_size=4, progress=False)
    tiff_summary = slide_map(regressor, tiff, tmp_path / "out", batch_size=4, progress=False)
    dicom_rows = read_rows(tmp_path / "out" / "case_dicom_tiles.csv")
    tiff_rows = read_rows(tmp_path / "out" / "case_tiff_tiles.csv")
    assert dicom_summary["mpp"] == tiff_summary["mpp"] == mpp
    assert dicom_summary["level"] == tiff_summary["level"] == (1 if mpp == 0.25 else 0)
    assert dicom_summary["tiles"] == tiff_summary["tiles"] == len(dicom_rows) >= 2
    place = ("row", "col", "x", "y", "width", "height")
    assert [[r[k] for k in place] for r in dicom_rows] == [[r[k] for k in place] for r in tiff_rows]
    for ours, theirs in zip(dicom_rows, tiff_rows):
        assert float(ours["tissue"]) == pytest.approx(float(theirs["tissue"]), abs=1e-4)
        assert float(ours["cellularity"]) == pytest.approx(float(theirs["cellularity"]), abs=1e-4)
    scores = [float(r["cellularity"]) for r in dicom_rows]
    assert max(scores) - min(scores) > 1e-3  # the tiles differ, so matching them means something

    # One instance of the slide names the slide: its folder is read, and names the outputs.
    summary = slide_map(regressor, folder / "level0.dcm", tmp_path / "one", batch_size=4, progress=False)
    rows = read_rows(tmp_path / "one" / "case_dicom_tiles.csv")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "case_dicom.geojson", "case_dicom_heatmap.png", "case_dicom_tiles.csv"]
    assert summary["level"] == dicom_summary["level"]
    assert [r["cellularity"] for r in rows] == [r["cellularity"] for r in dicom_rows]


def test_folder_without_a_dicom_slide_is_a_one_line_error(regressor, slide_image, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CellnetError, match="empty: no DICOM whole-slide image here") as info:
        slide_map(regressor, empty, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "slide.dcm").write_bytes(b"not a DICOM file at all")
    with pytest.raises(CellnetError, match="junk: no DICOM whole-slide image here"):
        slide_map(regressor, junk / "slide.dcm", tmp_path / "out", progress=False)

    # A truncated instance opens (its header is whole) and fails on reading its pixels.
    whole = write_dicom(tmp_path / "whole", slide_image, 0.5)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "level0.dcm").write_bytes((whole / "level0.dcm").read_bytes()[:3_000_000])
    with pytest.raises(CellnetError, match="truncated: unreadable or truncated whole-slide image") as info:
        slide_map(regressor, truncated, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

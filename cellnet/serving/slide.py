"""``cellnet slide``: cellularity over a whole-slide image (SPEC 6).

The slide is read with tiffslide, or with wsidicom when it is a DICOM whole-slide image (a folder
of the slide's VL Whole Slide Microscopy instances, or one ``.dcm`` file of it: then its folder is
read), and tiled like the training patches: 512 px tiles covering
256 um (0.5 um/px, 20x). With the slide's microns-per-pixel the tile spans ``256 / mpp``
level-0 pixels, read from the coarsest level that still has that resolution and resized to
512 px; without it level 0 is taken to be 0.5 um/px. Tiles are kept where a thumbnail's tissue
mask (Otsu threshold on saturation: stained tissue is coloured, glass is white or grey) covers
at least ``MIN_TISSUE`` of them, and go through the exported SavedModel in batches.

Writes, into the output folder, for a slide ``<stem>`` (the file's stem; a DICOM slide's folder name):

- ``<stem>_tiles.csv``: one row per tissue tile (level-0 box, tissue share, scores);
- ``<stem>_heatmap.png``: the tile scores coloured over the thumbnail;
- ``<stem>_uncertainty.png``: for exports with test-time augmentation or ensembles, their
  ``cellularity_std`` (the spread over variants and members) coloured the same way;
- ``<stem>.geojson``: a FeatureCollection QuPath 0.3 to 0.6 imports (:mod:`cellnet.data.qupath`);
  tiles are ``tile`` objects with the tile's CSV columns (``cellularity`` or ``malignant_fraction``,
  ``tissue``, any other score the model gives) as measurements; for models that output masks,
  malignant nuclei (local maxima of the malignant map above 0.5) are ``detection`` points of
  QuPath's class Tumor. Coordinates are level-0 pixels.

They are written together: each to a temporary name, renamed once all are written, so a full
disk leaves none of them behind.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tiffslide
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from cellnet.classes import MALIGNANT
from cellnet.data import qupath
from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_path, write_failure
from cellnet.serving.predict import MASK_THRESHOLD, ServedModel, load_served
from cellnet.preprocess import PATCH_SIZE

#: Microns per pixel of the training patches (BreastPathQ and BRCA-M2C are 20x).
TRAINING_MPP = 0.5
#: The per-tile uncertainty column of TTA and ensemble exports (``cellnet export --tta``).
UNCERTAINTY = "cellularity_std"
#: Longest side of the thumbnail used for tissue detection and the heatmap.
THUMBNAIL_SIZE = 1024
#: Otsu's threshold on saturation is kept in this range: below, noise on blank glass passes;
#: above (slides almost all tissue), pale stroma would be split off as background.
SATURATION_RANGE = (15, 40)
#: A tile is predicted when at least this share of it is tissue.
MIN_TISSUE = 0.25
#: Malignant nuclei: local maxima of the malignant map above ``MASK_THRESHOLD``, at least this many
#: working-resolution pixels apart (the weak masks' discs are 15 px across).
NUCLEUS_MIN_DISTANCE = 4
WHITE = 255


@dataclass
class Tile:
    """One tile of the grid: level-0 box and the share of it that is tissue."""

    row: int
    col: int
    x: int
    y: int
    size: int
    tissue: float


# ----------------------------------------------------------------------------- reading

#: A file with the DICOM preamble's magic at this offset is a DICOM instance (whatever its name).
DICOM_MAGIC = (128, b"DICM")


def is_dicom(path: Path) -> bool:
    """A folder (of DICOM instances) or a DICOM file: ``.dcm``, or the ``DICM`` magic at byte 128."""
    if path.is_dir() or path.suffix.lower() == ".dcm":
        return True
    offset, magic = DICOM_MAGIC
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(len(magic)) == magic
    except OSError:
        return False


class DicomSlide:
    """A DICOM WSI (wsidicom) behind the part of tiffslide's interface this module uses.

    Levels are the selected pyramid's (focal plane and optical path wsidicom's defaults);
    ``read_region`` takes level-0 coordinates like tiffslide's and returns the part of the
    region inside the level (the caller pads); ``mpp`` is (x, y) um/px from the pixel spacing.
    """

    def __init__(self, wsi):
        self.wsi = wsi
        self._levels = sorted(wsi.levels, key=lambda level: level.level)
        base = self._levels[0].size
        self.dimensions = (base.width, base.height)
        self.level_count = len(self._levels)
        self.level_dimensions = tuple((level.size.width, level.size.height) for level in self._levels)
        # wsidicom places a level 2**level below the base (its pixel spacing, rounded to powers of 2)
        self.level_downsamples = tuple(float(2 ** level.level) for level in self._levels)

    @property
    def mpp(self) -> tuple[float, float] | None:
        try:
            spacing = self.wsi.mpp
        except Exception:  # no pixel spacing: the caller assumes the training magnification
            return None
        return float(spacing.width), float(spacing.height)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level no coarser than ``downsample`` (tiffslide's and OpenSlide's rule)."""
        if downsample <= 1.0:
            return 0
        for level, ds in enumerate(self.level_downsamples):
            if ds > downsample:
                return level - 1
        return self.level_count - 1

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], as_array: bool = False):
        """RGB pixels of the region at ``level`` whose top left is ``location`` in level-0 px."""
        downsample = self.level_downsamples[level]
        width, height = self.level_dimensions[level]
        x0, y0 = (min(max(int(v / downsample), 0), limit) for v, limit in zip(location, (width, height)))
        x1, y1 = min(x0 + int(size[0]), width), min(y0 + int(size[1]), height)
        if x1 <= x0 or y1 <= y0:
            region = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        else:
            region = np.asarray(self.wsi.read_region((x0, y0), self._levels[level].level, (x1 - x0, y1 - y0),
                                                     as_array=True))
        if region.ndim == 2 or region.shape[-1] == 1:  # MONOCHROME2: grey as RGB
            region = np.repeat(region.reshape(*region.shape[:2], 1), 3, axis=-1)
        return region if as_array else Image.fromarray(region)

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """The best level for ``size`` read whole, resized to fit it (as tiffslide's thumbnail)."""
        downsample = max(self.dimensions[0] / size[0], self.dimensions[1] / size[1])
        level = self.get_best_level_for_downsample(downsample)
        thumbnail = self.read_region((0, 0), level, self.level_dimensions[level])
        thumbnail.thumbnail(size, Image.Resampling.LANCZOS)
        return thumbnail


#: Either backend: the rest of this module uses only what both offer.
Slide = tiffslide.TiffSlide | DicomSlide


def _problem(exc: Exception, limit: int) -> str:
    message = str(exc).strip().splitlines()[0][:limit] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def open_dicom(path: Path) -> DicomSlide:
    """The DICOM WSI in the folder ``path`` (or the folder of the instance ``path``)."""
    folder = path if path.is_dir() else path.parent
    try:  # imported here: only DICOM slides need it (and it is slow to import)
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNotFoundError
    except ImportError:
        raise bad(path, "is a DICOM slide, which needs wsidicom (pip install wsidicom)") from None

    try:
        return DicomSlide(WsiDicom.open(folder))
    except WsiDicomNotFoundError:
        raise bad(folder, "no DICOM whole-slide image here (no readable VL Whole Slide Microscopy "
                          "volume instance)") from None
    except Exception as exc:  # any reader failure is the files' problem, reported in one line
        raise bad(folder, f"cannot be read as a DICOM whole-slide image ({_problem(exc, 100)})") from None


def open_slide(path: str | os.PathLike) -> Slide:
    """The slide, its metadata parsed; a one-line error for a missing or unreadable file.

    A folder, a ``.dcm`` file or a file with the DICOM magic opens as a DICOM WSI; anything else
    with tiffslide.
    """
    path = Path(path)
    if not path.exists():
        raise bad(path, "no such file or folder")
    if is_dicom(path):
        return open_dicom(path)
    if not path.is_file():
        raise bad(path, "not a file or folder")
    try:
        slide = tiffslide.TiffSlide(path)
        _ = slide.properties, slide.dimensions, slide.level_downsamples  # parsed lazily: fail here
        return slide
    except Exception as exc:  # any reader failure is the file's problem, reported in one line
        raise bad(path, f"cannot be read as a whole-slide image ({type(exc).__name__}: {str(exc)[:100]})") from None


def slide_stem(path: str | os.PathLike) -> str:
    """The name a slide's outputs start with: the file's stem, or for DICOM its folder's name.

    A DICOM WSI is its folder (one instance per level), so ``slide/level0.dcm`` names ``slide``.
    """
    path = Path(path)
    return path.parent.name if path.is_file() and is_dicom(path) else path.stem


def read_thumbnail(slide: Slide, path: Path) -> np.ndarray:
    """The slide's RGB thumbnail (longest side ``THUMBNAIL_SIZE``); a one-line error if unreadable."""
    try:
        return np.asarray(slide.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).convert("RGB"))
    except Exception as exc:  # a truncated or damaged slide is the file's problem, reported in one line
        raise bad(path, f"unreadable or truncated whole-slide image ({_problem(exc, 80)})") from None


def slide_mpp(slide: Slide) -> float | None:
    """Level-0 microns per pixel from the slide's metadata, or None when absent."""
    if isinstance(slide, DicomSlide):
        values = list(slide.mpp or ())
    else:
        values = [slide.properties.get(f"tiffslide.mpp-{axis}") for axis in ("x", "y")]
    values = [float(v) for v in values if v is not None and float(v) > 0]
    return float(np.mean(values)) if values else None


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: saturation above a (bounded) Otsu threshold."""
    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, 5)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = saturation > np.clip(otsu, *SATURATION_RANGE)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)


def tile_grid(dimensions: tuple[int, int], tile: float, mask: np.ndarray) -> list[Tile]:
    """Tiles of ``tile`` level-0 px over the slide whose tissue share reaches ``MIN_TISSUE``.

    Edge tiles reaching past the slide count the outside as background (and are read padded
    with white).
    """
    width, height = dimensions
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    tiles = []
    for row in range(math.ceil(height / tile)):
        for col in range(math.ceil(width / tile)):
            x, y = round(col * tile), round(row * tile)
            y0, y1 = int(y * sy), max(int(y * sy) + 1, round((y + tile) * sy))
            x0, x1 = int(x * sx), max(int(x * sx) + 1, round((x + tile) * sx))
            share = mask[y0:y1, x0:x1].sum() / ((y1 - y0) * (x1 - x0))
            if share >= MIN_TISSUE:
                tiles.append(Tile(row, col, x, y, round(tile), float(share)))
    return tiles


def read_tile(slide: Slide, path: Path, tile: Tile, level: int, patch: int) -> np.ndarray:
    """The tile as uint8 RGB ``patch x patch``, read at ``level`` and resized; white outside."""
    downsample = slide.level_downsamples[level]
    width, height = slide.dimensions
    size = max(1, round(tile.size / downsample))
    inside = (max(1, min(size, math.ceil((width - tile.x) / downsample))),
              max(1, min(size, math.ceil((height - tile.y) / downsample))))
    try:
        region = np.asarray(slide.read_region((tile.x, tile.y), level, inside, as_array=True))
    except Exception as exc:  # a damaged tile is the file's problem, reported in one line
        raise bad(path, f"tile at ({tile.x}, {tile.y}) unreadable ({_problem(exc, 80)})") from None
    canvas = np.full((size, size, 3), WHITE, np.uint8)
    canvas[:region.shape[0], :region.shape[1]] = region[..., :3]
    interpolation = cv2.INTER_AREA if size > patch else cv2.INTER_LINEAR
    return cv2.resize(canvas, (patch, patch), interpolation=interpolation)


# ----------------------------------------------------------------------------- nuclei

def malignant_nuclei(masks: np.ndarray, tile: Tile, dimensions: tuple[int, int]) -> list[tuple[float, float, float]]:
    """(x, y, activation) in level-0 px of the malignant map's local maxima above 0.5.

    A pixel is a maximum when no pixel within ``NUCLEUS_MIN_DISTANCE`` is higher; touching
    maxima (a plateau, e.g. a saturated nucleus) count once, at their centroid.
    """
    malignant = np.ascontiguousarray(masks[..., MALIGNANT], dtype=np.float32)
    window = np.ones((2 * NUCLEUS_MIN_DISTANCE + 1,) * 2, np.uint8)
    peaks = (malignant >= cv2.dilate(malignant, window)) & (malignant > MASK_THRESHOLD)
    count, labels, _, centroids = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    activations = ndimage.maximum(malignant, labels, index=np.arange(1, count))
    scale = tile.size / malignant.shape[1]
    nuclei = []
    for (c, r), activation in zip(centroids[1:], activations):
        x, y = tile.x + (c + 0.5) * scale, tile.y + (r + 0.5) * scale
        if x < dimensions[0] and y < dimensions[1]:
            nuclei.append((float(x), float(y), float(activation)))
    return nuclei


# ----------------------------------------------------------------------------- outputs

def score_name(outputs) -> str:
    """``cellularity``, or ``malignant_fraction`` (share of pixels above 0.5) for segmenters.

    ``outputs``: the model's output names (a ``ServedModel``'s, or one tile's outputs).
    """
    names = outputs.outputs if isinstance(outputs, ServedModel) else outputs
    return "cellularity" if "cellularity" in names else "malignant_fraction"


def tile_scores(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """The tile-CSV scores of one tile's outputs (unbatched)."""
    if "cellularity" in outputs:
        scores = {"cellularity": outputs["cellularity"]}
        if "interval" in outputs:
            scores.update(low=outputs["interval"][0], high=outputs["interval"][1])
        if UNCERTAINTY in outputs:
            scores[UNCERTAINTY] = outputs[UNCERTAINTY]
        return {k: float(v) for k, v in scores.items()}
    return {"malignant_fraction": float((outputs["masks"][..., MALIGNANT] > MASK_THRESHOLD).mean())}


def tile_row(tile: Tile, outputs: dict[str, np.ndarray], dimensions: tuple[int, int]
             ) -> tuple[dict, list[tuple[float, float, float]]]:
    """One tile's CSV row and (for models with masks) its malignant nuclei in level-0 px."""
    row = {"row": tile.row, "col": tile.col, "x": tile.x, "y": tile.y, "width": tile.size,
           "height": tile.size, "tissue": round(tile.tissue, 4),
           **{k: round(v, 6) for k, v in tile_scores(outputs).items()}}
    found = []
    if "masks" in outputs:
        found = malignant_nuclei(outputs["masks"], tile, dimensions)
        row["malignant_nuclei"] = len(found)
    return row, found


def unbatch(outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A batch's outputs as one dict per example."""
    count = len(next(iter(outputs.values())))
    return [{k: v[i] for k, v in outputs.items()} for i in range(count)]


#: Tile-CSV columns that place a tile; every other column is a measurement of it in the GeoJSON.
GRID_COLUMNS = ("row", "col", "x", "y", "width", "height")


def geojson(tiles: list[Tile], rows: list[dict], nuclei: list[tuple[float, float, float]]) -> dict:
    """QuPath FeatureCollection: tiles with their scores as measurements, malignant nuclei as Tumor."""
    features = [qupath.tile_feature(tile.x, tile.y, tile.size, tile.size, name=f"tile {tile.row},{tile.col}",
                                    measurements={k: v for k, v in row.items() if k not in GRID_COLUMNS})
                for tile, row in zip(tiles, rows)]
    features += [qupath.nucleus_feature("malignant", qupath.point(x, y), {"malignant_activation": round(a, 4)})
                 for x, y, a in nuclei]
    return qupath.feature_collection(features)


def heatmap(thumbnail: np.ndarray, dimensions: tuple[int, int], tiles: list[Tile], scores: np.ndarray,
            name: str, path: Path, title: str, vmax: float = 1.0) -> None:
    """Tile scores (0..vmax, magma) over the thumbnail with a colour bar, as PNG to ``path``."""
    height, width = thumbnail.shape[:2]
    sx, sy = width / dimensions[0], height / dimensions[1]
    figure = Figure(figsize=(8, 8 * height / width + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(thumbnail)
    grid = np.full((max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1), np.nan)
    for tile, score in zip(tiles, scores):
        grid[tile.row, tile.col] = score
    size = tiles[0].size
    image = axes.imshow(grid, cmap="magma", vmin=0.0, vmax=vmax, alpha=0.6, interpolation="nearest",
                        extent=(0, grid.shape[1] * size * sx, grid.shape[0] * size * sy, 0))
    axes.set(xlim=(0, width), ylim=(height, 0), title=title)
    axes.set_axis_off()
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label=name)
    figure.savefig(path, format="png", bbox_inches="tight")


def write_tiles_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_together(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Call each writer on a temporary name; rename them all only once every one has written.

    A write the disk refuses leaves none of the outputs, nor a temporary file, and names the
    output it was writing.
    """
    current = None
    try:
        with contextlib.ExitStack() as stack:
            for current, write in writers.items():
                write(stack.enter_context(atomic_path(current)))
    except OSError as exc:
        raise write_failure(current, exc) from None


# ----------------------------------------------------------------------------- the command

@dataclass
class SlidePlan:
    """What tiling a slide decides before any prediction: its grid, level and thumbnail."""

    path: Path
    slide: Slide
    mpp: float | None
    level: int
    patch: int
    thumbnail: np.ndarray
    tiles: list[Tile]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.slide.dimensions

    def read(self, tile: Tile) -> np.ndarray:
        return read_tile(self.slide, self.path, tile, self.level, self.patch)


def plan_slide(slide_path: str | os.PathLike, patch: int | None, slide: Slide | None = None) -> SlidePlan:
    """Find the slide's tissue and lay the tile grid for a model of ``patch`` px inputs.

    ``slide``: the slide already opened (``open_slide``), else it is opened here.
    """
    slide_path = Path(slide_path)
    slide = slide or open_slide(slide_path)
    patch = patch or PATCH_SIZE
    mpp = slide_mpp(slide)
    tile_size = PATCH_SIZE * TRAINING_MPP / (mpp or TRAINING_MPP)
    level = slide.get_best_level_for_downsample(tile_size / patch)
    thumbnail = read_thumbnail(slide, slide_path)
    tiles = tile_grid(slide.dimensions, tile_size, tissue_mask(thumbnail))
    if not tiles:
        raise bad(slide_path, f"no tissue found (no {tile_size:.0f} px tile is {MIN_TISSUE:.0%} tissue)")
    return SlidePlan(slide_path, slide, mpp, level, patch, thumbnail, tiles)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise bad(out_dir, "is a file; expected a folder for the slide's outputs")


def write_slide_outputs(plan: SlidePlan, rows: list[dict], nuclei: list[tuple[float, float, float]],
                        out_dir: Path) -> dict[str, Path]:
    """The tile CSV, heatmap (and uncertainty map) and GeoJSON of a predicted slide, together."""
    stem, name = slide_stem(plan.path), score_name(rows[0])
    values = np.array([row[name] for row in rows])
    paths = {"csv": out_dir / f"{stem}_tiles.csv", "heatmap": out_dir / f"{stem}_heatmap.png",
             "geojson": out_dir / f"{stem}.geojson"}
    title = f"{plan.path.name}: {len(rows)} tiles, mean {name} {values.mean():.3f}"
    writers = {
        paths["csv"]: lambda tmp: write_tiles_csv(tmp, rows),
        paths["heatmap"]: lambda tmp: heatmap(plan.thumbnail, plan.dimensions, plan.tiles, values, name, tmp, title),
        paths["geojson"]: lambda tmp: tmp.write_text(json.dumps(geojson(plan.tiles, rows, nuclei)))}
    if UNCERTAINTY in rows[0]:
        spread = np.array([row[UNCERTAINTY] for row in rows])
        paths["uncertainty"] = out_dir / f"{stem}_uncertainty.png"
        # the spread's own scale (a std of scores in [0, 1] is at most 0.5), so small spreads show
        writers[paths["uncertainty"]] = lambda tmp: heatmap(
            plan.thumbnail, plan.dimensions, plan.tiles, spread, UNCERTAINTY, tmp,
            f"{plan.path.name}: spread over TTA variants / ensemble members, mean {spread.mean():.3f}",
            vmax=max(float(spread.max()), 1e-3))
    write_together(writers)
    return paths


def slide_map(model_dir: str | os.PathLike, slide_path: str | os.PathLike, out_dir: str | os.PathLike,
              batch_size: int = 16, progress: bool = True) -> dict:
    """Tile a slide over its tissue, predict every tile and write CSV, heatmap PNG and GeoJSON."""
    if batch_size < 1:
        raise CellnetError(f"--batch-size: expected a positive integer, got {batch_size}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    slide = open_slide(slide_path)  # a bad slide is reported before the model is loaded
    model = load_served(model_dir)
    plan = plan_slide(slide_path, model.patch_size, slide)

    start = time.time()
    rows: list[dict] = []
    nuclei: list[tuple[float, float, float]] = []
    with tqdm(total=len(plan.tiles), desc="slide", unit="tile", disable=not progress) as bar:
        for first in range(0, len(plan.tiles), batch_size):
            chunk = plan.tiles[first:first + batch_size]
            outputs = model.run(np.stack([plan.read(t) for t in chunk]), plan.path)
            for tile, tile_outputs in zip(chunk, unbatch(outputs)):
                row, found = tile_row(tile, tile_outputs, plan.dimensions)
                rows.append(row)
                nuclei += found
            bar.update(len(chunk))
    seconds = time.time() - start

    name = score_name(model)
    paths = write_slide_outputs(plan, rows, nuclei, out_dir)
    return {"tiles": len(rows), f"mean_{name}": round(float(np.mean([r[name] for r in rows])), 4),
            "nuclei": len(nuclei) if model.has_masks else "-",
            "mpp": round(plan.mpp, 4) if plan.mpp else f"unknown (assumed {TRAINING_MPP})", "level": plan.level,
            "tiles_per_s": round(len(rows) / seconds, 2), **{k: str(v) for k, v in paths.items()}}

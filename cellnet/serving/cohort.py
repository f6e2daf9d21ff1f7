"""``cellnet cohort``: ``cellnet slide`` over a manifest of slides as an Apache Beam pipeline.

The pipeline is slides -> tissue tiles -> Beam RunInference (its TensorFlow model handler,
batched) -> per-tile rows -> per-slide outputs, then one ``cohort.csv``::

    Create(slides) | FlatMap(tiles) | RunInference(KeyedModelHandler(CellnetModelHandler))
                   | Map(tile row) | GroupByKey(slide) | Map(write slide outputs) | ToList | cohort.csv

Each stage calls the same functions as ``cellnet slide`` (:mod:`cellnet.serving.slide`): the tile
grid, tile reading, scores, nuclei and the writers, so a slide's ``<stem>_tiles.csv``, heatmap(s)
and GeoJSON are those ``cellnet slide`` writes for it with the same model. Beam's TensorFlow
handler loads models with ``tf.keras.models.load_model``, which Keras 3 no longer offers for
SavedModels; the handler here is Beam's with only the loading replaced (``load_served``: the
export's ``images`` signature and its metadata).

The runner is Beam's choice of engine: DirectRunner here; FlinkRunner, SparkRunner or
DataflowRunner take their own options (``--flink_master``, ``--project``, ``--temp_location``...)
after cellnet's. Slides, the model and the output folder are read and written as local paths by
the workers, so on a cluster they must be on a file system every worker mounts (NFS, or a bucket
mounted with gcsfuse / s3fs).

apache-beam is the optional extra ``cellnet[cohort]``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_path, writing
from cellnet.serving.predict import ServedModel, load_served
from cellnet.serving.slide import (
    Tile, check_out_dir, open_slide, plan_slide, score_name, slide_stem, tile_row, unbatch, write_slide_outputs)

#: The manifest's column of slide paths (relative ones are read from the manifest's folder).
SLIDE_COLUMN = "slide"
COHORT_FILE = "cohort.csv"
#: Per-tile processing seconds travel with the tile's outputs under this name.
SECONDS = "_seconds"


def import_beam():
    """apache_beam, or a one-line error naming the extra; its import-time log lines silenced."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "apitools not found..." is about GCP clients cellnet does not use
    try:
        import apache_beam as beam
        from apache_beam.ml.inference import base, tensorflow_inference  # noqa: F401 (loaded here, once)
    except ImportError as exc:
        raise CellnetError(f"cellnet cohort needs Apache Beam ({exc}); install it with "
                           "pip install \"cellnet[cohort]\"") from None
    finally:
        root.setLevel(level)
    return beam


# ----------------------------------------------------------------------------- manifest

def read_manifest(path: str | os.PathLike) -> list[Path]:
    """The manifest's slide paths, checked: present, readable as slides, distinct output names."""
    path = Path(path)
    if not path.is_file():
        raise bad(path, "no such manifest file (expected a CSV with a 'slide' column)")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if SLIDE_COLUMN not in (reader.fieldnames or []):
                raise bad(path, f"no '{SLIDE_COLUMN}' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
            entries = [(line, (row[SLIDE_COLUMN] or "").strip()) for line, row in enumerate(reader, start=2)]
    except UnicodeDecodeError:
        raise bad(path, "not a text CSV file") from None
    except csv.Error as exc:
        raise bad(path, f"unreadable CSV ({exc})") from None
    slides, stems = [], {}
    for line, value in entries:
        if not value:
            raise bad(path, f"line {line}: empty '{SLIDE_COLUMN}'")
        slide = Path(value) if Path(value).is_absolute() else path.parent / value
        if not slide.exists():
            raise bad(path, f"line {line}: {slide}: no such slide")
        stem = slide_stem(slide)
        if stem in stems:  # the outputs are named after the stem: one would overwrite the other
            raise bad(path, f"line {line}: {slide} has the same name as line {stems[stem]} "
                            f"({stem}); its outputs would overwrite those")
        stems[stem] = line
        slides.append(slide)
    if not slides:
        raise bad(path, "lists no slides")
    return slides


# ----------------------------------------------------------------------------- pipeline stages

@dataclass(frozen=True)
class TileRef:
    """Where a tile's outputs belong: its slide, place in the slide's grid, and the read time."""

    slide: str
    index: int
    tile: Tile
    dimensions: tuple[int, int]
    seconds: float


def slide_tiles(slide: str, patch: int | None) -> Iterator[tuple[TileRef, np.ndarray]]:
    """(TileRef, uint8 tile) for every tissue tile of the slide; the grid's time goes to tile 0."""
    start = time.perf_counter()
    plan = plan_slide(slide, patch)
    for index, tile in enumerate(plan.tiles):
        image = plan.read(tile)
        now = time.perf_counter()
        yield TileRef(slide, index, tile, plan.dimensions, now - start), image
        start = now


def infer(model: ServedModel, batch: Sequence[np.ndarray], inference_args: dict, model_id: str | None = None):
    """RunInference's inference_fn: one batch through the export; each tile gets a share of the time."""
    from apache_beam.ml.inference.base import PredictionResult

    start = time.perf_counter()
    outputs = model.run(np.stack(batch), model.path)
    share = (time.perf_counter() - start) / len(batch)
    # the example itself is not passed on: only the outputs are needed downstream
    return [PredictionResult(None, {**tile, SECONDS: share}, model_id) for tile in unbatch(outputs)]


def model_handler(model_dir: str, batch_size: int):
    """Beam's TensorFlow model handler for a cellnet export, batching up to ``batch_size`` tiles."""
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

    class CellnetModelHandler(TFModelHandlerNumpy):
        """TFModelHandlerNumpy loading the export with ``load_served`` (Keras 3 cannot load SavedModels)."""

        def load_model(self) -> ServedModel:
            return load_served(model_dir)

    # fixed batches (Beam would otherwise start at 1 tile and grow): the last of a bundle may be smaller
    return CellnetModelHandler(model_dir, inference_fn=infer, min_batch_size=batch_size, max_batch_size=batch_size)


def tile_result(element) -> tuple[str, tuple[int, dict, list, float]]:
    """(slide, (index, CSV row, nuclei, seconds)) from a tile's RunInference result."""
    ref, result = element
    outputs = dict(result.inference)
    seconds = ref.seconds + float(outputs.pop(SECONDS))
    row, nuclei = tile_row(ref.tile, outputs, ref.dimensions)
    return ref.slide, (ref.index, row, nuclei, seconds)


def finish_slide(item, out_dir: str, patch: int | None, progress: bool = False) -> dict:
    """Write one slide's outputs (as ``cellnet slide``) and return its cohort row.

    The slide is planned again here (its thumbnail re-read) rather than carried through the
    pipeline: a thumbnail is megabytes, a shuffle should carry only the tiles' rows.
    With ``progress`` a line per finished slide goes to stderr (Beam has no progress bar).
    """
    slide, results = item
    results = sorted(results, key=lambda r: r[0])
    start = time.perf_counter()
    plan = plan_slide(slide, patch)  # the same grid and thumbnail as when its tiles were read
    if len(plan.tiles) != len(results):
        raise bad(slide, f"changed while it was processed ({len(plan.tiles)} tiles now, {len(results)} predicted)")
    rows = [row for _, row, _, _ in results]
    nuclei = [n for _, _, found, _ in results for n in found]
    write_slide_outputs(plan, rows, nuclei, Path(out_dir))
    name = score_name(rows[0])
    values = np.array([row[name] for row in rows])
    tissue = np.array([row["tissue"] for row in rows])
    seconds = sum(s for *_, s in results) + time.perf_counter() - start
    if progress:
        print(f"cohort: {slide}: {len(rows)} tiles, mean {name} {values.mean():.3f}, {seconds:.1f} s",
              file=sys.stderr, flush=True)
    return {"slide": slide, "tiles": len(rows), f"mean_{name}": round(float(values.mean()), 6),
            f"tissue_weighted_{name}": round(float((values * tissue).sum() / tissue.sum()), 6),
            "nuclei": len(nuclei) if "malignant_nuclei" in rows[0] else "",
            "seconds": round(seconds, 3)}


def write_cohort(rows: list[dict], out_dir: str, order: list[str]) -> str:
    """``cohort.csv``: one row per slide, in the manifest's order."""
    rows = sorted(rows, key=lambda row: order.index(row["slide"]))
    path = Path(out_dir) / COHORT_FILE
    with writing(path), atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# ----------------------------------------------------------------------------- the command

def unwrap(exc: Exception) -> CellnetError | None:
    """The cellnet error inside a runner's failure (runners re-raise with stage names appended)."""
    if isinstance(exc, CellnetError):
        return CellnetError(str(exc).split(" [while running")[0])
    for line in str(exc).splitlines():
        if "CellnetError: " in line:
            return CellnetError(line.split("CellnetError: ", 1)[1].split(" [while running")[0])
    return None


class _PlatformWarning(logging.Filter):
    """RunInference warns on every batch where it cannot read the process's memory use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "memory usage cannot be fetched" not in record.getMessage()


@contextlib.contextmanager
def quiet_platform_warning() -> Iterator[None]:
    root, keep = logging.getLogger(), _PlatformWarning()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class _Discarded(logging.Filter):
    """Collects (and silences) the options Beam's parser discards: it only logs them."""

    def __init__(self):
        super().__init__()
        self.options: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "unparseable" not in str(record.msg):
            return True
        self.options += [str(a) for arg in record.args or () for a in (arg if isinstance(arg, list) else [arg])]
        return False


def pipeline_options(runner: str, beam_args: Sequence[str]):
    """Beam's PipelineOptions for the runner; an unknown or malformed option is one line, not ignored."""
    from apache_beam.options.pipeline_options import PipelineOptions

    logger, discarded, usage = logging.getLogger("apache_beam.options.pipeline_options"), _Discarded(), io.StringIO()
    logger.addFilter(discarded)
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its whole usage before exiting
            options = PipelineOptions([f"--runner={runner}", *beam_args])
            options.get_all_options()
    except SystemExit:
        problem = usage.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise CellnetError(f"Beam options: {problem}") from None
    finally:
        logger.removeFilter(discarded)
    if discarded.options:
        raise CellnetError(f"Beam options: {' '.join(discarded.options)}: not one of Beam's pipeline options "
                           "(a typo, or an option of another runner's SDK)")
    return options


def cohort(model_dir: str | os.PathLike, manifest: str | os.PathLike, out_dir: str | os.PathLike,
           runner: str = "DirectRunner", beam_args: Sequence[str] = (), batch_size: int = 16,
           progress: bool = False) -> dict:
    """Score every slide of ``manifest`` with a Beam pipeline; write per-slide outputs and cohort.csv.

    Everything a user can get wrong (manifest, slides, model, output folder, options) is checked
    before the pipeline starts, each as one line naming the file.
    """
    if batch_size < 1:
        raise CellnetError(f"--batch-size: expected a positive integer, got {batch_size}")
    out = Path(out_dir)
    check_out_dir(out)
    slides = read_manifest(manifest)
    for slide in slides:
        open_slide(slide)
    model = load_served(model_dir)
    beam = import_beam()
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    options = pipeline_options(runner, beam_args)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(s) for s in slides]
    patch, path, folder = model.patch_size, str(model.path), str(out)
    start = time.time()
    try:
        with quiet_platform_warning(), beam.Pipeline(options=options) as pipeline:
            (pipeline
             | "Slides" >> beam.Create(names)
             | "Tiles" >> beam.FlatMap(slide_tiles, patch)
             | "Predict" >> RunInference(KeyedModelHandler(model_handler(path, batch_size)))
             | "TileRows" >> beam.Map(tile_result)
             | "BySlide" >> beam.GroupByKey()
             | "WriteSlide" >> beam.Map(finish_slide, folder, patch, progress)
             | "AllSlides" >> beam.combiners.ToList()
             | "WriteCohort" >> beam.Map(write_cohort, folder, names))
    except Exception as exc:  # a runner wraps what failed inside it; cellnet's own errors stay one line
        error = unwrap(exc)
        if error is None:
            raise
        raise error from None
    seconds = time.time() - start
    with (out / COHORT_FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {"slides": len(rows), "tiles": sum(int(r["tiles"]) for r in rows), "runner": runner,
            "seconds": round(seconds, 1), "cohort": str(out / COHORT_FILE)}

"""Bad-input table (SPEC 7) for ``cellnet predict``, ``export`` and ``slide``, through the real CLI.

Every row goes through :func:`badinput.check` (exit code, one line naming the file, no traceback,
inputs byte-for-byte unchanged). Rows that are refused must also leave nothing behind: no file
appears under the row's folder (no partial CSV, overlay, version folder or temporary file), and
the line never names a temporary file. Faults (a full disk, memory) are injected with monkeypatch.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from badinput import Case, Setup, check, files_under
from cellnet.serving.export import export_run
from cellnet.data.imageio import write_image
from cellnet.models import CellSegmenter, DirectCellularity, ResNet34Backbone
from conftest import TINY_BLOCKS, calibrate

WIDTH = 0.125
PATCH = 64  # full resolution; the tiny regression model takes 32x32 at working resolution


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """Tiny regression and U-Net segmentation runs and their exports, under one root."""
    root = tmp_path_factory.mktemp("serving")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    for kind, model in (
            ("regression", DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)),
            ("segmentation", CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="unet", name="unet_segmenter"))):
        calibrate(model, rng.integers(0, 256, (8, PATCH, PATCH, 3), dtype=np.uint8))
        run = root / "runs" / kind
        run.mkdir(parents=True)
        model.save(run / "best.keras")
        (run / "run.json").write_text(json.dumps({"kind": kind, "status": "complete"}))
        export_run(run, root / "saved_models" / kind)
    return root


# ----------------------------------------------------------------------------- building rows
# Each row's folder holds ``models`` (a link to the shared exports), then what the row writes.

def models(tmp: Path, kind: str = "regression") -> Path:
    return tmp / "models" / "saved_models" / kind


def run_dir(tmp: Path) -> Path:
    return tmp / "models" / "runs" / "regression"


def images(tmp: Path, names: tuple[str, ...] = ("1001_1.png", "1001_2.png"), size: int = PATCH) -> Path:
    folder = tmp / "in"
    rng = np.random.default_rng(0)
    for name in names:
        write_image(folder / name, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return folder


def predict_argv(tmp: Path, *extra: str, model: Path | None = None, inputs: Path | None = None) -> list[str]:
    return ["predict", "--model", str(model or models(tmp)), "--input", str(inputs or images(tmp)),
            "--quiet", *extra]


def model_copy(tmp: Path, edit: dict | None = None, meta: bytes | None = None) -> Path:
    """A copy of the regression export with its ``assets/cellnet.json`` edited or replaced."""
    copy = tmp / "model"
    shutil.copytree(models(tmp) / "1", copy)
    path = copy / "assets" / "cellnet.json"
    if edit is not None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    if meta is not None:
        path.write_bytes(meta)
    return copy


def slide_file(tmp: Path) -> Path:
    """A 1024 px single-level tiled TIFF: one quadrant of pink tissue on white glass."""
    image = np.full((1024, 1024, 3), 244, np.uint8)
    rng = np.random.default_rng(0)
    image[:512, :512] = rng.normal((215, 130, 175), 12, (512, 512, 3)).clip(0, 255).astype(np.uint8)
    path = tmp / "slides" / "case.tif"
    path.parent.mkdir(parents=True)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def slide_argv(tmp: Path, slide: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["slide", "--model", str(model or models(tmp)), "--slide", str(slide), "--out", str(tmp / "out"),
            "--quiet", *extra]


# ----------------------------------------------------------------------------- faults

def disk_full(path: str | os.PathLike | None = None) -> OSError:
    """The OSError a write on a full disk raises (naming the file written: here, a temporary one)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([os.fspath(path)] if path else []))


def full_csv(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The predictions CSV: the header is written, then the disk is full."""
    import cellnet.serving.predict

    real = csv.writer

    class Writer:
        def __init__(self, f):
            self.f, self.writer = f, real(f)

        def writerow(self, row):
            self.writer.writerow(row)

        def writerows(self, rows):
            self.f.write("1001,1,0.5")
            raise disk_full()

    monkeypatch.setattr(cellnet.serving.predict.csv, "writer", Writer)


def full_second_overlay(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The first overlay is written, the second half-written when the disk fills."""
    import cellnet.serving.predict

    real = cellnet.serving.predict.write_image
    calls = []

    def write_image(path, rgb):
        calls.append(path)
        if len(calls) == 1:
            return real(path, rgb)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise disk_full(path)

    monkeypatch.setattr(cellnet.serving.predict, "write_image", write_image)


def full_heatmap(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """``cellnet slide``: the tile CSV is written, the heatmap (second of three) half-written."""
    import cellnet.serving.slide

    def heatmap(thumbnail, dimensions, tiles, scores, name, path, title):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise disk_full(path)

    monkeypatch.setattr(cellnet.serving.slide, "heatmap", heatmap)


def out_of_memory(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    import cellnet.serving.predict

    def call(self, images):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[16,512,512,64]")

    monkeypatch.setattr(cellnet.serving.predict.ServedModel, "__call__", call)


def save_fails(error: Callable[[Path], Exception]) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """``tf.saved_model.save`` that half-writes the (temporary) export folder, then raises ``error``."""

    def fault(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        def save(obj, export_dir, signatures=None, options=None):
            Path(export_dir, "variables").mkdir(parents=True)
            Path(export_dir, "saved_model.pb").write_bytes(b"\x08\x01 half")
            raise error(Path(export_dir))

        monkeypatch.setattr(tf.saved_model, "save", save)

    return fault


def save_onto_a_full_disk(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The real ``tf.saved_model.save``, its checkpoint index landing on ``/dev/full`` (ENOSPC).

    TensorFlow reports that as a ResourceExhaustedError naming its temporary file.
    """
    real = tf.saved_model.save

    def save(obj, export_dir, signatures=None, options=None):
        Path(export_dir, "variables").mkdir(parents=True)
        Path(export_dir, "variables", "variables.index").symlink_to("/dev/full")
        return real(obj, export_dir, signatures=signatures, options=options)

    monkeypatch.setattr(tf.saved_model, "save", save)


# ----------------------------------------------------------------------------- rows

def out_is_an_input_image(tmp: Path) -> Setup:
    folder = images(tmp)
    return Setup(predict_argv(tmp, "--out", str(folder / "1001_1.png"), inputs=folder),
                 names=str(folder / "1001_1.png"), inputs=[folder], problem="is one of the inputs")


def out_is_a_skipped_input(tmp: Path) -> Setup:
    folder = images(tmp)
    notes = tmp / "notes.csv"
    notes.write_text("slide,rid,y\n1001,1,0.5\n")
    argv = ["predict", "--model", str(models(tmp)), "--input", str(folder), str(notes), "--out", str(notes),
            "--on-bad", "skip", "--quiet"]
    return Setup(argv, names=str(notes), inputs=[folder, notes], problem="is one of the inputs")


def out_is_not_csv(tmp: Path) -> Setup:
    folder = images(tmp)
    return Setup(predict_argv(tmp, "--out", str(tmp / "results.txt"), inputs=folder),
                 names=str(tmp / "results.txt"), inputs=[folder], problem="expected FILE.csv")


def out_is_a_folder(tmp: Path) -> Setup:
    folder = images(tmp)
    (tmp / "results").mkdir()
    return Setup(predict_argv(tmp, "--out", str(tmp / "results"), inputs=folder),
                 names=str(tmp / "results"), inputs=[folder], problem="is a folder; expected FILE.csv")


def overlays_are_the_input_folder(tmp: Path) -> Setup:
    folder = images(tmp)
    argv = predict_argv(tmp, "--out", str(tmp / "p.csv"), "--overlays", str(folder),
                        model=models(tmp, "segmentation"), inputs=folder)
    return Setup(argv, names=str(folder), inputs=[folder], problem="is the input folder")


def overlays_inside_the_input_folder(tmp: Path) -> Setup:
    folder = images(tmp)
    argv = predict_argv(tmp, "--out", str(tmp / "p.csv"), "--overlays", str(folder / "overlays"),
                        model=models(tmp, "segmentation"), inputs=folder)
    return Setup(argv, names=str(folder / "overlays"), inputs=[folder], problem="is inside the input folder")


def overlay_name_taken(tmp: Path) -> Setup:
    folder = images(tmp)
    mine = tmp / "overlays" / "1001_2.png"
    mine.parent.mkdir()
    mine.write_bytes(b"my own figure")
    argv = predict_argv(tmp, "--out", str(tmp / "p.csv"), "--overlays", str(mine.parent),
                        model=models(tmp, "segmentation"), inputs=folder)
    return Setup(argv, names=str(mine), inputs=[folder, mine.parent], problem="already exists")


def predict_with_overlays(tmp: Path) -> Setup:
    folder = images(tmp)
    argv = predict_argv(tmp, "--out", str(tmp / "p.csv"), "--overlays", str(tmp / "overlays"),
                        model=models(tmp, "segmentation"), inputs=folder)
    return Setup(argv, names=str(tmp / "p.csv"), inputs=[folder], problem="No space left on device")


def overlay_disk_full(tmp: Path) -> Setup:
    setup = predict_with_overlays(tmp)
    return dataclasses.replace(setup, names=str(tmp / "overlays" / "1001_2.png"))


def predict_out_of_memory(tmp: Path) -> Setup:
    folder = images(tmp)
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), inputs=folder), names=str(folder / "1001_1.png"),
                 inputs=[folder], problem="try a smaller --batch-size")


def predict_batch_size_zero(tmp: Path) -> Setup:
    folder = images(tmp)
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), "--batch-size", "0", inputs=folder),
                 names="--batch-size", inputs=[folder], problem="expected a positive integer, got 0")


def model_is_not_a_saved_model(tmp: Path) -> Setup:
    folder = images(tmp)
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), model=folder, inputs=folder),
                 names=str(folder), inputs=[folder], problem="holds no SavedModel")


def saved_model_pb_damaged(tmp: Path) -> Setup:
    folder, model = images(tmp), model_copy(tmp)
    (model / "saved_model.pb").write_bytes(b"\x08\x01 not a protocol buffer")
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), model=model, inputs=folder),
                 names=str(model), inputs=[folder, model], problem="cannot load the SavedModel")


def metadata_case(edit: dict | None = None, meta: bytes | None = None, problem: str = "", size: int = PATCH):
    def build(tmp: Path) -> Setup:
        folder, model = images(tmp, size=size), model_copy(tmp, edit, meta)
        return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), model=model, inputs=folder),
                     names=str(model / "assets" / "cellnet.json"), inputs=[folder, model], problem=problem)
    return build


def metadata_patch_size_wrong(tmp: Path) -> Setup:
    folder, model = images(tmp, size=32), model_copy(tmp, {"patch_size": 32})
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), model=model, inputs=folder),
                 names=str(folder / "1001_1.png"), inputs=[folder, model], problem="takes 64x64 RGB patches")


def one_image_truncated(tmp: Path) -> Setup:
    folder = images(tmp)
    broken = folder / "1001_3.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return Setup(predict_argv(tmp, "--out", str(tmp / "p.csv"), "--on-bad", "skip", inputs=folder),
                 names=str(broken), inputs=[folder], problem="unreadable or truncated image",
                 summary="skipped 1")


def export_argv(tmp: Path, run: Path | None = None, out: Path | None = None) -> list[str]:
    return ["export", "--run", str(run or run_dir(tmp)), "--out", str(out or tmp / "saved_models" / "reg")]


def export_disk_full(tmp: Path) -> Setup:
    return Setup(export_argv(tmp), names=str(tmp / "saved_models" / "reg" / "1"), inputs=[run_dir(tmp)],
                 problem="cannot write (No space left on device); nothing was written")


def export_best_keras_damaged(tmp: Path) -> Setup:
    run = tmp / "run"
    shutil.copytree(run_dir(tmp), run)
    (run / "best.keras").write_bytes(b"PK\x03\x04 not a zip archive")
    return Setup(export_argv(tmp, run=run), names=str(run / "best.keras"), inputs=[run],
                 problem="damaged or not a Keras model file")


def export_out_is_a_file(tmp: Path) -> Setup:
    blocker = tmp / "saved_models"
    blocker.write_text("mine")
    return Setup(export_argv(tmp, out=blocker), names=str(blocker), inputs=[run_dir(tmp), blocker],
                 problem="exists and is not a folder")


def slide_truncated(tmp: Path) -> Setup:
    whole = slide_file(tmp)
    cut = whole.with_name("cut.tif")
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return Setup(slide_argv(tmp, cut), names=str(cut), inputs=[cut], problem="truncated whole-slide image")


def slide_not_a_slide(tmp: Path) -> Setup:
    notes = tmp / "notes.svs"
    notes.write_text("a text file named like a slide")
    return Setup(slide_argv(tmp, notes), names=str(notes), inputs=[notes],
                 problem="cannot be read as a whole-slide image")


def slide_batch_size_zero(tmp: Path) -> Setup:
    slide = slide_file(tmp)
    return Setup(slide_argv(tmp, slide, "--batch-size", "0"), names="--batch-size", inputs=[slide],
                 problem="expected a positive integer, got 0")


def slide_out_is_a_file(tmp: Path) -> Setup:
    slide, blocker = slide_file(tmp), tmp / "out"
    blocker.write_text("mine")
    return Setup(slide_argv(tmp, slide), names=str(blocker), inputs=[slide, blocker],
                 problem="is a file; expected a folder")


def slide_model_not_a_saved_model(tmp: Path) -> Setup:
    slide = slide_file(tmp)
    return Setup(slide_argv(tmp, slide, model=slide.parent), names=str(slide.parent), inputs=[slide],
                 problem="holds no SavedModel")


def slide_disk_full(tmp: Path) -> Setup:
    slide = slide_file(tmp)
    return Setup(slide_argv(tmp, slide), names=str(tmp / "out" / "case_heatmap.png"), inputs=[slide],
                 problem="cannot write (No space left on device); nothing was written")


def slide_out_of_memory(tmp: Path) -> Setup:
    slide = slide_file(tmp)
    return Setup(slide_argv(tmp, slide), names=str(slide), inputs=[slide], problem="try a smaller --batch-size")


CASES = [
    # predict: outputs that would land on an input or on an existing output
    Case("predict-out-is-an-input-image", out_is_an_input_image),
    Case("predict-out-is-a-skipped-input", out_is_a_skipped_input),
    Case("predict-out-not-csv", out_is_not_csv),
    Case("predict-out-is-a-folder", out_is_a_folder),
    Case("predict-overlays-are-the-input-folder", overlays_are_the_input_folder),
    Case("predict-overlays-inside-the-input-folder", overlays_inside_the_input_folder),
    Case("predict-overlay-name-taken", overlay_name_taken),
    # predict: faults
    Case("predict-csv-disk-full", predict_with_overlays, fault=full_csv),
    Case("predict-overlay-disk-full", overlay_disk_full, fault=full_second_overlay),
    Case("predict-out-of-memory", predict_out_of_memory, fault=out_of_memory),
    # predict: bad models and options
    Case("predict-batch-size-zero", predict_batch_size_zero),
    Case("predict-model-not-a-saved-model", model_is_not_a_saved_model),
    Case("predict-saved-model-pb-damaged", saved_model_pb_damaged),
    Case("predict-metadata-binary", metadata_case(meta=b"\xff\xfe\x00\x01", problem="unreadable export description")),
    Case("predict-metadata-truncated", metadata_case(meta=b'{"kind": "regr', problem="unreadable export description")),
    Case("predict-metadata-not-an-object", metadata_case(meta=b"[1, 2]", problem="unreadable export description")),
    Case("predict-metadata-unknown-kind", metadata_case({"kind": "mystery"}, problem="unknown model kind 'mystery'")),
    Case("predict-metadata-outputs-not-in-model",
         metadata_case({"kind": "classification", "outputs": ["cellularity", "class_probs", "interval"]},
                       problem="does not describe this SavedModel")),
    Case("predict-metadata-patch-size-not-a-number",
         metadata_case({"patch_size": "big"}, problem="patch_size 'big': expected a positive integer")),
    Case("predict-metadata-patch-size-wrong", metadata_patch_size_wrong),
    # predict: a bad image, skipped
    Case("predict-one-image-truncated-skip", one_image_truncated, code=0, level="warning"),
    # export
    pytest.param(Case("export-disk-full-tensorflow", export_disk_full, fault=save_onto_a_full_disk),
                 marks=pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")),
    Case("export-disk-full-oserror", export_disk_full,
         fault=save_fails(lambda export_dir: disk_full(export_dir / "saved_model.pb"))),
    Case("export-best-keras-damaged", export_best_keras_damaged),
    Case("export-out-is-a-file", export_out_is_a_file),
    # slide
    Case("slide-truncated", slide_truncated),
    Case("slide-not-a-slide", slide_not_a_slide),
    Case("slide-batch-size-zero", slide_batch_size_zero),
    Case("slide-out-is-a-file", slide_out_is_a_file),
    Case("slide-model-not-a-saved-model", slide_model_not_a_saved_model),
    Case("slide-disk-full", slide_disk_full, fault=full_heatmap),
    Case("slide-out-of-memory", slide_out_of_memory, fault=out_of_memory),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, exports: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "models").symlink_to(exports, target_is_directory=True)
    check(case, tmp_path, capsys, monkeypatch)


def test_a_later_export_after_a_full_disk_works(exports, tmp_path, capsys, monkeypatch):
    from cellnet.cli import main

    (tmp_path / "models").symlink_to(exports, target_is_directory=True)
    case = Case("export-disk-full", export_disk_full,
                fault=save_fails(lambda export_dir: disk_full(export_dir / "saved_model.pb")))
    check(case, tmp_path, capsys, monkeypatch)
    name_dir = tmp_path / "saved_models" / "reg"
    assert not name_dir.exists() or not any(name_dir.iterdir())
    assert main(export_argv(tmp_path)) == 0
    assert sorted(p.name for p in name_dir.iterdir()) == ["1"]
    assert (name_dir / "1" / "saved_model.pb").is_file() and (name_dir / "1" / "assets" / "cellnet.json").is_file()


def test_overlays_land_with_the_csv_and_a_rerun_is_refused(exports, tmp_path, capsys):
    from cellnet.cli import main

    (tmp_path / "models").symlink_to(exports, target_is_directory=True)
    argv = predict_with_overlays(tmp_path).argv
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["1001_1.png", "1001_2.png"]
    assert not [p for p in files_under(tmp_path) if ".tmp" in p]
    capsys.readouterr()
    assert main(argv) == 2  # the overlays are there now: never overwritten
    assert "1001_1.png: already exists" in capsys.readouterr().err

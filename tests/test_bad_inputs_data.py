"""Bad-input table (SPEC 7) for the data commands: ``synth``, ``import``, ``prepare`` and the data a
``train`` run opens, through the real CLI.

Every row goes through :func:`badinput.check` (exit code, one line naming the file, no traceback,
inputs byte-for-byte unchanged). Rows that are refused must also leave nothing behind (no partial
output folder or run folder, no temporary file) and never name a temporary file. Faults (a full
disk, a record found corrupt mid-run) are injected with monkeypatch.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from badinput import Case, Setup, check
from cellnet.data.breastpathq import write_key_xml
from cellnet.data.imageio import read_rgb, write_image
from conftest import write_layout

SHARD = "cells_train-000-of-001.tfrecord"


# ----------------------------------------------------------------------------- building rows

def layout(tmp: Path, regions: int = 2) -> Path:
    """A small BreastPathQ layout: 3 patients (2 train, 1 validation), 1 patch each."""
    return write_layout(tmp / "bpq", n_patients=3, per_patient=1, regions=regions)


def prepare_argv(data: Path, tmp: Path) -> list[str]:
    return ["prepare", "--data", str(data), "--out", str(tmp / "out"), "--quiet"]


def prepared(tmp: Path) -> Path:
    from cellnet.data.records import prepare

    out = tmp / "prepared"
    prepare(layout(tmp), out, progress=False)
    return out


def train_argv(data: Path, tmp: Path) -> list[str]:
    return ["train", "segmentation", "--data", str(data), "--run", str(tmp / "run"), "--epochs", "1",
            "--quiet"]


# 1. synth over an existing folder
def synth_over_previous_output(tmp: Path) -> Setup:
    """A previous synth output (its README marker) whose labels the user edited."""
    out = tmp / "synth"
    out.mkdir()
    (out / "README.txt").write_text("cellnet synthetic BreastPathQ dataset\n")
    (out / "train_labels.csv").write_text("slide,rid,y\n1000,1,0.35\n")  # edited by hand
    return Setup(["synth", "--out", str(out), "--patients", "3", "--small", "--quiet"], names=str(out),
                 inputs=[out], problem="not empty")


# 2. a truncated or corrupt shard in a prepared folder
def truncated_shard(tmp: Path) -> Setup:
    data = prepared(tmp)
    shard = data / SHARD
    shard.write_bytes(shard.read_bytes()[:1000])
    return Setup(train_argv(data, tmp), names=str(shard), inputs=[data], problem="run `cellnet prepare` again")


def corrupt_byte_in_shard(tmp: Path) -> Setup:
    data = prepared(tmp)
    shard = data / SHARD
    body = bytearray(shard.read_bytes())
    body[len(body) // 2] ^= 0xFF
    shard.write_bytes(bytes(body))
    return Setup(train_argv(data, tmp), names=str(shard), inputs=[data], problem="corrupt")


def empty_shard(tmp: Path) -> Setup:
    data = prepared(tmp)
    (data / SHARD).write_bytes(b"")
    return Setup(train_argv(data, tmp), names=str(data / SHARD), inputs=[data], problem="manifest says")


def truncated_shard_met_mid_run(tmp: Path) -> Setup:
    setup = truncated_shard(tmp)
    data = Path(setup.argv[setup.argv.index("--data") + 1])
    return dataclasses.replace(setup, names=str(data), problem="truncated or corrupt")


def past_the_check(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The shard check is skipped and the 'training' reads every batch: the error surfaces mid-run."""
    from cellnet.data import records
    from cellnet.training import tasks as trainers
    from cellnet.data.pipeline import segmentation_dataset

    def read_all(cfg):
        prepared = trainers.ensure_prepared(cfg.data, tmp)
        for _ in segmentation_dataset(prepared, "cells_train", batch_size=1):
            pass
        return {}

    monkeypatch.setattr(records, "verify_shards", lambda prepared: None)
    monkeypatch.setattr(trainers, "train_segmentation", read_all)


# 3. disk full while preparing
def prepare_disk_full(tmp: Path) -> Setup:
    data = layout(tmp)
    return Setup(prepare_argv(data, tmp), names=str(tmp / "out" / "train-000-of-001.tfrecord"), inputs=[data],
                 problem="No space left on device")


def prepare_manifest_disk_full(tmp: Path) -> Setup:
    data = layout(tmp)
    return Setup(prepare_argv(data, tmp), names=str(tmp / "out" / "manifest.json"), inputs=[data],
                 problem="No space left on device")


def records_fail(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """TensorFlow's writer meets ENOSPC: it raises ResourceExhaustedError."""
    real = tf.io.TFRecordWriter

    class FullDisk(real):
        def write(self, record):
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{tmp}/.out.tmp1234/train-000-of-001.tfrecord; No space left on device")

    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)


def manifest_fails(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


# 4. 12-bit data in a 16-bit TIFF
def twelve_bit_patch(tmp: Path) -> Setup:
    data = layout(tmp)
    path = data / "train" / "1000_1.tif"
    tifffile.imwrite(path, read_rgb(path).astype(np.uint16) << 4, photometric="rgb")
    return Setup(prepare_argv(data, tmp), names=str(path), inputs=[data], problem="12-bit data",
                 summary="12-bit data")


# 5. a key XML without points
def empty_key_xml(tmp: Path) -> Setup:
    data = layout(tmp)
    key = data / "cells" / "1_Region 1_key.xml"
    key.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<annotations>\n</annotations>\n')
    return Setup(prepare_argv(data, tmp), names=str(key), inputs=[data], problem="no points", summary="no points")


def empty_key_xml_import(tmp: Path) -> Setup:
    setup = empty_key_xml(tmp)
    data = setup.inputs[0]
    return dataclasses.replace(setup, argv=["import", "--format", "breastpathq", "--src", str(data),
                                            "--out", str(tmp / "imported")])


# 6. two images with one stem
def same_stem_tif_and_png(tmp: Path) -> Setup:
    data = layout(tmp)
    tif = data / "train" / "1000_1.tif"
    write_image(tif.with_suffix(".png"), read_rgb(tif))
    return Setup(prepare_argv(data, tmp), names=str(tif), inputs=[data], problem="1000_1.png and 1000_1.tif")


# 7. a file's name and its content disagree
def png_named_jpg(tmp: Path) -> Setup:
    data = layout(tmp)
    tif = data / "train" / "1000_1.tif"
    jpg = tif.with_suffix(".jpg")
    ok, png = cv2.imencode(".png", read_rgb(tif)[..., ::-1])
    assert ok
    jpg.write_bytes(png.tobytes())
    tif.unlink()
    return Setup(prepare_argv(data, tmp), names=str(jpg), inputs=[data], problem="holds PNG data",
                 summary="holds PNG data")


def truncated_jpeg(tmp: Path) -> Setup:
    data = layout(tmp)
    tif = data / "train" / "1000_1.tif"
    jpg = tif.with_suffix(".jpg")
    write_image(jpg, read_rgb(tif))
    jpg.write_bytes(jpg.read_bytes()[:20000])
    tif.unlink()
    return Setup(prepare_argv(data, tmp), names=str(jpg), inputs=[data], problem="truncated JPEG")


# 8. --data is a file
def data_is_a_file(tmp: Path) -> Setup:
    path = tmp / "train_labels.csv"
    path.write_text("slide,rid,y\n1000,1,0.5\n")
    return Setup(prepare_argv(path, tmp), names=str(path), inputs=[path], problem="is a file, not a dataset folder")


def train_data_is_a_file(tmp: Path) -> Setup:
    setup = data_is_a_file(tmp)
    return dataclasses.replace(setup, argv=train_argv(setup.inputs[0], tmp))


# 9. points outside the image
def points_outside(tmp: Path) -> Setup:
    data = layout(tmp)
    key = data / "cells" / "1_Region 1_key.xml"
    write_key_xml(key, np.array([[10, 10], [20, 30], [5000, 20]], np.float32), np.array([0, 2, 1]))
    return Setup(prepare_argv(data, tmp), names=str(key), inputs=[data],
                 problem="points outside their image dropped: 1", summary="points outside their image dropped: 1")


def points_outside_import(tmp: Path) -> Setup:
    src = tmp / "points"
    write_image(src / "a.png", np.full((40, 50, 3), 200, np.uint8))
    table = src / "points.csv"
    table.write_text("image,x,y,class\na.png,10,10,tumor\na.png,60,10,tumor\n")
    return Setup(["import", "--format", "csv", "--src", str(table), "--out", str(tmp / "imported"),
                  "--on-bad", "skip"], names=str(table), inputs=[src], problem="skipped 1 point(s): outside",
                 summary="skipped 1 point(s): outside the image")


# 10. BRCA-M2C class outside 1..3
def brca_unknown_class(tmp: Path) -> Setup:
    src = tmp / "brca"
    write_image(src / "images" / "a.png", np.full((60, 60, 3), 200, np.uint8))
    labels = src / "labels" / "a_gt_class_coords.txt"
    labels.parent.mkdir()
    labels.write_text("10 10 1\n20 20 9\n30 30 2\n")
    return Setup(["import", "--format", "brca-m2c", "--src", str(src), "--out", str(tmp / "imported")],
                 names=f"{labels}: line 2", inputs=[src], problem="unknown BRCA-M2C class 9",
                 summary="skipped 1 point(s): unknown BRCA-M2C class 9")


# 11. QuPath's default classes
def qupath_default_classes(tmp: Path) -> Setup:
    src = tmp / "qupath"
    write_image(src / "a.png", np.full((60, 60, 3), 200, np.uint8))
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [10 + 5 * i, 10]},
                 "properties": {"objectType": "annotation", "classification": {"name": name}}}
                for i, name in enumerate(["Tumor", "Immune cells", "immune cells", "Stroma"])]
    annotations = src / "a.geojson"
    annotations.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return Setup(["import", "--format", "geojson", "--src", str(src), "--out", str(tmp / "imported")],
                 names=str(annotations), inputs=[src], problem="'Stroma'",
                 summary="normal 0, lymphocyte 2, malignant 1")


CASES = [
    Case("synth-over-previous-output", synth_over_previous_output),
    Case("train-truncated-shard", truncated_shard),
    Case("train-corrupt-byte-in-shard", corrupt_byte_in_shard),
    Case("train-empty-shard", empty_shard),
    Case("train-truncated-shard-mid-run", truncated_shard_met_mid_run, fault=past_the_check),
    Case("prepare-disk-full-records", prepare_disk_full, fault=records_fail),
    Case("prepare-disk-full-manifest", prepare_manifest_disk_full, fault=manifest_fails),
    Case("prepare-12-bit-tiff", twelve_bit_patch, code=0, level="warning"),
    Case("prepare-key-xml-without-points", empty_key_xml, code=0, level="warning"),
    Case("import-key-xml-without-points", empty_key_xml_import, code=0, level="warning"),
    Case("prepare-same-stem-tif-and-png", same_stem_tif_and_png),
    Case("prepare-png-named-jpg", png_named_jpg, code=0, level="warning"),
    Case("prepare-truncated-jpeg", truncated_jpeg),
    Case("prepare-data-is-a-file", data_is_a_file),
    Case("train-data-is-a-file", train_data_is_a_file),
    Case("prepare-points-outside", points_outside, code=0, level="warning"),
    Case("import-points-outside", points_outside_import, code=0, level="warning"),
    Case("import-brca-m2c-unknown-class", brca_unknown_class, code=0, level="warning"),
    Case("import-qupath-default-classes", qupath_default_classes, code=0, level="warning"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    check(case, tmp_path, capsys, monkeypatch)


def test_twelve_bit_patch_is_prepared_at_its_real_brightness(tmp_path, capsys):
    from cellnet.data.pipeline import patch_records
    from cellnet.data.records import prepare

    data = layout(tmp_path)
    path = data / "train" / "1000_1.tif"
    original = read_rgb(path)
    tifffile.imwrite(path, original.astype(np.uint16) << 4, photometric="rgb")
    prepare(data, tmp_path / "out", val_fraction=0.0, progress=False)
    assert "12-bit" in capsys.readouterr().err
    means = {slide: float(image.mean()) for batch in patch_records(tmp_path / "out", "train", batch_size=4)
             for slide, image in zip(batch["slide"].numpy(), batch["image"].numpy())}
    assert abs(means[b"1000"] - float(original.mean())) < 1.0  # not 1/16 of it


def test_import_help_shows_where_qupath_classes_go(capsys):
    from cellnet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("QuPath its default classes: Tumor -> malignant; Immune cells -> lymphocyte; Stroma, "
            "Necrosis, Other, Region*, Ignore*, Positive, Negative -> skipped") in help_text

"""``cellnet predict`` through exported SavedModels: CSV naming, values, overlays, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from cellnet import cli
from cellnet.errors import CellnetError
from cellnet.serving.export import export_run
from cellnet.data.imageio import read_rgb, write_image
from cellnet.serving.predict import predict
from cellnet.models import CellSegmenter, DirectCellularity, ResNet34Backbone, decode_bins_np
from cellnet.evaluation.plots import overlay_rgb
from conftest import TINY_BLOCKS, calibrate, graph_preprocess, spread_head

WIDTH = 0.125
PATCH = 64  # full resolution; the tiny direct models take 32x32 at working resolution
TOLERANCE = 1e-5


def export(root: Path, kind: str, model: keras.Model) -> Path:
    run = root / "runs" / kind
    run.mkdir(parents=True)
    model.save(run / "best.keras")
    (run / "run.json").write_text(json.dumps({"kind": kind, "status": "complete"}))
    return export_run(run, root / "saved_models" / kind)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    keras.utils.set_random_seed(0)
    built = {
        "regression": DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS),
        "classification": DirectCellularity("resnet34", "classification", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS),
        # U-Net: any input size, as the segmentation signature promises
        "segmentation": CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="unet", name="unet_segmenter"),
    }
    rng = np.random.default_rng(3)
    for kind, model in built.items():
        size = 128 if kind == "segmentation" else PATCH
        calibrate(model, rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8))
    # scores inside (0, 1), where serving's clip to [0, 1] leaves the model's own output
    spread_head(built["regression"], rng.integers(0, 256, (16, PATCH, PATCH, 3), dtype=np.uint8))
    return {kind: (model, export(root, kind, model)) for kind, model in built.items()}


def write_images(folder: Path, names: list[str], size: int = PATCH, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        write_image(folder / name, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(folder / name)
    return paths


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_breastpathq_names_give_slide_rid_p(models, tmp_path):
    model, saved = models["regression"]
    paths = write_images(tmp_path / "patches", ["1001_1.png", "1001_2.tif", "1002_1.jpg"])
    summary = predict(saved.parent, [tmp_path / "patches"], tmp_path / "out.csv", batch_size=2, progress=False)
    columns, rows = read_csv(tmp_path / "out.csv")
    assert columns == ["slide", "rid", "p"]
    assert [(r["slide"], r["rid"]) for r in rows] == [("1001", "1"), ("1001", "2"), ("1002", "1")]
    expected = np.asarray(model(graph_preprocess([read_rgb(p) for p in paths])))[:, 0]
    np.testing.assert_allclose([float(r["p"]) for r in rows], expected, atol=TOLERANCE, rtol=0)
    assert summary["images"] == 3 and summary["skipped"] == 0 and summary["kind"] == "regression"


def test_other_names_give_image_p_and_interval(models, tmp_path):
    model, saved = models["classification"]
    paths = write_images(tmp_path, ["a.png", "case_b.png"], seed=1)
    predict(saved, [str(p) for p in paths], tmp_path / "out.csv", progress=False)
    columns, rows = read_csv(tmp_path / "out.csv")
    assert columns == ["image", "p", "low", "high"]
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    decoded = decode_bins_np(np.asarray(model(graph_preprocess([read_rgb(p) for p in paths]))))
    for key, column in (("cellularity", "p"), ("low", "low"), ("high", "high")):
        np.testing.assert_allclose([float(r[column]) for r in rows], decoded[key], atol=TOLERANCE, rtol=0)


def test_ensemble_with_tta_writes_the_interval_and_the_spread(models, tmp_path):
    from cellnet.serving.predict import load_served

    runs = [models[kind][1].parents[2] / "runs" / kind for kind in ("classification", "classification")]
    saved = export_run(runs, tmp_path / "saved_models" / "ensemble", tta="flips")  # 2 members x 2 variants
    paths = write_images(tmp_path / "patches", ["a.png", "b.png"], seed=2)
    predict(saved, [tmp_path / "patches"], tmp_path / "out.csv", progress=False)
    columns, rows = read_csv(tmp_path / "out.csv")
    assert columns == ["image", "p", "low", "high", "cellularity_std"]
    served = load_served(saved)(np.stack([read_rgb(p) for p in paths]))
    for key, column in (("cellularity", "p"), ("cellularity_std", "cellularity_std")):
        np.testing.assert_allclose([float(r[column]) for r in rows], served[key], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose([[float(r["low"]), float(r["high"])] for r in rows], served["interval"])
    assert (served["cellularity_std"] > 1e-5).all()  # a flip changes a random model's scores
    assert load_served(saved).kind == "ensemble"


def test_segmenter_writes_overlays_and_class_fractions(models, tmp_path):
    model, saved = models["segmentation"]
    paths = write_images(tmp_path / "in", ["7_1.png", "7_2.png"], size=128, seed=2)
    summary = predict(saved, [tmp_path / "in"], tmp_path / "out.csv", overlays=tmp_path / "overlays",
                      progress=False)
    columns, rows = read_csv(tmp_path / "out.csv")
    assert columns == ["slide", "rid", "normal_fraction", "lymphocyte_fraction", "malignant_fraction"]
    images = [read_rgb(p) for p in paths]
    masks = np.asarray(model(graph_preprocess(images)))
    fractions = (masks[..., :3] > 0.5).mean(axis=(1, 2))
    got = np.array([[float(r[c]) for c in columns[2:]] for r in rows])
    np.testing.assert_allclose(got, fractions, atol=1e-5, rtol=0)
    assert summary["overlays"] == 2
    for path, image, mask in zip(paths, images, masks):
        overlay = read_rgb(tmp_path / "overlays" / f"{path.stem}.png")
        assert overlay.shape == image.shape
        assert np.abs(overlay.astype(int) - overlay_rgb(image, mask).astype(int)).max() <= 1


def test_bad_inputs_fail_in_one_line_or_are_skipped(models, tmp_path):
    _, saved = models["regression"]
    good = write_images(tmp_path, ["5_1.png"])[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    broken = tmp_path / "5_2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    small = write_images(tmp_path, ["5_3.png"], size=32)[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.csv"
    cases = [([notes], saved, "notes.txt: not an image file"),
             ([broken], saved, "5_2.png: unreadable or truncated image"),
             ([small], saved, "5_3.png: is 32x32 px; this regression model takes 64x64"),
             ([empty], saved, "empty: empty folder: no image files"),
             ([good], tmp_path, f"{tmp_path}: holds no SavedModel")]
    for inputs, model_dir, message in cases:
        with pytest.raises(CellnetError, match=message) as info:
            predict(model_dir, inputs, out, progress=False)
        assert "\n" not in str(info.value)
    assert not out.exists()
    summary = predict(saved, [good, notes, broken, small], out, on_bad="skip", progress=False)
    assert summary["images"] == 1 and summary["skipped"] == 3
    assert [r["rid"] for r in read_csv(out)[1]] == ["1"]


def test_command_line_prints_one_line_error(tmp_path, capsys):
    image = write_images(tmp_path, ["9_1.png"])[0]
    code = cli.main(["predict", "--model", str(tmp_path / "missing"), "--input", str(image),
                     "--out", str(tmp_path / "out.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"cellnet predict: error: {tmp_path / 'missing'}: no such folder")

"""Shared fixtures: tiny datasets written on the fly (no network, no ../shared needed)."""
from __future__ import annotations

from pathlib import Path

from cellnet.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # quietly, before any test module imports it

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real"


def write_layout(root: Path, n_patients: int = 4, per_patient: int = 3, regions: int = 4,
                 seed: int = 0) -> Path:
    """A hand-made BreastPathQ layout: noise patches whose brightness follows the label."""
    from cellnet.data.breastpathq import region_file_stem, write_key_xml
    from cellnet.data.imageio import write_image

    rng = np.random.default_rng(seed)
    rows = {"train": [], "validation": []}
    patients = []
    for p in range(n_patients):
        split = "validation" if p == n_patients - 1 else "train"
        slide = str(1000 + p)
        patients.append((f"P{p}", slide))
        for rid in range(1, per_patient + 1):
            y = round(float(rng.uniform()), 2)
            image = (rng.uniform(0, 1, (512, 512, 3)) * 60 + 190 - 150 * y).astype(np.uint8)
            write_image(root / ("train" if split == "train" else "validation") / f"{slide}_{rid}.tif", image)
            rows[split].append((slide, rid, y))
    for split, name in (("train", "train_labels.csv"), ("validation", "val_labels.csv")):
        lines = ["slide,rid,y"] + [f"{s},{r},{y}" for s, r, y in rows[split]]
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "patient_ids.csv").write_text(
        "patient_id,slide\n" + "".join(f"{p},{s}\n" for p, s in patients))
    for r in range(regions):
        size = 480 + 10 * r
        image = rng.integers(150, 255, (size, size, 3), dtype=np.uint8)
        points = rng.uniform(10, size - 10, (12, 2)).astype(np.float32)
        labels = np.arange(12) % 3
        stem = region_file_stem(str(r + 1), 1)
        write_image(root / "cells" / f"{stem}_crop.tif", image)
        write_key_xml(root / "cells" / f"{stem}_key.xml", points, labels)
    return root


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory) -> Path:
    return write_layout(tmp_path_factory.mktemp("layout") / "bpq")


@pytest.fixture(scope="session")
def tiny_prepared(tiny_layout, tmp_path_factory) -> Path:
    from cellnet.data.records import prepare

    out = tmp_path_factory.mktemp("prepared") / "records"
    prepare(tiny_layout, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A 3-patient synthetic BreastPathQ set (real-looking cells, ~2 s)."""
    from cellnet.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, patients=4, small=True, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_prepared(synth_data, tmp_path_factory) -> Path:
    from cellnet.data.records import prepare

    out = tmp_path_factory.mktemp("synth_prepared") / "records"
    prepare(synth_data, out, seed=0, val_fraction=0.34, progress=False)
    return out


#: Tiny networks: ResNet34s with one unit per stage trace in a third of the time of the full ones.
TINY_BLOCKS = (1, 1, 1, 1)
TINY = dict(preset="cpu", width=0.125, batch_size=4, steps_per_epoch=2, epochs=2, crop=64, progress=False,
            stage_blocks=TINY_BLOCKS)


def tiny_config(task: str, data: Path, run: Path, **overrides):
    from cellnet.training.config import field_names, make_config

    values = {**{k: v for k, v in TINY.items() if k in field_names(task)}, **overrides}
    return make_config(task, data=str(data), run=str(run), **values)


@pytest.fixture(scope="session")
def tiny_seg_run(synth_prepared, tmp_path_factory) -> Path:
    """A trained (2 short epochs) tiny FPN segmentation run, shared by the cascade/GBT tests."""
    from cellnet.training.tasks import train_segmentation

    run = tmp_path_factory.mktemp("runs") / "seg"
    train_segmentation(tiny_config("segmentation", synth_prepared, run))
    return run


def graph_preprocess(images: np.ndarray):
    """The export's pixel path run as a graph, as in the SavedModel and in training steps.

    Eager and graph execution of ``x / 255 * 2 - 1`` differ in the last bit (Grappler rewrites
    the arithmetic); a randomly initialised deep segmenter amplifies that to ~1e-4.
    """
    import tensorflow as tf

    from cellnet.preprocess import full_res_to_model_input

    return tf.function(full_res_to_model_input)(tf.constant(images))


def calibrate_batchnorm(model, x) -> None:
    """Set every BatchNormalization's moving statistics to those of the model-input batch ``x``.

    A randomly initialised ResNet with fresh statistics (mean 0, variance 1) saturates its
    sigmoid outputs at 0 or 1, where a wrong export or reload could match by chance; calibrated,
    outputs spread over (0, 1).
    """
    import keras

    layers, pending = [], [model]
    while pending:
        layer = pending.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layers.append((layer, layer.momentum))
        pending += getattr(layer, "layers", [])
    for layer, _ in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in layers:
        layer.momentum = momentum


def calibrate(model, images: np.ndarray) -> None:
    """``calibrate_batchnorm`` on uint8 full-resolution images, through the export's pixel path."""
    calibrate_batchnorm(model, graph_preprocess(images))


def spread_head(model: keras.Model, images: np.ndarray) -> None:
    """Rescale a linear ``cellularity`` head so its raw scores on ``images`` spread over [0.1, 0.9].

    A random linear head scores outside [0, 1], where the served (clipped) score would match any
    model; inside, the export must reproduce the Keras output itself.
    """
    raw = np.asarray(model(graph_preprocess(images)))[:, 0]
    dense = model.get_layer("cellularity")
    kernel, bias = dense.get_weights()
    scale = 0.4 / max(float(np.abs(raw - raw.mean()).max()), 1e-6)
    dense.set_weights([kernel * scale, scale * (bias - raw.mean()) + 0.5])

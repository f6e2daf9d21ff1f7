"""`cellnet bench`: throughput figures (SPEC 9), printed as a table and written as JSON.

- tf.data images/s of both pipelines (with CPU augmentation and without) against the images/s
  the training step consumes — is the input pipeline the bottleneck?
- SavedModel inference patches/s at batch 1, 8 and 32 and the GFLOP/s it achieves, against the
  machine's measured float32 matmul GFLOP/s (how close to the hardware the served model runs);
- 81-feature extraction maps/s; GBT fit time (paper settings, 600 rounds).
Models are the cpu-preset sizes with random weights: speed does not depend on training.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cellnet.files import write_text


def _rate(fn, items: int, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return items * repeats / (time.perf_counter() - start)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    mm = tf.function(lambda: tf.linalg.matmul(a, b))
    rate = _rate(lambda: mm().numpy(), 1, repeats, warmup=2)
    return 2 * n ** 3 * rate / 1e9


def graph_flops(fn, spec: tf.TensorSpec) -> int:
    """Float operations of one call of ``fn`` on ``spec`` (TF profiler on the frozen graph)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(fn).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")  # the v1 profiler warns about its own deprecated helpers
    try:
        with tf.Graph().as_default() as graph:
            tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
            options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
            options["output"] = "none"
            return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)
    finally:
        tf.get_logger().setLevel(level)


def _synthetic_prepared(folder: Path) -> Path:
    from cellnet.data.records import prepare
    from cellnet.data.synth import synthesize

    synthesize(folder / "data", patients=4, small=True, progress=False)
    prepare(folder / "data", folder / "prepared", progress=False)
    return folder / "prepared"


def bench_pipelines(prepared: Path, batches: int) -> dict:
    from cellnet.data.pipeline import cellularity_dataset, segmentation_dataset

    out = {}
    for name, make in (("cellularity", lambda aug: cellularity_dataset(prepared, "train", 16, training=True,
                                                                      augment_on=aug, repeat=True)),
                       ("segmentation", lambda aug: segmentation_dataset(prepared, "cells_train", 8, training=True,
                                                                        augment_on=aug, repeat=True))):
        for aug in ("device", "cpu"):
            it = iter(make(aug))
            for _ in range(3):  # fill the cache and the prefetch buffer
                next(it)
            batch = int(next(it)[0].shape[0])
            out[f"tfdata_{name}_{'read_only' if aug == 'device' else 'cpu_augment'}_images_per_s"] = \
                _rate(lambda: next(it), batch, batches, warmup=0)
    return out


def bench_train_steps(prepared: Path, steps: int) -> dict:
    from cellnet.data.pipeline import cellularity_dataset, segmentation_dataset
    from cellnet.training.losses import SegmentationLoss
    from cellnet.models import CellSegmenter, DirectCellularity, ResNet34Backbone
    from cellnet.training.presets import preset
    from cellnet.training.trainer import AugmentedTrainer

    out = {}
    seg_p, cell_p = preset("segmentation", "cpu"), preset("cellularity", "cpu")
    seg = CellSegmenter(ResNet34Backbone(width=seg_p["width"]), decoder="fpn")
    cell = DirectCellularity("resnet34", "regression", width=cell_p["width"])
    for name, model, ds, loss, mask in (
            ("segmentation", seg, segmentation_dataset(prepared, "cells_train", 8, training=True, repeat=True),
             SegmentationLoss(), True),
            ("cellularity", cell, cellularity_dataset(prepared, "train", 16, training=True, repeat=True),
             keras.losses.MeanSquaredError(), False)):
        trainer = AugmentedTrainer(model, augment=True, with_mask=mask)
        trainer.compile(optimizer="adam", loss=loss)
        x, y = next(iter(ds))
        trainer.train_on_batch(x, y)
        out[f"train_step_{name}_images_per_s"] = _rate(lambda: trainer.train_on_batch(x, y), int(x.shape[0]), steps)
    return out


def bench_savedmodel(batches: tuple[int, ...], repeats: int) -> dict:
    from cellnet.serving.export import export_run
    from cellnet.models import DirectCellularity
    from cellnet.training.presets import preset
    from cellnet.preprocess import full_res_to_model_input
    from cellnet.training.runs import save_model_atomic, write_run

    width = preset("cellularity", "cpu")["width"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        model = DirectCellularity("resnet34", "regression", width=width)
        save_model_atomic(model, run / "best.keras")
        write_run(run, kind="regression", arch="resnet34", status="complete", init="random")
        path = export_run(run, Path(tmp) / "export", version=1)
        served = tf.saved_model.load(str(path)).signatures["serving_default"]
        flops = graph_flops(lambda x: model(full_res_to_model_input(x)), tf.TensorSpec([1, 512, 512, 3], tf.uint8))
        out["savedmodel"] = "ResNet34 regression, width %.2f (cpu preset), 512x512 uint8 input" % width
        out["savedmodel_gflop_per_patch"] = flops / 1e9
        for b in batches:
            x = tf.constant(np.random.default_rng(0).integers(0, 255, (b, 512, 512, 3), dtype=np.uint8))
            rate = _rate(lambda: served(images=x), b, max(1, repeats // b), warmup=1)
            out[f"savedmodel_batch{b}_patches_per_s"] = rate
            out[f"savedmodel_batch{b}_gflops"] = rate * flops / 1e9
    return out


def bench_features(repeats: int) -> dict:
    from cellnet.models.features import extract_features
    from cellnet.training.boosting import fit_booster

    maps = tf.random.uniform([16, 256, 256, 4])
    fn = tf.function(extract_features)
    out = {"features_maps_per_s": _rate(lambda: fn(maps).numpy(), 16, repeats)}
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(400, 81)).astype(np.float32)
    y = np.clip(x[:, :5].mean(1) + rng.normal(0, 0.05, 400), 0, 1)
    start = time.perf_counter()
    fit_booster(x, y, seed=0)
    out["gbt_fit_seconds_400x81_600_rounds"] = time.perf_counter() - start
    return out


def bench(out: str | os.PathLike, quick: bool = False) -> dict:
    repeats = 3 if quick else 10
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__,
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
    }
    print("measuring matmul ...", flush=True)
    results["matmul_gflops"] = matmul_gflops(repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        print("measuring tf.data and training steps ...", flush=True)
        prepared = _synthetic_prepared(Path(tmp))
        results.update(bench_pipelines(prepared, batches=5 if quick else 20))
        results.update(bench_train_steps(prepared, steps=2 if quick else 5))
    print("measuring SavedModel inference ...", flush=True)
    results.update(bench_savedmodel((1, 8, 32), repeats=32 if quick else 96))
    for b in (1, 8, 32):
        results[f"savedmodel_batch{b}_fraction_of_matmul"] = results[f"savedmodel_batch{b}_gflops"] / results["matmul_gflops"]
    print("measuring features and GBT ...", flush=True)
    results.update(bench_features(repeats))
    write_text(out, json.dumps(results, indent=2))
    print(format_table(results))
    return results


def format_table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if k != "machine"]
    width = max(len(k) for k, _ in rows)
    lines = [f"machine: {results['machine']['processor']}, {results['machine']['cpus']} CPUs, "
             f"GPUs: {results['machine']['gpus'] or 'none'}, TF {results['machine']['tensorflow']}"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:>10.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)

"""`cellnet bench`: throughput figures (SPEC 9), printed as a table and written as JSON.

- tf.data images/s of both pipelines (with CPU augmentation and without) against the images/s
  the training step consumes — is the input pipeline the bottleneck?
- SavedModel inference patches/s at batch 1, 8 and 32 (and at 1 and 8 with ``--xla``) and the GFLOP/s it achieves, against the
  machine's measured float32 matmul GFLOP/s (how close to the hardware the served model runs;
  the better of a matmul run first and one last, the cores being shared);
  the same at batch 1 and 8 for the paper-size FPN segmenter, and its bfloat16 export's speed-up
  where the CPU computes bf16 natively (else "not supported here");
- the serving cost of test-time augmentation (x2, x8) and of a 3-member ensemble, patches/s;
- 81-feature extraction maps/s and GFLOP/s; GBT fit time (paper settings, 600 rounds).
Models are the cpu-preset sizes (the FPN: the paper preset's) with random weights: speed does
not depend on training. ``machine`` records the CPU model and SIMD flags (``cellnet.machine``),
which decide the kernels TF runs.
"""
from __future__ import annotations

import json
import math
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
        # the same export compiled with XLA (--xla): small batches gain most; the first call of
        # each batch size compiles (timed apart, as a server's warm-up)
        compiled = tf.saved_model.load(str(export_run(run, Path(tmp) / "export_xla", version=1, xla=True)))
        compiled = compiled.signatures["serving_default"]
        for b in batches[:2]:
            x = tf.constant(np.random.default_rng(0).integers(0, 255, (b, 512, 512, 3), dtype=np.uint8))
            start = time.perf_counter()
            compiled(images=x)
            out[f"savedmodel_xla_batch{b}_first_call_s"] = time.perf_counter() - start
            rate = _rate(lambda: compiled(images=x), b, max(1, repeats // b), warmup=0)
            out[f"savedmodel_xla_batch{b}_patches_per_s"] = rate
            out[f"savedmodel_xla_batch{b}_gflops"] = rate * flops / 1e9
    return out


def bench_savedmodel_fpn(batches: tuple[int, ...], repeats: int, width: float | None = None,
                         size: int = 512) -> dict:
    """The FPN segmenter served from a SavedModel: patches/s and GFLOP/s at each batch size.

    ``width`` defaults to the paper preset's (1.0, the model of the paper); ``size`` is the
    full-resolution input side. Both are smaller only in tests.
    """
    from cellnet.models import CellSegmenter, ResNet34Backbone
    from cellnet.preprocess import full_res_to_model_input
    from cellnet.serving.export import export_model
    from cellnet.training.presets import preset

    settings = preset("segmentation", "paper")
    width = settings["width"] if width is None else width
    model = CellSegmenter(ResNet34Backbone(unit=settings["unit"], width=width), decoder="fpn")
    flops = graph_flops(lambda x: model(full_res_to_model_input(x)), tf.TensorSpec([1, size, size, 3], tf.uint8))
    out = {"savedmodel_fpn_paper": f"FPN segmenter, ResNet34 width {width:.2f} (paper preset), "
                                   f"{size}x{size} uint8 input",
           "savedmodel_fpn_paper_gflop_per_patch": flops / 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, "segmentation", Path(tmp) / "fpn", {"run": "cellnet bench"})
        served = tf.saved_model.load(str(path)).signatures["serving_default"]
        for b in batches:
            x = tf.constant(np.random.default_rng(0).integers(0, 255, (b, size, size, 3), dtype=np.uint8))
            rate = _rate(lambda: served(images=x), b, max(1, repeats // b), warmup=1)
            out[f"savedmodel_fpn_paper_batch{b}_patches_per_s"] = rate
            out[f"savedmodel_fpn_paper_batch{b}_gflops"] = rate * flops / 1e9
        out.update(_bf16_speedup(model, batches[-1], size, repeats, out, Path(tmp)))
    return out


def _bf16_speedup(model, batch: int, size: int, repeats: int, float32: dict, tmp: Path) -> dict:
    """The bfloat16 export's throughput over float32's, where this CPU computes bf16 natively.

    Elsewhere TF emulates bf16 (slower than float32), so the figure would mislead: the key is
    left out and ``savedmodel_fpn_paper_bf16`` says why.
    """
    from cellnet.machine import reduced_precision_support
    from cellnet.serving.export import export_model, with_precision

    if not reduced_precision_support()["bfloat16"] and not tf.config.list_physical_devices("GPU"):
        return {"savedmodel_fpn_paper_bf16": "not supported here (no AVX512-BF16 or AMX-BF16, no GPU)"}
    path = export_model(with_precision(model, "bfloat16"), "segmentation", tmp / "fpn_bf16", {"run": "cellnet bench"})
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    x = tf.constant(np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8))
    rate = _rate(lambda: served(images=x), batch, max(1, repeats // batch), warmup=1)
    return {f"savedmodel_fpn_paper_batch{batch}_bf16_patches_per_s": rate,
            f"savedmodel_fpn_paper_batch{batch}_bf16_speedup": rate / float32[f"savedmodel_fpn_paper_batch{batch}_patches_per_s"]}


def bench_tta_ensemble(batch: int, repeats: int) -> dict:
    """Serving cost of test-time augmentation (x2, x8) and of a 3-member ensemble, in patches/s.

    The cpu-preset direct ResNet34 (random weights) exported four ways; ``..._cost_x`` is how many
    times slower than the plain export each is (ideal: 2, 8 and 3).
    """
    from cellnet.models import DirectCellularity
    from cellnet.serving.export import export_run
    from cellnet.training.presets import preset
    from cellnet.training.runs import save_model_atomic, write_run

    width = preset("cellularity", "cpu")["width"]
    x = tf.constant(np.random.default_rng(0).integers(0, 255, (batch, 512, 512, 3), dtype=np.uint8))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(3):
            run = Path(tmp) / f"run{i}"
            run.mkdir()
            save_model_atomic(DirectCellularity("resnet34", "regression", width=width), run / "best.keras")
            write_run(run, kind="regression", arch="resnet34", status="complete", init="random")
            runs.append(run)
        for name, sources, tta in (("plain", runs[0], "none"), ("tta_flips", runs[0], "flips"),
                                   ("tta_d4", runs[0], "d4"), ("ensemble3", runs, "none")):
            served = tf.saved_model.load(str(export_run(sources, Path(tmp) / name, version=1, tta=tta)))
            signature = served.signatures["serving_default"]
            rates[name] = _rate(lambda: signature(images=x), batch, max(1, repeats // batch))
    out = {f"savedmodel_{name}_batch{batch}_patches_per_s": rate for name, rate in rates.items()}
    for name in ("tta_flips", "tta_d4", "ensemble3"):
        out[f"savedmodel_{name}_batch{batch}_cost_x"] = rates["plain"] / rates[name]
    return out


def feature_flops(height: int, width: int) -> float:
    """Float operations of the 81 features on one (height, width) map, counted analytically.

    The LoG scale space, which is the arithmetic: per cell channel one forward and one inverse
    real 2-D FFT per sigma of the mirror-padded plane at the usual 2.5 n log2(n) for n points,
    and the transfer products (2 per complex bin). The comparisons, pooling and sums are memory
    traffic, not counted. (``graph_flops`` would count none of the FFTs.)
    """
    from cellnet.classes import CELL_CLASSES
    from cellnet.models.features import LOG_SIGMAS, MAX_RADIUS

    rows, cols = height + 2 * MAX_RADIUS, width + 2 * MAX_RADIUS
    fft = 2.5 * rows * cols * math.log2(rows * cols)
    products = len(LOG_SIGMAS) * rows * (cols // 2 + 1) * 2
    return len(CELL_CLASSES) * ((1 + len(LOG_SIGMAS)) * fft + products)


def bench_features(repeats: int) -> dict:
    from cellnet.models.features import extract_features

    maps = tf.random.uniform([16, 256, 256, 4])
    fn = tf.function(extract_features)
    rate = _rate(lambda: fn(maps).numpy(), 16, repeats)
    flops = feature_flops(256, 256)
    return {"features_maps_per_s": rate, "features_gflop_per_map": flops / 1e9,
            "features_gflops": rate * flops / 1e9}


def bench_gbt() -> dict:
    from cellnet.training.boosting import fit_booster

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(400, 81)).astype(np.float32)
    y = np.clip(x[:, :5].mean(1) + rng.normal(0, 0.05, 400), 0, 1)
    start = time.perf_counter()
    fit_booster(x, y, seed=0)
    return {"gbt_fit_seconds_400x81_600_rounds": time.perf_counter() - start}


def machine_info() -> dict:
    from cellnet.machine import cpu

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "cpu": cpu(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def fractions_of_matmul(results: dict) -> dict:
    """Every SavedModel ``..._batch<b>_gflops`` as ``..._batch<b>_fraction_of_matmul``."""
    return {k.removesuffix("_gflops") + "_fraction_of_matmul": v / results["matmul_gflops"]
            for k, v in results.items() if k.startswith("savedmodel") and k.endswith("_gflops")}


def bench(out: str | os.PathLike, quick: bool = False) -> dict:
    repeats = 3 if quick else 10
    results: dict = {"machine": machine_info()}
    print("measuring matmul ...", flush=True)
    matmul = [matmul_gflops(repeats=repeats)]
    results["matmul_gflops"] = matmul[0]
    with tempfile.TemporaryDirectory() as tmp:
        print("measuring tf.data and training steps ...", flush=True)
        prepared = _synthetic_prepared(Path(tmp))
        results.update(bench_pipelines(prepared, batches=5 if quick else 20))
        results.update(bench_train_steps(prepared, steps=2 if quick else 5))
    print("measuring SavedModel inference ...", flush=True)
    results.update(bench_savedmodel((1, 8, 32), repeats=32 if quick else 96))
    # the paper-size FPN is ~17x the cpu ResNet34's work (11.5 GFLOP a patch): a few batches do
    results.update(bench_savedmodel_fpn((1, 8), repeats=8 if quick else 16))
    print("measuring test-time augmentation and ensembles ...", flush=True)
    results.update(bench_tta_ensemble(8, repeats=16 if quick else 48))
    print("measuring features and GBT ...", flush=True)
    results.update(bench_features(repeats))
    results.update(bench_gbt())
    # On shared cores one matmul run can catch a busy moment (then served models "beat" it): the
    # reference is the better of a run before and one after everything else.
    print("measuring matmul again ...", flush=True)
    matmul.append(matmul_gflops(repeats=repeats))
    results["matmul_gflops"], results["matmul_gflops_runs"] = max(matmul), matmul
    results.update(fractions_of_matmul(results))
    write_text(out, json.dumps(results, indent=2))
    print(format_table(results))
    return results


def format_table(results: dict) -> str:
    machine = results["machine"]
    cpu = machine.get("cpu", {})
    rows = [(k, v) for k, v in results.items() if k != "machine"]
    width = max(len(k) for k, _ in rows)
    lines = [f"machine: {cpu.get('model', machine['processor'])}, {machine['cpus']} CPUs, "
             f"GPUs: {machine['gpus'] or 'none'}, TF {machine['tensorflow']}",
             f"simd: {' '.join(cpu.get('simd', [])) or 'none reported'}"]
    for k, v in rows:
        if isinstance(v, list):
            v = ", ".join(f"{x:.1f}" for x in v)
        lines.append(f"{k:<{width}}  {v:>10.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)

"""`cellnet bench`: throughput figures (SPEC 9), printed as a table and written as JSON.

- tf.data images/s of both pipelines (with CPU augmentation and without) against the images/s
  the training step consumes — is the input pipeline the bottleneck?
- SavedModel inference patches/s at batch 1, 8 and 32 (and at 1 and 8 with ``--xla``, and at
  batch 1 from one concurrent client per core, one thread per op) and the GFLOP/s it achieves,
  against the machine's measured float32 matmul GFLOP/s (how close to the hardware the served model runs;
  the better of a matmul run first and one last, the cores being shared);
  the same at batch 1 and 8 for the paper-size FPN segmenter, and its bfloat16 export's speed-up
  where the CPU computes bf16 natively (else "not supported here");
- the serving cost of test-time augmentation (x2, x8) and of a 3-member ensemble, patches/s;
- 81-feature extraction maps/s and GFLOP/s; GBT fit time (paper settings, 600 rounds);
- with ``--gpu`` (:func:`bench_gpu`), the paper FPN on the CUDA GPU: training step images/s in
  float32, mixed_float16 and with XLA, on-device augmentation's cost, SavedModel patches/s, and
  TFLOP/s and MFU against the GPU's peak (``gpu_*`` keys).
Models are the cpu-preset sizes (the FPN: the paper preset's) with random weights: speed does
not depend on training. ``machine`` records the CPU model and SIMD flags (``cellnet.machine``),
which decide the kernels TF runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cellnet.choices import RESNET34_BLOCKS
from cellnet.files import write_text


def _rate(fn, items: int, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return items * repeats / (time.perf_counter() - start)


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: tf.DType = tf.float32,
                  device: str | None = None) -> float:
    """GFLOP/s of an n x n matmul in ``dtype``, on ``device`` (None: TF's default placement).

    On a named device each call waits for one element of the product, not a copy of all of it
    (a GPU's n x n result would otherwise time the transfer to the host).
    """
    if device is None:
        a = tf.cast(tf.random.uniform([n, n]), dtype)
        b = tf.cast(tf.random.uniform([n, n]), dtype)
        mm = tf.function(lambda: tf.linalg.matmul(a, b))
        rate = _rate(lambda: mm().numpy(), 1, repeats, warmup=2)
        return 2 * n ** 3 * rate / 1e9
    with tf.device(device):
        a = tf.cast(tf.random.uniform([n, n]), dtype)
        b = tf.cast(tf.random.uniform([n, n]), dtype)
        mm = tf.function(lambda: tf.linalg.matmul(a, b))
        rate = _rate(lambda: mm()[0, 0].numpy(), 1, repeats, warmup=2)
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

    settings = preset("cellularity", "cpu")
    width, blocks = settings["width"], settings.get("stage_blocks") or RESNET34_BLOCKS
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
        # batch-1 traffic served as a server meets it: one client per core, one thread per op
        clients = os.cpu_count() or 1
        rate = concurrent_rate(path, batch=1, clients=clients, calls=max(4, repeats // clients))
        out["savedmodel_batch1_concurrent_clients"] = clients
        out["savedmodel_batch1_concurrent_patches_per_s"] = rate
        out["savedmodel_batch1_concurrent_gflops"] = rate * flops / 1e9
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


def concurrent_rate(path: str | os.PathLike, batch: int, clients: int, calls: int, intra_op: int = 1) -> float:
    """Patches/s of ``clients`` threads each calling the SavedModel ``calls`` times at once.

    Measured in a fresh process, because TF fixes its thread pools when it starts: ``intra_op``
    threads per op (1: each request keeps to one core, as TF Serving's
    ``--tensorflow_intra_op_parallelism=1``) and one inter-op thread per client. Small batches
    leave most of a multi-threaded op's cores idle (measured: a width-0.25 ResNet34 at batch 1 is
    no faster with 2 intra-op threads than with 1), so concurrent requests fill them instead.
    """
    command = [sys.executable, "-m", "cellnet.bench", "--concurrent", str(path), str(batch),
               str(clients), str(calls), str(intra_op)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from cellnet.errors import CellnetError
        raise CellnetError(f"bench: the concurrent-serving measurement failed: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return float(done.stdout.strip().splitlines()[-1])


def _serve_concurrently(path: str, batch: int, clients: int, calls: int, intra_op: int) -> float:
    """The child process of :func:`concurrent_rate`: set the thread pools, load, warm up, time."""
    from cellnet.serving.predict import load_served

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(clients)
    served = load_served(path)
    size = served.patch_size or 512
    x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    served(x)

    def client() -> None:
        for _ in range(calls):
            served(x)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return batch * calls * clients / (time.perf_counter() - start)


def bench_savedmodel_fpn(batches: tuple[int, ...], repeats: int, width: float | None = None,
                         size: int = 512, stage_blocks: tuple[int, ...] = RESNET34_BLOCKS) -> dict:
    """The FPN segmenter served from a SavedModel: patches/s and GFLOP/s at each batch size.

    ``width`` defaults to the paper preset's (1.0, the model of the paper); ``size`` is the
    full-resolution input side. Both, and ``stage_blocks``, are smaller only in tests.
    """
    from cellnet.models import CellSegmenter, ResNet34Backbone
    from cellnet.preprocess import full_res_to_model_input
    from cellnet.serving.export import export_model
    from cellnet.training.presets import preset

    settings = preset("segmentation", "paper")
    width = settings["width"] if width is None else width
    model = CellSegmenter(ResNet34Backbone(unit=settings["unit"], width=width, stage_blocks=stage_blocks),
                          decoder="fpn")
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

    settings = preset("cellularity", "cpu")
    width, blocks = settings["width"], settings.get("stage_blocks") or RESNET34_BLOCKS
    x = tf.constant(np.random.default_rng(0).integers(0, 255, (batch, 512, 512, 3), dtype=np.uint8))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(3):
            run = Path(tmp) / f"run{i}"
            run.mkdir()
            save_model_atomic(DirectCellularity("resnet34", "regression", width=width, stage_blocks=blocks),
                              run / "best.keras")
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
    and the transfer products (2 per complex bin). Two planes share one complex FFT, which does
    the same arithmetic as their two real ones. The comparisons, pooling and sums are memory
    traffic, not counted. (``graph_flops`` would count none of the FFTs.)
    """
    from cellnet.classes import CELL_CLASSES
    from cellnet.models.features import LOG_SIGMAS, MAX_RADIUS

    rows, cols = height + 2 * MAX_RADIUS, width + 2 * MAX_RADIUS
    fft = 2.5 * rows * cols * math.log2(rows * cols)
    products = len(LOG_SIGMAS) * rows * (cols // 2 + 1) * 2
    return len(CELL_CLASSES) * ((1 + len(LOG_SIGMAS)) * fft + products)


def fft_ceiling(maps: int, height: int, width: int, repeats: int) -> float:
    """Maps/s that the features' 2-D FFTs alone allow: the ceiling of the FFT scale space here.

    Per pair of cell planes (``log_scale_space``) one forward and one inverse transform per sigma
    of the mirror-padded size, timed as TF runs them on ``maps`` maps at once; every other step
    of the features comes on top of this.
    """
    from cellnet.classes import CELL_CLASSES
    from cellnet.models.features import LOG_SIGMAS, MAX_RADIUS

    shape = [-(-maps * len(CELL_CLASSES) // 2), height + 2 * MAX_RADIUS, width + 2 * MAX_RADIUS]
    pairs = tf.complex(tf.random.uniform(shape), tf.random.uniform(shape))
    forward, inverse = tf.function(tf.signal.fft2d), tf.function(tf.signal.ifft2d)
    seconds_forward = maps / _rate(lambda: forward(pairs).numpy(), maps, repeats)
    seconds_inverse = maps / _rate(lambda: inverse(pairs).numpy(), maps, repeats)
    return maps / (seconds_forward + len(LOG_SIGMAS) * seconds_inverse)


def bench_features(repeats: int) -> dict:
    from cellnet.models.features import extract_features

    maps = tf.random.uniform([16, 256, 256, 4])
    fn = tf.function(extract_features)
    rate = _rate(lambda: fn(maps).numpy(), 16, repeats)
    flops = feature_flops(256, 256)
    return {"features_maps_per_s": rate, "features_gflop_per_map": flops / 1e9,
            "features_gflops": rate * flops / 1e9,
            "features_fft_ceiling_maps_per_s": fft_ceiling(16, 256, 256, repeats)}


def bench_gbt() -> dict:
    from cellnet.training.boosting import fit_booster

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(400, 81)).astype(np.float32)
    y = np.clip(x[:, :5].mean(1) + rng.normal(0, 0.05, 400), 0, 1)
    start = time.perf_counter()
    fit_booster(x, y, seed=0)
    return {"gbt_fit_seconds_400x81_600_rounds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- GPU (--gpu)

#: Dense (no sparsity) peaks in TFLOP/s from the vendors' data sheets: (float16/bfloat16 tensor
#: cores, TF32 tensor cores or None where the chip has none, plain float32). Matched against
#: ``get_device_details(gpu)["device_name"]`` as whole words, the longest name first ("H100 PCIe"
#: before "H100", and "L4" does not match "L40S").
GPU_PEAK_TFLOPS: dict[str, tuple[float, float | None, float]] = {
    "H200": (989.4, 494.7, 66.9),  # the H100 SXM's compute with more memory
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),  # SXM
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "L40": (181.0, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3),
    "A10G": (70.0, 35.0, 31.2),
    "A10": (125.0, 62.5, 31.2),
    "V100": (125.0, None, 15.7),
    "T4": (65.0, None, 8.1),
}


def gpu_peak_from_table(device_name: str) -> tuple[str, tuple[float, float | None, float]] | None:
    """``(table key, peaks)`` of the first known GPU named in ``device_name``, else None."""
    import re

    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return key, GPU_PEAK_TFLOPS[key]
    return None


def _gpu_index(device: str) -> int | None:
    """0 for ``/GPU:0`` or ``/device:GPU:0``, None for a device that is not a GPU."""
    parts = device.upper().replace("/", "").split(":")
    if "GPU" not in parts:
        return None
    rest = parts[parts.index("GPU") + 1:]
    return int(rest[0]) if rest and rest[0].isdigit() else 0


def _device_details(device: str) -> dict:
    """Name (and compute capability) of a TF device string such as ``/GPU:0`` or ``/CPU:0``."""
    i = _gpu_index(device)
    if i is not None:
        gpus = tf.config.list_physical_devices("GPU")
        if i >= len(gpus):
            from cellnet.errors import CellnetError
            raise CellnetError(f"{device}: no such GPU ({len(gpus)} visible)")
        details = tf.config.experimental.get_device_details(gpus[i])
        return {"name": details.get("device_name", gpus[i].name),
                "compute_capability": ".".join(map(str, details.get("compute_capability") or ())) or None}
    from cellnet.machine import cpu
    return {"name": cpu().get("model") or platform.processor() or platform.machine(), "compute_capability": None}


def _peaks(device: str, name: str, matmul_n: int, repeats: int) -> dict:
    """The float32-path and float16-path peaks (TFLOP/s) MFU is measured against, and their source."""
    known = gpu_peak_from_table(name) if _gpu_index(device) is not None else None
    if known is not None:
        key, (fp16, tf32, fp32) = known
        tf32_on = tf32 is not None and tf.config.experimental.tensor_float_32_execution_enabled()
        return {"gpu_peak_source": f"table: {key} dense peaks (fp16/bf16 {fp16:g}, TF32 {tf32 or '-'}, "
                                   f"fp32 {fp32:g} TFLOP/s); float32 configs against "
                                   f"{'TF32 (TF enables it by default)' if tf32_on else 'fp32'}",
                "gpu_peak_float32_tflops": float(tf32 if tf32_on else fp32),
                "gpu_peak_float16_tflops": float(fp16)}
    return {"gpu_peak_source": f"measured: {matmul_n}x{matmul_n} matmul on {device} (float32, float16)",
            "gpu_peak_float32_tflops": matmul_gflops(matmul_n, repeats, tf.float32, device) / 1e3,
            "gpu_peak_float16_tflops": matmul_gflops(matmul_n, repeats, tf.float16, device) / 1e3}


@contextlib.contextmanager
def global_dtype_policy(name: str):
    """Keras's global dtype policy set to ``name`` inside the block, the previous one after (also on error)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text.strip().splitlines()[0][:200]}"


def bench_gpu(device: str = "/GPU:0", size: int | None = None, batch: int | None = None,
              width: float | None = None, steps: int = 10, matmul_n: int | None = None,
              stage_blocks: tuple[int, ...] | None = None) -> dict:
    """The paper FPN's training step and SavedModel on ``device``: images/s, TFLOP/s and MFU.

    The model, crop (``size``) and batch are the segmentation paper preset's unless given
    (smaller only in tests, which run this on ``/CPU:0``, also with fewer ``stage_blocks``:
    tracing time grows with the layers). Images and masks are random tensors
    made on the device, so no input pipeline is timed. The step is ``AugmentedTrainer``'s, as
    ``cellnet train segmentation`` compiles it (SegmentationLoss, Adam), timed after warm-up for:
    float32 with on-device augmentation (``fp32``), the same without augmentation
    (``fp32_no_augment``: the augmentation's cost is the difference), ``mixed_float16`` (the
    Keras global policy while its model and trainer are made and compiled, restored after, also
    on error) and float32 compiled with XLA
    (``xla``). A config that fails (XLA or float16 kernels missing) leaves ``..._error``.

    MFU is achieved / peak: the peak from ``GPU_PEAK_TFLOPS`` when the GPU is known, else a
    measured ``matmul_n``-square matmul on the device (8192 on a GPU, 512 elsewhere) in float32
    and float16; float32 configs are held against the float32 peak (TF32 where TF uses it),
    mixed_float16 against the float16 one.
    """
    from cellnet.models import CellSegmenter, ResNet34Backbone
    from cellnet.preprocess import full_res_to_model_input
    from cellnet.serving.export import export_model
    from cellnet.training.losses import SegmentationLoss
    from cellnet.training.presets import preset
    from cellnet.training.trainer import AugmentedTrainer

    settings = preset("segmentation", "paper")
    width = settings["width"] if width is None else width
    crop = settings["crop"] if size is None else size
    batch = settings["batch_size"] if batch is None else batch
    on_gpu = _gpu_index(device) is not None
    matmul_n = (8192 if on_gpu else 512) if matmul_n is None else matmul_n
    details = _device_details(device)
    out: dict = {"gpu_device": device, "gpu_device_name": details["name"],
                 "gpu_compute_capability": details["compute_capability"],
                 "gpu_model": f"FPN segmenter, ResNet34 width {width:.2f} (paper preset), {crop}x{crop} crops, "
                              f"batch {batch}, random uint8 images and masks on the device",
                 "gpu_tf32_enabled": bool(tf.config.experimental.tensor_float_32_execution_enabled())}
    out.update(_peaks(device, details["name"], matmul_n, max(3, steps)))

    def segmenter():
        blocks = {} if stage_blocks is None else {"stage_blocks": stage_blocks}
        return CellSegmenter(ResNet34Backbone(unit=settings["unit"], width=width, **blocks), decoder="fpn")

    with tf.device(device):
        rng = tf.random.Generator.from_seed(0)
        x = tf.cast(rng.uniform([batch, crop, crop, 3], 0, 256), tf.uint8)  # float, truncated: 0..255
        y = tf.cast(rng.uniform([batch, crop, crop, 4]) < 0.3, tf.float32)

        def time_step(model, augment: bool, jit: bool) -> tuple[float, float]:
            """(images/s, seconds of the first step, which traces and compiles)."""
            trainer = AugmentedTrainer(model, augment=augment, with_mask=True)
            trainer.compile(optimizer=keras.optimizers.Adam(1e-4), loss=SegmentationLoss(), jit_compile=jit)
            # Adam's slots made now, not in the first step: a step that makes variables is traced twice
            trainer.optimizer.build(trainer.trainable_variables)
            start = time.perf_counter()
            trainer.train_on_batch(x, y)  # train_on_batch returns numbers: each step waits for the device
            first = time.perf_counter() - start
            return _rate(lambda: trainer.train_on_batch(x, y), batch, steps, warmup=1), first

        model = segmenter()
        model(tf.zeros([1, crop, crop, 3]))
        # Training FLOPs per image = 3 x the forward's: the backward pass costs about twice the
        # forward (gradients with respect to the activations and to the weights), the usual
        # convention of MFU figures. The forward is counted by the TF profiler at the crop size.
        forward = graph_flops(lambda t: model(t), tf.TensorSpec([1, crop, crop, 3], tf.float32))
        train_flops = 3 * forward
        out["gpu_forward_gflop_per_image"] = forward / 1e9
        out["gpu_train_gflop_per_image"] = train_flops / 1e9

        rates: dict[str, float] = {}
        rates["fp32"], out["gpu_train_step_fp32_first_step_s"] = time_step(model, True, False)
        rates["fp32_no_augment"], _ = time_step(model, False, False)
        try:
            # as under `cellnet train --precision mixed_float16`: the policy holds while the model and
            # the trainer are made and compiled (Keras then scales the loss), and is restored after
            with global_dtype_policy("mixed_float16"):
                rates["mixed_float16"], out["gpu_train_step_mixed_float16_first_step_s"] = \
                    time_step(segmenter(), True, False)
        except Exception as exc:  # e.g. no float16 kernels for some op on this device
            out["gpu_train_step_mixed_float16_error"] = _first_line(exc)
        try:
            rates["xla"], out["gpu_train_step_xla_first_step_s"] = time_step(segmenter(), True, True)
        except Exception as exc:  # an op XLA cannot compile on this device
            out["gpu_train_step_xla_error"] = _first_line(exc)

        for name, rate in rates.items():
            peak = out["gpu_peak_float16_tflops" if name == "mixed_float16" else "gpu_peak_float32_tflops"]
            tflops = rate * train_flops / 1e12
            out[f"gpu_train_step_{name}_images_per_s"] = rate
            out[f"gpu_train_tflops_{name}"] = tflops
            out[f"gpu_mfu_{name}"] = tflops / peak
        # on-device augmentation's cost: the float32 step with it against without it
        out["gpu_augment_cost_ms_per_batch"] = 1e3 * batch * (1 / rates["fp32"] - 1 / rates["fp32_no_augment"])
        out["gpu_augment_cost_fraction_of_step"] = 1 - rates["fp32"] / rates["fp32_no_augment"]

        # the float32 model served from a SavedModel: full-resolution uint8 patches (2x the crop)
        full = 2 * crop
        flops = graph_flops(lambda t: model(full_res_to_model_input(t)), tf.TensorSpec([1, full, full, 3], tf.uint8))
        out["gpu_savedmodel"] = f"the float32 FPN above exported, {full}x{full} uint8 input"
        out["gpu_savedmodel_gflop_per_patch"] = flops / 1e9
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(model, "segmentation", Path(tmp) / "fpn", {"run": "cellnet bench --gpu"})
            served = tf.saved_model.load(str(path)).signatures["serving_default"]
            for b in (8, 32):
                images = tf.cast(rng.uniform([b, full, full, 3], 0, 256), tf.uint8)
                # reading one value back waits for the batch without timing a copy of every mask
                rate = _rate(lambda: served(images=images)["masks"][0, 0, 0, 0].numpy(), b, max(2, steps), warmup=2)
                out[f"gpu_savedmodel_batch{b}_patches_per_s"] = rate
                out[f"gpu_savedmodel_batch{b}_tflops"] = rate * flops / 1e12
                out[f"gpu_savedmodel_batch{b}_mfu"] = rate * flops / 1e12 / out["gpu_peak_float32_tflops"]
    return out


def machine_info() -> dict:
    from cellnet.machine import cpu

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "cpu": cpu(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def fractions_of_matmul(results: dict) -> dict:
    """Every SavedModel ``..._batch<b>_gflops`` as ``..._batch<b>_fraction_of_matmul``."""
    return {k.removesuffix("_gflops") + "_fraction_of_matmul": v / results["matmul_gflops"]
            for k, v in results.items() if k.startswith("savedmodel") and k.endswith("_gflops")}


def require_gpu() -> None:
    """Refuse ``--gpu`` (one line) where TensorFlow sees no CUDA GPU."""
    if not tf.config.list_physical_devices("GPU"):
        from cellnet.errors import CellnetError
        raise CellnetError("--gpu: no CUDA GPU is visible to TensorFlow; `cellnet bench` without --gpu "
                           "measures the CPU")


def bench(out: str | os.PathLike, quick: bool = False, gpu: bool = False) -> dict:
    """Every CPU figure (module docstring); with ``gpu``, also :func:`bench_gpu` on ``/GPU:0``."""
    if gpu:
        require_gpu()  # before minutes of CPU figures
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
    if gpu:
        print("measuring the GPU: training step, augmentation, SavedModel, MFU ...", flush=True)
        results.update(bench_gpu("/GPU:0", steps=3 if quick else 10))
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


if __name__ == "__main__" and sys.argv[1:2] == ["--concurrent"]:  # concurrent_rate's child
    _path, _batch, _clients, _calls, _intra = sys.argv[2:7]
    print(_serve_concurrently(_path, int(_batch), int(_clients), int(_calls), int(_intra)))

"""`cellnet bench`'s JSON keys and table, from its pieces at tiny sizes (nothing is timed as a
pass / fail criterion: the shared machine's speed varies)."""
from __future__ import annotations

import json

import pytest
import tensorflow as tf

from cellnet.bench import (bench_features, bench_savedmodel_fpn, concurrent_rate, format_table,
                           fractions_of_matmul, machine_info)
from cellnet.errors import CellnetError
from cellnet.machine import SIMD
from conftest import TINY_BLOCKS


def test_machine_records_cpu_model_and_simd_flags():
    machine = machine_info()
    assert isinstance(machine["cpu"]["model"], str) and machine["cpu"]["model"]
    assert all(SIMD.match(flag) for flag in machine["cpu"]["simd"])
    assert {"platform", "processor", "cpus", "tensorflow", "keras", "gpus"} <= set(machine)


def test_features_rate_and_gflops():
    out = bench_features(repeats=1)
    assert set(out) == {"features_maps_per_s", "features_gflop_per_map", "features_gflops",
                        "features_fft_ceiling_maps_per_s"}
    assert out["features_maps_per_s"] > 0
    assert 0 < out["features_fft_ceiling_maps_per_s"] < float("inf")
    # 3 cell channels x (1 forward + 4 inverse FFTs of 288x288 points at 2.5 n log2 n, + products)
    assert out["features_gflop_per_map"] == pytest.approx(0.052, rel=0.05)
    assert out["features_gflops"] == pytest.approx(out["features_maps_per_s"] * out["features_gflop_per_map"])


def test_fpn_savedmodel_keys_and_fractions_of_matmul():
    out = bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64, stage_blocks=TINY_BLOCKS)
    assert "width 0.12" in out["savedmodel_fpn_paper"]
    assert out["savedmodel_fpn_paper_gflop_per_patch"] > 0
    assert out["savedmodel_fpn_paper_batch1_patches_per_s"] > 0
    results = {"matmul_gflops": 100.0, "savedmodel_batch8_gflops": 50.0, **out}
    fractions = fractions_of_matmul(results)
    assert fractions == {
        "savedmodel_batch8_fraction_of_matmul": 0.5,
        "savedmodel_fpn_paper_batch1_fraction_of_matmul": out["savedmodel_fpn_paper_batch1_gflops"] / 100}


def test_concurrent_clients_are_timed_in_a_fresh_process(tmp_path):
    from cellnet.models import DirectCellularity
    from cellnet.serving.export import export_model

    model = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=0.125,
                              stage_blocks=TINY_BLOCKS)
    path = export_model(model, "regression", tmp_path / "direct" / "1", {"run": "test"})
    assert concurrent_rate(path, batch=1, clients=2, calls=2) > 0
    with pytest.raises(CellnetError, match="concurrent-serving measurement failed: .*no_such"):
        concurrent_rate(tmp_path / "no_such", batch=1, clients=2, calls=2)


def test_table_prints_the_cpu_and_every_key():
    machine = machine_info()
    results = {"machine": machine, "matmul_gflops": 100.0, "matmul_gflops_runs": [100.0, 61.25],
               "features_maps_per_s": 400.0,
               "features_gflops": 20.8, "savedmodel_fpn_paper": "FPN segmenter",
               "savedmodel_fpn_paper_batch8_fraction_of_matmul": 0.4,
               "savedmodel_fpn_paper_batch1_fraction_of_matmul": 0.3}
    lines = format_table(results).splitlines()
    assert machine["cpu"]["model"] in lines[0]
    assert lines[1].startswith("simd: ")
    for key in results:
        if key != "machine":
            assert any(line.startswith(key + " ") for line in lines[2:]), key
    assert any(line.startswith("matmul_gflops_runs ") and line.endswith("100.0, 61.2") for line in lines)


def test_tta_and_ensemble_costs_are_measured_against_the_plain_export(monkeypatch):
    from cellnet import bench
    from cellnet.training import presets

    real = presets.preset
    monkeypatch.setattr(presets, "preset", lambda task, name: {**real(task, name), "width": 0.125,
                                                                "stage_blocks": TINY_BLOCKS})
    out = bench.bench_tta_ensemble(batch=1, repeats=1)
    for name in ("plain", "tta_flips", "tta_d4", "ensemble3"):
        assert out[f"savedmodel_{name}_batch1_patches_per_s"] > 0
    for name in ("tta_flips", "tta_d4", "ensemble3"):
        assert out[f"savedmodel_{name}_batch1_cost_x"] == pytest.approx(
            out["savedmodel_plain_batch1_patches_per_s"] / out[f"savedmodel_{name}_batch1_patches_per_s"])


def test_bf16_speedup_is_omitted_where_the_cpu_emulates_bf16(monkeypatch):
    from cellnet import bench, machine

    monkeypatch.setattr(machine, "reduced_precision_support", lambda: {"bfloat16": False, "float16": False})
    out = bench.bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64, stage_blocks=TINY_BLOCKS)
    if not bench.tf.config.list_physical_devices("GPU"):
        assert "not supported here" in out["savedmodel_fpn_paper_bf16"]
        assert not any(k.endswith("bf16_speedup") for k in out)
    monkeypatch.setattr(machine, "reduced_precision_support", lambda: {"bfloat16": True, "float16": False})
    out = bench.bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64, stage_blocks=TINY_BLOCKS)
    assert out["savedmodel_fpn_paper_batch1_bf16_speedup"] == pytest.approx(
        out["savedmodel_fpn_paper_batch1_bf16_patches_per_s"] / out["savedmodel_fpn_paper_batch1_patches_per_s"])


# ----------------------------------------------------------------------------- cellnet bench --gpu

@pytest.fixture(scope="module")
def gpu_figures():
    """``bench_gpu`` run once on the CPU at tiny sizes, every code path of a GPU run.

    The backbone has one unit a stage here (not [3, 4, 6, 3]): each of the four configurations
    traces a training step, and tracing time grows with the layers, not with the tiny sizes.
    """
    from cellnet import bench

    yield bench.bench_gpu("/CPU:0", size=32, batch=2, width=0.125, steps=1, stage_blocks=TINY_BLOCKS)


def test_gpu_bench_measures_every_training_configuration(gpu_figures):
    import keras

    out = gpu_figures
    assert keras.config.dtype_policy().name == "float32"  # mixed_float16 was restored
    assert out["gpu_device"] == "/CPU:0" and out["gpu_device_name"]
    assert "width 0.12" in out["gpu_model"] and "32x32 crops, batch 2" in out["gpu_model"]
    # training FLOPs are 3x the forward's
    assert out["gpu_forward_gflop_per_image"] > 0
    assert out["gpu_train_gflop_per_image"] == pytest.approx(3 * out["gpu_forward_gflop_per_image"])
    configs = ("fp32", "fp32_no_augment", "mixed_float16", "xla")
    for name in configs:
        if f"gpu_train_step_{name}_error" in out:  # allowed only for the optional configurations
            assert name in ("mixed_float16", "xla") and out[f"gpu_train_step_{name}_error"]
            continue
        rate = out[f"gpu_train_step_{name}_images_per_s"]
        assert rate > 0
        assert out[f"gpu_train_tflops_{name}"] == pytest.approx(rate * out["gpu_train_gflop_per_image"] / 1e3)
        peak = out["gpu_peak_float16_tflops" if name == "mixed_float16" else "gpu_peak_float32_tflops"]
        assert out[f"gpu_mfu_{name}"] == pytest.approx(out[f"gpu_train_tflops_{name}"] / peak)
    assert "gpu_train_step_mixed_float16_images_per_s" in out or "gpu_train_step_mixed_float16_error" in out
    assert "gpu_train_step_xla_images_per_s" in out or "gpu_train_step_xla_error" in out
    # augmentation's cost: the float32 step with it against without it (may be < 0 in noise)
    on, off = out["gpu_train_step_fp32_images_per_s"], out["gpu_train_step_fp32_no_augment_images_per_s"]
    assert out["gpu_augment_cost_ms_per_batch"] == pytest.approx(1e3 * 2 * (1 / on - 1 / off))
    assert out["gpu_augment_cost_fraction_of_step"] == pytest.approx(1 - on / off)


def test_gpu_bench_peak_and_savedmodel(gpu_figures):
    out = gpu_figures
    # no GPU here: the peak is a matmul measured on the device
    assert out["gpu_peak_source"].startswith("measured: 512x512 matmul on /CPU:0")
    assert out["gpu_peak_float32_tflops"] > 0 and out["gpu_peak_float16_tflops"] > 0
    assert "64x64 uint8" in out["gpu_savedmodel"] and out["gpu_savedmodel_gflop_per_patch"] > 0
    for b in (8, 32):
        rate = out[f"gpu_savedmodel_batch{b}_patches_per_s"]
        assert rate > 0
        assert out[f"gpu_savedmodel_batch{b}_tflops"] == pytest.approx(rate * out["gpu_savedmodel_gflop_per_patch"] / 1e3)
        assert out[f"gpu_savedmodel_batch{b}_mfu"] == pytest.approx(
            out[f"gpu_savedmodel_batch{b}_tflops"] / out["gpu_peak_float32_tflops"])
    assert all(k.startswith("gpu_") for k in out)
    assert json.loads(json.dumps(out)) == out  # `cellnet bench --gpu` writes them as JSON
    assert {"gpu_model", "gpu_mfu_fp32"} <= {line.split()[0] for line in
                                             format_table({"machine": machine_info(), **out}).splitlines()[2:]}


def test_known_gpus_are_matched_by_whole_name():
    from cellnet.bench import GPU_PEAK_TFLOPS, gpu_peak_from_table

    cases = {"NVIDIA H200": "H200", "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe",
             "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A10G": "A10G", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S",
             "Tesla T4": "T4", "Tesla V100-SXM2-16GB": "V100"}
    for name, key in cases.items():
        assert gpu_peak_from_table(name) == (key, GPU_PEAK_TFLOPS[key]), name
    assert gpu_peak_from_table("NVIDIA GeForce RTX 3090") is None
    assert GPU_PEAK_TFLOPS["H200"] == GPU_PEAK_TFLOPS["H100"]


def test_dtype_policy_is_restored_even_on_error():
    import keras

    from cellnet.bench import global_dtype_policy

    with pytest.raises(RuntimeError):
        with global_dtype_policy("mixed_float16"):
            assert keras.config.dtype_policy().name == "mixed_float16"
            raise RuntimeError("boom")
    assert keras.config.dtype_policy().name == "float32"


def test_matmul_gflops_on_a_device_and_in_float16():
    from cellnet.bench import matmul_gflops

    assert matmul_gflops(64, repeats=1) > 0  # the CPU bench's call, unchanged
    assert matmul_gflops(64, repeats=1, dtype=tf.float16, device="/CPU:0") > 0


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is visible")
def test_bench_gpu_without_a_gpu_is_one_line_error(tmp_path, capsys):
    from cellnet.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("cellnet bench: error: --gpu: no CUDA GPU is visible")
    assert "`cellnet bench` without --gpu measures the CPU" in err[0]
    assert not out.exists()

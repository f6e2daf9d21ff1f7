"""`cellnet bench`'s JSON keys and table, from its pieces at tiny sizes (nothing is timed as a
pass / fail criterion: the shared machine's speed varies)."""
from __future__ import annotations

import pytest

from cellnet.bench import (bench_features, bench_savedmodel_fpn, format_table, fractions_of_matmul,
                           machine_info)
from cellnet.machine import SIMD


def test_machine_records_cpu_model_and_simd_flags():
    machine = machine_info()
    assert isinstance(machine["cpu"]["model"], str) and machine["cpu"]["model"]
    assert all(SIMD.match(flag) for flag in machine["cpu"]["simd"])
    assert {"platform", "processor", "cpus", "tensorflow", "keras", "gpus"} <= set(machine)


def test_features_rate_and_gflops():
    out = bench_features(repeats=1)
    assert set(out) == {"features_maps_per_s", "features_gflop_per_map", "features_gflops"}
    assert out["features_maps_per_s"] > 0
    # 3 cell channels x (1 forward + 4 inverse FFTs of 288x288 points at 2.5 n log2 n, + products)
    assert out["features_gflop_per_map"] == pytest.approx(0.052, rel=0.05)
    assert out["features_gflops"] == pytest.approx(out["features_maps_per_s"] * out["features_gflop_per_map"])


def test_fpn_savedmodel_keys_and_fractions_of_matmul():
    out = bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64)
    assert "width 0.12" in out["savedmodel_fpn_paper"]
    assert out["savedmodel_fpn_paper_gflop_per_patch"] > 0
    assert out["savedmodel_fpn_paper_batch1_patches_per_s"] > 0
    results = {"matmul_gflops": 100.0, "savedmodel_batch8_gflops": 50.0, **out}
    fractions = fractions_of_matmul(results)
    assert fractions == {
        "savedmodel_batch8_fraction_of_matmul": 0.5,
        "savedmodel_fpn_paper_batch1_fraction_of_matmul": out["savedmodel_fpn_paper_batch1_gflops"] / 100}


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
    monkeypatch.setattr(presets, "preset", lambda task, name: {**real(task, name), "width": 0.125})
    out = bench.bench_tta_ensemble(batch=1, repeats=1)
    for name in ("plain", "tta_flips", "tta_d4", "ensemble3"):
        assert out[f"savedmodel_{name}_batch1_patches_per_s"] > 0
    for name in ("tta_flips", "tta_d4", "ensemble3"):
        assert out[f"savedmodel_{name}_batch1_cost_x"] == pytest.approx(
            out["savedmodel_plain_batch1_patches_per_s"] / out[f"savedmodel_{name}_batch1_patches_per_s"])


def test_bf16_speedup_is_omitted_where_the_cpu_emulates_bf16(monkeypatch):
    from cellnet import bench, machine

    monkeypatch.setattr(machine, "reduced_precision_support", lambda: {"bfloat16": False, "float16": False})
    out = bench.bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64)
    if not bench.tf.config.list_physical_devices("GPU"):
        assert "not supported here" in out["savedmodel_fpn_paper_bf16"]
        assert not any(k.endswith("bf16_speedup") for k in out)
    monkeypatch.setattr(machine, "reduced_precision_support", lambda: {"bfloat16": True, "float16": False})
    out = bench.bench_savedmodel_fpn((1,), repeats=1, width=0.125, size=64)
    assert out["savedmodel_fpn_paper_batch1_bf16_speedup"] == pytest.approx(
        out["savedmodel_fpn_paper_batch1_bf16_patches_per_s"] / out["savedmodel_fpn_paper_batch1_patches_per_s"])

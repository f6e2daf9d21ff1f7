"""`cellnet evaluate` on tiny trained runs: predictions CSVs, tables, plots, no overwrite."""
import json
import math
import shutil

import numpy as np

import pandas as pd
import pytest

from cellnet.errors import CellnetError
from cellnet.evaluation.report import evaluate
from cellnet.training.tasks import train_cellularity
from conftest import tiny_config


@pytest.fixture(scope="module")
def report(tiny_seg_run, synth_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    direct = root / "direct"
    train_cellularity(tiny_config("cellularity", synth_prepared, direct, head="classification"))
    twin = root / "twin"  # a second cellularity run (the same model) for the ensemble row
    shutil.copytree(direct, twin)
    out = root / "out"
    evaluate(synth_prepared, [str(tiny_seg_run), str(direct), str(twin)], out, n_boot=200, progress=False,
             tta="flips", ensemble=True)
    return out


def test_report_has_the_papers_tables_and_our_numbers(report):
    text = (report / "report.md").read_text()
    for heading in ("## Summary", "## Table 1", "## Table 2", "## Table 3"):
        assert heading in text
    assert "Best cellularity model: ResNet34 (C)" in text
    assert "Predict the training mean" in text
    assert "0.53" in text and "0.010 [0.009-0.012]" in text  # paper values beside ours
    results = json.loads((report / "results.json").read_text())
    row = results["cellularity"][0]
    assert row["mse"]["low"] <= row["mse"]["value"] <= row["mse"]["high"]
    assert 0.0 <= results["segmentation"][0]["jaccard_malignant"] <= 1.0


def test_predictions_csv_and_plots(report):
    frame = pd.read_csv(report / "predictions_direct.csv")
    assert {"slide", "rid", "y_true", "p", "low", "high"} <= set(frame.columns)
    assert frame["p"].between(0, 1).all() and (frame["low"] <= frame["high"]).all()
    for name in ("scatter_direct.png", "bland_altman_direct.png"):
        assert (report / name).stat().st_size > 1000
    assert list(report.glob("fig4_thresholds_*.png")) and list(report.glob("fig7_masks_*.png"))


def test_refuses_to_overwrite_and_rejects_unfinished_runs(report, synth_prepared, tmp_path):
    with pytest.raises(CellnetError, match="not empty"):
        evaluate(synth_prepared, [str(report)], report)
    with pytest.raises(CellnetError, match="not a cellnet run folder"):
        evaluate(synth_prepared, [str(tmp_path)], tmp_path / "out")


def test_table1_shows_the_authors_per_image_jaccard(report):
    results = json.loads((report / "results.json").read_text())
    seg = results["segmentation"][0]
    weighted = seg["jaccard_image_weighted"]
    assert math.isnan(weighted) or 0.0 <= weighted <= 1.0
    table = (report / "report.md").read_text().split("## Table 1")[1].split("## Table 2")[0]
    header = next(line for line in table.splitlines() if line.startswith("| Initialisation"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["Initialisation", "Standard decoder (U-Net): ours", "paper",
                       "U-Net: per-image J (1,1,4,0)", "FPN decoder: ours", "paper",
                       "FPN: per-image J (1,1,4,0)"]
    label = "Random" if seg["init"] == "random" else "ImageNet"
    row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    cells = dict(zip(columns[1:], [c.strip() for c in row.strip("|").split("|")][1:]))
    prefix = "U-Net" if seg["decoder"] == "unet" else "FPN"
    assert cells[f"{prefix}: per-image J (1,1,4,0)"] == ("—" if math.isnan(weighted) else f"{weighted:.3f}")
    frame = pd.read_csv(report / "segmentation_metrics.csv")
    assert {"jaccard_mean", "jaccard_image_weighted", "jaccard_image_normal", "jaccard_image_lymphocyte",
            "jaccard_image_malignant"} <= set(frame.columns)


def test_tta_and_ensemble_rows_with_their_uncertainty(report):
    results = json.loads((report / "results.json").read_text())
    rows = {r["name"]: r for r in results["cellularity"]}
    assert set(rows) == {"direct", "direct_flips", "twin", "twin_flips", "ensemble_flips"}
    assert rows["direct_flips"]["single"] == "direct" and rows["direct_flips"]["tta"] == "flips"
    plain = pd.read_csv(report / "predictions_direct.csv")
    flips = pd.read_csv(report / "predictions_direct_flips.csv")
    ensemble = pd.read_csv(report / "predictions_ensemble_flips.csv")
    assert "cellularity_std" not in plain and (flips["cellularity_std"] >= 0).all()
    assert flips["cellularity_std"].max() > 1e-4  # a flip changes a random-ish model's score
    # the ensemble of two copies of one model is that model's TTA mean, its members named outputs
    np.testing.assert_allclose(ensemble["p"], flips["p"], atol=1e-5)
    np.testing.assert_allclose(ensemble["member0_cellularity"], flips["p"], atol=1e-5)
    inside = ((plain["low"] <= plain["y_true"]) & (plain["y_true"] <= plain["high"])).mean()
    coverage = rows["direct"]["coverage80"]
    assert coverage["value"] == pytest.approx(inside) and coverage["low"] <= inside <= coverage["high"]
    assert -1 <= rows["direct_flips"]["spread_error_spearman"]["value"] <= 1
    versus = results["comparison"]["vs_single"]
    assert versus["ensemble_flips"]["single"] in ("direct", "twin")
    assert set(versus) == {"direct_flips", "twin_flips", "ensemble_flips"}
    text = (report / "report.md").read_text()
    assert "## Test-time augmentation, ensembles and uncertainty" in text
    assert "| Ensemble of 2 + TTA flips | `ensemble_flips` |" in text


def test_ensemble_needs_two_cellularity_runs(tiny_seg_run, synth_prepared, tmp_path):
    with pytest.raises(CellnetError, match="--ensemble: needs at least two cellularity runs, got 0"):
        evaluate(synth_prepared, [str(tiny_seg_run)], tmp_path / "out", ensemble=True, progress=False)

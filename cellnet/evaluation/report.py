"""`cellnet evaluate`: score runs on held-out patients and write the paper's Tables 1-3 (SPEC 5)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellnet.evaluation import metrics
from cellnet.evaluation import plots
from cellnet.classes import CELL_CLASSES
from cellnet.data.pipeline import split_mean
from cellnet.evaluation.engine import predict_patches, segment_regions
from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_dir
from cellnet.data.records import ensure_prepared, load_manifest
from cellnet.training.runs import read_run

#: The paper's numbers (Tables 1-3), keyed like our rows.
PAPER_TABLE1 = {("unet", "random"): 0.35, ("fpn", "random"): 0.47, ("unet", "imagenet"): 0.50,
                ("fpn", "imagenet"): 0.53}
PAPER_TABLE2 = {  # MSE [95% CI]: (random, imagenet)
    "GBT": ("0.023 [0.019-0.026]", "0.022 [0.019-0.026]"),
    "ResNet34 (SR)": ("0.013 [0.011-0.015]", "0.013 [0.011-0.015]"),
    "ResNet34 (R)": ("0.015 [0.013-0.018]", "0.011 [0.010-0.012]"),
    "ResNet50 (R)": ("0.025 [0.022-0.028]", "0.011 [0.009-0.012]"),
    "Xception (R)": ("0.017 [0.015-0.020]", "0.010 [0.009-0.012]"),
    "Xception (C)": ("0.012 [0.010-0.014]", "0.010 [0.009-0.012]"),
}
PAPER_TABLE3 = {  # kappa, ICC (ImageNet models)
    "GBT": ("0.571 [0.520-0.622]", "0.787 [0.744-0.823]"),
    "ResNet34 (SR)": ("0.658 [0.604-0.704]", "0.865 [0.835-0.891]"),
    "ResNet34 (R)": ("0.649 [0.599-0.700]", "0.868 [0.840-0.892]"),
    "ResNet50 (R)": ("0.652 [0.603-0.701]", "0.867 [0.844-0.894]"),
    "Xception (R)": ("0.669 [0.616-0.713]", "0.881 [0.853-0.904]"),
    "Xception (C)": ("0.689 [0.642-0.734]", "0.883 [0.858-0.905]"),
}
ARCH_NAMES = {"resnet34": "ResNet34", "resnet50": "ResNet50", "xception": "Xception"}


def method_name(info: dict) -> str:
    kind = info["kind"]
    if kind == "gbt":
        return "GBT"
    if kind == "cascade":
        return "ResNet34 (SR)"
    if kind in ("regression", "classification"):
        return f"{ARCH_NAMES.get(info.get('arch'), info.get('arch'))} ({kind[0].upper()})"
    return f"{info.get('decoder', 'fpn').upper()} segmenter"


def init_name(info: dict) -> str:
    return "imagenet" if str(info.get("init", "random")).startswith("imagenet") else "random"


def _log_blobs(malignant: np.ndarray, threshold: float = 0.24) -> np.ndarray:
    from skimage.feature import blob_log

    return blob_log(malignant, min_sigma=1, max_sigma=4, num_sigma=4, threshold=threshold)


# ----------------------------------------------------------------------------- evaluate

def evaluate(data: str | os.PathLike, runs: list[str], out: str | os.PathLike, split: str = "eval",
             seed: int = 0, n_boot: int = 2000, progress: bool = True, tta: str = "none",
             ensemble: bool = False) -> Path:
    """Score each run, write predictions CSVs, plots and ``report.md`` into ``out`` (atomically).

    ``tta`` adds a row per cellularity run with that test-time augmentation; ``ensemble`` adds a
    row for the equal-weight ensemble of every cellularity run (under ``tta``), as ``cellnet
    export --tta MODE --run R1 --run R2 ...`` would serve it.
    """
    from cellnet.models.tta import symmetries

    symmetries(tta)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise bad(out, "exists and is not empty; choose a new --out (nothing was overwritten)")
    infos = {run: read_run(run) for run in runs}
    for run, info in infos.items():
        if info.get("status") != "complete":
            raise bad(run, "is not a complete run (resume it with the same `cellnet train` command)")
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = ensure_prepared(data, out.parent, seed=seed, progress=progress)
    manifest = load_manifest(prepared)
    scoring_cellularity = any(info["kind"] != "segmentation" for info in infos.values())
    if scoring_cellularity and (split not in manifest["splits"] or not manifest["splits"][split].get("labelled", True)):
        raise bad(prepared, f"has no labelled '{split}' split to evaluate on")
    if not scoring_cellularity and "cells_val" not in manifest["splits"]:
        raise bad(prepared, "has no 'cells_val' regions to score the segmenters on")
    cellularity_runs = sum(info["kind"] != "segmentation" for info in infos.values())
    if ensemble and cellularity_runs < 2:
        raise CellnetError(f"--ensemble: needs at least two cellularity runs, got {cellularity_runs}")
    with atomic_dir(out) as tmp:
        results = _evaluate_into(tmp, prepared, infos, split, seed, n_boot, progress, tta, ensemble)
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (tmp / "report.md").write_text(render_report(results))
    return out


def ensemble_name(tta: str) -> str:
    """The report row (and the demo's export) of the ensemble of every cellularity run."""
    return "ensemble" if tta == "none" else f"ensemble_{tta}"


def _evaluate_into(folder: Path, prepared: Path, infos: dict, split: str, seed: int, n_boot: int,
                   progress: bool, tta: str = "none", ensemble: bool = False) -> dict:
    from cellnet.evaluation.engine import predict_averaged
    from cellnet.models.tta import Averaged, Member
    from cellnet.training.runs import load_run_model

    results = {"split": split, "prepared": str(prepared), "segmentation": [], "cellularity": [],
               "tta": tta, "created": time.strftime("%Y-%m-%d %H:%M")}
    members = []
    score = dict(folder=folder, n_boot=n_boot, seed=seed)
    for run, info in infos.items():
        name = Path(run).name
        model = load_run_model(run)
        if info["kind"] == "segmentation":
            results["segmentation"].append(_evaluate_segmenter(folder, name, run, info, model, prepared, progress))
            continue
        method = method_name(info)
        frame = predict_patches(model, info["kind"], prepared, split, progress=progress)
        results["cellularity"].append(_cellularity_row(frame, name, method, info, run, **score))
        if info["kind"] == "gbt" and (Path(run) / "feature_importance.png").is_file():
            shutil.copyfile(Path(run) / "feature_importance.png", folder / f"feature_importance_{name}.png")
            shutil.copyfile(Path(run) / "feature_importance.csv", folder / f"feature_importance_{name}.csv")
        if tta != "none":
            frame = predict_averaged(Averaged([Member(model, info["kind"])], tta), prepared, split, progress=progress)
            results["cellularity"].append(_cellularity_row(frame, f"{name}_{tta}", f"{method} + TTA {tta}", info,
                                                           run, tta=tta, single=name, **score))
        members.append(Member(model, info["kind"]))
    if ensemble:
        frame = predict_averaged(Averaged(members, tta), prepared, split, progress=progress)
        singles = [r for r in results["cellularity"] if r["tta"] == "none"]
        best = min(singles, key=lambda r: r["mse"]["value"])
        method = f"Ensemble of {len(members)}" + (f" + TTA {tta}" if tta != "none" else "")
        results["cellularity"].append(_cellularity_row(frame, ensemble_name(tta), method, {"init": "random"},
                                                       "+".join(r["run"] for r in singles), tta=tta,
                                                       single=best["name"], **score))
    if results["cellularity"]:
        train_mean = split_mean(prepared, "train")
        y = np.asarray(results["cellularity"][0]["y"])
        results["baseline"] = {"train_mean": train_mean,
                               "mse": metrics.mse_ci(y, np.full_like(y, train_mean), n_boot=n_boot, seed=seed).as_dict()}
        results["comparison"] = _compare(results["cellularity"], y, train_mean, n_boot, seed)
        pd.DataFrame([{k: v for k, v in r.items() if k not in ("p", "y")} for r in results["cellularity"]]) \
            .to_csv(folder / "cellularity_metrics.csv", index=False)
    if results["segmentation"]:
        pd.DataFrame(results["segmentation"]).to_csv(folder / "segmentation_metrics.csv", index=False)
    return results


def _cellularity_row(frame: pd.DataFrame, name: str, method: str, info: dict, run: str, folder: Path,
                     n_boot: int, seed: int, tta: str = "none", single: str | None = None) -> dict:
    """One model's predictions CSV, plots and Table 2/3 numbers; uncertainty where it has one."""
    frame.to_csv(folder / f"predictions_{name}.csv", index=False)
    y, p = frame["y_true"], frame["p"]
    summary = metrics.cellularity_summary(y, p, n_boot=n_boot, seed=seed)
    plots.scatter(y, p, folder / f"scatter_{name}.png", title=f"{method} — {name}")
    plots.bland_altman(y, p, folder / f"bland_altman_{name}.png", title=f"{method} — {name}")
    row = {"run": str(run), "name": name, "method": method, "init": init_name(info), "tta": tta,
           "single": single, "n": summary["n"], "mse": summary["mse"].as_dict(), "kappa": summary["kappa"].as_dict(),
           "icc21": summary["icc21"].as_dict(), "icc31": summary["icc31"].as_dict(), "pk": summary["pk"],
           "train_seconds": info.get("train_seconds"), "p": p.tolist(), "y": y.tolist()}
    if frame["truth"].notna().all():
        row["mse_vs_truth"] = metrics.mse(frame["truth"], p)
    if "low" in frame:
        row["coverage80"] = metrics.interval_coverage(y, frame["low"], frame["high"], n_boot=n_boot, seed=seed).as_dict()
    if "cellularity_std" in frame:
        row["spread_error_spearman"] = metrics.spread_error_correlation(
            y, p, frame["cellularity_std"], n_boot=n_boot, seed=seed).as_dict()
    return row


def _compare(rows: list[dict], y: np.ndarray, train_mean: float, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of MSE differences: best vs the mean baseline and vs the runner-up."""
    ranked = sorted(rows, key=lambda r: r["mse"]["value"])
    best = np.asarray(ranked[0]["p"])

    def diff(other: np.ndarray) -> dict:
        return metrics.mse_difference_ci(y, best, other, n_boot=n_boot, seed=seed).as_dict()

    out = {"best": ranked[0]["name"], "best_method": ranked[0]["method"],
           "vs_baseline": diff(np.full_like(y, train_mean))}
    by_name = {r["name"]: r for r in rows}
    out["vs_single"] = {r["name"]: {"single": r["single"], "mse_difference": metrics.mse_difference_ci(
        y, np.asarray(r["p"]), np.asarray(by_name[r["single"]]["p"]), n_boot=n_boot, seed=seed).as_dict()}
        for r in rows if r.get("single")}
    if len(ranked) > 1:
        out["runner_up"] = ranked[1]["name"]
        out["vs_runner_up"] = diff(np.asarray(ranked[1]["p"]))
    return out


def _evaluate_segmenter(folder: Path, name: str, run: str, info: dict, model, prepared: Path,
                        progress: bool) -> dict:
    inters, unions = [], []  # one row per region: global sums and the per-image measure
    figures = 0
    for image, mask, maps, region in segment_regions(model, prepared, "cells_val", progress):
        i, u = metrics.jaccard_counts(mask[None], maps[None], 0.5)
        inters.append(i)
        unions.append(u)
        if figures < 2:
            stem = f"{name}_{region.replace(' ', '_')}"
            plots.threshold_overlays(image, maps[..., 2], folder / f"fig4_thresholds_{stem}.png")
            plots.blob_overlay(image, _log_blobs(maps[..., 2]), folder / f"fig5_blobs_{stem}.png",
                               title="LoG blobs of the malignant map (t=0.24)")
            plots.mask_panel(image, mask, maps, folder / f"fig7_masks_{stem}.png", blobs=_log_blobs(maps[..., 2]))
            figures += 1
    inters, unions = np.array(inters).reshape(-1, 4), np.array(unions).reshape(-1, 4)
    scores = metrics.jaccard_from_counts(inters.sum(axis=0), unions.sum(axis=0))
    per_image = metrics.jaccard_per_image_from_counts(inters, unions)
    return {"run": str(run), "name": name, "decoder": info.get("decoder", "fpn"), "init": init_name(info),
            **{f"jaccard_{c}": scores[c] for c in CELL_CLASSES}, "jaccard_mean": scores["mean"],
            **{f"jaccard_image_{c}": per_image[c] for c in CELL_CLASSES},
            "jaccard_image_weighted": per_image["weighted"],
            "train_seconds": info.get("train_seconds")}


# ----------------------------------------------------------------------------- report.md

def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"


def _est(d: dict | None) -> str:
    """``0.013 [0.011-0.015]`` like the paper; 4 decimals for small values, brackets with a comma
    when a bound is negative (differences)."""
    if not d:
        return "—"
    digits = 4 if 0 <= abs(d["value"]) < 0.01 and d["low"] >= 0 else 3
    if min(d["value"], d["low"], d["high"]) < 0:
        digits = 4 if abs(d["value"]) < 0.01 else 3
        return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}-{d['high']:.{digits}f}]"


def render_report(results: dict) -> str:
    lines = ["# cellnet evaluation report", "",
             f"Scored on the `{results['split']}` split of `{results['prepared']}` "
             f"({results['created']}). Paper values (Rakhlin et al. 2019, BreastPathQ) are beside ours; "
             "they come from different data, so compare the ranking, not the digits. "
             "Intervals are 95%: bootstrap (2000 resamples) for MSE and kappa, F-based for ICC.", ""]
    lines += _headline(results)
    lines += _table1(results["segmentation"])
    lines += ["", "## Table 2 — cellularity MSE [95% CI]", "",
              "| Model | Random: ours | paper | ImageNet: ours | paper |", "|---|---|---|---|---|"]
    ours = {(r["method"], r["init"]): r for r in results["cellularity"]}
    methods = list(PAPER_TABLE2) + sorted({r["method"] for r in results["cellularity"]} - set(PAPER_TABLE2))
    for method in methods:
        paper = PAPER_TABLE2.get(method, ("—", "—"))
        cells = []
        for i, init in enumerate(("random", "imagenet")):
            row = ours.get((method, init))
            cells += [_est(row["mse"]) if row else "—", paper[i]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "baseline" in results:
        lines.append(f"| Predict the training mean ({results['baseline']['train_mean']:.3f}) | "
                     f"{_est(results['baseline']['mse'])} | — | — | — |")
    lines += ["", "## Table 3 — agreement: Cohen's kappa (4 bins) and ICC [95% CI]", "",
              "| Model | Init | Kappa: ours | paper | ICC(2,1): ours | paper | ICC(3,1): ours | P_K: ours |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["cellularity"], key=lambda r: r["mse"]["value"]):
        paper = PAPER_TABLE3.get(r["method"], ("—", "—"))
        lines.append(f"| {r['method']} | {r['init']} | {_est(r['kappa'])} | {paper[0]} | {_est(r['icc21'])} | "
                     f"{paper[1]} | {_est(r['icc31'])} | {_fmt(r['pk'])} |")
    lines += _uncertainty_table(results)
    lines += ["", "Paper kappa/ICC are for ImageNet-initialised models. P_K is the BreastPathQ challenge "
              "metric (probability that the predictions order two patches like the truth).", "",
              "## Files", "",
              "- `predictions_<run>.csv`: slide, rid, patient, y_true (rater score), truth (exact area "
              "fraction where known), p (and low/high for classification heads: 80% interval).",
              "- `scatter_<run>.png`, `bland_altman_<run>.png`: predicted vs true, agreement.",
              "- `feature_importance_<run>.png`: GBT total gain (paper Fig. 10).",
              "- `fig4_thresholds_*.png`, `fig5_blobs_*.png`, `fig7_masks_*.png`: malignant map at "
              "thresholds, LoG blobs, masks (paper Figs. 4, 5, 7).",
              "- `cellularity_metrics.csv`, `segmentation_metrics.csv`, `results.json`: every number above.", ""]
    return "\n".join(lines)


def _uncertainty_table(results: dict) -> list[str]:
    """TTA and ensemble rows against their single model; interval coverage; spread vs error."""
    rows = [r for r in results["cellularity"] if r.get("single") or "coverage80" in r or "spread_error_spearman" in r]
    if not rows:
        return []
    versus = results["comparison"].get("vs_single", {})
    lines = ["", "## Test-time augmentation, ensembles and uncertainty", "",
             "| Model | Run | MSE [95% CI] | minus its single model [95% CI] | 80% interval coverage | "
             "Spearman(spread, abs error) |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = versus.get(r["name"])
        lines.append(f"| {r['method']} | `{r['name']}` | {_est(r['mse'])} | "
                     f"{(_est(d['mse_difference']) + ' vs `' + d['single'] + '`') if d else '—'} | "
                     f"{_est(r.get('coverage80'))} | {_est(r.get('spread_error_spearman'))} |")
    return lines + ["", "The difference is paired (same patches, bootstrap); below 0 the TTA or ensemble row "
                    "is better. An ensemble is compared with the best single model. Coverage: the share of "
                    "true scores inside the classification head's 80% interval (0.8 when calibrated). "
                    "Spread: `cellularity_std` over the TTA variants and ensemble members; a positive rank "
                    "correlation with the absolute error means the spread flags the patches it gets wrong."]


def _table1(segmentation: list[dict]) -> list[str]:
    """Table 1: the global cell-class Jaccard beside the paper's, and the authors' per-image measure."""
    weights = ",".join(f"{w:g}" for w in metrics.AUTHORS_CLASS_WEIGHTS)
    lines = ["## Table 1 — segmentation Jaccard (threshold 0.5; ours: mean over the cell classes of "
             "the Jaccard global over the validation regions)", "",
             "| Initialisation | Standard decoder (U-Net): ours | paper | U-Net: per-image J "
             f"({weights}) | FPN decoder: ours | paper | FPN: per-image J ({weights}) |",
             "|---|---|---|---|---|---|---|"]
    seg = {(r["decoder"], r["init"]): r for r in segmentation}
    for init in ("random", "imagenet"):
        cells = []
        for decoder in ("unet", "fpn"):
            row = seg.get((decoder, init))
            cells += [_fmt(row["jaccard_mean"]) if row else "—", f"{PAPER_TABLE1[(decoder, init)]:.2f}",
                      _fmt(row["jaccard_image_weighted"]) if row else "—"]
        lines.append(f"| {init.capitalize() if init == 'random' else 'ImageNet'} | " + " | ".join(cells) + " |")
    lines += ["", f"Per-image J ({weights}): the authors' validation measure — Jaccard of each region and "
              f"class, averaged over regions, then over classes with weights {weights} (normal, "
              "lymphocyte, malignant, background); a region where a class is neither present nor "
              "predicted is left out of that class's average."]
    if segmentation:
        lines += ["", "Per class (ours, global / per-image): " + "; ".join(
            f"{r['name']}: " + ", ".join(f"{c} {_fmt(r['jaccard_' + c])} / {_fmt(r['jaccard_image_' + c])}"
                                         for c in CELL_CLASSES)
            for r in segmentation), ""]
    return lines


def _headline(results: dict) -> list[str]:
    if not results["cellularity"]:
        return []
    c = results["comparison"]
    best = next(r for r in results["cellularity"] if r["name"] == c["best"])
    base = results["baseline"]["mse"]["value"]
    lines = ["## Summary", "",
             f"**Best cellularity model: {c['best_method']} (`{c['best']}`)**, MSE {_est(best['mse'])} on "
             f"{best['n']} held-out patches, against {base:.3f} for always predicting the training mean "
             f"({(1 - best['mse']['value'] / base) * 100:.0f}% lower; paired difference "
             f"{_est(c['vs_baseline'])}"
             + (", which excludes 0" if c["vs_baseline"]["high"] < 0 else ", which includes 0: not a sure win")
             + ")."]
    if "vs_runner_up" in c:
        runner = next(r for r in results["cellularity"] if r["name"] == c["runner_up"])
        d = c["vs_runner_up"]
        sure = "the interval excludes 0" if d["high"] < 0 else "the interval includes 0, so the order of these two is not settled"
        lines.append(f"Runner-up: {runner['method']} (`{runner['name']}`), MSE {_est(runner['mse'])}; "
                     f"best minus runner-up {_est(d)} — {sure}.")
    lines.append("")
    lines += ["| Method | Run | MSE [95% CI] | Kappa | ICC(2,1) | P_K |", "|---|---|---|---|---|---|"]
    for r in sorted(results["cellularity"], key=lambda r: r["mse"]["value"]):
        lines.append(f"| {r['method']} | `{r['name']}` | {_est(r['mse'])} | {_fmt(r['kappa']['value'])} | "
                     f"{_fmt(r['icc21']['value'])} | {_fmt(r['pk'])} |")
    lines.append(f"| Predict the training mean | — | {_est(results['baseline']['mse'])} | — | — | — |")
    lines.append("")
    return lines

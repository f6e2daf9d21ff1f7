"""`cellnet demo`: the whole mission on synthetic data with the cpu preset (SPEC 9).

synth -> prepare -> train FPN and U-Net segmenters -> SR cascade, GBT, direct ResNet34
(classification head) on the FPN -> evaluate (Tables 1-3, each cellularity method also with D4
test-time augmentation, and their D4 ensemble) -> export all four methods and the D4 ensemble ->
`predict` through the SavedModels on the held-out test patches -> a summary table. Every step is skipped when its output is already
complete, so running the demo again reuses what is built (and resumes an interrupted run).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from cellnet.errors import CellnetError

#: Test-time augmentation of the demo's ensemble (and its evaluation rows).
DEMO_TTA = "d4"
#: Enough held-out patients (15% validation, 15% test) for confidence intervals that mean something.
DEMO_PATIENTS = 16


def _say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _done(run: Path) -> bool:
    path = run / "run.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def demo(out: str | Path, seed: int = 0) -> dict:
    from cellnet.serving.export import export_run
    from cellnet.serving.predict import predict
    from cellnet.data.records import is_prepared, prepare
    from cellnet.evaluation.report import ensemble_name, evaluate
    from cellnet.data.synth import synthesize
    from cellnet.training.tasks import train_cascade, train_cellularity, train_gbt, train_segmentation
    from cellnet.training.config import make_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data, prepared, runs = out / "data", out / "prepared", out / "runs"
    timings = {}

    def step(name, done, fn):
        t = time.time()
        if done:
            print(f"== {name}: already done, reusing")
            return
        _say(name)
        fn()
        timings[name] = round(time.time() - t, 1)

    step("synth: synthetic BreastPathQ (small)", (data / "train_labels.csv").is_file(),
         lambda: synthesize(data, patients=DEMO_PATIENTS, seed=seed, small=True))
    step("prepare: TFRecords + patient splits", is_prepared(prepared),
         lambda: prepare(data, prepared, seed=seed))
    common = dict(data=str(prepared), preset="cpu", seed=seed)
    seg, unet = runs / "seg_fpn", runs / "seg_unet"
    jobs = [
        ("train segmentation (FPN, ResNet34-ELU)", seg,
         lambda: train_segmentation(make_config("segmentation", run=str(seg), decoder="fpn", **common))),
        ("train segmentation (U-Net, ResNet34-ELU; Table 1 only)", unet,
         lambda: train_segmentation(make_config("segmentation", run=str(unet), decoder="unet", **common))),
        ("train cellularity: SR cascade", runs / "sr_cascade",
         lambda: train_cascade(make_config("cascade", run=str(runs / "sr_cascade"), seg=str(seg), **common))),
        ("train gbt: 81 features + XGBoost", runs / "gbt",
         lambda: train_gbt(make_config("gbt", run=str(runs / "gbt"), seg=str(seg), **common))),
        ("train cellularity: direct ResNet34, 101-bin classification", runs / "resnet34_c",
         lambda: train_cellularity(make_config("cellularity", run=str(runs / "resnet34_c"),
                                               arch="resnet34", head="classification", **common))),
    ]
    for title, run, fn in jobs:
        step(title, _done(run), fn)
    cellularity_runs = [runs / "sr_cascade", runs / "gbt", runs / "resnet34_c"]
    report = out / "report"
    step(f"evaluate: Tables 1-3 on held-out patients, TTA {DEMO_TTA} and the ensemble", (report / "report.md").is_file(),
         lambda: evaluate(prepared, [str(seg), str(unet), *map(str, cellularity_runs)], report, seed=seed,
                          tta=DEMO_TTA, ensemble=True))
    ensemble = ensemble_name(DEMO_TTA)
    exports = {run.name: out / "saved_models" / run.name for run in [seg, *cellularity_runs]}
    exports[ensemble] = out / "saved_models" / ensemble
    sources = {**{run.name: run for run in [seg, *cellularity_runs]}, ensemble: cellularity_runs}
    step("export: SavedModels for TF Serving (and the ensemble)", all((p / "1").is_dir() for p in exports.values()),
         lambda: [export_run(sources[name], path, version=1, tta=DEMO_TTA if name == ensemble else "none")
                  for name, path in exports.items() if not (path / "1").is_dir()])
    test_images = sorted((data / "test_patches").glob("*.tif"))
    if not test_images:
        raise CellnetError(f"{data / 'test_patches'}: no test patches to predict")
    predictions = out / "predictions"
    step("predict: test patches through the SavedModels",
         all((predictions / f"{name}.csv").is_file() for name in exports),
         lambda: [predict(exports[name] / "1", [str(data / "test_patches")], predictions / f"{name}.csv",
                          overlays=str(predictions / f"overlays_{name}") if name in ("seg_fpn", "sr_cascade") else None)
                  for name in exports if not (predictions / f"{name}.csv").is_file()])
    summary = print_summary(out, data, report, predictions, exports)
    summary["seconds"] = round(time.time() - start, 1)
    summary["step_seconds"] = timings
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo finished in {summary['seconds']:.0f} s; everything is under {out}")
    return summary


def print_summary(out: Path, data: Path, report: Path, predictions: Path, exports: dict) -> dict:
    results = json.loads((report / "results.json").read_text())
    test_truth = pd.read_csv(data / "test_labels.csv", dtype={"slide": str, "rid": str})
    rows = []
    for r in sorted(results["cellularity"], key=lambda r: r["mse"]["value"]):
        csv = predictions / f"{r['name']}.csv"
        test_mse = None
        if csv.is_file():
            pred = pd.read_csv(csv, dtype={"slide": str, "rid": str})
            merged = pred.merge(test_truth, on=["slide", "rid"])
            test_mse = float(((merged["p"] - merged["y"]) ** 2).mean()) if len(merged) else None
        rows.append({"method": r["method"], "run": r["name"],
                     "mse": f"{r['mse']['value']:.4f} [{r['mse']['low']:.4f}-{r['mse']['high']:.4f}]",
                     "kappa": f"{r['kappa']['value']:.3f}", "icc21": f"{r['icc21']['value']:.3f}",
                     "pk": f"{r['pk']:.3f}", "test_mse_savedmodel": None if test_mse is None else f"{test_mse:.4f}"})
    base = results["baseline"]
    rows.append({"method": "Predict the training mean", "run": "-",
                 "mse": f"{base['mse']['value']:.4f} [{base['mse']['low']:.4f}-{base['mse']['high']:.4f}]",
                 "kappa": "-", "icc21": "-", "pk": "-", "test_mse_savedmodel": None})
    table = pd.DataFrame(rows)
    print("\nCellularity on held-out synthetic patients (validation split; CIs 95%):")
    print(table.to_string(index=False))
    for seg in results["segmentation"]:
        print(f"\nSegmentation {seg['name']}: Jaccard malignant {seg['jaccard_malignant']:.3f}, "
              f"lymphocyte {seg['jaccard_lymphocyte']:.3f}, normal {seg['jaccard_normal']:.3f}, "
              f"mean {seg['jaccard_mean']:.3f}")
    print(f"\nreport:       {report / 'report.md'}")
    print(f"SavedModels:  {out / 'saved_models'}  ({', '.join(exports)})")
    print(f"predictions:  {predictions}")
    return {"table": rows, "segmentation": results["segmentation"], "report": str(report / "report.md")}

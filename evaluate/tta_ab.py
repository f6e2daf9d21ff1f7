"""Test-time augmentation vs none on real tissue, leave-one-site-out (developer measurement).

``python -m evaluate.tta_ab --loso /tmp/loso --work /tmp/tta_ab``

Takes the BRCA-M2C leave-one-site-out segmenters that ``evaluate.site_ab`` trained
(``<loso>/fold_<SITE>/runs/<variant>``, each trained on two sites with the third held out) and
scores each through the product path: ``cellnet export --tta none|flips|d4``
(:func:`cellnet.serving.export.export_run`) then ``cellnet evaluate --model``
(:func:`cellnet.serving.scoring.evaluate_folder`) on a folder holding only the held-out site's
regions. The three exports of a run share one checkpoint, so the rows of a (fold, variant)
differ by the test-time augmentation alone.

The held-out folder (``<work>/fold_<SITE>/heldout/cells/``) links the ``_crop.tif`` and
``_key.xml`` of the regions the fold's ``split.csv`` marks ``val`` (checked against the site in
the barcode). It has no ``split.csv``: ``evaluate_folder`` scores every region of a cells folder
whatever a split says, so one would only mislead a reader. Exports go to
``<work>/fold_<SITE>/exports/<variant>_<tta>/1`` and evaluations to ``.../evals/<variant>_<tta>``;
both are reused when present, and figures already in ``<work>/<results>`` are not recomputed
(``--rescore`` recomputes them from the evaluations on disk, ``--fresh`` ignores both).

Figures (the ``all`` row of ``segmentation_metrics.csv``): global Jaccard at 0.5 per class with
15-px discs, the per-image Jaccard (class-weighted 1, 1, 4, 0), and point-detection F1 for
malignant and lymphocyte nuclei. A mean over folds is given only where every fold defines it.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

SITES = ("A7", "A8", "AC")
TTAS = ("none", "flips", "d4")
DEFAULT_VARIANTS = ("tissue_cpu_epreset_s0", "authors_e20_s0")
#: Table column -> key of evaluate_folder's ``all`` row.
COLUMNS = {
    "J malignant": "jaccard_malignant", "J lymphocyte": "jaccard_lymphocyte", "J normal": "jaccard_normal",
    "J per-image": "jaccard_image_weighted", "F1 malignant": "f1_malignant", "F1 lymphocyte": "f1_lymphocyte",
}
#: Also kept in the JSON (not tabled).
EXTRA = ("jaccard_mean", "precision_malignant", "recall_malignant", "precision_lymphocyte",
         "recall_lymphocyte", "predicted_malignant", "predicted_lymphocyte", "annotated_malignant",
         "annotated_lymphocyte", "annotated_normal")


def site_of(name: str) -> str:
    """``TCGA-A7-A0D9-...`` -> ``A7``."""
    return name.split("-")[1]


def heldout_names(fold_data: Path, site: str) -> list[str]:
    """Region names the fold's split.csv holds out (``val``), all of them from ``site``."""
    rows = [line.split(",") for line in (fold_data / "cells" / "split.csv").read_text().splitlines()[1:] if line]
    names = sorted(name for name, split in rows if split.strip() == "val")
    wrong = [n for n in names if site_of(n) != site]
    if not names or wrong:
        raise SystemExit(f"{fold_data}/cells/split.csv: val should be exactly site {site}; "
                         f"{len(names)} val rows, {len(wrong)} from another site")
    missed = [n for n, s in rows if s.strip() != "val" and site_of(n) == site]
    if missed:
        raise SystemExit(f"{fold_data}/cells/split.csv: {len(missed)} regions of {site} are not held out")
    return names


def make_heldout(fold_data: Path, out: Path, site: str) -> int:
    """``out/cells/`` linking only the held-out regions' image and annotation; returns their count."""
    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    names = heldout_names(fold_data, site)
    for name in names:
        for suffix in ("_crop.tif", "_key.xml"):
            source = (fold_data / "cells" / f"{name}{suffix}").resolve()
            if not source.is_file():
                raise SystemExit(f"{source}: missing (fold {site}, region {name})")
            link = cells / source.name
            if link.is_symlink() and link.resolve() != source:
                link.unlink()
            if not link.exists():
                link.symlink_to(source)
    extra = {p.name for p in cells.iterdir()} - {f"{n}{s}" for n in names for s in ("_crop.tif", "_key.xml")}
    if extra:
        raise SystemExit(f"{cells}: holds files that are not held-out regions: {sorted(extra)[:3]}")
    return len(names)


def check_run(run: Path) -> str | None:
    """Why ``run`` cannot be exported (None when it looks complete)."""
    if not run.is_dir():
        return "missing"
    if not (run / "best.keras").is_file():
        return "no best.keras"
    try:
        info = json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as exc:
        return f"run.json unreadable ({type(exc).__name__})"
    if info.get("status") != "complete" or info.get("kind") != "segmentation":
        return f"run.json status {info.get('status')!r}, kind {info.get('kind')!r}"
    return None


def export(run: Path, exports: Path, tta: str) -> tuple[Path, float | None]:
    """The SavedModel of ``run`` under ``tta`` (``exports/1``), exported unless present; seconds taken."""
    target = exports / "1"
    if (target / "saved_model.pb").is_file():
        return target, None
    from cellnet.serving.export import export_run

    start = time.perf_counter()
    path = export_run(run, exports, version=1, tta=tta)
    return path, time.perf_counter() - start


def evaluate(heldout: Path, model: Path, out: Path, fresh: bool) -> tuple[dict, float | None]:
    """evaluate_folder's ``all`` row for ``model`` on ``heldout`` (read back when already written)."""
    if fresh and out.exists():
        shutil.rmtree(out)
    done = out / "evaluation.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("model") == str(model):
            return summary, None
        shutil.rmtree(out)
    from cellnet.serving.scoring import evaluate_folder

    start = time.perf_counter()
    summary = evaluate_folder(heldout, model, out, progress=False)
    return summary, time.perf_counter() - start


def figures(summary: dict) -> dict:
    row = summary["all"]
    out = {"regions": summary["regions"]}
    for key in (*COLUMNS.values(), *EXTRA):
        value = row.get(key)
        out[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return out


def fmt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def mean_defined(values: list) -> float | None:
    """Mean when every value is defined, else None."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def table(results: dict, variants: list[str], sites: list[str]) -> str:
    head = "| fold | variant | tta | " + " | ".join(COLUMNS) + " |"
    rule = "|" + "---|" * (3 + len(COLUMNS))
    lines = [head, rule]
    for variant in variants:
        for site in sites:
            for tta in TTAS:
                r = results.get(f"{site}/{variant}/{tta}")
                if r:
                    lines.append(f"| {site} | {variant} | {tta} | "
                                 + " | ".join(fmt(r[k]) for k in COLUMNS.values()) + " |")
        for tta in TTAS:
            rows = [results[f"{s}/{variant}/{tta}"] for s in sites if f"{s}/{variant}/{tta}" in results]
            if rows:
                lines.append(f"| **mean ({len(rows)})** | {variant} | {tta} | "
                             + " | ".join(fmt(mean_defined([r[k] for r in rows])) for k in COLUMNS.values())
                             + " |")
    return "\n".join(lines)


def delta_table(results: dict, variants: list[str], sites: list[str], arm: str = "d4") -> str:
    head = f"| fold | variant | {arm} - none | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for variant in variants:
        deltas = []
        for site in sites:
            a, b = results.get(f"{site}/{variant}/{arm}"), results.get(f"{site}/{variant}/none")
            if not (a and b):
                continue
            d = {k: None if a[k] is None or b[k] is None else a[k] - b[k] for k in COLUMNS.values()}
            deltas.append(d)
            lines.append(f"| {site} | {variant} | | " + " | ".join(fmt(d[k], True) for k in COLUMNS.values()) + " |")
        if deltas:
            lines.append(f"| **mean ({len(deltas)})** | {variant} | | "
                         + " | ".join(fmt(mean_defined([d[k] for d in deltas]), True) for k in COLUMNS.values())
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loso", default="/tmp/loso", help="evaluate.site_ab's --work (folds and runs)")
    parser.add_argument("--work", default="/tmp/tta_ab", help="held-out folders, exports, evaluations, results")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="run folder names under <loso>/fold_<SITE>/runs/")
    parser.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES)
    parser.add_argument("--results", default="results.json", help="file under --work to keep the figures in")
    parser.add_argument("--rescore", action="store_true", help="recompute figures (reusing exports/evaluations)")
    parser.add_argument("--fresh", action="store_true", help="evaluate again even where an evaluation exists")
    args = parser.parse_args()
    loso, work = Path(args.loso), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / args.results
    results = {} if args.rescore or args.fresh or not results_path.is_file() else json.loads(results_path.read_text())

    from cellnet.quiet import import_tensorflow

    import_tensorflow()
    import keras

    started = time.perf_counter()
    broken = {}
    for site in args.sites:
        fold = work / f"fold_{site}"
        heldout = fold / "heldout"
        count = make_heldout(loso / f"fold_{site}" / "data", heldout, site)
        print(f"fold {site}: {count} held-out regions in {heldout}", flush=True)
        for variant in args.variants:
            run = loso / f"fold_{site}" / "runs" / variant
            problem = check_run(run)
            if problem:
                broken[f"{site}/{variant}"] = f"{run}: {problem}"
                print(f"  {variant}: SKIPPED, {run}: {problem}", flush=True)
                continue
            for tta in TTAS:
                key = f"{site}/{variant}/{tta}"
                if key in results:
                    continue
                model, export_s = export(run, fold / "exports" / f"{variant}_{tta}", tta)
                summary, eval_s = evaluate(heldout, model, fold / "evals" / f"{variant}_{tta}", args.fresh)
                results[key] = {**figures(summary), "export_s": export_s, "eval_s": eval_s,
                                "run": str(run), "model": str(model)}
                results_path.write_text(json.dumps(results, indent=2))
                timing = ", ".join(f"{k} {v:.0f}s" for k, v in (("export", export_s), ("evaluate", eval_s)) if v)
                print(f"  {key}: " + ", ".join(f"{c} {fmt(results[key][k])}" for c, k in COLUMNS.items())
                      + (f" ({timing})" if timing else " (cached)"), flush=True)
                keras.backend.clear_session()
    print(f"\nwall time this invocation: {time.perf_counter() - started:.0f} s\n")
    print(table(results, args.variants, args.sites))
    print()
    print(delta_table(results, args.variants, args.sites, "d4"))
    print()
    print(delta_table(results, args.variants, args.sites, "flips"))
    if broken:
        print("\nnot scored (missing or broken runs):")
        for key, why in broken.items():
            print(f"  {key}: {why}")


if __name__ == "__main__":
    main()

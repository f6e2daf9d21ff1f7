"""Leave-one-site-out A/B of segmentation training choices on BRCA-M2C (developer measurement).

``python -m evaluate.site_ab --src ../shared/real/brca-m2c --work /tmp/loso --epochs 30 --seeds 0 1 2``
(then ``--rescore --checkpoint last --results last.json`` scores the same runs' last epochs)

Each fold holds out one TCGA tissue-source site (A7, A8, AC: characters 6-7 of the barcode)
and trains on the other two, so no site or patient is on both sides. The run's own validation
split (which picks ``best.keras`` and drives early choices) is every ``INNER_VAL_EVERY``-th patient
of the training sites, never the held-out site: choosing the checkpoint on the site it is then
scored on would flatter the figures (cellnet <= 0.4's version of this script did that). Every variant is scored on
the held-out site's whole regions against the same reference: 15-px discs (global Jaccard at
0.5, as in training) and point detection (``cellnet.evaluation.points``: peaks of each class map
matched one-to-one to the annotated nuclei within 6 working-resolution px, as ``cellnet evaluate
--model`` scores), which does not depend on the disc size a variant trained with. Variants (same
seed and budget):

- ``eq2``: the soft Jaccard of eq. 2 as printed (per pixel), 15-px discs;
- ``authors``: the released code's per-image soft Jaccard (cellnet's loss), 15-px discs;
- ``authors_d12.5``: the same with the authors' 12.5-px discs;
- ``authors_bn0.99``: the same with 15-px discs and Keras's BatchNormalization momentum 0.99
  (the authors' Keras 2 default) instead of cellnet's 0.9;
- ``stain_aug``, ``macenko``, ``reinhard``: cellnet's loss and 15-px discs with stain
  augmentation (``--stain-aug``) or a stain normalisation fitted on the training regions;
- ``tissue_cpu``: the ``tissue-cpu`` preset as it stands;
- ``stain_strong``: stain augmentation at Tellez et al.'s "HED-strong" (0.2) with brightness 0.2 and
  contrast 0.3 (AC's regions are paler, with about 40% of A7's hematoxylin, more than the light
  defaults' 5% reach); ``tissue_cpu_strong``: the same settings in the ``tissue-cpu`` preset;
- ``ema``, ``tissue_cpu_ema``: the ``cpu`` (``authors``) and ``tissue-cpu`` runs validating and
  saving the moving average of the weights (``--ema 0.99``);
- ``tissue_cpu_region``, ``tissue_cpu_region_reinhard``: ``tissue-cpu`` with each crop the whole
  region (crop 256, batch 2: the same pixels a step), without and with Reinhard normalisation,
  whose statistics are then the region's, as when a region is served;
- ``tissue_cpu_stroma``: ``tissue-cpu`` trained with BRCA-M2C's stromal nuclei as a class of their
  own (imported into the ``normal`` channel, which BRCA-M2C leaves empty) instead of background;
- ``grey``: ``authors`` with half of the training crops turned grey (luminance in all three
  channels, after the other augmentations), so that the network cannot rest on stain colour alone;
- ``wide``, ``wider``: ``authors`` at width 0.5 and 1.0 instead of the ``cpu`` preset's 0.25
  (twice and four times the channels in every layer);
- ``alpha0.5``: ``authors`` with the loss's soft-Jaccard weight a 0.5 (``--jaccard-weight``) instead of the paper's 0.15
  (on held-out sites the 0.15 runs' maps cover a third of the annotated lymphocyte discs at 0.5);
  ``alpha1.0``: the soft Jaccard alone; ``tissue_cpu_alpha0.5``: a 0.5 in the ``tissue-cpu`` preset.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cellnet.choices import CHECKPOINTS
from cellnet.classes import BRCA_M2C_CODES

SITES = ("A7", "A8", "AC")
#: name -> how it differs: ``loss`` (eq2), ``disc``, ``bn`` (momentum), ``grey`` (the share of training
#: crops turned grey), ``stroma`` (the channel stromal nuclei are imported into), ``config`` (train overrides).
VARIANTS: dict[str, dict] = {
    "eq2": {"loss": "eq2"}, "authors": {}, "authors_d12.5": {"disc": 12.5}, "authors_bn0.99": {"bn": 0.99},
    "stain_aug": {"config": {"stain_aug": True}}, "macenko": {"config": {"stain_norm": "macenko"}},
    "reinhard": {"config": {"stain_norm": "reinhard"}}, "tissue_cpu": {"config": {"preset": "tissue-cpu"}},
    "stain_strong": {"config": {"stain_aug": True, "hed": 0.2, "brightness": 0.2, "contrast": 0.3}},
    "tissue_cpu_strong": {"config": {"preset": "tissue-cpu", "hed": 0.2, "brightness": 0.2, "contrast": 0.3}},
    "ema": {"config": {"ema": 0.99}}, "tissue_cpu_ema": {"config": {"preset": "tissue-cpu", "ema": 0.99}},
    "tissue_cpu_stroma": {"stroma": "normal", "config": {"preset": "tissue-cpu"}},
    "tissue_cpu_region": {"config": {"preset": "tissue-cpu", "crop": 256, "batch_size": 2}},
    "tissue_cpu_region_reinhard": {"config": {"preset": "tissue-cpu", "crop": 256, "batch_size": 2,
                                              "stain_norm": "reinhard"}},
    "grey": {"grey": 0.5},
    "wide": {"config": {"width": 0.5}}, "wider": {"config": {"width": 1.0}},
    "alpha0.5": {"config": {"jaccard_weight": 0.5}},
    "alpha1.0": {"config": {"jaccard_weight": 1.0}},
    "tissue_cpu_alpha0.5": {"config": {"preset": "tissue-cpu", "jaccard_weight": 0.5}},
}
REFERENCE_DISC = 15.0
#: BRCA-M2C's label codes; stromal nuclei have no cellnet channel (used here to measure false malignant calls).
CODES = {name: code for code, name in BRCA_M2C_CODES.items()}
STROMAL_CODE = CODES[None]
#: A region with fewer annotated tumour nuclei than this counts as tumour-free in ``--composition``.
TUMOUR_FREE_BELOW = 10
#: The runs' own validation: every 4th patient of each training site (about a quarter of them).
INNER_VAL_EVERY = 4


def site_of(case: str) -> str:
    """``TCGA-A7-A0D9-...`` -> ``A7``."""
    return case.split("-")[1]


def patient_of(case: str) -> str:
    """``TCGA-A7-A0D9-...`` -> ``TCGA-A7-A0D9``."""
    return "-".join(case.split("-")[:3])


def _link_region(image: Path, cells: Path) -> None:
    for path in (image, image.with_name(image.name.replace("_crop.tif", "_key.xml"))):
        link = cells / path.name
        if not link.exists():
            link.symlink_to(path.resolve())


def make_fold(imported: Path, fold: Path, site: str) -> tuple[Path, Path]:
    """The fold's training set and its held-out site, as two dataset folders (links to the imported files).

    ``fold/data``: the other sites' regions; ``cells/split.csv`` puts every ``INNER_VAL_EVERY``-th
    patient of them (sorted per site) in validation. ``fold/heldout``: the held-out site's regions,
    all ``val``, scored only after training.
    """
    data, heldout = fold / "data" / "cells", fold / "heldout" / "cells"
    for cells in (data, heldout):
        cells.mkdir(parents=True, exist_ok=True)
    images = sorted((imported / "cells").glob("*_crop.tif"))
    names = [image.name.removesuffix("_crop.tif") for image in images]
    patients = sorted({patient_of(n) for n in names if site_of(n) != site})
    inner_val = {p for train_site in sorted({site_of(p) for p in patients})
                 for i, p in enumerate(q for q in patients if site_of(q) == train_site) if i % INNER_VAL_EVERY == 0}
    rows = {data: ["name,split"], heldout: ["name,split"]}
    for image, name in zip(images, names):
        cells = heldout if site_of(name) == site else data
        _link_region(image, cells)
        split = "val" if cells is heldout or patient_of(name) in inner_val else "train"
        rows[cells].append(f"{name},{split}")
    for cells, lines in rows.items():
        (cells / "split.csv").write_text("\n".join(lines) + "\n")
    return data.parent, heldout.parent


def eq2_jaccard(y_true, y_pred):
    """Eq. 2 as printed: mean over pixels of y p / (y + p - y p)."""
    import tensorflow as tf

    y, p = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
    return tf.reduce_mean(tf.math.divide_no_nan(y * p, y + p - y * p), axis=(1, 2))


def train_one(prepared: Path, run: Path, spec: dict, epochs: int | None, seed: int) -> None:
    from cellnet.quiet import import_tensorflow

    import_tensorflow()
    from cellnet.models import backbone, decoders
    from cellnet.training import losses
    from cellnet.training.config import make_config
    from cellnet.training.tasks import train_segmentation

    if spec.get("loss") == "eq2":
        losses.soft_jaccard = eq2_jaccard
    if "bn" in spec:
        backbone.BN_MOMENTUM = decoders.BN_MOMENTUM = float(spec["bn"])
    if "grey" in spec:
        greyed_augmentation(float(spec["grey"]))
    values = {"preset": "cpu", **({"epochs": epochs} if epochs else {}), **spec.get("config", {})}
    train_segmentation(make_config("segmentation", data=str(prepared), run=str(run), seed=seed,
                                   progress=False, **values))


def greyed_augmentation(share: float) -> None:
    """Make ``BatchAugment`` turn ``share`` of each batch's images grey after its other ops (this
    process only: a variant under test, not a product option)."""
    import tensorflow as tf

    from cellnet.data.augment import BatchAugment

    stain = BatchAugment.stain

    def stain_then_grey(self, images, batch):
        images = stain(self, images, batch)
        grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images))
        return tf.where((self._uniform((batch,)) < share)[:, None, None, None], grey, images)

    BatchAugment.stain = stain_then_grey


def label_rows(src: Path, name: str) -> np.ndarray:
    """BRCA-M2C rows ``(y, x, code)`` at full resolution of a region or image ``name``, stromal nuclei
    included (cellnet's importer drops them); a region ``<stem>_Region 1`` reads ``<stem>``'s labels."""
    from cellnet.data.breastpathq import REGION_RE
    from cellnet.data.formats import BRCA_LABEL_SUFFIX

    region = REGION_RE.match(f"{name}_crop")
    stem = region["case"] if region else name
    text = (src / "labels" / f"{stem}{BRCA_LABEL_SUFFIX}").read_text()
    return np.asarray(text.split(), np.float64).reshape(-1, 3)


def composition(src: Path) -> str:
    """Per site: regions, annotated nuclei per BRCA-M2C class, and regions without tumour."""
    lines = ["site  regions  lymphocyte  tumour  stromal  regions with < "
             f"{TUMOUR_FREE_BELOW} tumour nuclei"]
    stems = sorted(p.stem for p in (src / "images").glob("*.png"))
    for site in SITES:
        rows = [label_rows(src, stem) for stem in stems if site_of(stem) == site]
        counts = [int(sum((r[:, 2] == code).sum() for r in rows))
                  for code in (CODES["lymphocyte"], CODES["malignant"], STROMAL_CODE)]
        free = sum(int((r[:, 2] == CODES["malignant"]).sum()) < TUMOUR_FREE_BELOW for r in rows)
        lines.append(f"{site}    {len(rows):7d}  {counts[0]:10d}  {counts[1]:6d}  {counts[2]:7d}  {free}")
    return "\n".join(lines)


def score(run: Path, reference: Path, imported: Path, src: Path, checkpoint: str = "best") -> dict:
    from cellnet.quiet import import_tensorflow

    import_tensorflow()
    from cellnet.classes import CELL_CLASSES, CLASSES
    from cellnet.data.breastpathq import read_regions
    from cellnet.errors import Problems
    from cellnet.evaluation import metrics
    from cellnet.evaluation.engine import segment_regions
    from cellnet.evaluation.points import detect, to_working
    from cellnet.training.runs import load_run_model

    regions = {r.name: r for r in read_regions(imported, Problems("fail"))}
    model = load_run_model(run, checkpoint)
    inter, union = np.zeros(4, np.int64), np.zeros(4, np.int64)
    det = {c: np.zeros(3, np.int64) for c in CELL_CLASSES}  # tp, predicted, annotated
    malignant, lymphocyte = CLASSES.index("malignant"), CLASSES.index("lymphocyte")
    stromal_hits, stromal, malignant_px, pixels = np.zeros(2, np.int64), 0, 0, 0
    for _, mask, maps, name in segment_regions(model, reference, "cells_val", progress=False):
        called = maps[..., [malignant, lymphocyte]] > 0.5
        malignant_px, pixels = malignant_px + int(called[..., 0].sum()), pixels + called[..., 0].size
        rows = label_rows(src, name)
        xy = np.round(to_working(rows[rows[:, 2] == STROMAL_CODE][:, 1::-1])).astype(int)
        xy = np.clip(xy, 0, [called.shape[1] - 1, called.shape[0] - 1])
        stromal_hits, stromal = stromal_hits + called[xy[:, 1], xy[:, 0]].sum(axis=0), stromal + len(xy)
        i, u = metrics.jaccard_counts(mask[None], maps[None], 0.5)
        inter, union = inter + i, union + u
        region = regions[name]
        for c in CELL_CLASSES:
            points = to_working(region.points[region.labels == CLASSES.index(c)])
            found = detect(maps[..., CLASSES.index(c)], points)[0]
            det[c] += (found.tp, found.predicted, found.annotated)
    jaccard = metrics.jaccard_from_counts(inter, union)
    out = {f"jaccard_{c}": float(jaccard[c]) for c in CELL_CLASSES}
    for c, (tp, npred, ntrue) in det.items():
        out[f"f1_{c}"] = float(2 * tp / max(npred + ntrue, 1))
    # specificity where the training sites may have shown none: stromal nuclei called malignant or
    # lymphocyte, and pixels called malignant
    out["stromal_called_malignant"], out["stromal_called_lymphocyte"] = (float(v) for v in stromal_hits / max(stromal, 1))
    out["malignant_pixel_share"] = malignant_px / max(pixels, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="../shared/real/brca-m2c")
    parser.add_argument("--work", default="/tmp/loso")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train every variant once per seed; the summary averages over folds and seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES,
                        help="the folds to run (the held-out sites); the summary needs all three")
    parser.add_argument("--rescore", action="store_true", help="score finished runs again (no training)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                        help="score each run's best.keras (chosen on the inner validation) or its last.keras")
    parser.add_argument("--results", default="results.json", help="file under --work to keep the figures in")
    parser.add_argument("--composition", action="store_true",
                        help="print each site's regions and annotated nuclei per class, and stop")
    parser.add_argument("--one", nargs=4, metavar=("PREPARED", "RUN", "SPEC", "REFERENCE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    work, src = Path(args.work), Path(args.src)
    imported = work / "imported"
    if args.composition:
        print(composition(src))
        return
    if args.one:
        prepared, run, spec, reference = args.one
        if not (Path(run) / "best.keras").is_file():
            train_one(Path(prepared), Path(run), json.loads(spec), args.epochs, args.seeds[0])
        print(json.dumps(score(Path(run), Path(reference), imported, src, args.checkpoint)))
        return
    import_once(src, imported)  # every variant's points are scored against the plain import
    results_path = work / args.results
    results = json.loads(results_path.read_text()) if results_path.is_file() and not args.rescore else {}
    for site in args.sites:
        for variant in args.variants:
            spec = VARIANTS[variant]
            tag = f"_stroma_as_{spec['stroma']}" if "stroma" in spec else ""
            fold = work / f"fold_{site}{tag}"
            data, heldout = make_fold(import_once(src, work / f"imported{tag}", spec.get("stroma")), fold, site)
            for seed in args.seeds:
                name = run_name(variant, args.epochs, seed)
                key = f"{site}/{name}"
                if key in results:
                    continue
                disc = spec.get("disc", REFERENCE_DISC)
                prepared = fold / f"prepared_d{disc:g}"
                reference = fold / "heldout_prepared"
                for source, path, d in ((data, prepared, disc), (heldout, reference, REFERENCE_DISC)):
                    if not (path / "manifest.json").is_file():
                        subprocess.run([sys.executable, "-m", "cellnet.cli", "prepare", "--data", str(source),
                                        "--out", str(path), "--disc", str(d), "--quiet"], check=True)
                epochs = ["--epochs", str(args.epochs)] if args.epochs else []
                done = subprocess.run([sys.executable, "-m", "evaluate.site_ab", "--work", str(work),
                                       "--src", str(src), *epochs, "--checkpoint", args.checkpoint,
                                       "--seeds", str(seed), "--one",
                                       str(prepared), str(fold / "runs" / name), json.dumps(spec), str(reference)],
                                      check=True, capture_output=True, text=True)
                results[key] = json.loads(done.stdout.strip().splitlines()[-1])
                results_path.write_text(json.dumps(results, indent=2))
                print(key, results[key], flush=True)
    for variant in args.variants:
        print(summary(results, variant, args.epochs, args.seeds))


def import_once(src: Path, imported: Path, stroma: str | None = None) -> Path:
    """``cellnet import --format brca-m2c`` into ``imported`` unless done; ``stroma`` names the channel
    BRCA-M2C's stromal nuclei go to (cellnet skips them: it has no stromal channel)."""
    if not imported.is_dir():
        code = ("import sys; from cellnet.classes import BRCA_M2C_CODES; "
                f"BRCA_M2C_CODES[{STROMAL_CODE}] = {stroma!r}; from cellnet.cli import main; sys.exit(main(sys.argv[1:]))")
        subprocess.run([sys.executable, "-c", code, "import", "--format", "brca-m2c", "--src", str(src),
                        "--out", str(imported)], check=True)
    return imported


def run_name(variant: str, epochs: int | None, seed: int) -> str:
    """A variant's run folder under ``fold_<site>/runs`` and its key in the results file."""
    return f"{variant}_e{epochs or 'preset'}_s{seed}"


def summary(results: dict, variant: str, epochs: int | None, seeds: list[int]) -> str:
    """Per fold the mean over seeds, then the mean over folds, and the spread of the seeds' means."""
    lines = [f"{variant}, epochs {epochs or 'preset'}, seeds {' '.join(map(str, seeds))}:"]
    per_seed = {}
    for seed in seeds:
        rows = [results.get(f"{site}/{run_name(variant, epochs, seed)}") for site in SITES]
        if all(rows):
            keys = set.intersection(*(set(r) for r in rows))  # figures added later are missing from old rows
            per_seed[seed] = {k: float(np.mean([r[k] for r in rows])) for k in sorted(keys)}
    for site in SITES:
        rows = [results[k] for k in (f"{site}/{run_name(variant, epochs, s)}" for s in seeds) if k in results]
        if rows:
            lines.append(f"  {site} held out: " + _figures(rows))
    if per_seed:
        means = list(per_seed.values())
        spread = {k: float(np.std([m[k] for m in means])) for k in means[0]}
        lines.append(f"  mean over folds ({len(means)} seed(s) complete): " + _figures(means)
                     + "  (std over seeds: J " + f"{spread['jaccard_malignant']:.3f} / {spread['jaccard_lymphocyte']:.3f})")
    return "\n".join(lines)


def _figures(rows: list[dict]) -> str:
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("jaccard_malignant", "jaccard_lymphocyte",
                                                              "f1_malignant", "f1_lymphocyte")}
    return (f"J mal / lym {mean['jaccard_malignant']:.3f} / {mean['jaccard_lymphocyte']:.3f}, "
            f"F1 {mean['f1_malignant']:.3f} / {mean['f1_lymphocyte']:.3f}")

if __name__ == "__main__":
    main()

"""The ``cellnet`` command (SPEC 8). Parsing only: each command calls one library function.

TensorFlow is imported lazily so ``--help`` answers at once; user errors (CellnetError) print
one line and exit 2, an interruption exits 130 with how to resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellnet.choices import (
    ARCHS, BEAM_RUNNERS, CHECKPOINTS, DECODERS, HEADS, PRECISIONS, REGRESSION_ACTIVATIONS, STAIN_NORMS, TTA_MODES,
    UNITS)
from cellnet.quiet import import_tensorflow
from cellnet.training.presets import PRESETS

#: Weak-mask disc diameter in working-resolution px (SPEC 2.3); the authors drew r = 12 at full
#: resolution, about 12.5 px across at working resolution.
DISC_HELP = "weak-mask disc diameter, working-resolution px (default 15; the authors' code: 12.5)"
GROUP_HELP = ("hold out whole groups for validation: patient, site (TCGA tissue-source site) or a regex "
              "(its first group, searched in patient ids and region names); ignores cells/split.csv")


def _unit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit", choices=UNITS,
                   help="ResNet34 residual unit: preact (BN-ELU-conv, default), authors (conv-ELU-BN, "
                        "the released code), torchvision (conv-BN-ELU; for --init imagenet:*.pth|*.safetensors)")


def _stain_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stain augmentation (in the training step, per example; 0 disables one op)")
    g.add_argument("--stain-aug", action="store_true", default=None,
                   help="turn on the light defaults: HED 0.05 (Tellez et al. 2018), brightness 0.1, contrast 0.1, "
                        "blur sigma <= 1 on 30%% of images, noise <= 0.02")
    g.add_argument("--hed", type=float, metavar="X", help="HED optical-density jitter: scale 1 +- X and shift +- X per stain")
    g.add_argument("--brightness", type=float, metavar="X", help="additive brightness +- X (images in [0, 1])")
    g.add_argument("--contrast", type=float, metavar="X", help="contrast factor 1 +- X around each image's mean")
    g.add_argument("--blur", type=float, metavar="X", help="largest Gaussian blur sigma, working-resolution px")
    g.add_argument("--blur-prob", type=float, metavar="X", help="share of images blurred")
    g.add_argument("--noise", type=float, metavar="X", help="largest Gaussian noise std")


def _ema_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", type=float, metavar="M",
                   help="validate and save the moving average of the weights with momentum M "
                        "(e.g. 0.99; default: the preset's, 0 turns it off)")


def _common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="BreastPathQ-layout folder or a `cellnet prepare` output")
    p.add_argument("--run", required=True, help="run folder to create (or an interrupted one to resume)")
    p.add_argument("--preset", default="cpu", choices=sorted({name for task in PRESETS.values() for name in task}),
                   help="paper: the paper's settings (GPU); cpu: small and fast (default)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="random", help="random (He) or imagenet:PATH (a local weights file)")
    p.add_argument("--strategy", default="default", choices=["default", "mirrored", "multi-worker"],
                   help="tf.distribute strategy (multi-worker reads TF_CONFIG)")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"],
                   help="compute precision; outputs stay float32")
    p.add_argument("--jit", action="store_true", help="compile the training step with XLA")
    p.add_argument("--augment-on", default="device", choices=["device", "cpu"],
                   help="augment batches in the training step (device, default) or in tf.data (cpu)")
    p.add_argument("--on-bad", default="fail", choices=["fail", "skip"], help="bad input: stop, or skip and count")
    p.add_argument("--group-by", metavar="patient|site|REGEX", help=GROUP_HELP + "; for --data prepared on the fly")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellnet", description="Breast tumour cellularity from H&E patches (Rakhlin et al. 2019).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic BreastPathQ-layout dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, help="number of patients (default 24, or 8 with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="a tiny set for tests and the demo")
    p.add_argument("--quiet", action="store_true")

    from cellnet.data.formats import describe_formats
    p = sub.add_parser("import", help="convert point annotations to the BreastPathQ cells layout",
                       epilog=describe_formats(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["breastpathq", "brca-m2c", "geojson", "csv"])
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--on-bad", default="fail", choices=["fail", "skip"])

    p = sub.add_parser("prepare", help="dataset folder -> sharded TFRecords + manifest (patient splits)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of train/ patients held for validation")
    p.add_argument("--disc", type=float, default=15.0, help=DISC_HELP)
    p.add_argument("--group-by", metavar="patient|site|REGEX", help=GROUP_HELP)
    p.add_argument("--on-bad", default="fail", choices=["fail", "skip"])
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train", help="train a model")
    tsub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    t = tsub.add_parser("segmentation", help="weakly supervised nuclei segmentation (paper 3.1)")
    _common_train(t)
    _unit(t)
    _stain_flags(t)
    _ema_flag(t)
    t.add_argument("--decoder", default="fpn", choices=DECODERS)
    t.add_argument("--disc", type=float, help=DISC_HELP + "; for --data prepared on the fly")
    t.add_argument("--stain-norm", choices=STAIN_NORMS,
                   help="stain normalisation fitted once and built into the model, so evaluation and the "
                        "export normalise as training did (default none)")
    t.add_argument("--stain-ref", metavar="DIR", help="images to fit --stain-norm on (default: the training regions)")
    t.add_argument("--jaccard-weight", type=float, metavar="A",
                   help="the loss's soft-Jaccard weight a in (1 - a) BCE - a J (default: the preset's; "
                        "the paper's 0.15)")
    t = tsub.add_parser("cellularity", help="direct cellularity model, or the SR cascade with --seg")
    _common_train(t)
    _unit(t)
    _stain_flags(t)
    _ema_flag(t)
    t.add_argument("--arch", choices=ARCHS, help="direct model (default resnet34)")
    t.add_argument("--head", choices=HEADS, help="direct model (default regression)")
    t.add_argument("--regression-activation", choices=REGRESSION_ACTIVATIONS,
                   help="regression output: linear (default, as the authors' code; clipped to [0, 1] when "
                        "served) or sigmoid (cellnet 0.2)")
    t.add_argument("--seg", help="segmentation RUN: train the SR cascade on its maps")
    t = tsub.add_parser("gbt", help="gradient-boosted trees on 81 features of a segmenter's maps")
    _common_train(t)
    t.add_argument("--seg", required=True, help="segmentation RUN")

    p = sub.add_parser("evaluate", help="score runs on held-out patients (Tables 1-3), or a segmenter "
                                        "SavedModel on any cells/ folder")
    p.add_argument("--data", required=True, help="--runs: dataset or prepared records; --model: any folder "
                                                 "with cells/ (e.g. a `cellnet import` output)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--runs", nargs="+", help="run folders to score and report")
    which.add_argument("--model", help="saved_models/NAME[/VERSION] of a segmenting export: scores every region "
                                       "(Jaccard with 15-px discs, per-image Jaccard, point detection)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="eval", help="prepared split to score (default eval = validation/)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="also score each cellularity run with this test-time augmentation (as export --tta)")
    p.add_argument("--ensemble", action="store_true",
                   help="also score the equal-weight ensemble of every cellularity run (under --tta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("export", help="SavedModel for TF Serving: saved_models/NAME/VERSION")
    p.add_argument("--run", required=True, action="append",
                   help="run folder; repeat it to export one ensemble of cellularity runs")
    p.add_argument("--weights", help="w1,w2,...: one weight per --run for the ensemble mean (default equal)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation in the graph: flips (x2) or d4 (x8, flips and rotations); "
                        "adds cellularity_std (default none)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="compute precision inside the SavedModel (inputs and outputs keep their dtypes); "
                        "bfloat16 pays off on CPUs with AVX512-BF16 or AMX and on GPUs (default float32)")
    p.add_argument("--xla", action="store_true",
                   help="compile the model with XLA inside the SavedModel (faster small batches; TF Serving "
                        "on CPU then needs --xla_cpu_compilation_enabled=true; not for GBT runs)")
    p.add_argument("--checkpoint", default="best", choices=CHECKPOINTS,
                   help="which of each run's models: best.keras, the epoch with the best validation loss "
                        "(default), or last.keras, the last epoch (higher malignant Jaccard on held-out "
                        "hospitals in leave-one-site-out: README, real tissue)")
    p.add_argument("--out", required=True, help="saved_models/NAME")
    p.add_argument("--version", type=int, help="version number (default: next free)")

    p = sub.add_parser("predict", help="run a SavedModel on images or folders -> CSV")
    p.add_argument("--model", required=True, help="saved_models/NAME or saved_models/NAME/VERSION")
    p.add_argument("--input", required=True, nargs="+")
    p.add_argument("--out", required=True, help="FILE.csv")
    p.add_argument("--overlays", help="folder for mask overlays (segmenting models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--on-bad", default="fail", choices=["fail", "skip"])
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("slide", help="whole-slide cellularity heatmap, tile CSV and QuPath GeoJSON")
    p.add_argument("--model", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("cohort", help="cellnet slide over a manifest of slides as an Apache Beam pipeline",
                       epilog="Options after cellnet's go to Beam, e.g. --direct_num_workers=2 "
                              "--direct_running_mode=multi_processing, or --flink_master=HOST:8081 for Flink. "
                              "Needs the extra: pip install \"cellnet[cohort]\".")
    p.add_argument("--model", required=True, help="an exported SavedModel (saved_models/NAME[/VERSION])")
    p.add_argument("--slides", required=True, metavar="MANIFEST.csv",
                   help="CSV with a 'slide' column of paths (relative ones from the manifest's folder)")
    p.add_argument("--out", required=True, help="folder for each slide's outputs and cohort.csv")
    p.add_argument("--runner", default="DirectRunner", choices=BEAM_RUNNERS)
    p.add_argument("--batch-size", type=int, default=16, help="tiles per RunInference batch (default 16)")
    p.add_argument("--quiet", action="store_true", help="no line per finished slide")

    p = sub.add_parser("bench", help="throughput: tf.data, training step, SavedModel, features")
    p.add_argument("--out", required=True, help="FILE.json")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--gpu", action="store_true",
                   help="also the paper FPN on the CUDA GPU: training step images/s in float32, mixed_float16 "
                        "and XLA, on-device augmentation's cost, SavedModel patches/s, MFU")

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data with the cpu preset")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False)
    if args.command == "synth":
        from cellnet.data.synth import synthesize
        summary = synthesize(args.out, **({"patients": args.patients} if args.patients else {}),
                             seed=args.seed, small=args.small, progress=not quiet)
        print(f"wrote {args.out}: {_summary_line(summary)}")
    elif args.command == "import":
        from cellnet.data.importers import import_points, summary_text
        summary = import_points(args.format, args.src, args.out, on_bad=args.on_bad)
        print(summary_text(summary))
    elif args.command == "prepare":
        from cellnet.data.records import prepare
        manifest = prepare(args.data, args.out, seed=args.seed, val_fraction=args.val_fraction,
                           on_bad=args.on_bad, diameter=args.disc, group_by=args.group_by,
                           progress=not quiet)
        counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
        print(f"wrote {args.out}: {counts}")
        if manifest["summary"]:
            print(manifest["summary"])
    elif args.command == "train":
        from cellnet.training import tasks as trainers
        from cellnet.training.config import make_config
        task = "cascade" if args.task == "cellularity" and args.seg else args.task
        given = {k: v for k, v in vars(args).items() if k not in ("command", "task", "quiet")}
        cfg = make_config(task, **given, progress=not quiet)
        job = {"segmentation": trainers.train_segmentation, "cellularity": trainers.train_cellularity,
               "gbt": trainers.train_gbt}[args.task]
        info = job(cfg)
        print(f"run complete: {args.run} ({info.get('kind')}, best epoch {info.get('best_epoch', '-')}, "
              f"{info.get('best', info.get('val_mse', ''))})")
    elif args.command == "evaluate" and args.model:
        from cellnet.serving.scoring import evaluate_folder
        summary = evaluate_folder(args.data, args.model, args.out, progress=not quiet)
        print(f"scored {summary['regions']} region(s): {summary['csv']}")
    elif args.command == "evaluate":
        from cellnet.evaluation.report import evaluate
        out = evaluate(args.data, args.runs, args.out, split=args.split, seed=args.seed, progress=not quiet,
                       tta=args.tta, ensemble=args.ensemble)
        print(f"report: {out / 'report.md'}")
    elif args.command == "export":
        from cellnet.serving.export import export_run, parse_weights
        path = export_run(args.run, args.out, version=args.version, tta=args.tta,
                          weights=parse_weights(args.weights, len(args.run)), precision=args.precision,
                          xla=args.xla, checkpoint=args.checkpoint)
        print(f"exported {path}")
    elif args.command == "predict":
        from cellnet.serving.predict import predict
        summary = predict(args.model, args.input, args.out, overlays=args.overlays,
                          batch_size=args.batch_size, on_bad=args.on_bad, progress=not quiet)
        print(f"wrote {args.out}: {_summary_line(summary)}")
    elif args.command == "slide":
        from cellnet.serving.slide import slide_map
        summary = slide_map(args.model, args.slide, args.out, batch_size=args.batch_size, progress=not quiet)
        print(f"wrote {args.out}: {_summary_line(summary)}")
    elif args.command == "cohort":
        from cellnet.serving.cohort import cohort
        summary = cohort(args.model, args.slides, args.out, runner=args.runner, beam_args=args.beam_args,
                         batch_size=args.batch_size, progress=not quiet)
        print(f"wrote {args.out}: {_summary_line(summary)}")
    elif args.command == "bench":
        from cellnet.bench import bench
        bench(args.out, quick=args.quick, gpu=args.gpu)
    elif args.command == "demo":
        from cellnet.demo import demo
        demo(args.out, seed=args.seed)
    return 0


def _summary_line(summary: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, (dict, list)))


def main(argv: list[str] | None = None) -> int:
    from cellnet import errors
    from cellnet.errors import CellnetError, emit

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help and usage errors exit here, before TensorFlow
    if args.command == "cohort":  # cohort passes the options it does not know on to Beam
        args.beam_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"cellnet {args.command}" + (f" {args.task}" if getattr(args, "task", None) else "")
    errors.PROG = prog
    try:
        import_tensorflow()  # once, quietly, before any command's module imports it
        return run(args)
    except CellnetError as exc:
        emit(f"{prog}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        emit(f"{prog}: interrupted; run the same command again to resume")
        return 130
    except OSError as exc:  # disk full, permissions: the user's environment, not a bug
        emit(f"{prog}: error: {describe_os_error(exc)}")
        return 2
    except Exception as exc:  # a corrupt TFRecord met mid-run is the data's problem; others are bugs
        if "tensorflow" not in sys.modules:
            raise
        from cellnet.data.records import data_error
        error = data_error(exc, getattr(args, "data", None))
        if error is None:
            raise
        emit(f"{prog}: error: {error}")
        return 2


def describe_os_error(exc: OSError) -> str:
    """``<path>: <problem>`` for an OSError; a file where a folder must go is named itself."""
    import errno

    path = getattr(exc, "filename", None)
    if path and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        for parent in [Path(path), *Path(path).parents]:
            if parent.exists() and not parent.is_dir():
                return f"{parent}: is a file, not a folder (in the way of {path})"
    if exc.errno == errno.ENOSPC:
        return f"{path or 'output'}: no space left on device; free space and run the same command again"
    return f"{path}: {exc.strerror or exc}" if path else str(exc.strerror or exc)


if __name__ == "__main__":
    sys.exit(main())

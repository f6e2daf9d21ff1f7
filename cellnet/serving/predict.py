"""``cellnet predict``: run an exported SavedModel on images and folders -> CSV (+ mask overlays).

The SavedModel is the artefact TF Serving loads (``cellnet export``), called through its
``serving_default`` signature with full-resolution uint8 RGB, so predictions here equal what a
server returns. Images are read once at the edge (``cellnet.data.imageio.read_rgb``), grouped into
batches of equal size and sent in order.

Outputs never land on an input: ``--out`` must be a ``.csv`` file (an earlier run's CSV is
replaced) that is not one of the inputs, and ``--overlays`` neither an input folder (nor inside
one) nor a folder where an overlay's name is taken. Overlays are written to a temporary folder
and moved in together with the CSV, so a failed run (a full disk) leaves neither behind, and
running it again is not refused.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from cellnet.classes import CELL_CLASSES
from cellnet.errors import CellnetError, Problems, bad, warn
from cellnet.data.imageio import IMAGE_SUFFIXES, read_rgb, write_image
from cellnet.files import atomic_path, staged_into, write_failure
from cellnet.serving.export import IMAGES_SIGNATURE, METADATA_FILE, SERVED_KINDS
from cellnet.evaluation.plots import overlay_rgb

#: BreastPathQ file stems: ``<slide>_<rid>`` (rid numeric), e.g. ``99788_3``.
SLIDE_RID = re.compile(r"^(?P<slide>.+)_(?P<rid>\d+)$")
#: A pixel counts towards a class's area fraction above this activation (segmenters' CSV).
MASK_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- the model

@dataclass
class ServedModel:
    """An exported cellnet SavedModel, called like a server would call it."""

    path: Path
    kind: str
    outputs: tuple[str, ...]
    patch_size: int | None
    metadata: dict
    loaded: Any

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 RGB [N, H, W, 3] at full resolution -> the signature's outputs as NumPy."""
        signature = self.loaded.signatures[IMAGES_SIGNATURE]
        outputs = signature(images=tf.convert_to_tensor(images, tf.uint8))
        return {name: value.numpy() for name, value in outputs.items()}

    def run(self, images: np.ndarray, source: str | os.PathLike) -> dict[str, np.ndarray]:
        """``self(images)``, the model's refusals as one line naming ``source`` (the batch's file)."""
        try:
            return self(images)
        except tf.errors.ResourceExhaustedError:
            raise bad(source, f"out of memory running a batch of {len(images)} through the model; "
                              "try a smaller --batch-size") from None
        except tf.errors.InvalidArgumentError as exc:  # the in-graph checks (cellnet.serving.export._checked)
            found = re.search(r"assertion failed: \[([^\]]*)\]", exc.message)
            reason = found[1] if found else exc.message.strip().splitlines()[0]
            raise bad(source, f"refused by the model {self.path} ({reason[:160]})") from None

    @property
    def has_masks(self) -> bool:
        return "masks" in self.outputs

    @property
    def has_cellularity(self) -> bool:
        return "cellularity" in self.outputs


def saved_model_dir(model_dir: str | os.PathLike) -> Path:
    """``saved_models/NAME/VERSION`` as given, or the highest version under ``saved_models/NAME``."""
    path = Path(model_dir)
    if not path.is_dir():
        raise bad(path, "no such folder (expected saved_models/NAME or saved_models/NAME/VERSION)")
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted((int(p.name), p) for p in path.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file())
    if not versions:
        raise bad(path, "holds no SavedModel (no saved_model.pb, nor numbered version folders with one); "
                        "write one with `cellnet export --run RUN --out saved_models/NAME`")
    return versions[-1][1]


def load_served(model_dir: str | os.PathLike) -> ServedModel:
    """Load a ``cellnet export`` SavedModel and the facts stored beside it."""
    path = saved_model_dir(model_dir)
    meta_path = path / "assets" / METADATA_FILE
    if not meta_path.is_file():
        raise bad(path, f"is a SavedModel but not a cellnet export (no assets/{METADATA_FILE})")
    try:
        metadata = json.loads(meta_path.read_text())
        kind, outputs, patch = metadata["kind"], tuple(metadata["outputs"]), metadata.get("patch_size")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise bad(meta_path, f"unreadable export description ({type(exc).__name__}: {str(exc)[:100]})") from None
    if kind not in SERVED_KINDS:
        raise bad(meta_path, f"unknown model kind {kind!r} (expected one of {', '.join(SERVED_KINDS)})")
    if patch is not None and (type(patch) is not int or patch < 1):
        raise bad(meta_path, f"patch_size {patch!r}: expected a positive integer or null")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # a damaged SavedModel is the user's file problem, reported in one line
        raise bad(path, f"cannot load the SavedModel ({type(exc).__name__}: {str(exc)[:120]})") from None
    if IMAGES_SIGNATURE not in loaded.signatures:
        raise bad(path, f"has no '{IMAGES_SIGNATURE}' signature")
    served = set(loaded.signatures[IMAGES_SIGNATURE].structured_outputs)
    needed = "masks" if kind == "segmentation" else "cellularity"
    if needed not in outputs or not served.issuperset(outputs):
        raise bad(meta_path, f"does not describe this SavedModel: a {kind} model lists outputs "
                             f"{', '.join(outputs) or 'none'}, the '{IMAGES_SIGNATURE}' signature has "
                             f"{', '.join(sorted(served))}")
    return ServedModel(path, kind, outputs, patch, metadata, loaded)


# ----------------------------------------------------------------------------- inputs

def _skip(problems: Problems, path: Path, problem: str) -> None:
    """A bad input: raises with ``on_bad="fail"``; else counted, and a warning says it is skipped."""
    problems.report(path, problem)
    warn(path, f"{problem}; skipped")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Image files as given or found in folders (sorted, not recursive), and the other files given."""
    if not inputs:
        raise CellnetError("--input: no images or folders given")
    files: list[Path] = []
    others: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise bad(item, f"empty folder: no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif not item.exists():
            raise bad(item, "no such file or folder")
        elif item.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(item)
        else:
            files.append(item)
    return files, others


def _readable(files: Iterable[Path], model: ServedModel, problems: Problems,
              bar: tqdm) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, image) for every file that reads and fits the model; the others go to ``problems``."""
    for path in files:
        try:
            image = read_rgb(path, problems.note)
        except CellnetError as exc:
            _skip(problems, path, str(exc).removeprefix(f"{path}: "))
            bar.update(1)
            continue
        patch = model.patch_size
        if patch is not None and image.shape[:2] != (patch, patch):
            _skip(problems, path, f"is {image.shape[0]}x{image.shape[1]} px; this {model.kind} model "
                                  f"takes {patch}x{patch} patches at full resolution (the training size)")
            bar.update(1)
            continue
        yield path, image


def batches(items: Iterable[tuple[Path, np.ndarray]], batch_size: int) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Consecutive groups of at most ``batch_size`` images of one size (a batch is one tensor)."""
    batch: list[tuple[Path, np.ndarray]] = []
    for item in items:
        if batch and (len(batch) == batch_size or item[1].shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# ----------------------------------------------------------------------------- outputs

def id_columns(paths: Sequence[Path]) -> tuple[list[str], list[list[str]]]:
    """``slide,rid`` when every stem is ``<slide>_<rid>`` and the pairs are unique, else ``image``."""
    matches = [SLIDE_RID.match(p.stem) for p in paths]
    pairs = [(m["slide"], m["rid"]) for m in matches if m]
    if paths and len(pairs) == len(paths) and len(set(pairs)) == len(pairs):
        return ["slide", "rid"], [list(pair) for pair in pairs]
    return ["image"], [[str(p)] for p in paths]


def value_columns(model: ServedModel) -> list[str]:
    """``p`` (+ ``low,high`` with an interval, + ``cellularity_std`` with TTA or an ensemble) for
    cellularity models; area fractions for segmenters."""
    if model.has_cellularity:
        return ["p"] + (["low", "high"] if "interval" in model.outputs else []) + \
            (["cellularity_std"] if "cellularity_std" in model.outputs else [])
    return [f"{name}_fraction" for name in CELL_CLASSES]


def value_rows(model: ServedModel, outputs: dict[str, np.ndarray]) -> list[list[float]]:
    if model.has_cellularity:
        columns = [outputs["cellularity"]]
        if "interval" in outputs:
            columns += [outputs["interval"][:, 0], outputs["interval"][:, 1]]
        if "cellularity_std" in outputs:
            columns.append(outputs["cellularity_std"])
    else:
        above = outputs["masks"][..., :len(CELL_CLASSES)] > MASK_THRESHOLD
        columns = list(above.mean(axis=(1, 2)).T)
    return [[float(v) for v in row] for row in zip(*columns)]


def _overlay_name(path: Path, used: set[str]) -> str:
    name, n = f"{path.stem}.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}-{n}.png"
    used.add(name)
    return name


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(out_csv: Path, overlays: Path | None, inputs: Sequence[Path], files: Sequence[Path]) -> None:
    """Refuse, before any work, outputs that would land on an input, a folder or an existing overlay."""
    if out_csv.is_dir():
        raise bad(out_csv, "is a folder; expected FILE.csv")
    if any(_same_file(out_csv, p) for p in [*inputs, *files]):
        raise bad(out_csv, "is one of the inputs; predict never writes over an input (expected FILE.csv)")
    if out_csv.suffix.lower() != ".csv":
        raise bad(out_csv, "expected FILE.csv (the predictions are written as CSV)")
    if overlays is None:
        return
    target = overlays.resolve()
    for folder in (p for p in inputs if p.is_dir()):
        if target == folder.resolve() or folder.resolve() in target.parents:
            where = "is" if target == folder.resolve() else "is inside"
            raise bad(overlays, f"{where} the input folder {folder}; give --overlays a folder of its own")
    if target == out_csv.resolve():
        raise bad(overlays, "is the --out file; give --overlays a folder of its own")
    if overlays.exists() and not overlays.is_dir():
        raise bad(overlays, "is a file; expected a folder for the overlays")
    used: set[str] = set()
    taken = [name for name in (_overlay_name(p, used) for p in files) if (overlays / name).exists()]
    if taken:
        raise bad(overlays / taken[0], f"already exists; predict never overwrites an overlay ({len(taken)} of "
                                       f"the {len(files)} overlay names are taken; choose another --overlays folder)")


@contextlib.contextmanager
def _staged(folder: Path | None) -> Iterator[Path | None]:
    """``files.staged_into`` the overlay folder, or nothing without ``--overlays``."""
    if folder is None:
        yield None
        return
    with staged_into(folder) as tmp:
        yield tmp


def predict(model_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_csv: str | os.PathLike,
            overlays: str | os.PathLike | None = None, batch_size: int = 16, on_bad: str = "fail",
            progress: bool = True) -> dict:
    """Predict every input image with an exported model and write ``out_csv``.

    Columns: ``slide,rid`` (stems ``<slide>_<rid>``) or ``image``, then ``p`` (+ ``low,high``
    for the classification head's 80% interval); segmentation-only models write the share of
    pixels above 0.5 per cell class instead of ``p``. With ``overlays``, models that output masks
    write ``<stem>.png`` overlays there. Bad images stop the run (``on_bad="fail"``) or are
    skipped and counted (``"skip"``). Outputs that would land on an input or an existing overlay
    are refused before any work (:func:`check_outputs`).
    """
    if batch_size < 1:
        raise CellnetError(f"--batch-size: expected a positive integer, got {batch_size}")
    problems = Problems(on_bad)
    out_csv = Path(out_csv)
    overlay_dir = Path(overlays) if overlays is not None else None
    files, others = expand_inputs(inputs)
    check_outputs(out_csv, overlay_dir, [Path(p) for p in inputs], files)
    for other in others:
        _skip(problems, other, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    model = load_served(model_dir)
    if overlay_dir is not None and not model.has_masks:
        warn(overlay_dir, f"--overlays ignored: this {model.kind} model outputs no masks")
        overlay_dir = None
    paths: list[Path] = []
    values: list[list[float]] = []
    used_names: set[str] = set()
    # exits in reverse: the overlays move in first, then the CSV is renamed
    with atomic_path(out_csv) as tmp_csv, _staged(overlay_dir) as staging, \
            tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        for batch in batches(_readable(files, model, problems, bar), batch_size):
            outputs = model.run(np.stack([image for _, image in batch]), batch[0][0])
            paths += [path for path, _ in batch]
            values += value_rows(model, outputs)
            if staging is not None:
                for (path, image), masks in zip(batch, outputs["masks"]):
                    name = _overlay_name(path, used_names)
                    try:
                        write_image(staging / name, overlay_rgb(image, masks))
                    except (OSError, CellnetError) as exc:
                        raise write_failure(overlay_dir / name, exc) from None
            bar.update(len(batch))
        if not paths:
            raise CellnetError(f"--input: none of the {len(files)} image(s) could be predicted "
                               f"({len(problems.items)} skipped)")
        id_names, ids = id_columns(paths)
        try:
            with tmp_csv.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(id_names + value_columns(model))
                writer.writerows(i + [f"{v:.6f}" for v in row] for i, row in zip(ids, values))
        except OSError as exc:
            raise write_failure(out_csv, exc) from None
    problems.emit_warnings()
    return {"images": len(paths), "skipped": len(problems.items), "kind": model.kind,
            "overlays": len(used_names), "model": str(model.path), "problems": list(problems.items)}

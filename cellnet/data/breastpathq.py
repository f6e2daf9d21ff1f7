"""Reader and writer for the BreastPathQ on-disk layout (SPEC 2.1).

```
<root>/train/<slide>_<rid>.tif            512x512 RGB patches
<root>/validation/<slide>_<rid>.tif
<root>/test_patches/<slide>_<rid>.tif     (labels may be absent)
<root>/train_labels.csv, val_labels.csv   slide,rid,y  ('p' accepted for y; extra columns kept)
<root>/test_labels.csv                    optional, same columns
<root>/patient_ids.csv                    patient_id,slide (optional)
<root>/cells/<N>_Region <M>_crop.tif      cell-annotation regions
<root>/cells/<N>_Region <M>_key.xml       point annotations for that region
<root>/cells/split.csv                    name,split (train/val) for the regions (optional)
<root>/cells/groups.csv                   name,patient,site for the regions (optional)
```
A region's patient and tissue-source site come from ``cells/groups.csv``, else from a TCGA
barcode in its name (patient ``TCGA-XX-YYYY``, site ``XX``); else its patient is its case and it
has no site. A patch's site is that of a TCGA patient id.

Bad input follows SPEC 7: with ``on_bad="fail"`` the first problem raises a one-line
:class:`CellnetError`; with ``"skip"`` the item is dropped and the problem counted in
:attr:`Problems`, which the command line prints as a summary. Problems worth going on with
(skipped points, a file read despite its name) are counted too, and :meth:`Problems.emit_warnings`
prints one warning line per kind, naming the first file it was seen in.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from cellnet.classes import CLASS_DESCRIPTION, CLASSES, class_for_description
from cellnet.errors import Problems, bad
from cellnet.data.imageio import IMAGE_SUFFIXES
from cellnet.files import write_text

SPLIT_FOLDERS = {"train": "train", "validation": "validation", "test": "test_patches"}
LABEL_FILES = {"train": "train_labels.csv", "validation": "val_labels.csv", "test": "test_labels.csv"}
REGION_RE = re.compile(r"^(?P<case>.+?)_Region\s*(?P<region>\d+)_crop$")
#: A TCGA barcode's first three fields, ``TCGA-<site>-<participant>``: the patient, anywhere in a name.
TCGA_RE = re.compile(r"(?<![A-Za-z0-9])TCGA-(?P<site>[A-Za-z0-9]{2})-[A-Za-z0-9]{4}(?![A-Za-z0-9])")
GROUP_COLUMNS = ("name", "patient", "site")


@dataclass
class Patch:
    """One cellularity patch and its label (``y`` is None where labels are absent)."""

    path: Path
    slide: str
    rid: str
    split: str
    y: float | None = None
    truth: float | None = None  # exact area fraction, when the source has it (synthetic data)
    patient: str = ""

    @property
    def stem(self) -> str:
        return f"{self.slide}_{self.rid}"

    @property
    def site(self) -> str:
        """The tissue-source site of a TCGA patient id ('' for any other id)."""
        return (tcga_patient(self.patient) or ("", ""))[1]


@dataclass
class Region:
    """A cell-annotation region: image and points (x, y at full resolution) with class indices."""

    image_path: Path
    xml_path: Path
    case: str
    points: np.ndarray  # float32 [K, 2] (x, y)
    labels: np.ndarray  # int32 [K] index into CLASSES
    patient: str = ""   # cells/groups.csv's, a TCGA barcode's, else the case
    site: str = ""      # cells/groups.csv's, a TCGA barcode's, else unknown ('')

    @property
    def name(self) -> str:
        return self.image_path.stem[: -len("_crop")] if self.image_path.stem.endswith("_crop") else self.image_path.stem


@dataclass
class BreastPathQ:
    root: Path
    patches: list[Patch]
    regions: list[Region]
    problems: Problems

    def split(self, name: str) -> list[Patch]:
        return [p for p in self.patches if p.split == name]


# ----------------------------------------------------------------------------- labels

def read_labels(path: Path, problems: Problems) -> pd.DataFrame:
    """Read ``slide,rid,y`` (or ``p``) with validation; returns columns stem, y, truth.

    Rejected rows (skip mode) are listed in ``out.attrs["rejected"]`` so their images are not
    reported a second time as unlabelled.
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise bad(path, f"malformed CSV ({type(exc).__name__}: {str(exc)[:80]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    score = "y" if "y" in frame.columns else "p" if "p" in frame.columns else None
    missing = [c for c in ("slide", "rid") if c not in frame.columns] + ([] if score else ["y"])
    if missing:
        raise bad(path, f"missing column(s) {', '.join(missing)} (expected slide,rid,y)")
    values = pd.to_numeric(frame[score], errors="coerce")
    keep = []
    for i, value in enumerate(values):
        line = i + 2
        if not np.isfinite(value):
            problems.report(path, f"line {line}: label {frame[score].iloc[i]!r} is not a number")
        elif not 0.0 <= value <= 1.0:
            problems.report(path, f"line {line}: label {value} outside [0, 1]")
        else:
            keep.append(i)
    stems = frame["slide"].str.strip() + "_" + frame["rid"].str.strip()
    out = pd.DataFrame({
        "stem": stems.iloc[keep].values,
        "y": values.iloc[keep].astype(float).values,
    })
    out["truth"] = (pd.to_numeric(frame["truth"], errors="coerce").iloc[keep].values
                    if "truth" in frame.columns else np.nan)
    duplicated = out["stem"].duplicated()
    for stem in out.loc[duplicated, "stem"]:
        problems.report(path, f"duplicate label for {stem}")
    out = out[~duplicated]
    out.attrs["rejected"] = set(stems) - set(out["stem"])
    return out


def read_patients(path: Path) -> dict[str, str]:
    """slide -> patient id from ``patient_ids.csv``."""
    try:
        frame = pd.read_csv(path, dtype=str)
    except Exception as exc:
        raise bad(path, f"malformed CSV ({type(exc).__name__}: {str(exc)[:80]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in ("patient_id", "slide") if c not in frame.columns]
    if missing:
        raise bad(path, f"missing column(s) {', '.join(missing)} (expected patient_id,slide)")
    return dict(zip(frame["slide"].str.strip(), frame["patient_id"].str.strip()))


def tcga_patient(name: str) -> tuple[str, str] | None:
    """(patient ``TCGA-XX-YYYY``, tissue-source site ``XX``) of a name holding a TCGA barcode."""
    match = TCGA_RE.search(name)
    return (match[0], match["site"]) if match else None


def read_groups(path: Path) -> dict[str, tuple[str, str]]:
    """Region name -> (patient, site) from ``cells/groups.csv``; a blank field is unknown."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise bad(path, f"malformed CSV ({type(exc).__name__}: {str(exc)[:80]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in GROUP_COLUMNS if c not in frame.columns]
    if missing:
        raise bad(path, f"missing column(s) {', '.join(missing)} (expected {','.join(GROUP_COLUMNS)})")
    return {name.strip(): (patient.strip(), site.strip())
            for name, patient, site in frame[list(GROUP_COLUMNS)].itertuples(index=False)}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def images_by_stem(folder: Path, problems: Problems) -> dict[str, Path]:
    """Images of a folder by stem; two images with one stem (``a.png``, ``a.tif``) are an error,
    as nothing says which one is meant (in skip mode the first is kept and the other reported)."""
    images: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in images:
            problems.report(path, f"two images named {path.stem} in one folder "
                                  f"({images[path.stem].name} and {path.name}); keep one of them")
            continue
        images[path.stem] = path
    return images


def read_patches(root: Path, split: str, patients: dict[str, str], problems: Problems) -> list[Patch]:
    folder = root / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        return []
    images = images_by_stem(folder, problems)
    label_path = root / LABEL_FILES[split]
    labels = read_labels(label_path, problems) if label_path.is_file() else None
    if labels is None and split != "test" and images:
        raise bad(label_path, f"missing label file for {len(images)} image(s) in {folder}")
    patches: list[Patch] = []
    labelled: set[str] = set()
    if labels is not None:
        for stem, y, truth in labels[["stem", "y", "truth"]].itertuples(index=False):
            if stem not in images:
                problems.report(label_path, f"id {stem} has no image in {folder}")
                continue
            labelled.add(stem)
            patches.append(_patch(images[stem], split, y, truth, patients))
    rejected = labels.attrs.get("rejected", set()) if labels is not None else set()
    for stem, path in images.items():
        if stem in labelled or stem in rejected:
            continue
        if labels is not None:
            problems.report(path, f"image has no label in {label_path.name}")
        else:
            patches.append(_patch(path, split, None, None, patients))
    return sorted(patches, key=lambda p: p.stem)


def _patch(path: Path, split: str, y, truth, patients: dict[str, str]) -> Patch:
    slide, _, rid = path.stem.rpartition("_")
    if not slide:
        slide, rid = path.stem, "0"
    truth = None if truth is None or not np.isfinite(truth) else float(truth)
    return Patch(path, slide, rid, split, None if y is None else float(y), truth,
                 patients.get(slide, slide))


# ----------------------------------------------------------------------------- cells XML

def parse_key_xml(path: Path, problems: Problems) -> tuple[np.ndarray, np.ndarray] | None:
    """Points (x, y) and class indices from a key XML; None if the file is malformed (skip mode)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        problems.report(path, f"malformed XML ({str(exc)[:80]})")
        return None
    points, labels, seen = [], [], 0
    for graphic in tree.getroot().iter():
        if graphic.tag.lower() != "graphic" or graphic.get("type", "point").lower() != "point":
            continue
        description = graphic.get("description", "")
        cls = class_for_description(description)
        for point in graphic.iter():
            if point.tag.lower() != "point":
                continue
            seen += 1
            try:
                x, y = (float(v) for v in (point.text or "").split(","))
            except ValueError:
                problems.report(path, f"bad point {point.text!r} (expected 'x,y')")
                return None
            if cls is None:
                problems.warn(f"skipped points with unknown description {description!r}", path=path)
                continue
            points.append((x, y))
            labels.append(CLASSES.index(cls))
    if not seen:  # kept (a region may truly hold no cells), but more often an export lost its points
        problems.note(path, "annotation file holds no points (its whole region is background in the mask)")
    return (np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels, np.int32))


def key_xml(points: np.ndarray, labels: np.ndarray) -> str:
    """Serialise points in the BreastPathQ key-XML form, one <graphic> per class."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<annotations>"]
    for index, cls in enumerate(CLASSES[:3]):
        mine = points[labels == index]
        if len(mine) == 0:
            continue
        description = CLASS_DESCRIPTION[cls]
        lines.append(f'  <graphic type="point" name={quoteattr(cls)} description={quoteattr(description)}>')
        lines.append("    <point-list>")
        lines += [f"      <point>{x:.1f},{y:.1f}</point>" for x, y in mine]
        lines.append("    </point-list>")
        lines.append("  </graphic>")
    lines.append("</annotations>")
    return "\n".join(lines) + "\n"


def write_key_xml(path: str | os.PathLike, points: np.ndarray, labels: np.ndarray) -> None:
    write_text(path, key_xml(np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels)))


def read_regions(root: Path, problems: Problems) -> list[Region]:
    folder = root / "cells"
    if not folder.is_dir():
        return []
    groups_path = folder / "groups.csv"
    groups = read_groups(groups_path) if groups_path.is_file() else {}
    regions = []
    for image in images_by_stem(folder, problems).values():
        if not image.stem.endswith("_crop"):
            continue
        stem = image.stem[: -len("_crop")]
        xml_path = image.with_name(f"{stem}_key.xml")
        if not xml_path.is_file():
            problems.report(image, f"no annotation file {xml_path.name}")
            continue
        parsed = parse_key_xml(xml_path, problems)
        if parsed is None:
            continue
        match = REGION_RE.match(image.stem)
        case = match["case"] if match else stem
        regions.append(Region(image, xml_path, case, *parsed, *_patient_and_site(stem, case, groups)))
    for xml_path in sorted(folder.glob("*_key.xml")):
        stem = xml_path.name[: -len("_key.xml")]
        if not any((folder / f"{stem}_crop{s}").is_file() for s in IMAGE_SUFFIXES):
            problems.report(xml_path, f"no region image {stem}_crop.tif")
    return regions


def _patient_and_site(name: str, case: str, groups: dict[str, tuple[str, str]]) -> tuple[str, str]:
    given_patient, given_site = groups.get(name, ("", ""))
    parsed_patient, parsed_site = tcga_patient(name) or (case, "")
    return given_patient or parsed_patient, given_site or parsed_site


# ----------------------------------------------------------------------------- dataset

def check_dataset_folder(root: Path) -> None:
    """A one-line error unless ``root`` is a folder (``--data`` given a file is a common slip)."""
    if root.is_file():
        raise bad(root, "is a file, not a dataset folder (give the folder that holds train/, "
                        "validation/ and cells/, or a `cellnet prepare` output)")
    if not root.is_dir():
        raise bad(root, "no such dataset folder")


def read_breastpathq(root: str | os.PathLike, on_bad: str = "fail") -> BreastPathQ:
    """Read a BreastPathQ-layout folder (paths and labels; pixels are decoded later)."""
    root = Path(root)
    problems = Problems(on_bad)
    check_dataset_folder(root)
    patient_path = root / "patient_ids.csv"
    patients = read_patients(patient_path) if patient_path.is_file() else {}
    patches = [p for split in SPLIT_FOLDERS for p in read_patches(root, split, patients, problems)]
    regions = read_regions(root, problems)
    if not patches and not regions:
        raise bad(root, "no patches (train/, validation/, test_patches/) or cells/ regions found "
                        "— is this a BreastPathQ-layout folder?")
    return BreastPathQ(root, patches, regions, problems)


def region_file_stem(case: str, region: int | str) -> str:
    """``<N>_Region <M>`` — the stem shared by a region's ``_crop.tif`` and ``_key.xml``."""
    return f"{case}_Region {region}"


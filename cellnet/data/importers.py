"""``cellnet import``: point annotations from other tools into the BreastPathQ cells layout (SPEC 2.2).

Every format becomes the same files, so one reader (:func:`cellnet.data.breastpathq.read_breastpathq`)
serves all of them:

```
<out>/cells/<case>_Region <M>_crop.tif   the image, 8-bit RGB TIFF
<out>/cells/<case>_Region <M>_key.xml    its points, one <graphic> per class
<out>/cells/split.csv                    name,split (train/val) when the source defines a split
<out>/cells/groups.csv                   name,patient,site when the source names them (TCGA barcodes)
<out>/mapping.csv                        case,region,source_image: where each region came from
```
The case id is the source image's name made file-safe, so it is stable whatever else is
imported alongside it. Bad input follows SPEC 7 through :class:`cellnet.errors.Problems`:
bad files raise a one-line error (``on_bad="fail"``) or are skipped and listed (``"skip"``);
points that cellnet cannot use (stromal, unknown classes, outside the image in skip mode) are
skipped and counted by reason. Files are written to a staging folder first and moved into
place at the end, so a failed import leaves nothing half-done, and nothing in ``out`` is ever
overwritten.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from cellnet.data.breastpathq import (GROUP_COLUMNS, REGION_RE, images_by_stem, read_groups, read_regions,
                                     region_file_stem, tcga_patient, write_key_xml)
from cellnet.classes import BRCA_M2C_CODES, CELL_CLASSES, CLASSES, NAME_TO_CLASS, class_for_description
from cellnet.errors import CellnetError, Problems, bad
from cellnet.data.formats import BRCA_LABEL_SUFFIX
from cellnet.data import qupath
from cellnet.data.imageio import IMAGE_SUFFIXES, read_rgb, write_image
from cellnet.files import staged_into, write_text

FORMATS: tuple[str, ...] = ("breastpathq", "brca-m2c", "geojson", "csv")
BRCA_SPLIT_LISTS = {"train": "brca_ds_train.txt", "val": "brca_ds_val.txt"}
GEOJSON_SUFFIXES = (".geojson", ".json")
CSV_COLUMNS = ("image", "x", "y", "class")
OUTSIDE = "outside the image"

@dataclass
class Source:
    """One annotated source image, parsed but not yet decoded."""

    image: Path
    annotation: Path        # the file the points came from (named in messages)
    points: np.ndarray      # float64 [K, 2] (x, y), full-resolution pixels
    labels: np.ndarray      # int32 [K] index into CLASSES
    case: str
    origin: str             # source_image column of mapping.csv
    region: int = 1
    split: str = ""
    patient: str = ""       # cells/groups.csv's patient and tissue-source site, where known
    site: str = ""

    @property
    def stem(self) -> str:
        return region_file_stem(self.case, self.region)


# ----------------------------------------------------------------------------- entry point

def import_points(fmt: str, src: str | os.PathLike, out: str | os.PathLike, on_bad: str = "fail") -> dict:
    """Import point annotations in format ``fmt`` from ``src`` into ``out/cells``.

    Returns a summary: ``out`` (the cells folder), ``regions`` (written), ``points`` (per class),
    ``skipped_points`` (reason -> count), ``warnings`` (problem -> files used despite it) and
    ``skipped_items`` (one line per bad file or row, skip mode only). Each kind of warning is
    also printed once, naming the first file it was seen in.
    """
    if fmt not in READERS:
        raise CellnetError(f"--format: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    problems = Problems(on_bad)
    src, out = Path(src), Path(out)
    if not src.exists():
        raise bad(src, "no such file or folder")
    if out.exists() and not out.is_dir():
        raise bad(out, "exists and is not a folder")
    sources = READERS[fmt](src, problems)
    if not sources:
        raise _nothing_to_import(src, fmt, problems)
    _number_regions(sources)
    splits = [s for s in sources if s.split]
    groups = [s for s in sources if s.patient or s.site]
    targets = [out / "cells" / f"{s.stem}{suffix}" for s in sources for suffix in ("_crop.tif", "_key.xml")]
    targets += [out / "mapping.csv"] + ([out / "cells" / "split.csv"] if splits else [])
    targets += [out / "cells" / "groups.csv"] if groups else []
    for target in targets:
        if target.exists():
            raise bad(target, "already exists; import never overwrites (choose a new --out)")

    with staged_into(out) as staging:  # a failed import leaves no trace
        written = [s for s in sources if _write_region(s, staging / "cells", problems)]
        if not written:
            raise _nothing_to_import(src, fmt, problems)
        write_text(staging / "mapping.csv", _csv_text(
            ("case", "region", "source_image"), [(s.case, s.region, s.origin) for s in written]))
        if splits:
            write_text(staging / "cells" / "split.csv", _csv_text(
                ("name", "split"), [(s.stem, s.split) for s in written if s.split]))
        if groups:
            write_text(staging / "cells" / "groups.csv", _csv_text(
                GROUP_COLUMNS, [(s.stem, s.patient, s.site) for s in written if s.patient or s.site]))

    labels = np.concatenate([s.labels for s in written])
    problems.emit_warnings(counted="skipped {n} point(s): {key}")
    return {
        "out": str(out / "cells"),
        "regions": len(written),
        "points": {c: int((labels == CLASSES.index(c)).sum()) for c in CELL_CLASSES},
        "skipped_points": dict(sorted(problems.warnings.items())),
        "warnings": dict(sorted(problems.notes.items())),
        "skipped_items": list(problems.items),
    }


def summary_text(summary: dict) -> str:
    """The summary of :func:`import_points` as the lines the command line prints."""
    points = ", ".join(f"{c} {n}" for c, n in summary["points"].items())
    lines = [f"imported {summary['regions']} region(s) into {summary['out']}: {points}"]
    lines += [f"warning: skipped {n} point(s): {reason}" for reason, n in summary["skipped_points"].items()]
    lines += [f"warning: {problem}: {n} file(s)" for problem, n in summary.get("warnings", {}).items()]
    items = summary["skipped_items"]
    if items:
        lines.append(f"skipped {len(items)} bad item(s)")
        lines += [f"  {item}" for item in items[:20]]
        if len(items) > 20:
            lines.append(f"  ... and {len(items) - 20} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing

def _write_region(source: Source, cells: Path, problems: Problems) -> bool:
    """Decode, check the points against the image and write one region; False if skipped."""
    try:
        rgb = read_rgb(source.image, problems.note)
    except CellnetError as exc:
        if problems.on_bad == "fail":
            raise
        problems.items.append(str(exc))
        return False
    height, width = rgb.shape[:2]
    x, y = source.points[:, 0], source.points[:, 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    outside = int((~inside).sum())
    if outside:
        if problems.on_bad == "fail":
            first = int(np.argmin(inside))
            raise bad(source.annotation, f"point ({x[first]:g}, {y[first]:g}) is outside the "
                                         f"{width}x{height} image {source.image.name}"
                                         + (f" (and {outside - 1} more)" if outside > 1 else ""))
        problems.warn(OUTSIDE, outside, path=source.annotation)
        source.points, source.labels = source.points[inside], source.labels[inside]
    write_image(cells / f"{source.stem}_crop.tif", rgb)
    write_key_xml(cells / f"{source.stem}_key.xml", source.points, source.labels)
    return True


def _number_regions(sources: list[Source]) -> None:
    """Give every source a distinct (case, region), keeping the wished-for one where free."""
    taken: set[tuple[str, int]] = set()
    for source in sources:
        while (source.case, source.region) in taken:
            source.region += 1
        taken.add((source.case, source.region))


def _nothing_to_import(src: Path, fmt: str, problems: Problems) -> CellnetError:
    if problems.items:
        return bad(src, f"nothing to import: all {len(problems.items)} item(s) were bad "
                        f"(first: {problems.items[0]})")
    return bad(src, f"nothing to import (see `cellnet import --help` for what --format {fmt} expects)")


def _csv_text(header: tuple[str, ...], rows: list[tuple]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _case_id(name: str) -> str:
    """A file-safe case id from an image name (stable: depends on that name only)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "image"


def _class_index(name: str, problems: Problems, path: Path, count: int = 1,
                 line: int | None = None) -> int | None:
    """CLASSES index for a class name (or its base: ``Tumor`` of ``Tumor: Positive``).

    None, with ``count`` points counted by reason, where cellnet has no channel for the name.
    """
    name = name.strip()
    for candidate in (name, name.split(":")[0]):
        cls = class_for_description(candidate)
        if cls is not None:
            return CLASSES.index(cls)
    if not name:
        reason = "unclassified"
    elif name.lower() in NAME_TO_CLASS:
        reason = f"class {name!r} (no cellnet channel)"
    else:
        reason = f"unknown class {name!r}"
    problems.warn(reason, count, path=path, line=line)
    return None


def _points(rows: list[tuple[float, float, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    kept = [(x, y, label) for x, y, label in rows if label is not None]
    points = np.asarray([(x, y) for x, y, _ in kept], np.float64).reshape(-1, 2)
    return points, np.asarray([label for _, _, label in kept], np.int32)


# ----------------------------------------------------------------------------- BRCA-M2C

def _read_brca_m2c(src: Path, problems: Problems) -> list[Source]:
    for folder in (src / "images", src / "labels"):
        if not folder.is_dir():
            raise bad(folder, "no such folder (a BRCA-M2C root holds images/ and labels/)")
    images = images_by_stem(src / "images", problems)
    labels = {p.name[: -len(BRCA_LABEL_SUFFIX)]: p
              for p in sorted((src / "labels").glob(f"*{BRCA_LABEL_SUFFIX}"))}
    splits = _brca_splits(src, set(images), problems)
    sources = []
    for stem in sorted(images.keys() | labels.keys()):
        if stem not in labels:
            problems.report(images[stem], f"no label file labels/{stem}{BRCA_LABEL_SUFFIX}")
            continue
        if stem not in images:
            problems.report(labels[stem], f"no image images/{stem}.png")
            continue
        parsed = _parse_brca_labels(labels[stem], problems)
        if parsed is not None:
            patient, site = tcga_patient(stem) or ("", "")
            sources.append(Source(images[stem], labels[stem], *parsed, case=_case_id(stem),
                                  origin=f"images/{images[stem].name}", split=splits.get(stem, ""),
                                  patient=patient, site=site))
    return sources


def _parse_brca_labels(path: Path, problems: Problems) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows ``<y> <x> <class>`` (a header line and blank lines are tolerated); None if malformed."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.report(path, f"unreadable label file ({exc})")
        return None
    rows = []
    for number, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields or (not rows and not any(_is_number(f) for f in fields)):
            continue
        values = [float(f) for f in fields if _is_number(f)]
        if len(fields) != 3 or len(values) != 3 or not values[2].is_integer():
            problems.report(path, f"line {number}: expected '<y> <x> <class>', got {line.strip()!r}")
            return None
        y, x, code = values
        cls = BRCA_M2C_CODES.get(int(code), "unknown")
        if cls == "unknown":
            problems.warn(f"unknown BRCA-M2C class {int(code)} (expected 1, 2 or 3)", path=path, line=number)
        elif cls is None:
            problems.warn(f"BRCA-M2C class {int(code)} (stromal: cellnet has no stromal channel)",
                          path=path, line=number)
        rows.append((x, y, CLASSES.index(cls) if cls in CLASSES else None))
    return _points(rows)


def _brca_splits(src: Path, stems: set[str], problems: Problems) -> dict[str, str]:
    """Image stem -> train/val from ``brca_ds_train.txt`` / ``brca_ds_val.txt`` (where present)."""
    splits: dict[str, str] = {}
    for split, name in BRCA_SPLIT_LISTS.items():
        path = src / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            entry = PurePath(line.strip()).name
            if not entry:
                continue
            stem = PurePath(entry).stem if PurePath(entry).suffix.lower() in IMAGE_SUFFIXES else entry
            if stem not in stems:
                problems.report(path, f"line {number}: {entry} has no image in images/")
            elif splits.get(stem, split) != split:
                problems.report(path, f"line {number}: {entry} is also in the {splits[stem]} list")
            else:
                splits[stem] = split
    return splits


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ----------------------------------------------------------------------------- QuPath GeoJSON

def _read_geojson(src: Path, problems: Problems) -> list[Source]:
    if not src.is_dir():
        raise bad(src, "expected a folder of <stem>.geojson files next to their images")
    images = images_by_stem(src, problems)
    by_name = {p.name: p for p in images.values()}
    pairs: dict[Path, Path] = {}
    for path in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in GEOJSON_SUFFIXES):
        image = by_name.get(path.stem) or images.get(path.stem)  # 'a.tif.geojson' or 'a.geojson'
        if image is None:
            problems.report(path, f"no image {path.stem}.png|.tif|.jpg next to it")
        elif image in pairs:
            problems.report(path, f"a second annotation file for {image.name} (first: {pairs[image].name})")
        else:
            pairs[image] = path
    sources = []
    for image in sorted(images.values()):
        if image not in pairs:
            problems.report(image, f"no annotation file {image.stem}.geojson next to it")
            continue
        parsed = _parse_geojson(pairs[image], problems)
        if parsed is not None:
            sources.append(Source(image, pairs[image], *parsed, case=_case_id(image.stem), origin=image.name))
    return sources


def _parse_geojson(path: Path, problems: Problems) -> tuple[np.ndarray, np.ndarray] | None:
    """Points and class indices of a QuPath export (:mod:`cellnet.data.qupath`); None if malformed.

    Features of no cellnet class (unclassified, stroma, unknown names) and regions (tiles, TMA
    cores) are skipped and counted by reason.
    """
    try:
        features = qupath.features(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.report(path, f"malformed GeoJSON ({exc})")
        return None
    except ValueError as exc:
        problems.report(path, str(exc))
        return None
    rows = []
    for number, feature in enumerate(features):
        try:
            nuclei = qupath.read_feature(feature)
        except ValueError as exc:
            problems.report(path, f"feature {number}: {exc}")
            return None
        if nuclei.skipped:
            problems.warn(nuclei.skipped, path=path)
        elif nuclei.points:
            label = _class_index(nuclei.name, problems, path, len(nuclei.points))
            rows += [(x, y, label) for x, y in nuclei.points]
    return _points(rows)


# ----------------------------------------------------------------------------- CSV

def _read_csv(src: Path, problems: Problems) -> list[Source]:
    if not src.is_file():
        raise bad(src, f"expected a CSV file with columns {','.join(CSV_COLUMNS)}")
    groups: dict[str, list[tuple[float, float, str, int]]] = {}
    try:
        with open(src, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise bad(src, f"missing column(s) {', '.join(missing)} (expected {','.join(CSV_COLUMNS)})")
            column = {c: header.index(c) for c in CSV_COLUMNS}
            for row in reader:
                if not any(field.strip() for field in row):
                    continue
                line = reader.line_num
                if len(row) < len(header):
                    problems.report(src, f"line {line}: {len(row)} field(s), expected {len(header)}")
                    continue
                image, x, y, name = (row[column[c]].strip() for c in CSV_COLUMNS)
                if not image:
                    problems.report(src, f"line {line}: empty image")
                elif not (_is_number(x) and _is_number(y)):
                    problems.report(src, f"line {line}: x, y = {x!r}, {y!r} are not numbers")
                else:
                    groups.setdefault(image, []).append((float(x), float(y), name, line))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise bad(src, f"malformed CSV ({exc})") from None
    sources = []
    for image, rows in sorted(groups.items()):
        path = Path(image) if Path(image).is_absolute() else src.parent / image
        if not path.is_file():
            problems.report(path, f"no such image (named in {src.name})")
            continue
        case = _case_id(PurePath(image).with_suffix("").as_posix().replace("/", "-"))
        rows = [(x, y, _class_index(name, problems, src, line=line)) for x, y, name, line in rows]
        sources.append(Source(path, src, *_points(rows), case=case, origin=image))
    return sources


# ----------------------------------------------------------------------------- BreastPathQ

def _read_breastpathq(src: Path, problems: Problems) -> list[Source]:
    cells = src / "cells"
    if not cells.is_dir():
        raise bad(cells, "no such folder (expected a BreastPathQ root with cells/)")
    given = _given_splits(cells / "split.csv")
    groups = read_groups(cells / "groups.csv") if (cells / "groups.csv").is_file() else {}
    sources = []
    for region in read_regions(src, problems):
        match = REGION_RE.match(region.image_path.stem)
        case, number = (match["case"], int(match["region"])) if match else (region.name, 1)
        patient, site = groups.get(region.name, ("", ""))
        sources.append(Source(region.image_path, region.xml_path, region.points.astype(np.float64),
                              region.labels, case=_case_id(case), region=number,
                              origin=f"cells/{region.image_path.name}", split=given.get(region.name, ""),
                              patient=patient, site=site))
    return sources


def _given_splits(path: Path) -> dict[str, str]:
    """Region name -> split from an existing ``cells/split.csv`` (so a re-import keeps it)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"name", "split"} <= set(rows[0]):
        raise bad(path, "missing column(s): expected name,split")
    return {row["name"]: row["split"] for row in rows}


READERS = {"breastpathq": _read_breastpathq, "brca-m2c": _read_brca_m2c,
           "geojson": _read_geojson, "csv": _read_csv}

"""What ``cellnet import`` reads: the formats and class names it knows, as text for ``--help``.

Kept apart from the importers so the command line's help needs neither NumPy nor pandas.
"""
from __future__ import annotations

import textwrap

from cellnet.classes import BREASTPATHQ_DESCRIPTIONS, NAME_TO_CLASS, class_for_description

BRCA_LABEL_SUFFIX = "_gt_class_coords.txt"
#: QuPath's default classes, all in the class table (shown by ``cellnet import --help``).
QUPATH_CLASSES = ("Tumor", "Immune cells", "Stroma", "Necrosis", "Other", "Region*", "Ignore*", "Positive",
                  "Negative")


def describe_formats() -> str:
    """What each ``--format`` expects: the epilog of ``cellnet import --help`` (keep its line breaks)."""
    def item(name: str, text: str) -> str:
        filled = textwrap.fill(text, 90, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)
        return filled.replace("\xa0", " ")  # no-break spaces keep 'DCIS 3' on one line

    def names(cls: str | None) -> str:
        return ", ".join(n for n, c in NAME_TO_CLASS.items() if c == cls)

    return "\n".join([
        "formats (what --src is):",
        item("breastpathq", "a BreastPathQ folder: its cells/<N>_Region <M>_crop.tif and _key.xml "
                            "are checked and copied (with cells/split.csv and cells/groups.csv, where "
                            "present)."),
        item("brca-m2c", f"a BRCA-M2C root: images/<stem>.png and labels/<stem>{BRCA_LABEL_SUFFIX} "
                         "with rows '<y> <x> <class>': 1 lymphocyte, 2 tumour (-> malignant), "
                         "3 stromal (skipped and counted: cellnet has no stromal channel, so stroma "
                         "is background in the masks). brca_ds_train.txt and brca_ds_val.txt, if "
                         "present, become cells/split.csv; the TCGA barcodes of the names become "
                         "cells/groups.csv (name,patient,site: TCGA-XX-YYYY, XX) for `cellnet prepare "
                         "--group-by`."),
        item("geojson", "a folder of QuPath GeoJSON exports (QuPath 0.3 to 0.6, or `cellnet slide`'s), "
                        "<stem>.geojson (or .json, or <stem>.<ext>.geojson) next to "
                        "<stem>.png|.tif|.jpg: Point and MultiPoint objects, and detection "
                        "and cell polygons (their centroid; a cell's nucleusGeometry when exported). "
                        "Class from properties.classification (name; names of a derived class; 0.3's "
                        "colorRGB form too), else properties.name; objects of no cellnet class are "
                        "skipped and counted, and so are polygon annotations, tiles and TMA cores (regions)."),
        item("csv", "one CSV file with columns image,x,y,class, one point a row; image paths "
                    "relative to the CSV's folder."),
        "class names (geojson, csv; case-insensitive):",
        item("malignant", names("malignant")),
        item("normal", names("normal")),
        item("lymphocyte", names("lymphocyte")),
        item("skipped", f"{names(None)} and unknown names (counted in the summary)"),
        item("QuPath", "its default classes: " + qupath_classes()
             + "; a derived class (Tumor: Positive) counts as its base class"),
        item("also", "the BreastPathQ key-XML descriptions ("
                     + ", ".join(d.replace(" ", "\xa0") for d in BREASTPATHQ_DESCRIPTIONS) + ")"),
        textwrap.fill("x, y are full-resolution pixel coordinates (x = column). A point outside "
                      "its image stops the import, or is skipped and counted with --on-bad skip. "
                      "Writes OUT/cells/<case>_Region <M>_crop.tif + _key.xml (the BreastPathQ "
                      "cells layout) and OUT/mapping.csv (case,region,source_image); existing files "
                      "are never overwritten.", 92),
    ])


def qupath_classes() -> str:
    """``Tumor -> malignant; ...``: where QuPath's default classes go, grouped by class."""
    groups: dict[str, list[str]] = {}
    for name in QUPATH_CLASSES:
        groups.setdefault(class_for_description(name) or "skipped", []).append(name)
    return "; ".join(f"{', '.join(names)} -> {cls}" for cls, names in groups.items())

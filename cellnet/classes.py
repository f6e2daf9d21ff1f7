"""Cell classes, the channel order of every mask, and the annotation vocabularies."""
from __future__ import annotations

#: Channel order of masks and segmentation outputs (SPEC 2.3).
CLASSES: tuple[str, ...] = ("normal", "lymphocyte", "malignant", "background")
NORMAL, LYMPHOCYTE, MALIGNANT, BACKGROUND = range(4)
#: The three cell classes (everything but background).
CELL_CLASSES: tuple[str, ...] = CLASSES[:3]

#: BreastPathQ key-XML ``description`` -> class (SPEC 2.1). Anything else is skipped and counted.
BREASTPATHQ_DESCRIPTIONS: dict[str, str] = {
    **{d: "malignant" for d in ("IDC", "ILC", "Muc C", "DCIS 1", "DCIS 2", "DCIS 3",
                                "MC- E", "MC - C", "MC - M")},
    **{d: "normal" for d in ("normal", "UDH", "ADH")},
    **{d: "lymphocyte" for d in ("TIL-E", "TIL-S")},
}
#: Description written by ``cellnet synth`` / ``cellnet import`` for each class.
CLASS_DESCRIPTION: dict[str, str] = {"malignant": "IDC", "normal": "normal", "lymphocyte": "TIL-S"}

#: Generic names accepted by the CSV / GeoJSON importers (case-insensitive), -> class or None (skip).
NAME_TO_CLASS: dict[str, str | None] = {
    "malignant": "malignant", "tumor": "malignant", "tumour": "malignant", "cancer": "malignant",
    "epithelial": "malignant", "neoplastic": "malignant",
    "normal": "normal", "normal epithelial": "normal", "benign": "normal",
    "lymphocyte": "lymphocyte", "lymphocytes": "lymphocyte", "immune": "lymphocyte", "til": "lymphocyte",
    "stroma": None, "stromal": None, "other": None, "necrosis": None,
    # QuPath's default classes (Tumor, Stroma, Necrosis and Other are above)
    "immune cells": "lymphocyte", "region*": None, "ignore*": None, "positive": None, "negative": None,
}

#: BRCA-M2C label codes: 1 lymphocyte, 2 tumour/epithelial, 3 stromal (stromal has no channel: skipped).
BRCA_M2C_CODES: dict[int, str | None] = {1: "lymphocyte", 2: "malignant", 3: None}


def class_for_description(description: str) -> str | None:
    """Map a BreastPathQ description (or a generic class name) to a class, or None to skip."""
    d = description.strip()
    if d in BREASTPATHQ_DESCRIPTIONS:
        return BREASTPATHQ_DESCRIPTIONS[d]
    return NAME_TO_CLASS.get(d.lower())

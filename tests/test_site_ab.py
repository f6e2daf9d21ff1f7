"""evaluate.site_ab's folds (no site or patient on both sides) and its seed summary; no training."""
from __future__ import annotations

import csv
import math

import pytest

from cellnet.training.config import make_config
from evaluate.site_ab import (INNER_VAL_EVERY, SITES, VARIANTS, composition, label_rows, make_fold, patient_of,
                              run_name, site_of, summary)


def _imported(root, patients_per_site: int = 5, images_per_patient: int = 2):
    cells = root / "imported" / "cells"
    cells.mkdir(parents=True)
    for site in SITES:
        for p in range(patients_per_site):
            for i in range(images_per_patient):
                name = f"TCGA-{site}-P{p:03d}-01Z-00-DX1_{i}"
                (cells / f"{name}_crop.tif").write_bytes(b"")
                (cells / f"{name}_key.xml").write_text("<Annotations/>")
    return root / "imported"


def _split(folder):
    with open(folder / "cells" / "split.csv") as f:
        return {row["name"]: row["split"] for row in csv.DictReader(f)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_a_valid_training_configuration(variant):
    """A misspelt override would otherwise surface only after the other variants' hours of training."""
    values = {"preset": "cpu", **VARIANTS[variant].get("config", {})}
    make_config("segmentation", data="data", run="run", **values).resolve()


def test_fold_holds_out_one_site_and_validates_on_whole_patients_of_the_others(tmp_path):
    imported = _imported(tmp_path)
    data, heldout = make_fold(imported, tmp_path / "fold_A8", "A8")
    train_split, held_split = _split(data), _split(heldout)
    assert {site_of(n) for n in held_split} == {"A8"} and set(held_split.values()) == {"val"}
    assert "A8" not in {site_of(n) for n in train_split}
    assert len(train_split) + len(held_split) == 3 * 5 * 2
    by_patient: dict[str, set[str]] = {}
    for name, split in train_split.items():
        by_patient.setdefault(patient_of(name), set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient on both sides
    for site in ("A7", "AC"):
        val = sorted(p for p, s in by_patient.items() if site_of(p) == site and s == {"val"})
        assert len(val) == math.ceil(5 / INNER_VAL_EVERY)  # every 4th patient of each training site
    for name in train_split:  # the regions are links to the imported files, with their key XML
        assert (data / "cells" / f"{name}_crop.tif").resolve() == (imported / "cells" / f"{name}_crop.tif").resolve()
        assert (data / "cells" / f"{name}_key.xml").is_symlink()


def test_summary_averages_folds_then_seeds_and_reports_the_spread():
    def row(mal: float) -> dict:
        return {"jaccard_malignant": mal, "jaccard_lymphocyte": 0.2, "f1_malignant": 0.4,
                "f1_lymphocyte": 0.1, "jaccard_normal": float("nan"), "f1_normal": 0.0}

    results = {f"{site}/{run_name('authors', 20, seed)}": row(0.3 + 0.2 * seed)
               for site in SITES for seed in (0, 1)}
    results[f"A7/{run_name('authors', 20, 2)}"] = row(0.9)  # seed 2 has one fold only
    text = summary(results, "authors", 20, [0, 1, 2])
    assert "A7 held out: J mal / lym 0.567 / 0.200" in text  # fold A7 over its three seeds
    assert "A8 held out: J mal / lym 0.400 / 0.200" in text
    assert "mean over folds (2 seed(s) complete): J mal / lym 0.400 / 0.200" in text
    assert "std over seeds: J 0.100 / 0.000" in text
    assert run_name("tissue_cpu", None, 1) == "tissue_cpu_epreset_s1"


def test_composition_counts_nuclei_per_site_and_class_and_tumour_free_regions(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    regions = {"TCGA-A7-P000-01Z-00-DX1_1": [1, 2] + [2] * 10, "TCGA-A7-P001-01Z-00-DX1_1": [3, 3, 2],
               "TCGA-AC-P000-01Z-00-DX1_1": [3] * 5 + [1], "TCGA-A8-P000-01Z-00-DX1_1": []}
    for stem, codes in regions.items():
        (tmp_path / "images" / f"{stem}.png").write_bytes(b"")
        rows = "".join(f"{10 + i} {20 + i} {code}\n" for i, code in enumerate(codes))
        (tmp_path / "labels" / f"{stem}_gt_class_coords.txt").write_text(rows)
    lines = composition(tmp_path).splitlines()
    assert lines[1].split() == ["A7", "2", "1", "12", "2", "1"]  # P001 has 1 tumour nucleus: tumour-free
    assert lines[2].split() == ["A8", "1", "0", "0", "0", "1"]  # an empty label file reads as no nuclei
    assert lines[3].split() == ["AC", "1", "1", "0", "5", "1"]
    rows = label_rows(tmp_path, "TCGA-AC-P000-01Z-00-DX1_1_Region 1")  # the name cellnet import gives it
    assert rows.shape == (6, 3) and rows[0].tolist() == [10, 20, 3]

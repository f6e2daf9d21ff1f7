import os
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.data.records import ensure_prepared, load_manifest, prepare
from conftest import REAL, write_layout


def _count(folder, split):
    manifest = load_manifest(folder)
    files = [str(folder / s) for s in manifest["splits"][split]["shards"]]
    return sum(1 for _ in tf.data.TFRecordDataset(files))


def test_record_count_equals_image_count(tiny_layout, tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    n_images = sum(len(list((tiny_layout / d).glob("*.tif"))) for d in ("train", "validation"))
    n_records = sum(_count(tiny_prepared, s) for s in ("train", "val", "eval"))
    assert n_records == n_images == 12
    n_regions = len(list((tiny_layout / "cells").glob("*_crop.tif")))
    assert _count(tiny_prepared, "cells_train") + _count(tiny_prepared, "cells_val") == n_regions
    for split, info in manifest["splits"].items():
        assert info["count"] == _count(tiny_prepared, split)


def test_no_patient_on_both_sides(tiny_prepared):
    splits = load_manifest(tiny_prepared)["splits"]
    sides = [set(splits[s]["patients"]) for s in ("train", "val", "eval")]
    assert all(sides)
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    cells = [set(splits[s]["patients"]) for s in ("cells_train", "cells_val")]
    assert not (cells[0] & cells[1])


def test_splits_are_seeded(tmp_path):
    layout = write_layout(tmp_path / "bpq", n_patients=8, per_patient=1, regions=0)
    val = [set(prepare(layout, tmp_path / f"r{i}", seed=s, progress=False)["splits"]["val"]["patients"])
           for i, s in enumerate((0, 0, 1, 2, 3))]
    assert val[0] == val[1]
    assert any(v != val[0] for v in val[2:])


def test_patient_in_validation_and_train_is_dropped_from_train(tmp_path):
    layout = write_layout(tmp_path / "bpq", n_patients=3, per_patient=2, regions=0)
    # slide 1000 (train) now belongs to the validation patient P2
    (layout / "patient_ids.csv").write_text("patient_id,slide\nP2,1000\nP1,1001\nP2,1002\n")
    manifest = prepare(layout, tmp_path / "rec", progress=False)
    train_side = set(manifest["splits"]["train"]["patients"]) | set(manifest["splits"].get("val", {}).get("patients", []))
    assert "P2" not in train_side
    assert any("dropped" in k for k in manifest["warnings"])


def test_refuses_to_overwrite(tiny_layout, tiny_prepared):
    with pytest.raises(CellnetError, match="already holds prepared records"):
        prepare(tiny_layout, tiny_prepared, progress=False)


def test_wrong_size_patch_fails_or_is_skipped(tmp_path):
    from cellnet.data.imageio import write_image

    layout = write_layout(tmp_path / "bpq", n_patients=2, per_patient=2, regions=0)
    write_image(layout / "train" / "1000_1.tif", np.zeros((300, 512, 3), np.uint8))
    with pytest.raises(CellnetError, match=r"1000_1\.tif: patch is 512x300, expected 512x512"):
        prepare(layout, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # nothing half-written
    manifest = prepare(layout, tmp_path / "b", on_bad="skip", progress=False)
    assert len(manifest["skipped"]) == 1 and manifest["splits"]["train"]["count"] + \
        manifest["splits"].get("val", {"count": 0})["count"] == 1


def test_truncated_image_is_reported(tmp_path):
    layout = write_layout(tmp_path / "bpq", n_patients=2, per_patient=2, regions=0)
    path = layout / "train" / "1000_2.tif"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CellnetError, match=r"1000_2\.tif: unreadable or truncated image"):
        prepare(layout, tmp_path / "a", progress=False)


def test_points_outside_are_dropped_and_counted(tmp_path):
    from cellnet.data.breastpathq import write_key_xml

    layout = write_layout(tmp_path / "bpq", n_patients=2, per_patient=1, regions=2)
    write_key_xml(layout / "cells" / "1_Region 1_key.xml",
                  np.array([[10.0, 10.0], [5000.0, 10.0], [-3.0, 4.0]]), np.array([2, 2, 1]))
    manifest = prepare(layout, tmp_path / "rec", progress=False)
    assert sum(v for k, v in manifest["warnings"].items() if "outside" in k) == 2


def test_ensure_prepared_caches(tiny_layout, tmp_path):
    first = ensure_prepared(tiny_layout, tmp_path, progress=False)
    stamp = os.path.getmtime(first / "manifest.json")
    again = ensure_prepared(tiny_layout, tmp_path, progress=False)
    assert again == first and os.path.getmtime(again / "manifest.json") == stamp
    assert ensure_prepared(first, tmp_path / "elsewhere") == first  # a prepared folder is used as is


def test_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CellnetError, match="empty: no patches"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "prepared")


def test_shards_are_checked_when_a_prepared_folder_is_opened(tiny_prepared, tmp_path):
    from cellnet.data.records import verify_shards

    prepared = _copy(tiny_prepared, tmp_path)
    verify_shards(prepared)  # a sound folder passes
    shard = prepared / load_manifest(prepared)["splits"]["train"]["shards"][0]
    body = shard.read_bytes()
    shard.write_bytes(body[: len(body) - 10])
    with pytest.raises(CellnetError, match=f"^{shard}: truncated or corrupt TFRecord shard .*prepare` again$"):
        ensure_prepared(prepared, tmp_path)
    shard.unlink()
    with pytest.raises(CellnetError, match=f"^{shard}: shard listed in manifest.json is missing"):
        ensure_prepared(prepared, tmp_path)


def test_a_damaged_cache_is_prepared_again(tiny_layout, tmp_path, capsys):
    from cellnet.data.records import verify_shards

    cache = ensure_prepared(tiny_layout, tmp_path, progress=False)
    shard = cache / load_manifest(cache)["splits"]["eval"]["shards"][0]
    shard.write_bytes(b"")
    capsys.readouterr()
    assert ensure_prepared(tiny_layout, tmp_path, progress=False) == cache
    verify_shards(cache)
    err = capsys.readouterr().err
    assert f"warning: {cache}: damaged cache, preparing it again ({shard.name}: holds 0 record" in err


def test_data_error_is_only_for_damaged_records():
    from cellnet.data.records import data_error

    loss = tf.errors.DataLossError(None, None, "{{function_node x}} corrupted record at 42\n\t [[{{node y}}]]")
    assert str(data_error(loss, "prep")) == ("prep: a TFRecord shard is truncated or corrupt "
                                             "(corrupted record at 42); run `cellnet prepare` again")
    assert data_error(tf.errors.InvalidArgumentError(None, None, "shape"), "prep") is None
    assert data_error(ValueError("bug"), "prep") is None


def test_disk_full_leaves_nothing(tiny_layout, tmp_path, monkeypatch):
    class FullDisk(tf.io.TFRecordWriter):
        def write(self, record):
            raise tf.errors.ResourceExhaustedError(None, None, "/x/.out.tmp1/a.tfrecord; No space left on device")

    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    (tmp_path / "out").mkdir()  # an empty --out is the user's: it stays, empty
    with pytest.raises(CellnetError, match=r"out/train-000-of-001.tfrecord: could not write \(No space left"):
        prepare(tiny_layout, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def test_disc_diameter_sets_the_masks_and_is_recorded(tiny_layout, tmp_path):
    from cellnet.data.pipeline import region_records

    areas = {}
    for disc in (15.0, 12.5):
        folder = tmp_path / f"d{disc:g}"
        assert prepare(tiny_layout, folder, diameter=disc, progress=False)["disc_diameter"] == disc
        assert load_manifest(folder)["disc_diameter"] == disc
        areas[disc] = sum(int(ex["mask"][..., :3].numpy().sum()) for ex in region_records(folder, "cells_train"))
    # disc area scales with the squared diameter (up to overlaps and edges)
    assert 0.55 < areas[12.5] / areas[15.0] < 0.8


@pytest.mark.parametrize("disc", [0.0, -3.0, 200.0])
def test_an_impossible_disc_is_refused(tiny_layout, tmp_path, disc):
    with pytest.raises(CellnetError, match=r"^--disc: expected a diameter"):
        prepare(tiny_layout, tmp_path / "out", diameter=disc, progress=False)
    assert not (tmp_path / "out").exists()


def test_disc_must_match_a_prepared_folder(tiny_prepared, tiny_layout, tmp_path):
    with pytest.raises(CellnetError, match=r"manifest.json: masks were drawn with 15-px discs, not --disc 12.5; run `cellnet prepare --disc 12.5`"):
        ensure_prepared(tiny_prepared, tmp_path, diameter=12.5)
    cache = ensure_prepared(tiny_layout, tmp_path, diameter=12.5, progress=False)
    assert cache.name.endswith("-d12.5") and load_manifest(cache)["disc_diameter"] == 12.5


# ----------------------------------------------------------------------------- --group-by

#: Made-up TCGA patients on three tissue-source sites (A1, B2, C3).
TCGA = ["TCGA-A1-0001", "TCGA-A1-0002", "TCGA-B2-0003", "TCGA-B2-0004", "TCGA-C3-0005", "TCGA-C3-0006"]
#: train/ slides -> patient: two slides of one patient, three sites; 1006 is in validation/.
SLIDE_PATIENTS = {"1000": TCGA[0], "1001": TCGA[0], "1002": TCGA[1], "1003": TCGA[2], "1004": TCGA[4],
                  "1005": TCGA[5], "1006": TCGA[3]}
PARTICIPANT = r"TCGA-\w\w-(\w{4})"


def write_tcga_cells(root, size: int = 96):
    """Two small regions (slides DX1, DX2) per made-up TCGA patient, named as BRCA-M2C names them."""
    from cellnet.data.breastpathq import region_file_stem, write_key_xml
    from cellnet.data.imageio import write_image

    rng = np.random.default_rng(0)
    for i, patient in enumerate(TCGA):
        for dx in (1, 2):
            stem = region_file_stem(f"{patient}-01Z-00-DX{dx}_{1000 * i}_500_1000_1000_0.98", 1)
            write_image(root / "cells" / f"{stem}_crop.tif", rng.integers(150, 255, (size, size, 3), dtype=np.uint8))
            write_key_xml(root / "cells" / f"{stem}_key.xml", np.array([[10.0, 10.0], [50.0, 40.0]]), np.array([1, 2]))
    return root


@pytest.fixture(scope="module")
def tcga_layout(tmp_path_factory):
    root = write_layout(tmp_path_factory.mktemp("tcga") / "bpq", n_patients=7, per_patient=1, regions=0)
    (root / "patient_ids.csv").write_text(
        "patient_id,slide\n" + "".join(f"{p},{s}\n" for s, p in SLIDE_PATIENTS.items()))
    return write_tcga_cells(root)


def cells_layout(root, regions: int):
    """A layout of cell regions named 1, 2, ... only (no patches)."""
    root.mkdir(parents=True)
    return write_layout(root, n_patients=0, regions=regions)


def _drawn(layout, group_by, seed, val_fraction=0.34):
    from cellnet.data.breastpathq import read_breastpathq
    from cellnet.data.records import assign_patch_splits, assign_region_splits

    data = read_breastpathq(layout)
    return {**assign_patch_splits(data, val_fraction, seed, group_by),
            **assign_region_splits(data, val_fraction, seed, group_by)}


@pytest.mark.parametrize("group_by", ["patient", "site", PARTICIPANT])
def test_no_group_lands_on_both_sides(tcga_layout, group_by):
    from cellnet.data.records import group_key

    key = group_key(group_by)
    for seed in range(6):
        splits = _drawn(tcga_layout, group_by, seed)
        for train, val in (("train", "val"), ("cells_train", "cells_val")):
            sides = [{key(item) for item in splits[s]} for s in (train, val)]
            assert all(sides) and not sides[0] & sides[1], (seed, train, sides)
        assert len(splits["train"]) + len(splits["val"]) == 6
        assert len(splits["cells_train"]) + len(splits["cells_val"]) == 2 * len(TCGA)


def _sides_of_patients(splits) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for split in ("cells_train", "cells_val"):
        for region in splits[split]:
            sides.setdefault(region.patient, set()).add(split)
    return sides


def test_two_images_of_one_patient_stay_on_one_side(tcga_layout):
    straddled = False
    for seed in range(10):
        assert all(len(s) == 1 for s in _sides_of_patients(_drawn(tcga_layout, "patient", seed)).values())
        straddled |= any(len(s) > 1 for s in _sides_of_patients(_drawn(tcga_layout, None, seed)).values())
    assert straddled  # split by case (one image), as without --group-by, a patient's DX1 and DX2 part


def test_group_by_site_holds_out_one_whole_site(tcga_layout):
    for seed in range(6):
        splits = _drawn(tcga_layout, "site", seed)
        for train, val in (("train", "val"), ("cells_train", "cells_val")):
            held = {item.site for item in splits[val]}
            assert len(held) == 1 and not any(item.site in held for item in splits[train])
            assert {item.site for item in splits[train]} | held == {"A1", "B2", "C3"}


def test_split_csv_is_ignored_with_group_by(tcga_layout, tmp_path, capsys):
    import shutil

    layout = shutil.copytree(tcga_layout, tmp_path / "bpq")
    names = sorted(p.name[: -len("_crop.tif")] for p in (layout / "cells").glob("*_crop.tif"))
    (layout / "cells" / "split.csv").write_text(
        "name,split\n" + "".join(f"{n},{'val' if i % 2 else 'train'}\n" for i, n in enumerate(names)))
    assert len(_drawn(layout, None, 0)["cells_val"]) == len(names) // 2  # the file is the split

    manifest = prepare(layout, tmp_path / "rec", val_fraction=0.34, group_by="site", progress=False)
    splits = manifest["splits"]
    assert manifest["group_by"] == "site" and "groups" not in splits["eval"]
    for train, val in (("train", "val"), ("cells_train", "cells_val")):
        assert len(splits[val]["groups"]) == 1 and not set(splits[train]["groups"]) & set(splits[val]["groups"])
        assert set(splits[train]["groups"]) | set(splits[val]["groups"]) == {"A1", "B2", "C3"}
    assert splits["cells_val"]["count"] == 4  # one site: two patients, two images each
    assert load_manifest(tmp_path / "rec")["splits"]["cells_val"]["groups"] == splits["cells_val"]["groups"]
    assert "ignored: --group-by site draws the split over groups" in manifest["file_warnings"]
    assert f"{layout / 'cells' / 'split.csv'}: ignored: --group-by site" in capsys.readouterr().err


def test_region_patient_and_site_come_from_groups_csv_then_tcga_names(tmp_path):
    from cellnet.data.breastpathq import read_breastpathq

    layout = cells_layout(tmp_path / "bpq", 3)
    assert [(r.patient, r.site) for r in read_breastpathq(layout).regions] == [("1", ""), ("2", ""), ("3", "")]
    (layout / "cells" / "groups.csv").write_text("name,patient,site\n1_Region 1,pa,S1\n2_Region 1,pb,\n")
    write_tcga_cells(layout)
    regions = {r.name: (r.patient, r.site) for r in read_breastpathq(layout).regions}
    assert regions["1_Region 1"] == ("pa", "S1") and regions["2_Region 1"] == ("pb", "")
    assert regions["3_Region 1"] == ("3", "")
    assert regions["TCGA-A1-0002-01Z-00-DX2_1000_500_1000_1000_0.98_Region 1"] == ("TCGA-A1-0002", "A1")
    (layout / "cells" / "groups.csv").write_text("name,patient\n1_Region 1,pa\n")
    with pytest.raises(CellnetError, match=r"groups.csv: missing column\(s\) site \(expected name,patient,site\)$"):
        read_breastpathq(layout)


def _one_line_error(call) -> str:
    with pytest.raises(CellnetError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_group_by_errors_name_the_item(tcga_layout, tmp_path):
    out = tmp_path / "out"
    message = _one_line_error(lambda: prepare(tcga_layout, out, group_by="TCGA-(", progress=False))
    assert message.startswith("--group-by TCGA-(: not a regular expression (missing ), unterminated subpattern")
    message = _one_line_error(lambda: prepare(tcga_layout, out, group_by=r"A1-(\d+)", progress=False))
    assert message == (rf"--group-by A1-(\d+): patient 'TCGA-B2-0003' of {tcga_layout / 'train' / '1003_1.tif'} "
                       "does not match")

    plain = write_layout(tmp_path / "plain", n_patients=2, per_patient=1, regions=1)
    message = _one_line_error(lambda: prepare(plain, out, group_by="site", progress=False))
    assert message == (f"--group-by site: patient 'P0' of {plain / 'train' / '1000_1.tif'} has no site: "
                       "its patient id is not a TCGA barcode (TCGA-XX-YYYY, XX the site)")
    cells = cells_layout(tmp_path / "cells", 2)
    message = _one_line_error(lambda: prepare(cells, out, group_by="site", progress=False))
    assert message == (f"--group-by site: region '1_Region 1' ({cells / 'cells' / '1_Region 1_crop.tif'}) has no "
                       "site: cells/groups.csv (name,patient,site) gives none and its name holds no TCGA barcode")
    message = _one_line_error(lambda: prepare(cells, out, group_by="^TCGA", progress=False))
    assert message.startswith("--group-by ^TCGA: region '1_Region 1' (") and message.endswith("does not match")
    assert not out.exists()


def test_ensure_prepared_keys_the_cache_by_group_by(tiny_prepared, tmp_path):
    cells = write_tcga_cells(tmp_path / "cells")
    cache = ensure_prepared(cells, tmp_path, group_by="site", progress=False)
    assert cache.name.endswith("-s0-gsite") and load_manifest(cache)["group_by"] == "site"
    assert ensure_prepared(cells, tmp_path, group_by="site", progress=False) == cache
    regex = ensure_prepared(cells, tmp_path, group_by=PARTICIPANT, progress=False)
    assert regex.parent == cache.parent and re.search(r"-s0-g[0-9a-f]{8}$", regex.name)  # no file name: its hash
    assert ensure_prepared(cache, tmp_path) == cache  # no --group-by: the folder's own splits
    with pytest.raises(CellnetError, match=rf"^{cache}/manifest.json: splits were drawn with --group-by site, not "
                                           r"--group-by patient; run `cellnet prepare --group-by patient`"):
        ensure_prepared(cache, tmp_path, group_by="patient")
    with pytest.raises(CellnetError, match=r"manifest.json: splits were drawn with no --group-by, not --group-by site"):
        ensure_prepared(tiny_prepared, tmp_path, group_by="site")


@pytest.mark.skipif(not (REAL / "brca-m2c").is_dir(), reason="../shared/real is absent (a fresh clone)")
def test_real_brca_m2c_group_by_site_and_patient(tmp_path):
    import shutil

    from cellnet.data.breastpathq import read_breastpathq
    from cellnet.data.importers import import_points

    real = REAL / "brca-m2c"
    names = sorted(p.name for p in (real / "images").glob("*.png"))
    by_site: dict[str, list[str]] = {}
    for name in names:
        by_site.setdefault(name[5:7], []).append(name)
    two_slides = ("TCGA-A7-A0DB", "TCGA-A7-A13G")
    picked = sorted({n for n in names if n.startswith(two_slides)} | {n for ns in by_site.values() for n in ns[:3]})
    src = tmp_path / "brca"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
    for name in picked:
        shutil.copy(real / "images" / name, src / "images")
        shutil.copy(real / "labels" / f"{Path(name).stem}_gt_class_coords.txt", src / "labels")
    for split in ("train", "val"):
        listed = set((real / f"brca_ds_{split}.txt").read_text().split())
        (src / f"brca_ds_{split}.txt").write_text("".join(f"{n}\n" for n in picked if n in listed))
    import_points("brca-m2c", src, tmp_path / "data")
    data = tmp_path / "data"

    manifest = prepare(data, tmp_path / "site", val_fraction=0.34, group_by="site", progress=False)
    train, val = (set(manifest["splits"][s]["groups"]) for s in ("cells_train", "cells_val"))
    assert train | val == {"A7", "A8", "AC"} and not train & val and len(val) == 1
    sites = [name[5:7] for name in picked]
    assert manifest["splits"]["cells_val"]["count"] == sum(site in val for site in sites)  # whole sites only
    assert manifest["splits"]["cells_train"]["count"] == sum(site in train for site in sites)

    assert {r.patient for r in read_breastpathq(data).regions} >= set(two_slides)
    official = _sides_of_patients(_drawn(data, None, 0))
    assert all(len(official[p]) == 2 for p in two_slides)  # the published lists split these patients
    for seed in range(5):
        sides = _sides_of_patients(_drawn(data, "patient", seed))
        assert all(len(sides[p]) == 1 for p in two_slides), seed

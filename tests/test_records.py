import os

import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.data.records import ensure_prepared, load_manifest, prepare
from conftest import write_layout


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

"""QuPath GeoJSON: what cellnet writes, and QuPath 0.3 / 0.4 / 0.5-0.6 exports, import back.

The version fixtures are written here from the shapes of QuPath's own reader and writer
(``PathObjectTypeAdapters`` and ``GsonTools.PathClassTypeAdapter`` in qupath-core).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from cellnet.data import qupath
from cellnet.data.breastpathq import read_breastpathq
from cellnet.data.imageio import write_image
from cellnet.data.importers import import_points
from cellnet.errors import CellnetError
from cellnet.serving.slide import Tile, geojson

CHANNEL = {"normal": 0, "lymphocyte": 1, "malignant": 2}  # SPEC 2.3 channel order
COLOURS = {"Tumor": (200, 0, 0), "Immune cells": (160, 90, 160), "Stroma": (150, 200, 150),
           "Positive": (200, 50, 50)}


def argb(rgb: tuple[int, int, int]) -> int:
    """QuPath 0.3's ``colorRGB``: opaque packed ARGB as a signed 32-bit int."""
    r, g, b = rgb
    return (255 << 24 | r << 16 | g << 8 | b) - (1 << 32)


def square(x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def classification(version: str, names: list[str]) -> dict:
    """QuPath's classification of ``names`` (a derived class when more than one) as ``version`` writes it."""
    if version == "0.3":  # Gson's default form of PathClass: parentClass, name, colorRGB
        parent = classification(version, names[:-1]) if len(names) > 1 else None
        return {**({"parentClass": parent} if parent else {}), "name": names[-1],
                "colorRGB": argb(COLOURS[names[-1]])}
    if len(names) > 1:  # 0.5+: derived classes as a list of names
        return {"names": names, "color": list(COLOURS[names[-1]])}
    return {"name": names[0], "color": list(COLOURS[names[0]])}


def qupath_feature(version: str, object_type: str, geometry: dict, names: list[str] | None,
                   nucleus: dict | None = None) -> dict:
    """One exported object: 0.3 has ``object_type`` and list measurements; 0.4+ a UUID, ``objectType``
    and a measurement object."""
    properties: dict = {"isLocked": False}
    if version == "0.3":
        properties.update(object_type=object_type, measurements=[{"name": "Area", "value": 12.5}])
    else:
        properties.update(objectType=object_type, measurements={"Area": 12.5})
    if names:
        properties["classification"] = classification(version, names)
    feature = {"type": "Feature", "geometry": geometry, "properties": properties}
    if version != "0.3":
        feature["id"] = str(uuid.uuid4())
    if nucleus is not None:
        feature["nucleusGeometry"] = nucleus
    return feature


def export(version: str) -> dict:
    """A point annotation, classified detection polygons, a cell with its nucleus and skipped objects."""
    derived = ["Tumor", "Positive"] if version != "0.4" else ["Tumor"]
    return {"type": "FeatureCollection", "features": [
        qupath_feature(version, "annotation", {"type": "Point", "coordinates": [10.5, 20.25]}, ["Tumor"]),
        qupath_feature(version, "detection", square(30, 40, 50, 60), ["Immune cells"]),      # centroid (40, 50)
        qupath_feature(version, "cell", square(60, 0, 90, 30), derived, square(70, 10, 74, 14)),  # nucleus
        qupath_feature(version, "detection", square(0, 0, 8, 8), ["Stroma"]),                 # no channel
        qupath_feature(version, "detection", square(0, 0, 9, 9), None),                       # unclassified
        qupath_feature(version, "annotation", square(0, 0, 99, 79), ["Tumor"]),               # a tumour region
        qupath_feature(version, "tile", square(0, 0, 50, 50), None),                          # a region
    ]}


EXPORTED = [(10.5, 20.2, CHANNEL["malignant"]), (40.0, 50.0, CHANNEL["lymphocyte"]),
            (72.0, 12.0, CHANNEL["malignant"])]


def import_one(tmp_path: Path, collection: dict, name: str = "a") -> tuple[list, dict]:
    """Import one GeoJSON next to an 80 x 100 image: its points (x, y, channel) and the summary."""
    src = tmp_path / "src"
    write_image(src / f"{name}.png", np.zeros((80, 100, 3), np.uint8))
    (src / f"{name}.geojson").write_text(json.dumps(collection))
    summary = import_points("geojson", src, tmp_path / "out")
    data = read_breastpathq(tmp_path / "out")
    assert not data.problems.items and len(data.regions) == 1
    region = data.regions[0]
    return sorted((round(float(x), 1), round(float(y), 1), int(c))
                  for (x, y), c in zip(region.points, region.labels)), summary


# ----------------------------------------------------------------------------- writing

def test_written_features_have_uuids_both_object_types_and_listed_measurements():
    tile = qupath.tile_feature(0, 512, 512, 512, {"cellularity": 0.25, "cellularity_std": 0.05}, name="tile 1,0")
    nucleus = qupath.nucleus_feature("malignant", qupath.point(12.34, 5.67), {"malignant_activation": 0.9})
    for feature in (tile, nucleus):
        assert feature["type"] == "Feature" and uuid.UUID(feature["id"]).version == 4
        properties = feature["properties"]
        assert properties["objectType"] == properties["object_type"]
    assert tile["id"] != qupath.tile_feature(0, 0, 1, 1, {})["id"]
    assert tile["properties"]["objectType"] == "tile" and "classification" not in tile["properties"]
    assert tile["geometry"] == square(0, 512, 512, 1024)
    assert tile["properties"]["measurements"] == [{"name": "cellularity", "value": 0.25},
                                                  {"name": "cellularity_std", "value": 0.05}]
    assert nucleus["properties"]["objectType"] == "detection"
    assert nucleus["geometry"] == {"type": "Point", "coordinates": [12.3, 5.7]}
    assert nucleus["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}


def test_cellnet_classes_are_qupath_classes_that_map_back():
    from cellnet.classes import class_for_description

    assert {c: qupath.classification(c)["name"] for c in CHANNEL} == {
        "normal": "Normal", "lymphocyte": "Immune cells", "malignant": "Tumor"}
    assert qupath.classification("lymphocyte")["color"] == [160, 90, 160]
    for cls in CHANNEL:
        assert class_for_description(qupath.classification(cls)["name"]) == cls


def test_slide_geojson_writes_every_tile_score_as_a_measurement():
    tiles = [Tile(row=0, col=1, x=64, y=0, size=64, tissue=0.9)]
    rows = [{"row": 0, "col": 1, "x": 64, "y": 0, "width": 64, "height": 64, "tissue": 0.9,
             "cellularity": 0.4, "cellularity_std": 0.07, "malignant_nuclei": 1}]
    collection = geojson(tiles, rows, [(70.26, 10.0, 0.81234)])
    tile, nucleus = collection["features"]
    assert {m["name"]: m["value"] for m in tile["properties"]["measurements"]} == {
        "tissue": 0.9, "cellularity": 0.4, "cellularity_std": 0.07, "malignant_nuclei": 1.0}
    assert tile["properties"]["name"] == "tile 0,1" and tile["geometry"] == square(64, 0, 128, 64)
    assert nucleus["properties"]["classification"]["name"] == "Tumor"
    assert nucleus["properties"]["measurements"] == [{"name": "malignant_activation", "value": 0.8123}]


# ----------------------------------------------------------------------------- reading

def test_what_cellnet_writes_imports_back(tmp_path):
    collection = qupath.feature_collection([
        qupath.tile_feature(0, 0, 100, 80, {"cellularity": 0.5}),
        qupath.nucleus_feature("malignant", qupath.point(12.3, 45.6)),
        qupath.nucleus_feature("lymphocyte", qupath.polygon([(20, 20), (30, 20), (30, 30), (20, 30)])),
        qupath.nucleus_feature("normal", qupath.point(90.0, 70.5), {"area": 3.0}),
    ])
    points, summary = import_one(tmp_path, collection)
    assert points == [(12.3, 45.6, 2), (25.0, 25.0, 1), (90.0, 70.5, 0)]
    assert summary["skipped_points"] == {"Polygon tile objects (regions, not cells)": 1}


def test_slide_geojson_imports_back(tmp_path):
    tiles = [Tile(row=0, col=0, x=0, y=0, size=64, tissue=1.0)]
    rows = [{"row": 0, "col": 0, "x": 0, "y": 0, "width": 64, "height": 64, "cellularity": 0.3}]
    points, _ = import_one(tmp_path, geojson(tiles, rows, [(5.0, 6.0, 0.9), (40.5, 30.0, 0.7)]))
    assert points == [(5.0, 6.0, 2), (40.5, 30.0, 2)]


@pytest.mark.parametrize("version", ["0.3", "0.4", "0.5"])
def test_each_qupath_version_imports(tmp_path, version):
    points, summary = import_one(tmp_path, export(version))
    assert points == EXPORTED
    assert summary["skipped_points"] == {"Polygon tile objects (regions, not cells)": 1,
                                         "Polygon annotation objects (regions, not cells)": 1,
                                         "class 'Stroma' (no cellnet channel)": 1, "unclassified": 1}


def test_legacy_and_alternative_spellings(tmp_path):
    cell = {"type": "Feature", "id": "PathCellObject", "geometry": square(60, 0, 90, 30),  # v0.2: type in id
            "properties": {"classification": "Tumor: Positive", "nucleusGeometry": square(70, 10, 74, 14)}}
    tile = {"type": "Feature", "id": "PathTileObject", "geometry": square(0, 0, 10, 10), "properties": {}}
    core = {"type": "Feature", "geometry": square(0, 0, 10, 10), "properties": {"type": "tma_core"}}
    named = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
             "properties": {"name": "Immune cells"}}
    points, summary = import_one(tmp_path, [cell, tile, core, named])
    assert points == [(1.0, 2.0, 1), (3.0, 4.0, 1), (72.0, 12.0, 2)]
    assert summary["skipped_points"] == {"Polygon tile objects (regions, not cells)": 1,
                                         "Polygon tmaCore objects (regions, not cells)": 1}


def test_class_names_of_every_classification_shape():
    shapes = [classification("0.3", ["Tumor", "Positive"]), classification("0.5", ["Tumor", "Positive"]),
              {"name": "Tumor: Positive", "color": [200, 0, 0]}, "Tumor: Positive"]
    assert {qupath.class_name({"classification": s}) for s in shapes} == {"Tumor: Positive"}
    assert qupath.class_name({"classification": classification("0.3", ["Stroma"])}) == "Stroma"
    assert qupath.class_name({"name": "Tumor"}) == "Tumor" and qupath.class_name({}) == ""


def test_not_geojson_is_a_one_line_error_naming_the_file(tmp_path):
    with pytest.raises(CellnetError) as info:
        import_one(tmp_path, {"type": "Topology"})
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "src" / "a.geojson") in message and "not GeoJSON" in message

"""QuPath GeoJSON, written by ``cellnet slide`` and read by ``cellnet import --format geojson``.

The shapes are QuPath's own (``PathObjectTypeAdapters`` and ``GsonTools`` in qupath-core), so one
file imports in QuPath 0.3 through 0.6:

- ``id``: a UUID (0.4+ keeps it as the object's id; 0.3 ignores it);
- ``properties.objectType`` (0.4+) and ``properties.object_type`` (0.3), both written; on reading,
  either, else ``properties.type``, else a v0.2 class name in ``id`` (``PathCellObject``);
- ``properties.measurements``: written as the ``[{"name", "value"}]`` list every version reads
  (0.4+ writes a ``{name: value}`` object, which 0.3 cannot read);
- ``properties.classification``: written as ``{"name", "color": [r, g, b]}`` (0.4+; 0.3 reads the
  name and shows its own colour for it); read as that, ``{"names": [...], "color"}`` (0.5+ derived
  classes), ``{"name", "colorRGB": int}`` (0.3, with ``parentClass`` for derived classes) or a
  plain string. The class is the name; colours are display only and not read.
"""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: cellnet class -> (QuPath class, colour) of written nuclei. Malignant and lymphocyte are QuPath's
#: built-in Tumor and Immune cells, in its colours. QuPath has no class for normal epithelium (its
#: "Other" means anything else, and imports as skipped), so normal is "Normal" in cellnet's overlay
#: green; QuPath adds the class when it reads the file.
CLASS_TO_QUPATH: dict[str, tuple[str, tuple[int, int, int]]] = {
    "malignant": ("Tumor", (200, 0, 0)),
    "lymphocyte": ("Immune cells", (160, 90, 160)),
    "normal": ("Normal", (20, 200, 40)),
}
#: v0.2 stored the object type as a Java class name in ``id``; 0.3 wrote ``tma_core``.
LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tmaCore",
                "PathRootObject": "root", "tma_core": "tmaCore"}
#: Object types that outline regions, never cells: their polygons are skipped on reading (a polygon
#: annotation classed "Tumor" is a tumour region, not one nucleus).
REGION_TYPES = {"annotation", "tile", "tmaCore", "root"}

Geometry = dict
XY = tuple[float, float]


# ----------------------------------------------------------------------------- writing

def point(x: float, y: float) -> Geometry:
    return {"type": "Point", "coordinates": [round(x, 1), round(y, 1)]}


def polygon(ring: Iterable[tuple[float, float]]) -> Geometry:
    """A polygon from its outer ring (closed here when it is open)."""
    ring = [[x, y] for x, y in ring]
    return {"type": "Polygon", "coordinates": [ring if ring[0] == ring[-1] else ring + ring[:1]]}


def new_feature(object_type: str, geometry: Geometry, *, name: str | None = None,
            classification: dict | None = None, measurements: Mapping[str, float] | None = None) -> dict:
    """A QuPath object as a GeoJSON Feature: a fresh UUID, both spellings of the object type."""
    properties: dict = {"objectType": object_type, "object_type": object_type}
    if name is not None:
        properties["name"] = name
    if classification is not None:
        properties["classification"] = classification
    if measurements:
        properties["measurements"] = [{"name": k, "value": float(v)} for k, v in measurements.items()]
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": properties}


def tile_feature(x: float, y: float, width: float, height: float, measurements: Mapping[str, float],
                 name: str | None = None) -> dict:
    """A ``tile`` object over a level-0 box, its per-tile numbers (whatever they are) as measurements.

    Tiles are detections to QuPath, so Measure > Show measurement maps colours them by any of them.
    """
    corners = ((x, y), (x + width, y), (x + width, y + height), (x, y + height))
    return new_feature("tile", polygon(corners), name=name, measurements=measurements)


def classification(cls: str) -> dict:
    """QuPath's classification of a cellnet class (see ``CLASS_TO_QUPATH``)."""
    name, colour = CLASS_TO_QUPATH[cls]
    return {"name": name, "color": list(colour)}


def nucleus_feature(cls: str, geometry: Geometry, measurements: Mapping[str, float] | None = None) -> dict:
    """A nucleus (point or outline) of cellnet class ``cls``: a classified ``detection``."""
    return new_feature("detection", geometry, classification=classification(cls), measurements=measurements)


def feature_collection(features: Iterable[dict]) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


# ----------------------------------------------------------------------------- reading

@dataclass
class Nuclei:
    """What one feature stands for: nucleus points and their class name, or why there are none."""

    points: list[XY] = field(default_factory=list)
    name: str = ""          # QuPath's class name, '' when unclassified ('Tumor: Positive' if derived)
    skipped: str = ""       # why a feature gave no points (a region, another geometry): counted


def features(data) -> list:
    """The features of a FeatureCollection, a single Feature or a bare list of features."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list):
        raise ValueError("not GeoJSON: expected a FeatureCollection, a Feature or a list of features")
    return data


def read_feature(feature: object) -> Nuclei:
    """The nuclei of one feature; ValueError (one line) when it is malformed.

    Points and MultiPoints are nuclei whatever the object type. Polygons stand for one nucleus at
    their area centroid (a cell's ``nucleusGeometry`` when it has one), except annotations, tiles,
    TMA cores and the root, which are regions. Whether a class is a cellnet class is the caller's
    to decide: detection polygons of other classes (or none) are then skipped and counted.
    """
    if not isinstance(feature, dict):
        raise ValueError("not a GeoJSON Feature object")
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict):
        raise ValueError("'properties' is not an object")
    geometry = feature.get("nucleusGeometry") or properties.get("nucleusGeometry") or feature.get("geometry")
    if geometry is None:
        return Nuclei(skipped="features without geometry")
    if not isinstance(geometry, dict):
        raise ValueError("'geometry' is not an object")
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    name = class_name(properties)
    if kind == "Point":
        return Nuclei([_xy(coordinates)], name)
    if kind == "MultiPoint":
        return Nuclei([_xy(c) for c in _listed(coordinates)], name)
    if kind in ("Polygon", "MultiPolygon"):
        qupath_type = object_type(feature)
        if qupath_type in REGION_TYPES:
            return Nuclei(skipped=f"{kind} {qupath_type} objects (regions, not cells)")
        polygons = [coordinates] if kind == "Polygon" else _listed(coordinates)
        return Nuclei([centroid(polygons)], name)
    return Nuclei(skipped=f"{kind} geometries (not points or cells)")


def object_type(feature: dict) -> str:
    """``objectType``, ``object_type`` or ``type`` of the properties, else v0.2's ``id``; '' if none."""
    properties = feature.get("properties") or {}
    for key in ("objectType", "object_type", "type"):
        if properties.get(key):
            value = str(properties[key])
            return LEGACY_TYPES.get(value, value)
    return LEGACY_TYPES.get(str(feature.get("id")), "")


def class_name(properties: dict) -> str:
    """The classification's name (derived classes joined: ``Tumor: Positive``), else ``name``."""
    value = properties.get("classification")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("names"), list):  # 0.5+ derived class
            return ": ".join(str(n) for n in value["names"])
        if value.get("name"):
            parent = value.get("parentClass")  # 0.3 derived class
            own = str(value["name"])
            return f"{class_name({'classification': parent})}: {own}" if isinstance(parent, dict) else own
    return str(properties.get("name") or "")


def centroid(polygons: list) -> XY:
    """Area centroid of polygons with holes (first ring outer); the vertex mean if degenerate."""
    area = moment_x = moment_y = 0.0
    vertices: list[XY] = []
    for rings in polygons:
        for index, ring in enumerate(_listed(rings)):
            xy = [_xy(p) for p in _listed(ring)]
            if index == 0:
                vertices += xy
            signed = sum_x = sum_y = 0.0
            for (x0, y0), (x1, y1) in zip(xy, xy[1:] + xy[:1]):
                cross = x0 * y1 - x1 * y0
                signed += cross / 2
                sum_x += (x0 + x1) * cross
                sum_y += (y0 + y1) * cross
            if signed == 0:
                continue
            weight = math.copysign(1.0, signed) * (1.0 if index == 0 else -1.0)  # holes subtract
            area += weight * signed
            moment_x += weight * sum_x / 6
            moment_y += weight * sum_y / 6
    if abs(area) < 1e-9:
        if not vertices:
            raise ValueError("polygon without vertices")
        return (sum(x for x, _ in vertices) / len(vertices), sum(y for _, y in vertices) / len(vertices))
    return moment_x / area, moment_y / area


def _listed(value) -> list:
    if not isinstance(value, list):
        raise ValueError("malformed coordinates (expected a list)")
    return value


def _xy(position) -> XY:
    if (not isinstance(position, list) or len(position) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in position[:2])):
        raise ValueError(f"malformed position {json.dumps(position)[:40]} (expected [x, y])")
    return float(position[0]), float(position[1])

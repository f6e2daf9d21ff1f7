"""Synthetic BreastPathQ: a procedural, deterministic H&E-like dataset (SPEC 2.4).

Every tile is painted as stain concentrations (hematoxylin ``c_H`` and eosin ``c_E`` per pixel)
and turned into colour with a colour-deconvolution model, ``RGB = I0 * exp(-(c_H*OD_H + c_E*OD_E))``,
so per-slide stain variation is a rotation and scaling of the two optical-density vectors.
The layers, bottom to top: collagen stroma (stretched noise warped along a wavy flow field),
normal ducts (rings of regular nuclei round a lumen), fat and vessels, tumour nests and sheets
(pleomorphic nuclei in pale cytoplasm), lymphocytes and stromal spindle nuclei. A label map records
the class of every painted pixel; the cellularity truth is the malignant (nucleus + cytoplasm) area
fraction of that map. Spindle nuclei are painted but not listed in the cell XML, as BreastPathQ has
no stromal class, so a segmenter has to learn to ignore them.

Randomness: each item draws from ``numpy.random.default_rng([seed, kind, ...item ids])``, so an
item's pixels depend only on the seed and its ids, never on the order of rendering.

Cell regions (``cells/``) are rendered for *training* patients only, with the stain of the
patient's first slide, so a segmenter trained on them never sees validation or test patients; the
case number ``N`` of ``<N>_Region <M>`` is the patient id written in ``patient_ids.csv``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cellnet.data.breastpathq import LABEL_FILES, SPLIT_FOLDERS, region_file_stem, write_key_xml
from cellnet.classes import BACKGROUND, CELL_CLASSES, LYMPHOCYTE, MALIGNANT, NORMAL
from cellnet.errors import CellnetError, bad
from cellnet.data.imageio import read_rgb, write_image
from cellnet.files import atomic_dir, write_text
from cellnet.preprocess import PATCH_SIZE

GENERATOR_VERSION = "1.0"
README_MARKER = "cellnet synthetic BreastPathQ dataset"
SCORE_STEP = 0.05
RATER_SD = 0.05

# Unit optical-density vectors (R, G, B) before per-slide variation, tuned side by side with
# TCGA breast H&E (between Ruifrok's and Macenko's reference vectors).
HEMATOXYLIN_OD = np.array([0.55, 0.76, 0.34], np.float32)
EOSIN_OD = np.array([0.16, 0.82, 0.55], np.float32)

# Item kinds mixed into the random-number keys.
_PLAN, _SLIDE, _PATCH, _REGION, _SCORE = range(5)
_VERTICES = 20
_BANK = 2048
_MAX_H, _MAX_E = 3.6, 1.6  # concentration ranges of the stain look-up table


# ----------------------------------------------------------------------------- stain


@dataclass(frozen=True)
class Stain:
    """How one slide was stained and scanned, and its slide-level tissue traits."""

    od_h: np.ndarray  # unit OD vector of hematoxylin
    od_e: np.ndarray  # unit OD vector of eosin
    h_scale: float
    e_scale: float
    white: np.ndarray  # I0 per channel (illumination, 0..255)
    blur: float  # Gaussian sigma in px (focus)
    jpeg: int  # JPEG quality of the scanner's compression
    inflammation: float  # lymphocyte density factor
    retraction: bool  # white retraction clefts round tumour nests

    def with_jitter(self, rng: np.random.Generator) -> "Stain":
        """Small patch-to-patch drift within one slide (section thickness, focus)."""
        return dataclasses.replace(self, h_scale=self.h_scale * rng.uniform(0.94, 1.06),
                                   e_scale=self.e_scale * rng.uniform(0.92, 1.08),
                                   blur=max(0.4, self.blur + rng.uniform(-0.15, 0.15)))

    @property
    def lut(self) -> np.ndarray:
        """RGB of every quantised (c_H, c_E) pair, uint8 [256*256, 3] (shared by a slide's patches)."""
        return _stain_lut(tuple(self.od_h.tolist()), tuple(self.od_e.tolist()), tuple(self.white.tolist()))


@functools.lru_cache(maxsize=32)
def _stain_lut(od_h: tuple[float, ...], od_e: tuple[float, ...], white: tuple[float, ...]) -> np.ndarray:
    """Beer-Lambert as a look-up table over c_H in [0, _MAX_H] x c_E in [0, _MAX_E]."""
    c_h = np.arange(256, dtype=np.float32)[:, None, None] * (_MAX_H / 255.0)
    c_e = np.arange(256, dtype=np.float32)[None, :, None] * (_MAX_E / 255.0)
    rgb = np.float32(white) * np.exp(-(c_h * np.float32(od_h) + c_e * np.float32(od_e)))
    lut = np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)
    lut.flags.writeable = False
    return lut


def _perturbed_unit(rng: np.random.Generator, vector: np.ndarray, sd: float) -> np.ndarray:
    v = np.clip(vector + rng.normal(0.0, sd, 3).astype(np.float32), 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)


def sample_stain(rng: np.random.Generator) -> Stain:
    """A random slide: perturbed and scaled H and E vectors, illumination, focus, JPEG quality."""
    return Stain(
        od_h=_perturbed_unit(rng, HEMATOXYLIN_OD, 0.05),
        od_e=_perturbed_unit(rng, EOSIN_OD + np.float32([0, 0, rng.uniform(0.0, 0.25)]), 0.03),
        h_scale=float(rng.uniform(0.8, 1.2)),
        e_scale=float(rng.uniform(0.7, 1.2)),
        white=(rng.uniform(236, 252) + rng.uniform(-4, 3, 3)).astype(np.float32),
        blur=float(rng.uniform(0.5, 1.1)),
        jpeg=int(rng.integers(78, 96)),
        inflammation=float(rng.lognormal(0.0, 0.6)),
        retraction=bool(rng.uniform() < 0.3),
    )


# ----------------------------------------------------------------------------- noise fields


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Unit white noise shared by all tiles (fixed); tiles read random windows of it."""
    bank = np.random.default_rng(20190417).standard_normal((_BANK, _BANK), dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _white_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Unit white noise: a random window of the bank (drawing fresh noise costs more than a tile)."""
    if height > _BANK or width > _BANK:
        return rng.standard_normal((height, width), dtype=np.float32)
    top, left = rng.integers(0, _BANK - height + 1), rng.integers(0, _BANK - width + 1)
    return _noise_bank()[top:top + height, left:left + width]


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return xs, ys


def _standardise(values: np.ndarray) -> np.ndarray:
    mean, sd = cv2.meanStdDev(values)
    return (values - np.float32(mean[0, 0])) * np.float32(1.0 / (sd[0, 0] + 1e-6))


def smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Zero-mean, about unit-sd noise with correlation length ~``scale`` px (a blurred coarse grid, upsampled)."""
    step = max(scale / 3.0, 1.0)
    coarse = rng.standard_normal((int(height / step) + 2, int(width / step) + 2), dtype=np.float32)
    coarse = _standardise(cv2.GaussianBlur(coarse, (0, 0), 0.8))
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _stretched_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_along: float,
                     sigma_across: float) -> np.ndarray:
    """Unit noise blurred much more along x than along y: straight fibres."""
    noise = np.ascontiguousarray(_white_noise(rng, *shape))
    return _standardise(cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_along, sigmaY=sigma_across))


# ----------------------------------------------------------------------------- layers


@dataclass
class _Layers:
    """Stain concentrations and bookkeeping painted by the steps of :func:`render_tissue`."""

    height: int
    width: int
    base_h: np.ndarray  # hematoxylin of the tissue between nuclei (stroma, cytoplasm)
    base_e: np.ndarray  # eosin of the same
    fibre_v: np.ndarray  # flow coordinate across the fibres (its level sets are the fibres)
    white: np.ndarray  # uint8 1 = empty space (fat, lumen, vessel, cleft)
    hema: np.ndarray  # nuclear hematoxylin (0 outside nuclei)
    label: np.ndarray  # uint8 class index per pixel (CLASSES order)
    occupied: np.ndarray  # uint8 1 = no room for a new stromal or immune nucleus
    points: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def empty(cls, height: int, width: int) -> "_Layers":
        def plane(dtype) -> np.ndarray:
            return np.zeros((height, width), dtype)

        return cls(height, width, base_h=np.full((height, width), 0.05, np.float32), base_e=plane(np.float32),
                   fibre_v=plane(np.float32), white=plane(np.uint8), hema=plane(np.float32),
                   label=np.full((height, width), BACKGROUND, np.uint8), occupied=plane(np.uint8))

    def inside(self, xy: np.ndarray) -> np.ndarray:
        return (xy[:, 0] >= 0) & (xy[:, 0] < self.width) & (xy[:, 1] >= 0) & (xy[:, 1] < self.height)

    def sample(self, image: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Values of ``image`` at points (clamped to the canvas)."""
        x = np.clip(xy[:, 0].astype(np.int64), 0, self.width - 1)
        y = np.clip(xy[:, 1].astype(np.int64), 0, self.height - 1)
        return image[y, x]

    def fibre_angle(self, xy: np.ndarray) -> np.ndarray:
        """Local fibre direction (degrees) at points: along the level sets of ``fibre_v``."""
        x = np.clip(xy[:, 0].astype(np.int64), 1, self.width - 2)
        y = np.clip(xy[:, 1].astype(np.int64), 1, self.height - 2)
        dx = self.fibre_v[y, x + 1] - self.fibre_v[y, x - 1]
        dy = self.fibre_v[y + 1, x] - self.fibre_v[y - 1, x]
        return np.degrees(np.arctan2(-dx, dy))


def _fixed(xy) -> np.ndarray | tuple[int, int]:
    """Float coordinates -> 1/4-px fixed point for OpenCV drawing with ``shift=2``."""
    if isinstance(xy, np.ndarray):
        return np.round(xy * 4.0).astype(np.int32)
    return tuple(int(round(v * 4.0)) for v in xy)


def _shape_polygons(rng: np.random.Generator, centres: np.ndarray, half_axes: np.ndarray,
                    angles_deg: np.ndarray, irregularity: np.ndarray) -> np.ndarray:
    """Outlines of ellipses bent by random low harmonics (2-4 lobes), float [N, V, 2]."""
    n = len(centres)
    t = np.linspace(0.0, 2.0 * np.pi, _VERTICES, endpoint=False, dtype=np.float32)
    harmonics = np.arange(2, 5, dtype=np.float32)
    amplitude = irregularity[:, None] * rng.normal(0.0, 1.0, (n, 3)).astype(np.float32) / harmonics
    phase = rng.uniform(0, 2 * np.pi, (n, 3)).astype(np.float32)
    radius = 1.0 + np.einsum("nk,nkv->nv", amplitude,
                             np.cos(harmonics[None, :, None] * t[None, None, :] + phase[:, :, None]))
    local_x = half_axes[:, :1] * radius * np.cos(t)
    local_y = half_axes[:, 1:] * radius * np.sin(t)
    theta = np.radians(angles_deg)[:, None]
    x = centres[:, :1] + local_x * np.cos(theta) - local_y * np.sin(theta)
    y = centres[:, 1:] + local_x * np.sin(theta) + local_y * np.cos(theta)
    return np.stack([x, y], axis=-1).astype(np.float32)


def _jittered_grid(rng: np.random.Generator, height: int, width: int, spacing: float,
                   jitter: float, margin: float = 0.0) -> np.ndarray:
    """Staggered grid points (random phase) moved by +-``jitter``*spacing; float [N, 2] (x, y)."""
    xs = np.arange(-margin + rng.uniform(0, spacing), width + margin, spacing, dtype=np.float32)
    ys = np.arange(-margin + rng.uniform(0, spacing), height + margin, spacing * 0.87, dtype=np.float32)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    # Every other row moves half a step: the near-hexagonal packing of cell sheets and fat.
    row = np.arange(len(grid)) // len(xs)
    grid[:, 0] += (row % 2) * spacing / 2
    return grid + rng.uniform(-jitter, jitter, grid.shape).astype(np.float32) * spacing


def _paint_nuclei(layers: _Layers, rng: np.random.Generator, centres: np.ndarray, half_axes: np.ndarray,
                  angles_deg: np.ndarray, irregularity: np.ndarray, rim: np.ndarray, core: np.ndarray,
                  cls: int | None, nucleoli: np.ndarray | None = None) -> None:
    """Nuclei: a rim polygon with an inner core of its own darkness (pale = vesicular).

    ``cls`` None paints unlisted (stromal) nuclei; otherwise centres inside the tile are listed.
    """
    if len(centres) == 0:
        return
    outer = _shape_polygons(rng, centres, half_axes, angles_deg, irregularity)
    inner = centres[:, None, :] + 0.74 * (outer - centres[:, None, :])
    outer_fixed, inner_fixed = _fixed(outer), _fixed(inner)
    label = BACKGROUND if cls is None else cls
    for i in range(len(centres)):
        cv2.fillPoly(layers.hema, [outer_fixed[i]], float(rim[i]), cv2.LINE_8, 2)
        cv2.fillPoly(layers.hema, [inner_fixed[i]], float(core[i]), cv2.LINE_8, 2)
        cv2.fillPoly(layers.label, [outer_fixed[i]], label, cv2.LINE_8, 2)
    if nucleoli is not None and nucleoli.any():
        owner = np.repeat(np.arange(len(centres)), nucleoli)
        spots = _fixed(centres[owner] + rng.normal(0.0, 0.25, (len(owner), 2)) * half_axes[owner].min(axis=1)[:, None])
        radii = (rng.uniform(1.3, 2.2, len(owner)) * 4).astype(int)
        for (x, y), r, i in zip(spots.tolist(), radii.tolist(), owner.tolist()):
            cv2.circle(layers.hema, (x, y), r, float(rim[i] * 1.25), -1, cv2.LINE_8, 2)
    if cls is not None:
        layers.points += [(float(x), float(y), cls) for x, y in centres[layers.inside(centres)]]


def _free_points(layers: _Layers, candidates: np.ndarray, radius: float) -> np.ndarray:
    """Greedily keep candidates whose neighbourhood is free stroma, marking each kept disc occupied."""
    kept = []
    for x, y in candidates:
        ix, iy = int(math.floor(x)), int(math.floor(y))
        if not (0 <= ix < layers.width and 0 <= iy < layers.height):
            continue
        near = (slice(max(iy - 3, 0), iy + 4), slice(max(ix - 3, 0), ix + 4))
        if layers.occupied[near].any() or layers.white[iy, ix]:
            continue
        kept.append((x, y))
        cv2.circle(layers.occupied, (ix, iy), int(radius), 1, -1)
    return np.asarray(kept, np.float32).reshape(-1, 2)


# ----------------------------------------------------------------------------- tissue steps


def _flow(rng: np.random.Generator, height: int, width: int, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along and across the collagen flow (a rotation, a slow bend and a crimp wave)
    on a grid of ``pitch`` px; lengths below are in full-resolution px."""
    xs, ys = _pixel_grid(height, width)
    angle = rng.uniform(0, np.pi)
    along = (xs * math.cos(angle) + ys * math.sin(angle)) * pitch
    across = (-xs * math.sin(angle) + ys * math.cos(angle)) * pitch
    across += rng.uniform(20, 80) * smooth_noise(rng, height, width, rng.uniform(400, 800) / pitch)
    crimp = rng.uniform(1.0, 6.0) * (1 + 0.5 * smooth_noise(rng, height, width, 240 / pitch))
    phase = 2.5 * smooth_noise(rng, height, width, 180 / pitch)
    across += crimp * np.sin(2 * np.pi / rng.uniform(40, 120) * along + phase)
    return along, across


def _paint_stroma(layers: _Layers, rng: np.random.Generator) -> None:
    """Collagen: straight fibre textures sampled along the bent flow, with clefts between bundles."""
    h, w = layers.height, layers.width
    # The flow is smooth: build it at half resolution and upsample.
    along, across = (cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)
                     for f in _flow(rng, (h + 1) // 2, (w + 1) // 2, pitch=2.0))
    layers.fibre_v = across
    # The textures vary slowly along the fibres, so they are stored 4x (fibrils) and 16x
    # (bundles) coarser along them than across.
    u0, v0 = float(along.min()) - 2, float(across.min()) - 2
    span_u, span_v = float(along.max()) - u0 + 3, float(across.max()) - v0 + 3
    fibrils = _stretched_noise(rng, (int(span_v) + 2, int(span_u / 4) + 2),
                               rng.uniform(2.5, 6.0), rng.uniform(0.7, 1.1))
    bundles = _stretched_noise(rng, (int(span_v / 4) + 2, int(span_u / 16) + 2),
                               rng.uniform(0.8, 1.6), rng.uniform(0.8, 2.0))
    map_u, map_v = along - u0, across - v0
    fibrils = cv2.remap(fibrils, map_u * 0.25, map_v, cv2.INTER_LINEAR)
    bundles = cv2.remap(bundles, map_u * 0.0625, map_v * 0.25, cv2.INTER_LINEAR)

    looseness = rng.uniform(0.0, 1.0)
    density = rng.uniform(0.6, 0.9) + 0.1 * bundles + 0.16 * fibrils + 0.08 * smooth_noise(rng, h, w, 80)
    # Clefts where bundle and fibril fields are both low; loose stroma parts more.
    cleft = np.clip((-2.3 + 1.3 * looseness - 0.7 * bundles - fibrils) * 2.5, 0, 1)
    layers.base_e = np.clip(density * (1 - 0.9 * cleft) * (1.0 - 0.3 * looseness), 0.03, 1.2)


def _place_ducts(layers: _Layers, rng: np.random.Generator, count: int) -> list[tuple[float, ...]]:
    """Non-overlapping duct ellipses (cx, cy, lumen a, lumen b, angle)."""
    h, w = layers.height, layers.width
    ducts: list[tuple[float, ...]] = []
    for _ in range(count * 8):
        if len(ducts) == count:
            break
        a = rng.uniform(7, 28)
        b = a * rng.uniform(0.45, 1.0)
        reach = a + 30
        cx, cy = rng.uniform(0.6 * reach, w - 0.6 * reach), rng.uniform(0.6 * reach, h - 0.6 * reach)
        if all(math.hypot(cx - d[0], cy - d[1]) > reach + d[2] + 30 for d in ducts):
            ducts.append((cx, cy, a, b, rng.uniform(0, 180)))
    return ducts


def _paint_duct(layers: _Layers, rng: np.random.Generator, cx: float, cy: float, a: float, b: float,
                angle: float) -> None:
    """A normal duct: white lumen, pink cytoplasm, one or two rings of regular oval nuclei."""
    rows = 1 if rng.uniform() < 0.6 else 2
    thickness = 10.0 + 9.0 * rows
    centre = _fixed((cx, cy))

    def ellipse(image: np.ndarray, grow: float, value: float) -> None:
        axes = _fixed((a + grow, b + grow))
        cv2.ellipse(image, centre, axes, angle, 0, 360, value, -1, cv2.LINE_8, 2)

    ellipse(layers.base_h, thickness, rng.uniform(0.06, 0.12))
    ellipse(layers.base_e, thickness, rng.uniform(0.35, 0.5))
    ellipse(layers.label, thickness, NORMAL)
    ellipse(layers.occupied, thickness + 3, 1)
    ellipse(layers.white, 0, 1)
    ellipse(layers.label, 0, BACKGROUND)
    theta = math.radians(angle)
    for row in range(rows):
        offset = 6.5 + 10.0 * row
        n = max(5, int(math.pi * (a + b + 2 * offset) / rng.uniform(10.5, 13.0)))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        t += rng.normal(0, 0.25 * 2 * np.pi / n, n)
        ex, ey = (a + offset) * np.cos(t), (b + offset) * np.sin(t)
        centres = np.stack([cx + ex * math.cos(theta) - ey * math.sin(theta),
                            cy + ex * math.sin(theta) + ey * math.cos(theta)], axis=1).astype(np.float32)
        radial = np.degrees(np.arctan2((a + offset) * np.sin(t), (b + offset) * np.cos(t))) + angle
        half = np.stack([rng.uniform(6.0, 8.0, n), rng.uniform(4.2, 5.5, n)], axis=1).astype(np.float32)
        value = (rng.uniform(1.0, 1.3, n) * rng.uniform(0.9, 1.1)).astype(np.float32)
        _paint_nuclei(layers, rng, centres, half, radial + rng.normal(0, 12, n),
                      np.full(n, 0.08, np.float32), value * 1.1, value, NORMAL)


def _paint_adipose(layers: _Layers, rng: np.random.Generator, fraction: float) -> None:
    """Fat: packed polygonal white cells with thin septa, filling a blob of the free area."""
    if fraction <= 0:
        return
    h, w = layers.height, layers.width
    region = smooth_noise(rng, h, w, rng.uniform(120, 220))
    region = (region > np.quantile(region[::4, ::4], 1 - fraction)).astype(np.uint8)
    spacing = rng.uniform(50, 110)
    centres = _jittered_grid(rng, h, w, spacing, 0.15, margin=spacing)
    centres = centres[layers.sample(region, centres) > 0]
    radius = spacing * rng.uniform(0.45, 0.5, len(centres)) - rng.uniform(1.0, 3.0)
    free = cv2.distanceTransform((layers.occupied == 0).astype(np.uint8), cv2.DIST_L2, 3)
    room = layers.sample(free, centres) > radius + 4
    centres, radius = centres[room], radius[room].astype(np.float32)
    n = len(centres)
    if n == 0:
        return
    half = np.stack([radius, radius * rng.uniform(0.8, 1.0, n).astype(np.float32)], axis=1)
    polygons = list(_fixed(_shape_polygons(rng, centres, half, rng.uniform(0, 180, n),
                                           np.full(n, 0.25, np.float32))))
    cv2.fillPoly(layers.white, polygons, 1, cv2.LINE_8, 2)
    cv2.fillPoly(layers.occupied, polygons, 1, cv2.LINE_8, 2)


def _paint_vessels(layers: _Layers, rng: np.random.Generator, count: int) -> None:
    """Small empty vessels and tears in the stroma, clear of the ducts and fat."""
    free = cv2.distanceTransform((layers.occupied == 0).astype(np.uint8), cv2.DIST_L2, 3)
    for _ in range(count):
        cx, cy = rng.uniform(0, layers.width), rng.uniform(0, layers.height)
        a = rng.uniform(3, 14)
        axes, angle = _fixed((a, a * rng.uniform(0.3, 0.9))), rng.uniform(0, 180)
        if free[int(cy), int(cx)] <= a + 2:
            continue
        for image in (layers.white, layers.occupied):
            cv2.ellipse(image, _fixed((cx, cy)), axes, angle, 0, 360, 1, -1, cv2.LINE_8, 2)


def _tumour_mask(layers: _Layers, rng: np.random.Generator, burden: float) -> np.ndarray:
    """Nest area covering about ``burden`` of the tile: a thresholded two-scale noise field."""
    h, w = layers.height, layers.width
    if burden <= 0:
        return np.zeros((h, w), np.uint8)
    nests = smooth_noise(rng, h, w, rng.uniform(90, 200)) + 0.3 * smooth_noise(rng, h, w, 35)
    nests[layers.occupied > 0] = -1e3  # ducts and fat keep their place
    threshold = np.quantile(nests[::4, ::4], 1 - burden * 0.88)
    return (nests > threshold).astype(np.uint8)


def _paint_tumour(layers: _Layers, rng: np.random.Generator, nests: np.ndarray, pleomorphism: float,
                  retraction: bool) -> None:
    """Malignant cells: pale cytoplasm sheets with large, irregular, hyperchromatic nuclei."""
    h, w = layers.height, layers.width
    spacing = rng.uniform(27, 36)
    centres = _jittered_grid(rng, h, w, spacing, 0.2, margin=spacing)
    room = cv2.distanceTransform((layers.occupied == 0).astype(np.uint8), cv2.DIST_L2, 3)
    keep = (layers.sample(nests, centres) > 0) & (layers.sample(room, centres) > 0.45 * spacing)
    centres = centres[keep & (rng.uniform(0, 1, len(centres)) > 0.04)]
    n = len(centres)
    if n == 0:
        return
    # Each cell's cytoplasm is a disc holding the cell's number; overlaps give polygonal cells.
    cell = np.zeros((h, w), np.uint16)
    radii = (spacing * rng.uniform(0.72, 0.9, n) * 4).astype(int)
    for (x, y), r, number in zip(_fixed(centres).tolist(), radii.tolist(), range(1, n + 1)):
        cv2.circle(cell, (x, y), r, number, -1, cv2.LINE_8, 2)
    cyto_h = np.r_[0, rng.uniform(0.16, 0.32) * rng.uniform(0.93, 1.07, n)].astype(np.float32)
    cyto_e = np.r_[0, rng.uniform(0.25, 0.45) * rng.uniform(0.93, 1.07, n)].astype(np.float32)
    # Nests get smooth outlines; cells grow round the fat, vessels and ducts, never over them.
    sheet = cv2.compare(cell, 0, cv2.CMP_GT)
    cover = cv2.GaussianBlur(sheet, (0, 0), 4.0)
    inside = ((cover > 127) & (sheet > 0) & (layers.occupied == 0) & (layers.white == 0)).astype(np.uint8)
    cv2.copyTo(np.take(cyto_h, cell), inside, layers.base_h)
    cv2.copyTo(np.take(cyto_e, cell), inside, layers.base_e)
    cross = np.ones((3, 3), np.uint8)
    membrane = (cv2.compare(cv2.dilate(cell, cross), cv2.erode(cell, cross), cv2.CMP_NE) & inside)
    cv2.add(layers.base_e, 0.1, dst=layers.base_e, mask=membrane)
    layers.label[inside > 0] = MALIGNANT
    if retraction:  # shrinkage gaps along part of the nests' outer outlines (not inner gaps)
        ring = cv2.dilate(inside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > inside
        ring &= (cover < 110) & (layers.occupied == 0) & (smooth_noise(rng, h, w, 40) > 0.3)
        layers.white[ring] = 1
    layers.occupied |= inside

    size = np.clip(rng.lognormal(math.log(spacing * 0.39), 0.1 + 0.12 * pleomorphism, n), 7.0, 15.5)
    half = np.stack([size, size / rng.uniform(1.0, 1.2 + 0.4 * pleomorphism, n)], axis=1).astype(np.float32)
    vesicular = rng.uniform(0, 1, n) < rng.uniform(0.2, 0.7)
    rim = (rng.uniform(1.2, 1.8) * rng.uniform(0.85, 1.15, n)).astype(np.float32)
    core = np.where(vesicular, rim * rng.uniform(0.45, 0.7, n), rim * rng.uniform(0.9, 1.05, n)).astype(np.float32)
    nucleoli = np.where(vesicular, rng.integers(1, 3, n), 0)
    irregularity = ((0.12 + 0.25 * pleomorphism) * rng.uniform(0.5, 1.5, n)).astype(np.float32)
    mitotic = rng.uniform(0, 1, n) < 0.03
    rim[mitotic], core[mitotic], irregularity[mitotic], nucleoli[mitotic] = 2.6, 2.6, 0.4, 0
    half[mitotic] *= 0.7
    _paint_nuclei(layers, rng, centres, half, rng.uniform(0, 180, n), irregularity, rim, core,
                  MALIGNANT, nucleoli=nucleoli)


def _paint_lymphocytes(layers: _Layers, rng: np.random.Generator, scattered: int, clusters: int) -> None:
    """Small, very dark round nuclei, scattered in the stroma or in clusters."""
    h, w = layers.height, layers.width
    parts = [np.stack([rng.uniform(0, w, scattered), rng.uniform(0, h, scattered)], axis=1)]
    for _ in range(clusters):
        size = int(rng.integers(15, 70))
        parts.append(rng.uniform([0, 0], [w, h]) + rng.normal(0, rng.uniform(12, 35), (size, 2)))
    centres = _free_points(layers, np.concatenate(parts).astype(np.float32), 6)
    n = len(centres)
    radius = rng.uniform(4.0, 5.5, n)
    half = np.stack([radius, radius * rng.uniform(0.85, 1.0, n)], axis=1).astype(np.float32)
    value = rng.uniform(1.9, 2.4, n).astype(np.float32)
    _paint_nuclei(layers, rng, centres, half, rng.uniform(0, 180, n), np.full(n, 0.05, np.float32),
                  value * 1.05, value, LYMPHOCYTE)


def _paint_spindles(layers: _Layers, rng: np.random.Generator, count: int) -> None:
    """Fibroblast nuclei: thin, elongated, aligned with the collagen; painted but not listed."""
    candidates = np.stack([rng.uniform(0, layers.width, count), rng.uniform(0, layers.height, count)], axis=1)
    centres = _free_points(layers, candidates.astype(np.float32), 7)
    n = len(centres)
    half = np.stack([rng.uniform(7, 11, n), rng.uniform(1.8, 2.8, n)], axis=1).astype(np.float32)
    value = rng.uniform(1.2, 1.7, n).astype(np.float32)
    _paint_nuclei(layers, rng, centres, half, layers.fibre_angle(centres) + rng.normal(0, 8, n),
                  np.full(n, 0.1, np.float32), value * 1.1, value, None)


def _compose(layers: _Layers, rng: np.random.Generator, stain: Stain) -> np.ndarray:
    """Concentrations -> RGB through the stain model, then focus and JPEG artefacts."""
    h, w = layers.height, layers.width
    grain = _standardise(cv2.GaussianBlur(np.ascontiguousarray(_white_noise(rng, h, w)), (0, 0), 1.2))
    conc_h = layers.base_h * (1 + 0.2 * grain)
    conc_e = layers.base_e * (1 + 0.2 * grain)
    # Empty spaces, with a denser eosin rim (fat septa, vessel walls) ...
    septa = cv2.dilate(layers.white, np.ones((3, 3), np.uint8)) - layers.white
    cv2.add(conc_e, 0.18, dst=conc_e, mask=septa)
    empty = np.zeros((h, w), np.float32)
    cv2.copyTo(empty + 0.005, layers.white, conc_h)
    cv2.copyTo(empty + 0.015, layers.white, conc_e)
    # ... under the nuclei, which are always painted whole, with chromatin texture.
    nucleus = cv2.compare(layers.hema, 0.0, cv2.CMP_GT)
    chromatin = _standardise(cv2.GaussianBlur(np.ascontiguousarray(_white_noise(rng, h, w)), (0, 0), 0.7))
    cv2.copyTo(layers.hema * (1 + 0.15 * grain + 0.3 * chromatin), nucleus, conc_h)
    cv2.copyTo(conc_e * 0.15, nucleus, conc_e)
    index = (cv2.convertScaleAbs(conc_h, alpha=stain.h_scale * 255.0 / _MAX_H).astype(np.uint16) << 8) | \
        cv2.convertScaleAbs(conc_e, alpha=stain.e_scale * 255.0 / _MAX_E)
    rgb = cv2.GaussianBlur(np.take(stain.lut, index, axis=0), (0, 0), stain.blur)
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, stain.jpeg])
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- one tissue tile


@dataclass
class Tissue:
    """A rendered tile: pixels, per-pixel classes and the listed nucleus centres."""

    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # uint8 [H, W] index into CLASSES
    points: np.ndarray  # float32 [K, 2] (x, y) nucleus centres of the three cell classes
    point_labels: np.ndarray  # int32 [K] index into CLASSES

    @property
    def truth(self) -> float:
        """Cellularity: malignant (nucleus + cytoplasm) area fraction of the label map."""
        return float(np.count_nonzero(self.label == MALIGNANT)) / self.label.size


def render_tissue(rng: np.random.Generator, height: int, width: int, burden: float, stain: Stain,
                  pleomorphism: float = 0.5, ducts: int | None = None,
                  lymphocyte_clusters: int | None = None) -> Tissue:
    """Paint one H&E-like tile whose malignant area is roughly ``burden`` (0..1) of the tile.

    ``ducts`` / ``lymphocyte_clusters`` force those counts (cell regions need every class).
    """
    layers = _Layers.empty(height, width)
    area = height * width / PATCH_SIZE ** 2
    _paint_stroma(layers, rng)
    if ducts is None:
        ducts = int(rng.poisson(1.2 * (1 - burden) * area))
    for duct in _place_ducts(layers, rng, ducts):
        _paint_duct(layers, rng, *duct)
    fat = rng.uniform(0.1, 0.6) if rng.uniform() < 0.05 + 0.25 * (1 - burden) else 0.0
    _paint_adipose(layers, rng, fat * (1 - burden))
    _paint_vessels(layers, rng, int(rng.poisson(4 * area)))
    _paint_tumour(layers, rng, _tumour_mask(layers, rng, burden), pleomorphism, stain.retraction)
    if lymphocyte_clusters is None:
        lymphocyte_clusters = int(rng.poisson(0.5 * stain.inflammation * area))
    stroma_share = 1.0 - float(np.count_nonzero(layers.occupied)) / layers.occupied.size
    _paint_lymphocytes(layers, rng, int(rng.poisson(35 * stain.inflammation * stroma_share * area)),
                       lymphocyte_clusters)
    _paint_spindles(layers, rng, int(rng.poisson(rng.uniform(40, 110) * stroma_share * area)))
    image = _compose(layers, rng, stain)
    points = np.asarray([p[:2] for p in layers.points], np.float32).reshape(-1, 2)
    labels = np.asarray([p[2] for p in layers.points], np.int32)
    return Tissue(image, layers.label, points, labels)


# ----------------------------------------------------------------------------- dataset plan


@dataclass(frozen=True)
class PatientPlan:
    """One synthetic patient: split, tumour burden, slides and patches per slide."""

    index: int
    patient_id: str  # also the case number N of the patient's cell regions
    split: str  # key of SPLIT_FOLDERS
    burden: float  # mean tumour burden of the patient's patches
    pleomorphism: float
    slides: tuple[str, ...]
    patches_per_slide: tuple[int, ...]


def _patient_burden(rng: np.random.Generator) -> float:
    """Like the paper's Figure 6: ~35% of patients near zero, the rest spread over the range."""
    if rng.uniform() < 0.35:
        return float(rng.uniform(0.0, 0.1))
    return float(rng.uniform(0.1, 1.0))


def _patch_burden(rng: np.random.Generator, mean: float) -> float:
    """A patch's burden scatters round its patient's; low-burden patients have tumour-free patches."""
    if mean < 0.1 and rng.uniform() < 0.5:
        return 0.0
    burden = float(rng.normal(mean, 0.15))
    return min(burden, 1.0) if burden >= 0.02 else 0.0


def plan_patients(patients: int, seed: int, small: bool) -> list[PatientPlan]:
    """Patients, their split (about 70/15/15, at least one each), slides and patch counts."""
    rng = np.random.default_rng([seed, _PLAN])
    held_out = max(1, round(0.15 * patients))
    rank = np.empty(patients, int)
    rank[rng.permutation(patients)] = np.arange(patients)
    plan, next_slide = [], 1001
    for index in range(patients):
        prng = np.random.default_rng([seed, _PLAN, index])
        n_slides = int(prng.integers(1, 4))
        counts = tuple(int(c) for c in (prng.integers(4, 9, n_slides) if small else prng.integers(6, 14, n_slides)))
        split = "test" if rank[index] < held_out else "validation" if rank[index] < 2 * held_out else "train"
        plan.append(PatientPlan(index, str(101 + index), split, _patient_burden(prng), float(prng.uniform(0.2, 1.0)),
                             tuple(str(next_slide + k) for k in range(n_slides)), counts))
        next_slide += n_slides
    return plan


def _slide_stain(seed: int, patient: PatientPlan, slide_index: int) -> Stain:
    return sample_stain(np.random.default_rng([seed, _SLIDE, patient.index, slide_index]))


def render_patch(seed: int, patient: PatientPlan, slide_index: int, rid: int) -> Tissue:
    """One 512x512 cellularity patch of a patient's slide."""
    rng = np.random.default_rng([seed, _PATCH, patient.index, slide_index, rid])
    burden = _patch_burden(rng, patient.burden)
    stain = _slide_stain(seed, patient, slide_index).with_jitter(rng)
    return render_tissue(rng, PATCH_SIZE, PATCH_SIZE, burden, stain, patient.pleomorphism)


def render_region(seed: int, patient: PatientPlan, number: int) -> Tissue:
    """A cell-annotation region (450-520 px, not square) holding all three annotated classes."""
    stain = _slide_stain(seed, patient, 0)
    for attempt in range(8):
        rng = np.random.default_rng([seed, _REGION, patient.index, number, attempt])
        height = int(rng.integers(450, 521))
        width = int(np.clip(height + rng.integers(-30, 31), 450, 520))
        tissue = render_tissue(rng, height, width, float(rng.uniform(0.15, 0.6)), stain.with_jitter(rng),
                               patient.pleomorphism, ducts=int(rng.integers(1, 3)),
                               lymphocyte_clusters=int(rng.integers(1, 3)))
        if len(np.unique(tissue.point_labels)) == len(CELL_CLASSES):
            return tissue
    raise RuntimeError(f"region {patient.patient_id}/{number}: no attempt held all three cell classes")


def rater_score(truth: float, rng: np.random.Generator) -> float:
    """A pathologist's score: truth + noise (sd RATER_SD, cut at 2 sd), rounded to SCORE_STEP, in [0, 1]."""
    noise = float(np.clip(rng.normal(0.0, RATER_SD), -2 * RATER_SD, 2 * RATER_SD))
    return round(round(min(max(truth + noise, 0.0), 1.0) / SCORE_STEP) * SCORE_STEP, 2)


# ----------------------------------------------------------------------------- writing


def _check_free(out: Path) -> None:
    """Refuse a file or a non-empty folder: even a previous synth output may hold the user's edits."""
    if out.exists() and not out.is_dir():
        raise bad(out, "exists and is not a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise bad(parent, f"is a file, not a folder (in the way of {out})")
    if out.is_dir() and any(out.iterdir()):
        raise bad(out, "exists and is not empty; synth never writes over a folder "
                       "(choose a new or empty --out)")


def _readme(seed: int, patients: int, small: bool) -> str:
    return f"""{README_MARKER}
generator: cellnet.data.synth version {GENERATOR_VERSION}; seed {seed}; patients {patients}; small {small}

SYNTHETIC DATA: every image here is painted procedurally (no real tissue, no patient data).
Layout of the BreastPathQ challenge (SPEC 2.1):
  train/ validation/ test_patches/   <slide>_<rid>.tif, 512x512 RGB, about 20x (0.5 um/px)
  train_labels.csv val_labels.csv test_labels.csv   slide,rid,y,truth
      truth = exact malignant (nucleus + cytoplasm) area fraction of the rendered label map
      y     = truth + rater noise (sd {RATER_SD}, cut at 2 sd), rounded to {SCORE_STEP}, clipped to [0, 1]
  patient_ids.csv                    patient_id,slide (no patient is in two split folders)
  cells/<N>_Region <M>_crop.tif + _key.xml   cell regions with every normal, lymphocyte and
      malignant nucleus centre; N is the patient id; regions come from training patients only.
      Stromal spindle nuclei are painted but not annotated (BreastPathQ has no stromal class).
  preview.png                        contact sheet of patches (y / truth) and one annotated region
The same seed and version give byte-identical files.
"""


def _format_rows(rows: list[tuple[str, int, float, float]]) -> str:
    return "slide,rid,y,truth\n" + "".join(f"{s},{r},{y:.2f},{t:.6f}\n" for s, r, y, t in rows)


_POINT_COLOURS = {NORMAL: (0, 170, 0), LYMPHOCYTE: (0, 90, 255), MALIGNANT: (255, 200, 0)}


def _preview(out: Path, rows: list[tuple[Path, float, float]],
             region: tuple[Path, np.ndarray, np.ndarray] | None) -> None:
    """Contact sheet: 12 patches spread over the truth range with y / truth, and one annotated region."""
    tile, columns = 256, 4
    rows = sorted(rows, key=lambda row: row[2])
    chosen = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, min(12, len(rows))).round().astype(int)))]
    sheet_h = tile * 3
    sheet = np.full((sheet_h, tile * columns + 16 + 540, 3), 255, np.uint8)
    for k, (path, y, truth) in enumerate(chosen):
        thumb = cv2.resize(read_rgb(path), (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.rectangle(thumb, (0, 0), (tile, 22), (255, 255, 255), -1)
        cv2.putText(thumb, f"{path.stem}  y={y:.2f} t={truth:.2f}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        top, left = (k // columns) * tile, (k % columns) * tile
        sheet[top:top + tile, left:left + tile] = thumb
    if region is not None:
        path, points, labels = region
        image = read_rgb(path)
        for (x, y), label in zip(points, labels):
            cv2.circle(image, (int(round(x)), int(round(y))), 5, _POINT_COLOURS[int(label)], 2, cv2.LINE_AA)
        image = image[: sheet_h - 60, :540]
        left = tile * columns + 16
        sheet[60:60 + image.shape[0], left:left + image.shape[1]] = image
        cv2.putText(sheet, path.stem, (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for k, cls in enumerate((NORMAL, LYMPHOCYTE, MALIGNANT)):
            cv2.circle(sheet, (left + 8 + 150 * k, 42), 5, _POINT_COLOURS[cls], 2, cv2.LINE_AA)
            cv2.putText(sheet, CELL_CLASSES[cls], (left + 18 + 150 * k, 47), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 0, 0), 1, cv2.LINE_AA)
    write_image(out / "preview.png", sheet)


def synthesize(out: str | os.PathLike, patients: int | None = None, seed: int = 0, small: bool = False,
               progress: bool = True) -> dict:
    """Write a complete synthetic BreastPathQ-layout dataset under ``out``; returns a summary.

    ``patients`` defaults to 24 (about 450 patches and 60 regions), or 8 with ``small`` (about 100
    patches, 24 regions, fewer patches per slide); an explicit number overrides either. ``out`` must
    be new or empty; the files appear under it only once all are written.
    """
    started = time.perf_counter()
    n_patients = patients if patients is not None else (8 if small else 24)
    if n_patients < 3:
        raise CellnetError(f"--patients: need at least 3 (one each for train, validation and test), got {n_patients}")
    if seed < 0:
        raise CellnetError(f"--seed: must be >= 0, got {seed}")
    final = Path(out)
    _check_free(final)
    with atomic_dir(final) as out:  # an interrupted synth leaves nothing under the final name
        write_text(out / "README.txt", _readme(seed, n_patients, small))
        plan = plan_patients(n_patients, seed, small)
        train = [p for p in plan if p.split == "train"]
        n_regions = 3 * n_patients if small else round(2.5 * n_patients)
        regions = [(train[k % len(train)], k // len(train) + 1) for k in range(n_regions)]
        n_patches = sum(sum(p.patches_per_slide) for p in plan)

        rows: dict[str, list[tuple[str, int, float, float]]] = {split: [] for split in SPLIT_FOLDERS}
        written: list[tuple[Path, float, float]] = []
        points = dict.fromkeys(CELL_CLASSES, 0)
        first_region = None
        with tqdm(total=n_patches + n_regions, desc="cellnet synth", unit="image", disable=not progress) as bar:
            for patient in plan:
                for slide_index, (slide, count) in enumerate(zip(patient.slides, patient.patches_per_slide)):
                    for rid in range(1, count + 1):
                        tissue = render_patch(seed, patient, slide_index, rid)
                        path = out / SPLIT_FOLDERS[patient.split] / f"{slide}_{rid}.tif"
                        write_image(path, tissue.image)
                        score_rng = np.random.default_rng([seed, _SCORE, patient.index, slide_index, rid])
                        y = rater_score(tissue.truth, score_rng)
                        rows[patient.split].append((slide, rid, y, tissue.truth))
                        written.append((path, y, tissue.truth))
                        bar.update()
            for patient, number in regions:
                tissue = render_region(seed, patient, number)
                stem = region_file_stem(patient.patient_id, number)
                write_image(out / "cells" / f"{stem}_crop.tif", tissue.image)
                write_key_xml(out / "cells" / f"{stem}_key.xml", tissue.points, tissue.point_labels)
                for index, cls in enumerate(CELL_CLASSES):
                    points[cls] += int(np.count_nonzero(tissue.point_labels == index))
                if first_region is None:
                    first_region = (out / "cells" / f"{stem}_crop.tif", tissue.points, tissue.point_labels)
                bar.update()

        for split, name in LABEL_FILES.items():
            write_text(out / name, _format_rows(rows[split]))
        write_text(out / "patient_ids.csv",
                   "patient_id,slide\n" + "".join(f"{p.patient_id},{s}\n" for p in plan for s in p.slides))
        _preview(out, written, first_region)
    seconds = time.perf_counter() - started
    return {
        "out": str(final), "seed": seed, "patients": n_patients, "small": small, "version": GENERATOR_VERSION,
        "splits": {split: {"patients": sum(p.split == split for p in plan),
                           "slides": sum(len(p.slides) for p in plan if p.split == split),
                           "patches": len(rows[split])} for split in SPLIT_FOLDERS},
        "patches": n_patches, "regions": n_regions, "points": points,
        "seconds": round(seconds, 2), "patches_per_second": round((n_patches + n_regions) / seconds, 1),
    }

"""Report figures: agreement plots, GBT feature importance and mask overlays (paper Figs 4, 5, 7, 10).

Figures are built on the Agg canvas directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``),
never through ``pyplot``: no display is needed, no global backend is switched for the caller, and
no figure outlives the function that drew it. Every PNG is written to ``<path>.tmp.png`` and
renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from cellnet.classes import LYMPHOCYTE, MALIGNANT, NORMAL
from cellnet.errors import CellnetError
from cellnet.files import atomic_path, writing

#: Overlay colour (RGB) of each cell channel, as in the paper's Fig. 3.
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    MALIGNANT: (230, 25, 25),
    NORMAL: (20, 200, 40),
    LYMPHOCYTE: (30, 90, 255),
}
_MALIGNANT_COLOUR = np.array(CLASS_COLOURS[MALIGNANT], dtype=np.float64)


# -------------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> None:
    """Write ``figure`` as PNG atomically (``cellnet.files``)."""
    try:
        with writing(path), atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        figure.clear()


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CellnetError(f"image: expected uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _fit(maps: np.ndarray, image: np.ndarray, what: str) -> np.ndarray:
    """Float32 copy of ``maps`` ([h, w] or [h, w, c]) resized to the image, e.g. from a half-size output."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim not in (2, 3):
        raise CellnetError(f"{what}: expected [H, W] or [H, W, C], got shape {maps.shape}")
    height, width = image.shape[:2]
    if maps.shape[:2] != (height, width):
        resized = cv2.resize(maps, (width, height), interpolation=cv2.INTER_LINEAR)
        maps = resized.reshape(height, width, *maps.shape[2:])
    return maps


def _malignant(maps: np.ndarray, image: np.ndarray, what: str) -> np.ndarray:
    """The malignant channel of a 4-channel map, or a single-channel map as it is."""
    maps = _fit(maps, image, what)
    return maps[..., MALIGNANT] if maps.ndim == 3 else maps


def _tint(image: np.ndarray, weight: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend ``colour`` into the float ``image`` with per-pixel ``weight`` in [0, 1]."""
    weight = np.clip(weight, 0.0, 1.0)[..., None]
    return image * (1.0 - weight) + colour * weight


def _show(axes, image: np.ndarray, title: str) -> None:
    axes.imshow(image)
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()


def _scores(y_true: Sequence[float] | np.ndarray,
            y_pred: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != p.shape or y.size == 0:
        raise CellnetError(f"cellularity scores: {y.size} true values but {p.size} predictions")
    return y, p


# ------------------------------------------------------------------------ agreement plots


def scatter(y_true: Sequence[float] | np.ndarray, y_pred: Sequence[float] | np.ndarray,
            path: str | os.PathLike, title: str = "") -> None:
    """Predicted against true cellularity, with the identity line and the MSE in the legend."""
    y, p = _scores(y_true, y_pred)
    figure = _new_figure(5, 5)
    axes = figure.add_subplot()
    axes.scatter(y, p, s=8, alpha=0.5, color="tab:blue",
                 label=f"patches (n={y.size}), MSE {np.mean((y - p) ** 2):.4f}")
    axes.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--", label="identity")
    axes.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="true cellularity",
             ylabel="predicted cellularity", title=title, aspect="equal")
    axes.legend(loc="upper left", fontsize=8)
    _save(figure, path)


def bland_altman(y_true: Sequence[float] | np.ndarray, y_pred: Sequence[float] | np.ndarray,
                 path: str | os.PathLike, title: str = "") -> None:
    """Bland-Altman plot: prediction - truth against their mean, bias and 95% limits of agreement."""
    y, p = _scores(y_true, y_pred)
    difference = p - y
    bias = difference.mean()
    sd = difference.std(ddof=1) if y.size > 1 else 0.0
    figure = _new_figure(6, 4)
    axes = figure.add_subplot()
    axes.scatter((y + p) / 2, difference, s=8, alpha=0.5, color="tab:blue")
    axes.axhline(bias, color="black", linewidth=1, label=f"mean difference {bias:+.3f}")
    for sign in (-1, 1):
        axes.axhline(bias + sign * 1.96 * sd, color="tab:red", linewidth=1, linestyle="--",
                     label=f"mean {'+' if sign > 0 else '-'} 1.96 SD ({bias + sign * 1.96 * sd:+.3f})")
    axes.set(xlabel="mean of true and predicted cellularity",
             ylabel="predicted - true cellularity", title=title)
    axes.legend(loc="best", fontsize=8)
    _save(figure, path)


def feature_importance(df: pd.DataFrame, path: str | os.PathLike, top: int = 20) -> None:
    """Horizontal bars of the ``top`` features by total gain, largest on top (paper Fig. 10)."""
    missing = {"feature", "total_gain"} - set(df.columns)
    if missing:
        raise CellnetError(f"feature importance table: missing columns {sorted(missing)}")
    if df.empty or top < 1:
        raise CellnetError(f"feature importance table: nothing to plot ({len(df)} rows, top={top})")
    best = df.nlargest(top, "total_gain").iloc[::-1]
    figure = _new_figure(7, 0.3 * len(best) + 1.2)
    axes = figure.add_subplot()
    axes.barh(best["feature"].astype(str), best["total_gain"], color="tab:blue")
    axes.set(xlabel="total gain", title=f"GBT top {len(best)} features")
    axes.tick_params(axis="y", labelsize=8)
    _save(figure, path)


# ------------------------------------------------------------------------------- overlays


def overlay_rgb(image_rgb_uint8: np.ndarray, maps4: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Colour the three cell channels over the image: malignant red, normal green, lymphocyte blue.

    Each pixel takes the colour of its strongest cell channel, blended in proportionally to that
    channel's activation (so soft maps fade in and binary masks give a flat tint); background is
    not drawn. Maps of another size (e.g. a half-resolution output) are resized to the image.
    """
    image = _rgb(image_rgb_uint8)
    maps = _fit(maps4, image, "segmentation maps")
    if maps.ndim != 3 or maps.shape[2] < 3:
        raise CellnetError(f"segmentation maps: expected [H, W, 4] channels, got shape {maps.shape}")
    cells = maps[..., :3]
    strongest = cells.argmax(axis=2)
    palette = np.array([CLASS_COLOURS[c] for c in range(3)], dtype=np.float64)
    weight = alpha * np.clip(cells.max(axis=2), 0.0, 1.0)[..., None]
    blended = image * (1.0 - weight) + palette[strongest] * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def threshold_overlays(image_rgb_uint8: np.ndarray, malignant_map: np.ndarray,
                       path: str | os.PathLike,
                       thresholds: Sequence[float] = (0.02, 0.08, 0.24, 0.5)) -> None:
    """One panel per threshold: the malignant map above it, tinted over the image (paper Fig. 4).

    ``malignant_map`` is [H, W] or a 4-channel [H, W, 4] map (its malignant channel is used).
    """
    image = _rgb(image_rgb_uint8)
    activation = _malignant(malignant_map, image, "malignant map")
    figure = _new_figure(3 * len(thresholds), 3.3)
    for i, threshold in enumerate(thresholds):
        tinted = _tint(image.astype(np.float64), 0.6 * (activation > threshold), _MALIGNANT_COLOUR)
        _show(figure.add_subplot(1, len(thresholds), i + 1), tinted.astype(np.uint8),
              f"({chr(ord('a') + i)}) > {threshold:g}")
    _save(figure, path)


def _draw_blobs(axes, blobs: np.ndarray) -> None:
    """Circles of radius sigma * sqrt(2) (the LoG scale of a disc) at (y, x, sigma) rows."""
    for y, x, sigma in np.asarray(blobs, dtype=np.float64).reshape(-1, 3):
        axes.add_patch(Circle((x, y), sigma * np.sqrt(2.0), fill=False, color="yellow",
                              linewidth=1))


def blob_overlay(image_rgb_uint8: np.ndarray, blobs: np.ndarray, path: str | os.PathLike,
                 title: str = "") -> None:
    """Detected nuclei as circles over the image (paper Figs 5 and 7d).

    ``blobs``: [k, 3] rows of (y, x, sigma) in image pixels, as skimage's ``blob_log`` returns.
    """
    image = _rgb(image_rgb_uint8)
    figure = _new_figure(5, 5)
    axes = figure.add_subplot()
    _show(axes, image, title or f"{len(np.asarray(blobs).reshape(-1, 3))} blobs")
    _draw_blobs(axes, blobs)
    _save(figure, path)


def mask_panel(image_rgb_uint8: np.ndarray, true_mask: np.ndarray, pred_map: np.ndarray,
               path: str | os.PathLike, blobs: np.ndarray | None = None) -> None:
    """Paper Fig. 7 for the malignant channel: original | ground truth | activation map | blobs.

    ``true_mask`` and ``pred_map`` are [H, W, 4] (or [H, W] malignant-only) and may be at another
    resolution than the image; the blob panel is drawn only when ``blobs`` ((y, x, sigma) rows in
    image pixels) is given.
    """
    image = _rgb(image_rgb_uint8)
    truth = _malignant(true_mask, image, "ground-truth mask")
    activation = _malignant(pred_map, image, "activation map")
    panels = 3 if blobs is None else 4
    figure = _new_figure(3 * panels, 3.3)
    _show(figure.add_subplot(1, panels, 1), image, "(a) original")
    tinted = _tint(image.astype(np.float64), 0.6 * (truth > 0.5), _MALIGNANT_COLOUR)
    _show(figure.add_subplot(1, panels, 2), tinted.astype(np.uint8), "(b) ground truth")
    axes = figure.add_subplot(1, panels, 3)
    axes.imshow(np.clip(activation, 0.0, 1.0), cmap="magma", vmin=0.0, vmax=1.0)
    axes.set_title("(c) activation map", fontsize=9)
    axes.set_axis_off()
    if blobs is not None:
        axes = figure.add_subplot(1, panels, 4)
        _show(axes, image, "(d) nuclei blobs")
        _draw_blobs(axes, blobs)
    _save(figure, path)

"""Report plots: every function writes a readable PNG atomically; overlays colour the right pixels."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cellnet.evaluation import plots
from cellnet.classes import BACKGROUND, LYMPHOCYTE, MALIGNANT, NORMAL
from cellnet.errors import CellnetError

SIZE = 48


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(120, 230, size=(SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def maps() -> np.ndarray:
    """Half-resolution 4-channel maps: a soft malignant blob, a normal and a lymphocyte corner."""
    half = SIZE // 2
    yy, xx = np.mgrid[:half, :half]
    maps = np.zeros((half, half, 4), dtype=np.float32)
    maps[..., MALIGNANT] = np.exp(-((yy - 12) ** 2 + (xx - 12) ** 2) / 20.0)
    maps[:4, :4, NORMAL] = 1.0
    maps[-4:, -4:, LYMPHOCYTE] = 1.0
    maps[..., BACKGROUND] = 1.0 - maps[..., :3].max(axis=2)
    return maps


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    picture = cv2.imread(str(path))
    assert picture is not None and picture.ndim == 3 and min(picture.shape[:2]) > 50
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .tmp.png left


def test_scatter_and_bland_altman(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.random(40)
    p = np.clip(y + rng.normal(0, 0.1, 40), 0, 1)
    plots.scatter(y, p, tmp_path / "a" / "scatter.png", title="test")
    assert_png(tmp_path / "a" / "scatter.png")
    plots.bland_altman(y, p, tmp_path / "b" / "bland_altman.png")
    assert_png(tmp_path / "b" / "bland_altman.png")
    with pytest.raises(CellnetError, match="cellularity scores"):
        plots.scatter(y, p[:-1], tmp_path / "c.png")


def test_feature_importance(tmp_path):
    df = pd.DataFrame({"feature": [f"malignant_area_{i}" for i in range(30)],
                       "total_gain": np.linspace(1, 30, 30)})
    plots.feature_importance(df, tmp_path / "importance.png", top=12)
    assert_png(tmp_path / "importance.png")
    with pytest.raises(CellnetError, match="total_gain"):
        plots.feature_importance(df.rename(columns={"total_gain": "gain"}), tmp_path / "x.png")


def test_threshold_and_blob_figures(tmp_path, image, maps):
    plots.threshold_overlays(image, maps[..., MALIGNANT], tmp_path / "t" / "thresholds.png")
    assert_png(tmp_path / "t" / "thresholds.png")
    blobs = np.array([[24.0, 24.0, 3.0], [8.0, 40.0, 2.0]])
    plots.blob_overlay(image, blobs, tmp_path / "b" / "blobs.png")
    assert_png(tmp_path / "b" / "blobs.png")
    truth = (maps > 0.5).astype(np.float32)
    plots.mask_panel(image, truth, maps, tmp_path / "m" / "panel.png", blobs=blobs)
    assert_png(tmp_path / "m" / "panel.png")
    plots.mask_panel(image, truth, maps, tmp_path / "n" / "panel.png")
    assert_png(tmp_path / "n" / "panel.png")
    with pytest.raises(CellnetError, match="image"):
        plots.blob_overlay(image.astype(np.float32), blobs, tmp_path / "x.png")


def test_overlay_colours_each_cell_class(image, maps):
    full = cv2.resize(maps, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
    full[20:28, 20:28, MALIGNANT] = 1.0
    out = plots.overlay_rgb(image, full, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    # Expected blend computed independently at pixels where one channel is fully on.
    for (row, col), channel in (((1, 1), NORMAL), ((SIZE - 2, SIZE - 2), LYMPHOCYTE),
                                ((24, 24), MALIGNANT)):
        colour = np.array(plots.CLASS_COLOURS[channel], dtype=np.float64)
        expected = np.rint(0.5 * image[row, col] + 0.5 * colour)
        assert np.abs(out[row, col].astype(int) - expected).max() <= 1
    # Far from every cell the image is untouched (background is not drawn).
    assert np.array_equal(out[SIZE - 2, 2], image[SIZE - 2, 2])
    assert np.array_equal(plots.overlay_rgb(image, np.zeros((SIZE, SIZE, 4))), image)


def test_overlay_resizes_smaller_maps_to_the_image(image, maps):
    resized = cv2.resize(maps, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(plots.overlay_rgb(image, maps), plots.overlay_rgb(image, resized))
    with pytest.raises(CellnetError, match="segmentation maps"):
        plots.overlay_rgb(image, maps[..., 0])

"""The 81 GBT features in TF ops against an independent NumPy / scikit-image reference."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy import ndimage as ndi
from skimage.feature import blob_log

from cellnet.errors import CellnetError
from cellnet.models.features import FEATURE_NAMES, extract_features, feature_frame

# The paper's numbers (section 3.3), written out here rather than imported.
AREA_T = (0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.5)
BLOB_T = (0.02, 0.04, 0.08, 0.16, 0.24, 0.5)
CHANNELS = ("normal", "lymphocyte", "malignant")


def find_blobs(plane: np.ndarray, t: float, prune: bool = False) -> np.ndarray:
    """(K, 2) integer blob centres: skimage's LoG detector with sigma 1..4 (the sea-lion call).

    Without ``prune`` skimage's overlap pruning is off (overlap=1 never triggers), which is the
    definition cellnet implements.
    """
    blobs = blob_log(plane, min_sigma=1, max_sigma=4, num_sigma=4, threshold=t,
                     overlap=0.5 if prune else 1.0)
    return blobs[:, :2].astype(int)


def reference_features(maps: np.ndarray) -> np.ndarray:
    """(N, H, W, >=3) -> (N, 81), in plain NumPy + skimage, one map and channel at a time."""
    rows = []
    for image in maps:
        row = []
        for c in range(3):
            plane = image[..., c].astype(np.float32)
            wide = plane.astype(np.float64)
            row.append(wide.sum())
            for t in AREA_T:
                row += [np.count_nonzero(plane > t), wide[plane > t].sum()]
            for t in BLOB_T:
                centres = find_blobs(plane, t)
                row += [len(centres), wide[centres[:, 0], centres[:, 1]].sum()]
        rows.append(row)
    return np.asarray(rows)


BLOB_COUNT = np.array(["_blobs@" in n for n in FEATURE_NAMES])
BLOB_SUM = np.array(["_blob_activation@" in n for n in FEATURE_NAMES])


def assert_matches_reference(got: np.ndarray, maps: np.ndarray) -> None:
    """Areas and sums to float tolerance; blob counts within float32-rounding slack.

    TF convolves in float32 while SciPy accumulates in float64 (responses differ by ~1e-7), so
    a scale-space point within 1e-7 of a neighbour or of t may flip: allow 1 blob per map,
    channel and threshold, and 1% overall. The centre sums may differ by the flipped blobs'
    values only.
    """
    want = reference_features(maps)
    plain = ~(BLOB_COUNT | BLOB_SUM)
    np.testing.assert_allclose(got[:, plain], want[:, plain], rtol=1e-5, atol=1e-3)
    count_diff = np.abs(got[:, BLOB_COUNT] - want[:, BLOB_COUNT])
    assert count_diff.max() <= 1
    assert count_diff.sum() <= 0.01 * want[:, BLOB_COUNT].sum() + 1
    slack = count_diff * maps[..., :3].max() + 1e-5 * np.abs(want[:, BLOB_SUM]) + 1e-4
    assert np.all(np.abs(got[:, BLOB_SUM] - want[:, BLOB_SUM]) <= slack)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndi.gaussian_filter(rng.random(shape), sigma=(0, sigma, sigma, 0))
    lo, hi = noise.min(axis=(1, 2), keepdims=True), noise.max(axis=(1, 2), keepdims=True)
    return ((noise - lo) / (hi - lo)).astype(np.float32)


def disc_plane(rng: np.random.Generator, size: int, heights: list[float]):
    """Blurred discs of diameter 7 px at well separated random centres; returns plane, centres."""
    plane = np.zeros((size, size), np.float32)
    centres: list[tuple[int, int]] = []
    while len(centres) < len(heights):
        y, x = (int(v) for v in rng.integers(8, size - 8, 2))
        if all(np.hypot(y - cy, x - cx) >= 14 for cy, cx in centres):
            centres.append((y, x))
    for (y, x), h in zip(centres, heights):
        cv2.circle(plane, (x, y), 3, float(h), thickness=-1)
    return cv2.GaussianBlur(plane, (0, 0), 1.0), centres


def test_feature_names():
    assert len(FEATURE_NAMES) == 81 == len(set(FEATURE_NAMES))
    expected = []
    for c in CHANNELS:
        expected.append(f"{c}_activation_total")
        for t in AREA_T:
            expected += [f"{c}_area@{t}", f"{c}_activation@{t}"]
        for t in BLOB_T:
            expected += [f"{c}_blobs@{t}", f"{c}_blob_activation@{t}"]
    assert list(FEATURE_NAMES) == expected
    assert FEATURE_NAMES.index("malignant_area@0.24") == 2 * 27 + 1 + 2 * 4
    assert "lymphocyte_blobs@0.02" in FEATURE_NAMES and "normal_activation@0.5" in FEATURE_NAMES


def test_random_maps_match_reference():
    rng = np.random.default_rng(0)
    # Non-square maps catch a swapped H / W; white noise and smooth noise give many and few blobs.
    maps = np.concatenate([rng.random((1, 40, 52, 4)), smooth_noise(rng, (2, 40, 52, 4), 2.0)])
    maps = maps.astype(np.float32)
    got = extract_features(maps).numpy()
    assert got.shape == (3, 81) and got.dtype == np.float32
    assert got[:, BLOB_COUNT].sum() > 100  # the blob step is really exercised
    assert_matches_reference(got, maps)


def test_background_channel_is_ignored():
    rng = np.random.default_rng(1)
    maps = rng.random((2, 32, 32, 4)).astype(np.float32)
    other = maps.copy()
    other[..., 3] = rng.random((2, 32, 32))
    np.testing.assert_array_equal(extract_features(maps).numpy(),
                                  extract_features(other).numpy())
    np.testing.assert_array_equal(extract_features(maps[..., :3]).numpy(),
                                  extract_features(maps).numpy())


def test_disc_maps_count_one_blob_per_disc():
    """Tall discs (height 1) and faint ones (0.25) in different numbers per channel.

    A blurred disc of diameter 7 has a scale-normalised LoG peak of about 0.58 x its height,
    so faint discs respond ~0.15: counted up to t=0.08, not at 0.16 / 0.24, although their map
    value (~0.25) is above those thresholds — the threshold applies to the LoG response.
    """
    rng = np.random.default_rng(2)
    size = 96
    maps = np.zeros((1, size, size, 4), np.float32)
    discs = {}
    for c, (tall, faint) in enumerate([(3, 2), (5, 4), (8, 3)]):
        maps[0, :, :, c], centres = disc_plane(rng, size, [1.0] * tall + [0.25] * faint)
        discs[c] = (centres[:tall], centres)
    got = extract_features(maps).numpy()[0]
    for c, name in enumerate(CHANNELS):
        plane = maps[0, :, :, c]
        for t in BLOB_T:
            count = got[FEATURE_NAMES.index(f"{name}_blobs@{t}")]
            centre_sum = got[FEATURE_NAMES.index(f"{name}_blob_activation@{t}")]
            assert count == len(find_blobs(plane, t)) == len(find_blobs(plane, t, prune=True))
            if t <= 0.24:
                expected = discs[c][1] if t <= 0.08 else discs[c][0]
                assert count == len(expected)
                assert centre_sum == pytest.approx(sum(plane[y, x] for y, x in expected),
                                                   rel=1e-5)
    assert_matches_reference(got[np.newaxis], maps)


def test_unknown_shapes_inside_tf_function():
    rng = np.random.default_rng(3)
    fn = tf.function(extract_features,
                     input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    for shape in [(3, 36, 44, 4), (1, 20, 17, 4)]:
        maps = smooth_noise(rng, shape, 1.5)
        got = fn(tf.constant(maps)).numpy()
        assert got.shape == (shape[0], 81)
        singles = np.concatenate([extract_features(m[np.newaxis]).numpy() for m in maps])
        np.testing.assert_allclose(got, singles, rtol=1e-6, atol=1e-4)
        assert_matches_reference(got, maps)
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("shape", [(1, 16, 16, 4), (2, 16, 23, 3), (1, 33, 17, 4)])
def test_smallest_and_odd_maps_match_reference(shape):
    """16 px (the widest kernel's radius, the least the mirror padding allows), odd and
    non-square sizes, a batch of one; white noise puts peaks on every border row and column."""
    maps = np.random.default_rng(4).random(shape).astype(np.float32)
    got = extract_features(maps).numpy()
    assert got[:, BLOB_COUNT].sum() > 20
    assert_matches_reference(got, maps)


def test_blobs_on_borders_and_corners():
    """Impulses at corners and edges: each blob is found where it sits, exactly as skimage
    counts it. The last two maps have one at the end of a row and one at the start of the next,
    neighbours in memory but not in the image; the taller must not hide the other."""
    size = 24
    spots = [{(0, 0): 1.0}, {(0, size - 1): 1.0}, {(size - 1, 0): 1.0},
             {(size - 1, size - 1): 1.0}, {(0, 11): 1.0}, {(size - 1, 7): 1.0}, {(9, 0): 1.0},
             {(14, size - 1): 1.0}, {(12, 12): 1.0},
             {(5, size - 1): 1.0, (6, 0): 0.5}, {(5, size - 1): 0.5, (6, 0): 1.0}]
    maps = np.zeros((len(spots), size, size, 3), np.float32)
    for i, heights in enumerate(spots):
        for (y, x), height in heights.items():
            maps[i, y, x] = height
    got = extract_features(maps).numpy()
    for i, heights in enumerate(spots):
        for t in BLOB_T:
            count = got[i, FEATURE_NAMES.index(f"normal_blobs@{t}")]
            assert count == len(find_blobs(maps[i, :, :, 0], t))
        # one blob per spot at the lowest threshold, centred on it
        assert got[i, FEATURE_NAMES.index("normal_blobs@0.02")] == len(heights)
        assert got[i, FEATURE_NAMES.index("normal_blob_activation@0.02")] == sum(heights.values())
    assert_matches_reference(got, maps)


@pytest.mark.parametrize("shape", [(2, 32, 32, 5), (32, 32, 4), (1, 8, 32, 4)])
def test_bad_shapes_raise(shape):
    with pytest.raises(CellnetError, match="segmentation maps"):
        extract_features(np.zeros(shape, np.float32))


def test_feature_frame():
    values = np.arange(2 * 81, dtype=np.float32).reshape(2, 81)
    frame = feature_frame(values)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(FEATURE_NAMES)
    assert frame["normal_area@0.02"].tolist() == [1.0, 82.0]
    with pytest.raises(CellnetError, match="features"):
        feature_frame(values[:, :80])


def test_empty_batch_gives_no_rows():
    assert extract_features(np.zeros((0, 40, 33, 4), np.float32)).shape == (0, 81)


def test_area_thresholds_are_strict_at_their_float32_values():
    """A pixel exactly at t is not above t; the next float32 up is (the level count's edges)."""
    at = np.float32(AREA_T)
    above = np.nextafter(at, np.float32(np.inf))
    values = np.concatenate([at, above, [np.float32(0), np.float32(1)]])
    maps = np.zeros((1, 32, 32, 4), np.float32)
    maps[0, 0, :values.size, 1] = values  # lymphocyte channel, one row
    got = extract_features(maps).numpy()[0]
    for t in AREA_T:
        want = np.count_nonzero(values > np.float32(t))
        assert got[FEATURE_NAMES.index(f"lymphocyte_area@{t}")] == want
        np.testing.assert_allclose(got[FEATURE_NAMES.index(f"lymphocyte_activation@{t}")],
                                   values[values > np.float32(t)].astype(np.float64).sum(), rtol=1e-6)

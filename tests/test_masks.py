import numpy as np

from cellnet.classes import BACKGROUND, CLASSES
from cellnet.data.masks import points_to_mask


def test_discs_are_where_the_points_are():
    points = np.array([[100.0, 60.0], [300.0, 200.0], [40.0, 400.0]], np.float32)
    labels = np.array([CLASSES.index("malignant"), CLASSES.index("lymphocyte"), CLASSES.index("normal")])
    mask = points_to_mask(points, labels, (480, 500), diameter=15)
    assert mask.shape == (240, 250, 4) and mask.dtype == np.uint8
    for (x, y), label in zip(points, labels):
        cx, cy = int(x // 2), int(y // 2)
        assert mask[cy, cx, label] == 1 and mask[cy, cx, BACKGROUND] == 0
        # a disc of diameter 15: inside at radius 6, outside at radius 9
        assert mask[cy, cx + 6, label] == 1 and mask[cy + 6, cx, label] == 1
        assert mask[cy, cx + 9, label] == 0 and mask[cy + 9, cx, label] == 0
        area = mask[max(cy - 12, 0):cy + 12, max(cx - 12, 0):cx + 12, label].sum()
        assert abs(area - np.pi * 7.5 ** 2) < 0.15 * np.pi * 7.5 ** 2
    # every pixel is a cell or background, and the three discs are the only cells
    assert np.all(mask[..., :3].max(-1) + mask[..., BACKGROUND] == 1)
    assert mask[..., :3].sum() < 3 * 200


def test_diameter_is_configurable_and_empty_points_give_all_background():
    small = points_to_mask(np.array([[50.0, 50.0]]), np.array([2]), (100, 100), diameter=5)
    large = points_to_mask(np.array([[50.0, 50.0]]), np.array([2]), (100, 100), diameter=25)
    assert small[..., 2].sum() < large[..., 2].sum()
    empty = points_to_mask(np.zeros((0, 2)), np.zeros(0, int), (64, 64))
    assert empty[..., BACKGROUND].all() and not empty[..., :3].any()

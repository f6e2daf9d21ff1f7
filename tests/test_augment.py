import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.data.augment import BatchAugment, StainAugment, _gaussian_blur, _hed_jitter


def _blocky_batch(n=6, size=64, seed=0):
    """Images of 8x8 blocks; the 'mask' is a function of the pixels (red > 0.5)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0.05, 0.95, (n, size // 8, size // 8, 3)).astype(np.float32)
    images = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)
    masks = (images[..., :1] > 0.5).astype(np.float32)
    return tf.constant(images), tf.constant(masks)


def test_geometric_augmentation_keeps_image_and_mask_aligned():
    images, masks = _blocky_batch()
    augment = BatchAugment(seed=3)
    batch = tf.shape(images)[0]
    moved_images, moved_masks = augment.geometric(images, masks, batch)
    recomputed = (moved_images.numpy()[..., :1] > 0.5).astype(np.float32)
    # bilinear vs nearest resampling may disagree only on block edges
    assert np.mean(recomputed != moved_masks.numpy()) < 0.03
    assert not np.allclose(moved_images.numpy(), images.numpy())  # something moved


def test_full_augmentation_changes_colour_but_keeps_range_and_mask_values():
    images, masks = _blocky_batch(seed=1)
    out, out_masks = BatchAugment(seed=0)(images, masks, training=True)
    assert out.shape == images.shape and out_masks.shape == masks.shape
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0 + 1e-6
    assert set(np.unique(out_masks.numpy())) <= {0.0, 1.0}


def test_rot90_and_flip_variants_are_all_drawn():
    x = tf.reshape(tf.range(16, dtype=tf.float32), [1, 4, 4, 1])
    batch = tf.tile(x, [64, 1, 1, 1])
    augment = BatchAugment(max_rotation=0.0, seed=1)
    out, _ = augment.geometric(batch, None, tf.shape(batch)[0])
    variants = {tuple(o.numpy().ravel()) for o in out}
    assert len(variants) == 8  # the dihedral group of the square


def test_inference_is_identity():
    images, masks = _blocky_batch()
    out, out_masks = BatchAugment()(images, masks, training=False)
    assert np.array_equal(out.numpy(), images.numpy()) and np.array_equal(out_masks.numpy(), masks.numpy())


def test_runs_inside_tf_function():
    augment = BatchAugment(seed=0)
    fn = tf.function(lambda x: augment(x, training=True))
    out = fn(tf.random.uniform([3, 32, 32, 3]))
    assert out.shape == (3, 32, 32, 3)


def test_rotation_matches_tensorflows_projective_transform():
    """Our XLA-compatible rotation against TF's own ImageProjectiveTransformV3 (same convention)."""
    from cellnet.data.augment import _rotate

    rng = np.random.default_rng(0)
    smooth = tf.image.resize(tf.constant(rng.uniform(size=(2, 8, 8, 3)), tf.float32), [48, 48])
    angle = tf.constant([0.2, -0.15])
    ours = _rotate(smooth, angle, "BILINEAR").numpy()
    cos, sin, c = np.cos(angle.numpy()), np.sin(angle.numpy()), 23.5
    transforms = np.stack([cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c,
                           0 * cos, 0 * cos], axis=1).astype(np.float32)
    reference = tf.raw_ops.ImageProjectiveTransformV3(
        images=smooth, transforms=transforms, output_shape=[48, 48], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT").numpy()
    inner = (slice(None), slice(8, 40), slice(8, 40))  # away from the reflected borders
    assert np.abs(ours[inner] - reference[inner]).max() < 1e-4


# ----------------------------------------------------------------------------- stain augmentation

STRONG = StainAugment(hed_scale=0.5, hed_shift=0.5, brightness=0.5, contrast=0.5, blur_sigma=2.0,
                      blur_prob=1.0, noise=0.3)
ONE_OP = {"hed_scale": {"hed_scale": 0.05}, "hed_shift": {"hed_shift": 0.05},
          "brightness": {"brightness": 0.1}, "contrast": {"contrast": 0.1},
          "blur": {"blur_sigma": 1.0, "blur_prob": 1.0}, "noise": {"noise": 0.02}}


def _he_like(n=2, size=16, seed=0):
    """H&E-like colours: Beer-Lambert mixtures of positive H, E and a little DAB (skimage's vectors)."""
    from skimage.color import rgb_from_hed

    rng = np.random.default_rng(seed)
    stains = rng.uniform([0.1, 0.1, 0.0], [0.8, 0.8, 0.05], (n, size, size, 3))
    return np.exp(-stains @ rgb_from_hed).astype(np.float32)


def test_stain_ops_off_reproduce_the_previous_augmentation():
    """Seed 11, two calls: the values the augmentation gave before the stain ops existed."""
    rng = np.random.default_rng(0)
    blocks = rng.uniform(0.05, 0.95, (3, 4, 4, 3)).astype(np.float32)
    images = tf.constant(np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2))
    masks = tf.cast(images[..., :1] > 0.5, tf.float32)
    expected = [  # per example: channel sums, mask sum, pixel (5, 7)
        ([[550.24, 538.03, 495.68], [478.97, 546.99, 508.83], [449.72, 572.77, 424.05]], [640, 383, 573],
         [[0.8182, 0.3172, 0.5279], [0.7965, 0.9195, 0.8714], [0.4035, 0.7499, 0.5499]]),
        ([[484.38, 443.74, 421.55], [554.32, 602.12, 585.81], [431.17, 518.31, 366.77]], [642, 378, 556],
         [[0.599, 0.3649, 0.2253], [0.5218, 0.5463, 0.7427], [0.0, 0.7736, 0.5611]]),
    ]
    default, explicit_off = BatchAugment(seed=11), BatchAugment(seed=11, **StainAugment.off().as_kwargs())
    for sums, mask_sums, pixels in expected:
        out, out_masks = default(images, masks, training=True)
        again, again_masks = explicit_off(images, masks, training=True)
        assert np.array_equal(out.numpy(), again.numpy()) and np.array_equal(out_masks.numpy(), again_masks.numpy())
        np.testing.assert_allclose(out.numpy().sum(axis=(1, 2)), sums, atol=0.02)
        np.testing.assert_array_equal(out_masks.numpy().sum(axis=(1, 2, 3)), mask_sums)
        np.testing.assert_allclose(out.numpy()[:, 5, 7], pixels, atol=1e-4)


def test_hed_jitter_with_unit_scale_and_no_shift_is_the_identity():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)
    images[0, 0, 0], images[0, 0, 1] = 0.0, 1.0  # black and white survive the OD round trip too
    out = _hed_jitter(tf.constant(images), tf.ones([3, 3]), tf.zeros([3, 3]))
    assert np.abs(out.numpy() - images).max() < 1e-4


def test_hed_shift_of_haematoxylin_moves_only_the_haematoxylin_channel():
    """skimage's colour deconvolution, an independent reference, sees H rise and E, DAB stay."""
    from skimage.color import rgb2hed

    images = _he_like()
    out = _hed_jitter(tf.constant(images), tf.ones([2, 3]), tf.constant([[0.1, 0.0, 0.0]] * 2)).numpy()
    change = rgb2hed(out.astype(np.float64)) - rgb2hed(images.astype(np.float64))
    dh = change[..., 0]
    assert dh.min() > 0  # more haematoxylin everywhere
    assert np.abs(change[..., 1:]).max() < 0.05 * dh.mean()


@pytest.mark.parametrize("op", sorted(ONE_OP))
def test_stain_parameters_are_drawn_per_example(op):
    images = tf.tile(_blocky_batch(n=1, size=32)[0], [4, 1, 1, 1])
    out = BatchAugment(seed=2, **ONE_OP[op]).stain(images, 4).numpy()
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(out[i] - out[j]).max() > 1e-4, (op, i, j)
    assert np.abs(out - images.numpy()).max() > 1e-3  # the op did something


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_stain_ops_keep_unit_range_and_float32(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        images, masks = _blocky_batch(n=4, size=32, seed=4)
        images = tf.concat([tf.zeros_like(images[:1]), tf.ones_like(images[:1]), images[2:]], axis=0)
        augment = BatchAugment(seed=0, **STRONG.as_kwargs())
        for x in (images, tf.cast(images, tf.float16)) if policy != "float32" else (images,):
            out, out_masks = augment(x, masks, training=True)
            assert out.dtype == tf.float32
            assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
            assert set(np.unique(out_masks.numpy())) <= {0.0, 1.0}
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_stain_ops_leave_masks_alone_and_geometry_moves_both():
    rng = np.random.default_rng(5)
    bright = rng.uniform(size=(4, 8, 8, 1)) < 0.5
    grey = np.repeat(np.repeat(np.where(bright, 0.8, 0.2), 8, axis=1), 8, axis=2)
    images = tf.constant(np.repeat(grey, 3, axis=3).astype(np.float32))
    masks = tf.cast(images[..., :1] > 0.5, tf.float32)
    plain_images, plain_masks = BatchAugment(seed=9)(images, masks, training=True)
    stained, stained_masks = BatchAugment(seed=9, **StainAugment().as_kwargs())(images, masks, training=True)
    # the same geometric draws (they come first), so the same masks; only the images differ
    assert np.array_equal(stained_masks.numpy(), plain_masks.numpy())
    assert not np.array_equal(stained_masks.numpy(), masks.numpy())  # they moved
    assert np.abs(stained.numpy() - plain_images.numpy()).max() > 1e-3
    recomputed = (stained.numpy().mean(axis=-1, keepdims=True) > 0.5).astype(np.float32)
    assert np.mean(recomputed != stained_masks.numpy()) < 0.05  # only block edges may disagree


def test_blur_matches_scipy_and_reduces_high_frequency_energy():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
    ours = _gaussian_blur(tf.constant(images[:2]), tf.constant([1.0, 0.0]), radius=3).numpy()
    reference = gaussian_filter(images[0], sigma=(1.0, 1.0, 0.0), mode="reflect", truncate=3.0)
    assert np.abs(ours[0] - reference).max() < 1e-5
    assert np.abs(ours[1] - images[1]).max() < 1e-6  # sigma 0: unchanged

    def energy(x):
        return np.mean(np.diff(x, axis=1) ** 2, axis=(1, 2, 3)) + np.mean(np.diff(x, axis=2) ** 2, axis=(1, 2, 3))

    out = BatchAugment(seed=1, blur_sigma=1.5, blur_prob=1.0).stain(tf.constant(images), 8).numpy()
    assert np.all(energy(out) <= energy(images) + 1e-7)
    assert np.mean(energy(out) / energy(images)) < 0.6


def test_blur_probability_leaves_the_rest_unblurred():
    images = tf.constant(np.random.default_rng(0).uniform(size=(64, 8, 8, 3)).astype(np.float32))
    out = BatchAugment(seed=0, blur_sigma=1.0, blur_prob=0.3).stain(images, 64).numpy()
    unchanged = np.abs(out - images.numpy()).max(axis=(1, 2, 3)) < 1e-6
    assert 0.5 < unchanged.mean() < 0.9  # about 70 % untouched


def test_noise_std_follows_its_drawn_range():
    images = tf.fill([64, 16, 16, 3], 0.5)  # far enough from 0 and 1 that clipping never bites
    out = BatchAugment(seed=3, noise=0.1).stain(images, 64).numpy()
    std = (out - 0.5).reshape(64, -1).std(axis=1)
    assert std.max() < 0.11 and std.max() > 0.08 and std.min() < 0.02  # spread over U(0, 0.1)
    assert 0.04 < std.mean() < 0.06


def test_stain_settings_in_config_and_old_configs_mean_off():
    augment = BatchAugment(seed=1, **StainAugment().as_kwargs())
    config = augment.get_config()
    assert {k: config[k] for k in StainAugment().as_kwargs()} == StainAugment().as_kwargs()
    assert BatchAugment.from_config(config).stain_settings == StainAugment()
    old = {k: v for k, v in config.items() if k not in StainAugment().as_kwargs()}
    assert BatchAugment.from_config(old).stain_settings == StainAugment.off()


@pytest.mark.parametrize("bad", [{"hed_scale": -0.1}, {"hed_scale": 1.0}, {"contrast": 1.5},
                                 {"blur_prob": 1.2}, {"noise": float("nan")}])
def test_stain_settings_refuse_out_of_range_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        StainAugment(**bad)


def test_stain_ops_compile_with_xla():
    augment = BatchAugment(seed=0, **StainAugment().as_kwargs())
    images, masks = _blocky_batch(n=2, size=32)
    out, out_masks = tf.function(lambda x, m: augment(x, m, training=True), jit_compile=True)(images, masks)
    assert out.shape == images.shape and out_masks.shape == masks.shape
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0

import numpy as np
import tensorflow as tf

from cellnet.data.augment import BatchAugment


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

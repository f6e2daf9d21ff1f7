"""Test-time augmentation as graph ops: the dihedral group D4 on NHWC tensors.

Every element is ``g(x) = T^t(R_a(x))``: reverse the axes ``a`` (rows, columns or both), then
transpose H and W when ``t``. Both steps are involutions, so ``g^-1(y) = R_a(T^t(y))``. The
eight (t, a) pairs are the eight symmetries of the square: identity, the two flips, the three
rotations and the two diagonal reflections.

Averaging ``g^-1(f(g(x)))`` over a whole group makes any per-pixel model ``f`` exactly equivariant
(and any per-image score invariant) under that group: an input transformed by ``h`` only reorders
the terms of the mean. That holds for the full D4, not for a subset such as ``flips`` (identity
and left-right flip), which is equivariant under the left-right flip only.

The authors' released inference also averaged gamma and HSV variants; those change colours, not
geometry, and are not used here (a stain-normalised or stain-augmented model is the cellnet way to
colour robustness, and colour variants have no inverse to apply to masks).
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from cellnet.choices import TTA_MODES
from cellnet.errors import CellnetError

@dataclass(frozen=True)
class Symmetry:
    """``x -> transpose^t(reverse_axes(x))`` on [N, H, W, C]; ``axes`` are 1 (rows) and/or 2 (columns)."""

    axes: tuple[int, ...] = ()
    transpose: bool = False

    @property
    def name(self) -> str:
        if not self.axes and not self.transpose:
            return "identity"
        flips = {(): "", (1,): "flip_ud", (2,): "flip_lr", (1, 2): "rot180"}[self.axes]
        return "+".join(part for part in (flips, "transpose" if self.transpose else "") if part)

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        if self.axes:
            x = tf.reverse(x, axis=list(self.axes))
        return tf.transpose(x, [0, 2, 1, 3]) if self.transpose else x

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        if self.transpose:
            y = tf.transpose(y, [0, 2, 1, 3])
        return tf.reverse(y, axis=list(self.axes)) if self.axes else y


D4: tuple[Symmetry, ...] = tuple(Symmetry(axes, transpose) for transpose in (False, True)
                                 for axes in ((), (2,), (1,), (1, 2)))
#: ``--tta`` mode -> its variants (1, 2 and 8), identity first.
GROUPS: dict[str, tuple[Symmetry, ...]] = dict(zip(TTA_MODES, (D4[:1], D4[:2], D4)))


def symmetries(mode: str) -> tuple[Symmetry, ...]:
    """The variants of a ``--tta`` mode, identity first."""
    if mode not in GROUPS:
        raise CellnetError(f"--tta {mode!r}: expected one of {', '.join(GROUPS)}")
    return GROUPS[mode]


def same_shape_groups(variants: tuple[Symmetry, ...]) -> list[tuple[Symmetry, ...]]:
    """Variants split by whether they transpose: within a group all outputs share one shape,
    so a group runs as one batch even for non-square images."""
    groups = [tuple(v for v in variants if v.transpose is t) for t in (False, True)]
    return [g for g in groups if g]

"""Test-time augmentation and ensembles as graph ops, shared by the export and ``evaluate``.

``Averaged(members, tta)`` maps model-input images ([-1, 1], working resolution) to the outputs a
cellnet export serves (SPEC 6 names): each member's raw outputs on every variant, masks mapped
back through the inverse transform, averaged over variants, then over members by weight.

The variants are the dihedral group D4 on NHWC tensors.

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

import keras
import tensorflow as tf

from cellnet.choices import TTA_MODES
from cellnet.errors import CellnetError
from cellnet.models.cellularity import clip_score, decode_bins
from cellnet.preprocess import pad_to_multiple

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


# ----------------------------------------------------------------------------- averaging

def output_heads(model: keras.Model, kind: str) -> keras.Model:
    """A Keras model from [-1, 1] images to the kind's raw outputs, as a dict.

    Cascade and GBT models expose their inner segmenter's maps too; they are taken from the
    node where the outer model calls its segmenter, so the segmenter runs once per request.
    """
    if kind in ("cascade", "gbt"):
        return keras.Model(model.inputs, {"cellularity": model.outputs[0],
                                          "masks": model.segmenter_maps}, name=f"{kind}_heads")
    key = {"segmentation": "masks", "regression": "cellularity", "classification": "class_probs"}[kind]
    return keras.Model(model.inputs, {key: model.outputs[0]}, name=f"{kind}_heads")


@dataclass(frozen=True)
class Member:
    """One model of an export: a single run, or one run of an ensemble with its weight."""

    model: keras.Model
    kind: str
    weight: float = 1.0


def _variant_outputs(heads: keras.Model, kind: str, x: tf.Tensor,
                     variants: tuple[Symmetry, ...]) -> list[dict[str, tf.Tensor]]:
    """The raw outputs of ``heads`` on every variant of ``x``, masks mapped back to x's frame.

    Variants of one shape run as one batch; a segmenter's input is padded to a multiple of 32
    per group and its maps cropped back before the inverse transform.
    """
    outputs = []
    for group in same_shape_groups(variants):
        batch = tf.concat([v.forward(x) for v in group], axis=0) if len(group) > 1 else group[0].forward(x)
        if kind == "segmentation":
            batch, size = pad_to_multiple(batch)
        raw = {k: tf.cast(v, tf.float32) for k, v in heads(batch, training=False).items()}
        if kind == "segmentation":
            raw["masks"] = raw["masks"][:, :size[0], :size[1], :]
        parts = {k: tf.split(v, len(group), axis=0) if len(group) > 1 else [v] for k, v in raw.items()}
        for i, variant in enumerate(group):
            out = {k: parts[k][i] for k in raw}
            if "masks" in out:
                out["masks"] = variant.inverse(out["masks"])
            outputs.append(out)
    return outputs


def _mean(tensors: list[tf.Tensor]) -> tf.Tensor:
    return tensors[0] if len(tensors) == 1 else tf.add_n(tensors) / float(len(tensors))


def _member_summary(variants: list[dict[str, tf.Tensor]], kind: str) -> dict[str, tf.Tensor]:
    """A member's TTA means, and (cellularity models) its clipped score per variant as ``scores``."""
    summary = {}
    if "masks" in variants[0]:
        summary["masks"] = _mean([v["masks"] for v in variants])
    if kind == "segmentation":
        return summary
    if kind == "classification":
        summary["class_probs"] = _mean([v["class_probs"] for v in variants])
        scores = [clip_score(decode_bins(v["class_probs"])["cellularity"]) for v in variants]
    else:
        scores = [clip_score(v["cellularity"][:, 0]) for v in variants]
    summary["scores"] = tf.stack(scores, axis=0)  # (variants, N)
    summary["cellularity"] = tf.reduce_mean(summary["scores"], axis=0)
    return summary


def _combine(summaries: list[dict[str, tf.Tensor]], weights: list[float], spread: bool) -> dict[str, tf.Tensor]:
    """Weighted ensemble of member summaries: the served outputs (SPEC 6 names, see module doc)."""
    outputs = {}
    with_masks = [(s["masks"], w) for s, w in zip(summaries, weights) if "masks" in s]
    if with_masks:
        total = sum(w for _, w in with_masks)
        outputs["masks"] = tf.add_n([m * (w / total) for m, w in with_masks]) if len(with_masks) > 1 \
            else with_masks[0][0]
    if "cellularity" not in summaries[0]:
        return outputs
    outputs["cellularity"] = tf.add_n([s["cellularity"] * w for s, w in zip(summaries, weights)]) \
        if len(summaries) > 1 else summaries[0]["cellularity"]
    if all("class_probs" in s for s in summaries):
        probs = tf.add_n([s["class_probs"] * w for s, w in zip(summaries, weights)]) \
            if len(summaries) > 1 else summaries[0]["class_probs"]
        decoded = decode_bins(probs)
        outputs["class_probs"] = probs
        outputs["interval"] = tf.stack([decoded["low"], decoded["high"]], axis=-1)
    if spread:  # weighted std over every (member, variant) score
        squares = [tf.reduce_mean(tf.square(s["scores"] - outputs["cellularity"]), axis=0) * w
                   for s, w in zip(summaries, weights)]
        outputs["cellularity_std"] = tf.sqrt(tf.add_n(squares))
    if len(summaries) > 1:
        for i, s in enumerate(summaries):
            outputs[member_output(i)] = s["cellularity"]
    return outputs


def member_output(index: int) -> str:
    """Name of an ensemble member's own (TTA-averaged) cellularity output."""
    return f"member{index}_cellularity"


class Averaged:
    """Model-input images -> the outputs of ``members`` averaged over the ``tta`` variants.

    Weights are normalised to sum to 1. A segmenter's input is padded to a multiple of 32 (and
    its maps cropped back), so it takes any size. ``cellularity_std`` (the spread over members
    and variants) is an output when there is more than one of either.

    Args:
        members: the models, their kinds (``cellnet.serving.export.KINDS``) and weights.
        tta: ``none``, ``flips`` (x2) or ``d4`` (x8).

    Example:
        >>> averaged = Averaged([Member(model, "regression")], tta="d4")  # doctest: +SKIP
        >>> averaged(images)["cellularity_std"]  # doctest: +SKIP
    """

    def __init__(self, members: list[Member], tta: str = "none"):
        self.members = list(members)
        self.variants = symmetries(tta)
        self.heads = [output_heads(m.model, m.kind) for m in self.members]
        total = sum(m.weight for m in self.members)
        self.weights = [m.weight / total for m in self.members]
        self.spread = len(self.members) * len(self.variants) > 1

    @property
    def kind(self) -> str:
        return self.members[0].kind if len(self.members) == 1 else "ensemble"

    def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        summaries = [_member_summary(_variant_outputs(h, m.kind, x, self.variants), m.kind)
                     for h, m in zip(self.heads, self.members)]
        return _combine(summaries, self.weights, self.spread)

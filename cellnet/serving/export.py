"""SavedModel export for TF Serving (SPEC 6): ``saved_models/<name>/<version>/``.

Every run kind exports to the same contract, so one server serves all four methods:

- ``serving_default``: ``images`` uint8 RGB ``[N, H, W, 3]`` at FULL resolution. The x2 area
  downsampling and the scaling to [-1, 1] run inside the graph (``cellnet.preprocess``, the very
  functions training uses), so a served model sees what the trained one saw.
- ``serving_bytes``: ``image_bytes`` string ``[N]`` of encoded PNG or JPEG files (REST clients send
  them as ``{"b64": ...}``), decoded to RGB in the graph, then as above.

Named outputs by kind (float32):

==============  ====================================================================
segmentation    ``masks`` [N, ceil(H/2), ceil(W/2), 4] (working resolution)
regression      ``cellularity`` [N]
classification  ``cellularity`` [N], ``class_probs`` [N, 101], ``interval`` [N, 2] (80%)
cascade, gbt    ``cellularity`` [N] and their segmenter's ``masks``
==============  ====================================================================

``cellularity`` is always clipped to [0, 1] (``cellnet.models.cellularity.clip_score``): a
linear regression head and the GBT's tree sums can leave it; the trained models' raw outputs
(what their losses saw) are not changed.

Cellularity models take patches of the training size only (512x512 at full resolution); any
other size fails inside the graph with a message saying so. Segmenters take any size: the input
is padded to a multiple of 32 and the maps are cropped back.

The run's ``run.json`` travels in ``assets/cellnet.json`` with the export's own facts (kind,
outputs, patch size), so ``cellnet predict`` and ``cellnet slide`` know what they load.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import keras
import tensorflow as tf

from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_dir, writing
from cellnet.models import decode_bins
from cellnet.models.cellularity import clip_score
from cellnet.preprocess import DOWNSAMPLE, IMAGES_SPEC, PATCH_SIZE, full_res_to_model_input, pad_to_multiple

KINDS: tuple[str, ...] = ("segmentation", "regression", "classification", "cascade", "gbt")
#: Kinds that output a cellularity score (and need patches of the training size).
CELLULARITY_KINDS: tuple[str, ...] = ("regression", "classification", "cascade", "gbt")
OUTPUTS: dict[str, tuple[str, ...]] = {
    "segmentation": ("masks",),
    "regression": ("cellularity",),
    "classification": ("cellularity", "class_probs", "interval"),
    "cascade": ("cellularity", "masks"),
    "gbt": ("cellularity", "masks"),
}
IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
METADATA_FILE = "cellnet.json"

BYTES_SPEC = tf.TensorSpec([None], tf.string, name="image_bytes")


# ----------------------------------------------------------------------------- versions

def _versions(name_dir: Path) -> list[int]:
    """Numbered version folders under ``saved_models/<name>`` (TF Serving's layout)."""
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(name_dir: str | os.PathLike) -> int:
    """The next free version number: one more than the highest, starting at 1."""
    versions = _versions(Path(name_dir))
    return versions[-1] + 1 if versions else 1


# ----------------------------------------------------------------------------- graph pieces

def _output_heads(model: keras.Model, kind: str) -> keras.Model:
    """A Keras model from [-1, 1] images to the kind's raw outputs, as a dict.

    Cascade and GBT models expose their inner segmenter's maps too; they are taken from the
    node where the outer model calls its segmenter, so the segmenter runs once per request.
    """
    if kind in ("cascade", "gbt"):
        return keras.Model(model.inputs, {"cellularity": model.outputs[0],
                                          "masks": _segmenter_maps(model)}, name=f"{kind}_heads")
    key = {"segmentation": "masks", "regression": "cellularity", "classification": "class_probs"}[kind]
    return keras.Model(model.inputs, {key: model.outputs[0]}, name=f"{kind}_heads")


def _segmenter_maps(model: keras.Model) -> keras.KerasTensor:
    """The symbolic maps where ``model``'s graph calls its segmenter (SRCascade, GBTCellularity)."""
    return model.segmenter_maps


def _patch_size(model: keras.Model, kind: str) -> int | None:
    """Full-resolution patch size a cellularity model was built for (None: any size)."""
    if kind not in CELLULARITY_KINDS:
        return None
    working = model.inputs[0].shape[1]
    return DOWNSAMPLE * working if working else PATCH_SIZE


def _checked(images: tf.Tensor, kind: str, patch: int | None) -> tf.Tensor:
    """``images`` after an in-graph size check; static [patch, patch] for cellularity models."""
    size = tf.shape(images)[1:3]
    if patch is None:
        check = tf.debugging.assert_positive(size, message="images: height and width must be > 0")
    else:
        check = tf.debugging.assert_equal(
            size, tf.constant([patch, patch]),
            message=f"images: this {kind} model takes {patch}x{patch} RGB patches at full resolution "
                    "(the training patch size); got another height x width")
    with tf.control_dependencies([check]):
        images = tf.identity(images)
    return images if patch is None else tf.ensure_shape(images, [None, patch, patch, 3])


def serving_fn(model: keras.Model, kind: str) -> tf.types.experimental.GenericFunction:
    """uint8 RGB [N, H, W, 3] at full resolution -> the kind's named outputs (float32)."""
    heads = _output_heads(model, kind)
    patch = _patch_size(model, kind)

    @tf.function(input_signature=[IMAGES_SPEC])
    def serve(images):
        images = _checked(images, kind, patch)
        x = full_res_to_model_input(images)
        if kind == "segmentation":
            x, size = pad_to_multiple(x)
        raw = {k: tf.cast(v, tf.float32) for k, v in heads(x, training=False).items()}
        if kind == "segmentation":
            return {"masks": raw["masks"][:, :size[0], :size[1], :]}
        if kind == "classification":
            decoded = decode_bins(raw["class_probs"])
            return {"cellularity": clip_score(decoded["cellularity"]), "class_probs": raw["class_probs"],
                    "interval": tf.stack([decoded["low"], decoded["high"]], axis=-1)}
        outputs = {"cellularity": clip_score(raw["cellularity"][:, 0])}
        if "masks" in raw:
            outputs["masks"] = raw["masks"]
        return outputs

    return serve


def decode_images(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG strings [N] -> uint8 RGB [N, H, W, 3]; all images must share one size."""
    check = tf.debugging.assert_positive(tf.size(image_bytes), message="image_bytes: the batch is empty")
    with tf.control_dependencies([check]):
        n = tf.shape(image_bytes)[0]
    images = tf.TensorArray(tf.uint8, size=n, infer_shape=False, element_shape=[None, None, 3])
    sizes = tf.TensorArray(tf.int32, size=n)
    for i in tf.range(n):
        image = tf.io.decode_image(image_bytes[i], channels=3, expand_animations=False)
        images = images.write(i, image)
        sizes = sizes.write(i, tf.shape(image)[:2])
    sizes = sizes.stack()
    same = tf.debugging.assert_equal(sizes, tf.broadcast_to(sizes[:1], tf.shape(sizes)),
                                     message="image_bytes: all images of a request must have the same size")
    with tf.control_dependencies([same]):
        return images.stack()


def bytes_fn(serve: tf.types.experimental.GenericFunction) -> tf.types.experimental.GenericFunction:
    """The ``serving_bytes`` signature: decode, then ``serve``."""

    @tf.function(input_signature=[BYTES_SPEC])
    def serve_bytes(image_bytes):
        return serve(decode_images(image_bytes))

    return serve_bytes


# ----------------------------------------------------------------------------- export

def _load(run: Path, kind: str) -> keras.Model:
    from cellnet.training.runs import load_run_model

    try:
        return load_run_model(run)
    except CellnetError:
        raise
    except Exception as exc:  # a damaged best.keras is the run's file problem, reported in one line
        raise bad(run / "best.keras", f"damaged or not a Keras model file ({type(exc).__name__}); "
                                      "resume or retrain the run") from None


def export_model(model: keras.Model, kind: str, path: str | os.PathLike, metadata: dict) -> Path:
    """Write ``model`` as a SavedModel at ``path`` (must not exist), atomically."""
    if kind not in KINDS:
        raise CellnetError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")
    path = Path(path)
    if path.exists():
        raise bad(path, "already exists; an export never overwrites a version (choose another --version)")
    serve = serving_fn(model, kind)
    module = tf.Module()
    # Track the variables, not the Keras model: saving a model object would also trace Keras's
    # own default signature for it (and for every nested model).
    module.model_variables = list(model.variables)
    patch = _patch_size(model, kind)
    meta = {"format": "cellnet-savedmodel/1", "kind": kind, "outputs": list(OUTPUTS[kind]),
            "patch_size": patch, "downsample": DOWNSAMPLE,
            "signatures": {IMAGES_SIGNATURE: "images", BYTES_SIGNATURE: "image_bytes"},
            "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "tensorflow": tf.__version__,
            "keras": keras.__version__, **metadata}
    signatures = {IMAGES_SIGNATURE: serve.get_concrete_function(),
                  BYTES_SIGNATURE: bytes_fn(serve).get_concrete_function()}
    # disk full: one line naming the version folder; no version folder, no temporary left
    with writing(path), atomic_dir(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return path


def export_run(run: str | os.PathLike, out: str | os.PathLike, version: int | None = None) -> Path:
    """Export a run's ``best.keras`` to ``out/<version>/``; returns that folder.

    ``out`` is ``saved_models/<name>``; ``version`` defaults to the next free number (from 1) and
    an existing version is refused, never overwritten.
    """
    from cellnet.training.runs import require_complete

    run, out = Path(run), Path(out)
    info = require_complete(run, "be exported")
    kind = info.get("kind")
    if kind not in KINDS:
        raise bad(run / "run.json", f"kind {kind!r} cannot be exported (expected one of {', '.join(KINDS)})")
    if out.exists() and not out.is_dir():
        raise bad(out, "exists and is not a folder (expected saved_models/NAME)")
    if version is None:
        version = next_version(out)
    elif version < 1:
        raise CellnetError(f"--version: expected a positive integer, got {version}")
    target = out / str(version)
    if target.exists():
        raise bad(target, "already exists; an export never overwrites a version "
                          f"(omit --version for the next free one, {next_version(out)})")
    model = _load(run, kind)
    return export_model(model, kind, target, {"version": version, "run": str(run.resolve()), "run_info": info})

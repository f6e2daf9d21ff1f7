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
ensemble        ``cellularity``, ``cellularity_std``, ``member<i>_cellularity`` per member, the
                members' mean ``masks`` (where members have masks), ``class_probs`` and
                ``interval`` (when every member is a classification head)
==============  ====================================================================

Test-time augmentation (``--tta flips|d4``, ``cellnet.models.tta``) runs the 2 or 8 variants
inside the graph, maps masks back through the inverse transform and averages them and the
cellularity (each variant's score clipped first, so an ensemble of exports equals the mean of
their outputs); cellularity models then also serve ``cellularity_std``, the spread of the
variant (and member) scores. A classification head's ``class_probs`` are averaged and its
interval is read from the averaged distribution.

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

from cellnet.choices import CHECKPOINTS, PRECISIONS
from cellnet.errors import CellnetError, bad
from cellnet.files import atomic_dir, writing
from cellnet.models.tta import Averaged, Member, member_output, symmetries
from cellnet.preprocess import DOWNSAMPLE, IMAGES_SPEC, PATCH_SIZE, full_res_to_model_input

KINDS: tuple[str, ...] = ("segmentation", "regression", "classification", "cascade", "gbt")
#: Kinds that output a cellularity score (and need patches of the training size).
CELLULARITY_KINDS: tuple[str, ...] = ("regression", "classification", "cascade", "gbt")
#: What ``assets/cellnet.json`` may say: a run's kind, or an ensemble of cellularity runs.
SERVED_KINDS: tuple[str, ...] = (*KINDS, "ensemble")
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


def _common_patch(members: list[Member]) -> int | None:
    patches = {_patch_size(m.model, m.kind) for m in members}
    if len(patches) > 1:
        raise CellnetError(f"ensemble: the members take different patch sizes ({sorted(patches)}); "
                           "an ensemble needs one input size")
    return patches.pop()


def ensemble_fn(members: list[Member], tta: str = "none", xla: bool = False) -> tf.types.experimental.GenericFunction:
    """uint8 RGB [N, H, W, 3] at full resolution -> the averaged outputs of ``members`` under ``tta``.

    ``xla`` compiles the models' part (not the input checks and the area downsampling, which XLA
    has no kernel for) with XLA, once per input shape on first use.
    """
    if xla and any(m.kind == "gbt" for m in members):
        raise CellnetError("--xla: the GBT's 81 features gather a data-dependent number of blobs, "
                           "which XLA cannot compile; export GBT runs without --xla")
    averaged = Averaged(members, tta)
    compute = tf.function(averaged.__call__, jit_compile=True) if xla else averaged
    kind = averaged.kind
    patch = _common_patch(members)

    @tf.function(input_signature=[IMAGES_SPEC])
    def serve(images):
        return compute(full_res_to_model_input(_checked(images, kind, patch)))

    return serve


def serving_fn(model: keras.Model, kind: str, tta: str = "none", xla: bool = False) -> tf.types.experimental.GenericFunction:
    """uint8 RGB [N, H, W, 3] at full resolution -> the kind's named outputs (float32)."""
    return ensemble_fn([Member(model, kind)], tta, xla)


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

def served_outputs(kind: str, tta: str = "none", members: int = 1, all_classification: bool = False) -> list[str]:
    """The named outputs an export of ``kind`` serves (the order ``assets/cellnet.json`` lists)."""
    if kind != "ensemble":
        outputs = list(OUTPUTS[kind])
        return outputs + ["cellularity_std"] if tta != "none" and kind in CELLULARITY_KINDS else outputs
    outputs = ["cellularity", "cellularity_std"]
    if all_classification:
        outputs += ["class_probs", "interval"]
    return outputs + [member_output(i) for i in range(members)]


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """``model`` rebuilt under Keras's ``mixed_<precision>`` policy, with the same weights.

    Convolutions and dense layers then compute in bfloat16 / float16 (variables stay float32);
    the layers that must not (the ``masks``/``cellularity``/``class_probs`` outputs, stain
    normalisation, the 81 features and the GBT's thresholds) are float32 by construction.
    """
    if precision not in PRECISIONS:
        raise CellnetError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(f"mixed_{precision}")
    try:
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


def export_model(model: keras.Model, kind: str, path: str | os.PathLike, metadata: dict,
                 tta: str = "none", xla: bool = False) -> Path:
    """Write ``model`` as a SavedModel at ``path`` (must not exist), atomically."""
    if kind not in KINDS:
        raise CellnetError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")
    return export_members([Member(model, kind)], path, metadata, tta=tta, xla=xla)


def export_members(members: list[Member], path: str | os.PathLike, metadata: dict, tta: str = "none",
                   xla: bool = False) -> Path:
    """Write one model, or an ensemble of cellularity models, as a SavedModel at ``path``."""
    path = Path(path)
    if path.exists():
        raise bad(path, "already exists; an export never overwrites a version (choose another --version)")
    symmetries(tta)  # an unknown mode is refused before anything is traced
    serve = ensemble_fn(members, tta, xla)
    module = tf.Module()
    # Track the variables, not the Keras models: saving a model object would also trace Keras's
    # own default signature for it (and for every nested model).
    module.model_variables = [v for m in members for v in m.model.variables]
    concrete = serve.get_concrete_function()
    kind = members[0].kind if len(members) == 1 else "ensemble"
    outputs = [name for name in served_outputs(kind, tta, len(members),
                                               all(m.kind == "classification" for m in members))
               if name in concrete.structured_outputs]
    meta = {"format": "cellnet-savedmodel/1", "kind": kind, "outputs": outputs,
            "patch_size": _common_patch(members), "downsample": DOWNSAMPLE, "tta": tta, "xla": xla,
            "tta_variants": len(symmetries(tta)),
            "signatures": {IMAGES_SIGNATURE: "images", BYTES_SIGNATURE: "image_bytes"},
            "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "tensorflow": tf.__version__,
            "keras": keras.__version__, **metadata}
    signatures = {IMAGES_SIGNATURE: concrete, BYTES_SIGNATURE: bytes_fn(serve).get_concrete_function()}
    # disk full: one line naming the version folder; no version folder, no temporary left
    with writing(path), atomic_dir(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return path


def parse_weights(text: str | None, runs: int) -> list[float]:
    """``--weights w1,w2,...``: one positive number per ``--run`` (default: all equal)."""
    if text is None:
        return [1.0] * runs
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CellnetError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None
    if len(weights) != runs:
        raise CellnetError(f"--weights {text!r}: {len(weights)} weight(s) for {runs} --run(s); give one per run")
    if not all(w > 0 and w < float("inf") for w in weights):
        raise CellnetError(f"--weights {text!r}: every weight must be a positive finite number")
    return weights


def _target(out: Path, version: int | None) -> tuple[Path, int]:
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
    return target, version


def _run_kind(run: Path) -> tuple[str, dict]:
    from cellnet.training.runs import require_complete

    info = require_complete(run, "be exported")
    kind = info.get("kind")
    if kind not in KINDS:
        raise bad(run / "run.json", f"kind {kind!r} cannot be exported (expected one of {', '.join(KINDS)})")
    return kind, info


def export_run(run: str | os.PathLike | list, out: str | os.PathLike, version: int | None = None,
               tta: str = "none", weights: list[float] | None = None, precision: str = "float32",
               xla: bool = False, checkpoint: str = "best") -> Path:
    """Export a run's ``best.keras`` or ``last.keras`` (or several runs' as one ensemble) to ``out/<version>/``.

    ``out`` is ``saved_models/<name>``; ``version`` defaults to the next free number (from 1) and
    an existing version is refused, never overwritten. Several runs must all output cellularity
    (SR cascade, GBT, direct regression or classification); ``weights`` default to equal.
    ``precision`` bfloat16 or float16 computes in reduced precision (``with_precision``); ``xla``
    compiles the models with XLA (TF Serving then needs ``--xla_cpu_compilation_enabled=true`` on CPUs).
    ``checkpoint`` "last" exports each run's ``last.keras`` instead: the last epoch's weights, which
    scored a higher malignant Jaccard on held-out hospitals than the validation-chosen ones (README).
    """
    runs = [Path(r) for r in (run if isinstance(run, (list, tuple)) else [run])]
    out = Path(out)
    symmetries(tta)
    if precision not in PRECISIONS:
        raise CellnetError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if checkpoint not in CHECKPOINTS:
        raise CellnetError(f"--checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    weights = weights or [1.0] * len(runs)
    if len(weights) != len(runs):
        raise CellnetError(f"--weights: {len(weights)} weight(s) for {len(runs)} --run(s); give one per run")
    kinds = [_run_kind(r) for r in runs]
    if len(runs) > 1:
        for r, (kind, _) in zip(runs, kinds):
            if kind not in CELLULARITY_KINDS:
                raise bad(r, f"is a {kind} run; an ensemble averages cellularity, so every --run must be "
                             f"one of {', '.join(CELLULARITY_KINDS)}")
    target, version = _target(out, version)
    from cellnet.training.runs import load_run_model

    members = [Member(with_precision(load_run_model(r, checkpoint), precision), kind, w)
               for r, (kind, _), w in zip(runs, kinds, weights)]
    if len(runs) == 1:
        return export_model(members[0].model, members[0].kind, target,
                            {"version": version, "run": str(runs[0].resolve()), "run_info": kinds[0][1],
                             "precision": precision, "checkpoint": checkpoint}, tta=tta, xla=xla)
    listed = [{"output": member_output(i), "run": str(r.resolve()), "kind": kind, "weight": w / sum(weights),
               "run_info": info} for i, (r, (kind, info), w) in enumerate(zip(runs, kinds, weights))]
    return export_members(members, target, {"version": version, "members": listed, "precision": precision,
                                            "checkpoint": checkpoint},
                          tta=tta, xla=xla)

"""SavedModel export: every run kind, reloaded in a fresh process, matches its Keras model.

Tolerance: 1e-5 absolute on float32 outputs. The references run the same preprocessing function
as a graph, as the SavedModel does (see ``graph_preprocess``); the GBT export matches xgboost's
own predict on the features of the same maps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnet.errors import CellnetError
from cellnet.serving.export import (BYTES_SIGNATURE, IMAGES_SIGNATURE, OUTPUTS, export_model, export_run,
                                    next_version, serving_fn)
from cellnet.models.features import FEATURE_NAMES, extract_features
from cellnet.models import (CellSegmenter, DirectCellularity, GBTCellularity, GBTEnsemble, ResNet34Backbone,
                            SRCascade, decode_bins_np)
from cellnet.preprocess import pad_to_multiple
from conftest import TINY_BLOCKS, calibrate, graph_preprocess, spread_head

TOLERANCE = 1e-5
WIDTH = 0.125
#: Full-resolution patch of the tiny direct models (their input is 32x32 at working resolution).
SMALL_PATCH = 64
KINDS = ("segmentation", "regression", "classification", "cascade", "gbt")
QUIET_TF = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def write_run(root: Path, kind: str, model: keras.Model) -> Path:
    run = root / kind
    run.mkdir(parents=True)
    model.save(run / "best.keras")
    (run / "run.json").write_text(json.dumps({"kind": kind, "status": "complete"}))
    return run


def xgboost_predict(booster, features: np.ndarray) -> np.ndarray:
    import xgboost

    return booster.predict(xgboost.DMatrix(features, feature_names=list(FEATURE_NAMES)))


def patches(rng: np.random.Generator, brightness, size: int) -> np.ndarray:
    """Smooth colour noise (so JPEG keeps it close) around each mean ``brightness``."""
    coarse = rng.normal(0, 40, (len(brightness), 8, 8, 3)).astype(np.float32)
    smooth = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse])
    return np.clip(smooth + np.reshape(brightness, (-1, 1, 1, 1)), 0, 255).astype(np.uint8)


def gbt_model(segmenter: CellSegmenter):
    """A GBT fitted to the brightness of patches from the segmenter's features (any trees will do)."""
    from cellnet.models.gbt import GBTCellularity
    from cellnet.training.boosting import fit_booster

    brightness = np.linspace(40, 220, 4)
    images = patches(np.random.default_rng(1), brightness, 512)
    features = extract_features(segmenter(graph_preprocess(images))).numpy()
    booster = fit_booster(features, brightness / 255, rounds=30, learning_rate=0.3, min_child_weight=1)
    return GBTCellularity(segmenter, booster, name="gbt_cellularity"), booster


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind exported from a run folder, the inputs, and the Keras / xgboost references."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    small = patches(rng, [90, 170], SMALL_PATCH)
    large = patches(rng, [70, 190], 512)
    odd = rng.integers(0, 256, (2, 100, 70, 3), dtype=np.uint8)  # 50x35 working: padded to 64x64
    keras.utils.set_random_seed(0)
    segmenter = CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="fpn", name="fpn_segmenter")
    regression = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    classification = DirectCellularity("resnet34", "classification", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    calibration_small = patches(rng, np.linspace(40, 220, 16), SMALL_PATCH)
    calibration_large = patches(rng, np.linspace(40, 220, 4), 512)
    for model, images in ((segmenter, calibration_large), (regression, calibration_small),
                          (classification, calibration_small)):
        calibrate(model, images)
    cascade = SRCascade(segmenter, width=WIDTH, stage_blocks=TINY_BLOCKS, name="sr_cascade")  # freezes the segmenter
    calibrate(cascade, calibration_large)
    spread_head(regression, small)
    spread_head(cascade, large)
    gbt, booster = gbt_model(segmenter)
    models = {"segmentation": segmenter, "regression": regression, "classification": classification,
              "cascade": cascade, "gbt": gbt}
    inputs = {"segmentation": large, "regression": small, "classification": small, "cascade": large,
              "gbt": large}

    prep = graph_preprocess
    seg_maps = np.asarray(segmenter(prep(large)))
    probs = np.asarray(classification(prep(small)))
    decoded = decode_bins_np(probs)
    features = extract_features(seg_maps).numpy()
    expected = {
        "segmentation": {"masks": seg_maps},
        "regression": {"cellularity": np.clip(np.asarray(regression(prep(small)))[:, 0], 0, 1)},
        "classification": {"class_probs": probs, "cellularity": decoded["cellularity"],
                           "interval": np.stack([decoded["low"], decoded["high"]], axis=-1)},
        "cascade": {"cellularity": np.clip(np.asarray(cascade(prep(large)))[:, 0], 0, 1), "masks": seg_maps},
        "gbt": {"cellularity": np.clip(xgboost_predict(booster, features), 0, 1), "masks": seg_maps},
    }
    padded, _ = pad_to_multiple(prep(odd), 32)
    odd_expected = np.asarray(segmenter(padded))[:, :50, :35]

    paths = {kind: export_run(write_run(root / "runs", kind, model), root / "saved_models" / kind)
             for kind, model in models.items()}
    encoded = {fmt: [cv2.imencode(f".{fmt}", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in small]
               for fmt in ("png", "jpg")}
    jpeg_pixels = np.stack([tf.io.decode_jpeg(b).numpy() for b in encoded["jpg"]])
    mixed = [encoded["png"][0], cv2.imencode(".png", odd[0])[1].tobytes()]
    # saved_model_cli (a TF process of its own) runs beside the fresh serving process.
    cli = subprocess.Popen([str(Path(sys.executable).with_name("saved_model_cli")), "show", "--all",
                            "--dir", str(paths["classification"])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=QUIET_TF)
    served = serve_in_fresh_process(root, paths, inputs, odd, encoded, mixed)
    cli_out, cli_err = cli.communicate(timeout=300)
    return {"paths": paths, "expected": expected, "served": served, "odd_expected": odd_expected,
            "small": small, "jpeg_pixels": jpeg_pixels, "root": root, "booster": booster, "regression": regression,
            "cli": (cli.returncode, cli_out, cli_err)}


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    job = json.load(open(sys.argv[1]))
    arrays = np.load(job["arrays"])
    out = {}
    for kind, path in job["paths"].items():
        model = tf.saved_model.load(path)
        serve = model.signatures["serving_default"]
        for name, value in serve(images=tf.constant(arrays[kind])).items():
            out[f"{kind}/{name}"] = value.numpy()
        if kind == "segmentation":
            out["odd/masks"] = serve(images=tf.constant(arrays["odd"]))["masks"].numpy()
        if kind == "regression":
            decode = model.signatures["serving_bytes"]
            for fmt, blobs in job["encoded"].items():
                blobs = [bytes.fromhex(b) for b in blobs]
                out[f"bytes/{fmt}"] = decode(image_bytes=tf.constant(blobs))["cellularity"].numpy()
            try:
                decode(image_bytes=tf.constant([bytes.fromhex(b) for b in job["mixed"]]))
            except tf.errors.InvalidArgumentError as e:
                out["mixed_size_error"] = np.array(e.message)
            try:
                serve(images=tf.constant(arrays["odd"]))
            except tf.errors.InvalidArgumentError as e:
                out["wrong_size_error"] = np.array(e.message)
    np.savez(job["out"], **out)
""")


def serve_in_fresh_process(root: Path, paths: dict, inputs: dict, odd: np.ndarray, encoded: dict,
                           mixed: list[bytes]) -> dict:
    np.savez(root / "inputs.npz", odd=odd, **inputs)
    job = {"paths": {k: str(v) for k, v in paths.items()}, "arrays": str(root / "inputs.npz"),
           "out": str(root / "served.npz"), "encoded": {k: [b.hex() for b in v] for k, v in encoded.items()},
           "mixed": [b.hex() for b in mixed]}
    (root / "job.json").write_text(json.dumps(job))
    (root / "serve.py").write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(root / "serve.py"), str(root / "job.json")],
                            capture_output=True, text=True, env=QUIET_TF, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(root / "served.npz") as served:
        return {k: served[k] for k in served.files}


@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_keras_in_a_fresh_process(exported, kind):
    served = exported["served"]
    names = sorted(k.split("/", 1)[1] for k in served if k.startswith(f"{kind}/"))
    assert names == sorted(OUTPUTS[kind])
    for name, expected in exported["expected"][kind].items():
        got = served[f"{kind}/{name}"]
        assert got.dtype == np.float32
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0, err_msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["regression", "cascade", "gbt"])
def test_reference_scores_lie_inside_0_1_so_the_clip_leaves_them(exported, kind):
    # Otherwise the clipped served scores above could match a wrong model's.
    score = exported["expected"][kind]["cellularity"]
    assert ((0.01 < score) & (score < 0.99)).all() and np.ptp(score) > 1e-3, score


def _raw_head(model: keras.Model, bias: float) -> None:
    """Push the ``cellularity`` head's raw output to about ``bias`` (a small image-dependent spread)."""
    dense = model.get_layer("cellularity")
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel * 0.01, np.array([bias], np.float32)])


def test_exported_regression_clips_a_raw_output_outside_0_1(tmp_path):
    keras.utils.set_random_seed(3)
    images = patches(np.random.default_rng(3), [60, 200], SMALL_PATCH)
    model = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    calibrate(model, images)
    for bias, served_value in ((2.0, 1.0), (-2.0, 0.0)):
        _raw_head(model, bias)
        raw = np.asarray(model(graph_preprocess(images)))[:, 0]
        assert (raw > 1.5).all() if bias > 0 else (raw < -1.5).all()  # the Keras model is unclipped
        path = export_model(model, "regression", tmp_path / f"bias{bias:+}", {})
        served = tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.constant(images))
        assert served["cellularity"].dtype == tf.float32
        np.testing.assert_array_equal(served["cellularity"].numpy(), [served_value] * len(images))


def test_served_cascade_and_gbt_scores_are_clipped_to_0_1():
    keras.utils.set_random_seed(5)
    images = patches(np.random.default_rng(5), [80, 180], 512)
    segmenter = CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="fpn", name="fpn_segmenter")
    cascade = SRCascade(segmenter, width=WIDTH, stage_blocks=TINY_BLOCKS, name="sr_cascade")

    def stump(score: float) -> GBTEnsemble:  # one single-leaf tree: the tree sum is ``score``
        return GBTEnsemble([[0]], [[0.0]], [[0]], [[0]], [[0]], [[0.5]], base_score=score - 0.5,
                           depth=0, num_features=len(FEATURE_NAMES))

    for raw, served_value in ((2.0, 1.0), (-2.0, 0.0)):
        _raw_head(cascade, raw)
        gbt = GBTCellularity(segmenter, stump(raw), name="gbt_cellularity")
        np.testing.assert_allclose(np.asarray(gbt(graph_preprocess(images)))[:, 0], raw)  # raw tree sum
        for kind, model in (("cascade", cascade), ("gbt", gbt)):
            served = serving_fn(model, kind)(tf.constant(images))
            np.testing.assert_array_equal(served["cellularity"].numpy(), [served_value] * len(images),
                                          err_msg=kind)


def test_gbt_export_agrees_with_xgboost_on_its_own_maps(exported):
    # Independent of the Keras reference: xgboost on the features of the maps the export returned.
    served = exported["served"]
    features = extract_features(served["gbt/masks"]).numpy()
    np.testing.assert_allclose(served["gbt/cellularity"],
                               np.clip(xgboost_predict(exported["booster"], features), 0, 1),
                               atol=TOLERANCE, rtol=0)


def test_segmenter_takes_any_size_and_crops_back(exported):
    odd = exported["served"]["odd/masks"]
    assert odd.shape == (2, 50, 35, 4)
    np.testing.assert_allclose(odd, exported["odd_expected"], atol=TOLERANCE, rtol=0)


def test_cellularity_model_refuses_other_sizes_in_graph(exported):
    assert "wrong_size_error" in exported["served"], "a 100x70 request to a 64x64 model was served"
    message = str(exported["served"]["wrong_size_error"])
    assert f"takes {SMALL_PATCH}x{SMALL_PATCH} RGB patches" in message


def test_bytes_signature_decodes_png_and_jpeg(exported):
    served = exported["served"]
    expected = exported["expected"]["regression"]["cellularity"]
    np.testing.assert_allclose(served["bytes/png"], expected, atol=TOLERANCE, rtol=0)  # PNG is lossless
    # JPEG is lossy: the reference is the Keras model on TF's decoding of the same bytes, which
    # must itself be close to the original pixels.
    pixels = exported["jpeg_pixels"]
    assert np.abs(pixels.astype(int) - exported["small"]).mean() < 4
    jpeg_reference = np.clip(np.asarray(exported["regression"](graph_preprocess(pixels)))[:, 0], 0, 1)
    np.testing.assert_allclose(served["bytes/jpg"], jpeg_reference, atol=TOLERANCE, rtol=0)


def test_bytes_signature_refuses_mixed_sizes_in_graph(exported):
    assert "mixed_size_error" in exported["served"], "a request of two sizes was served"
    assert "all images of a request must have the same size" in str(exported["served"]["mixed_size_error"])


def test_export_refuses_an_existing_version_and_numbers_the_next(exported):
    root, paths = exported["root"], exported["paths"]
    name_dir = paths["regression"].parent
    assert paths["regression"].name == "1"
    assert next_version(name_dir) == 2
    before = sorted(p.name for p in name_dir.iterdir())
    with pytest.raises(CellnetError, match=r"1: already exists; an export never overwrites"):
        export_run(root / "runs" / "regression", name_dir, version=1)
    assert sorted(p.name for p in name_dir.iterdir()) == before  # nothing written, no temp left
    with pytest.raises(CellnetError, match="positive integer"):
        export_run(root / "runs" / "regression", name_dir, version=0)


def test_export_refuses_a_run_without_a_known_kind(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(CellnetError, match="kind 'mystery' cannot be exported"):
        export_run(run, tmp_path / "out")
    with pytest.raises(CellnetError, match="not a cellnet run folder"):
        export_run(tmp_path / "nothing", tmp_path / "out")


def test_metadata_travels_in_assets(exported):
    meta = json.loads((exported["paths"]["classification"] / "assets" / "cellnet.json").read_text())
    assert meta["kind"] == "classification"
    assert meta["outputs"] == list(OUTPUTS["classification"])
    assert meta["patch_size"] == SMALL_PATCH
    assert meta["run_info"]["status"] == "complete"


def test_saved_model_cli_lists_both_signatures(exported):
    returncode, text, errors = exported["cli"]
    assert returncode == 0, errors[-2000:]
    for signature in (IMAGES_SIGNATURE, BYTES_SIGNATURE):
        assert f"signature_def['{signature}']" in text
    assert "inputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, -1, -1, 3)" in text
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in text
    for output in OUTPUTS["classification"]:
        assert f"outputs['{output}']" in text


# ----------------------------------------------------------------------------- ensembles

def _serve(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    signature = tf.saved_model.load(str(path)).signatures[IMAGES_SIGNATURE]
    return {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}


def test_ensemble_is_the_weighted_mean_of_its_members_own_savedmodels(exported, tmp_path):
    runs = [exported["root"] / "runs" / kind for kind in ("regression", "classification")]
    members = [exported["served"][f"{kind}/cellularity"] for kind in ("regression", "classification")]
    assert np.abs(members[0] - members[1]).min() > 1e-3  # two different models: the mean is a real test
    path = export_run(runs, tmp_path / "ensemble", weights=[1.0, 3.0])
    served = _serve(path, exported["small"])
    mean = 0.25 * members[0] + 0.75 * members[1]
    np.testing.assert_allclose(served["cellularity"], mean, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served["cellularity_std"],
                               np.sqrt(0.25 * (members[0] - mean) ** 2 + 0.75 * (members[1] - mean) ** 2),
                               atol=TOLERANCE, rtol=0)
    for i, member in enumerate(members):
        np.testing.assert_allclose(served[f"member{i}_cellularity"], member, atol=TOLERANCE, rtol=0)
    assert "interval" not in served  # a regression member has no distribution to mix
    meta = json.loads((path / "assets" / "cellnet.json").read_text())
    assert meta["kind"] == "ensemble" and meta["patch_size"] == SMALL_PATCH
    assert meta["outputs"] == ["cellularity", "cellularity_std", "member0_cellularity", "member1_cellularity"]
    assert [(m["kind"], m["weight"], m["output"]) for m in meta["members"]] == [
        ("regression", 0.25, "member0_cellularity"), ("classification", 0.75, "member1_cellularity")]


def test_ensemble_with_tta_is_the_mean_of_its_members_tta_exports(exported, tmp_path):
    runs = [exported["root"] / "runs" / kind for kind in ("regression", "classification")]
    singles = [_serve(export_run(run, tmp_path / run.name, tta="flips"), exported["small"]) for run in runs]
    served = _serve(export_run(runs, tmp_path / "ensemble", tta="flips"), exported["small"])
    for single in singles:
        assert set(single) >= {"cellularity", "cellularity_std"}
    np.testing.assert_allclose(served["cellularity"], (singles[0]["cellularity"] + singles[1]["cellularity"]) / 2,
                               atol=TOLERANCE, rtol=0)
    # the spread over all four (member, variant) scores is at least each member's own
    assert (served["cellularity_std"] + TOLERANCE >= np.abs(singles[0]["cellularity"] - served["cellularity"])).all()


def test_ensemble_refuses_a_segmenter_mixed_patch_sizes_and_bad_weights(exported, tmp_path):
    from cellnet.serving.export import parse_weights

    root = exported["root"] / "runs"
    with pytest.raises(CellnetError, match=r"segmentation: is a segmentation run; an ensemble averages cellularity"):
        export_run([root / "regression", root / "segmentation"], tmp_path / "a")
    with pytest.raises(CellnetError, match=r"ensemble: the members take different patch sizes \(\[64, 512\]\)"):
        export_run([root / "regression", root / "cascade"], tmp_path / "b")
    assert not (tmp_path / "a" / "1").exists() and not (tmp_path / "b" / "1").exists()
    assert parse_weights("1,3", 2) == [1.0, 3.0]
    for text, problem in (("1", "1 weight\\(s\\) for 2"), ("1,x", "expected comma-separated numbers"),
                          ("1,-1", "every weight must be a positive finite")):
        with pytest.raises(CellnetError, match=f"--weights '{text}': {problem}"):
            parse_weights(text, 2)


# ----------------------------------------------------------------------------- precision

def test_reduced_precision_exports_stay_close_to_float32_and_keep_their_io_dtypes(tmp_path):
    from cellnet.serving.export import with_precision

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    segmenter = CellSegmenter(ResNet34Backbone(width=WIDTH, stage_blocks=TINY_BLOCKS), decoder="fpn", name="fpn_segmenter")
    large = patches(rng, np.linspace(40, 220, 4), 256)
    calibrate(segmenter, large)
    regression = DirectCellularity("resnet34", "regression", input_shape=(32, 32, 3), width=WIDTH, stage_blocks=TINY_BLOCKS)
    small = patches(rng, np.linspace(40, 220, 8), SMALL_PATCH)
    calibrate(regression, small)
    spread_head(regression, small)  # scores inside (0, 1), where the clip does not hide errors
    reference = {"masks": serving_fn(segmenter, "segmentation")(tf.constant(large))["masks"].numpy(),
                 "cellularity": serving_fn(regression, "regression")(tf.constant(small))["cellularity"].numpy()}
    errors = {}
    for precision in ("float16", "bfloat16"):
        masks = serving_fn(with_precision(segmenter, precision), "segmentation")(tf.constant(large))["masks"]
        score = serving_fn(with_precision(regression, precision), "regression")(tf.constant(small))["cellularity"]
        assert masks.dtype == score.dtype == tf.float32
        errors[precision] = (np.abs(masks.numpy() - reference["masks"]), np.abs(score.numpy() - reference["cellularity"]))
    masks, score = errors["float16"]
    assert 0 < masks.max() <= 0.01 and score.max() <= 0.005  # reduced precision did run, within the spec
    masks, score = errors["bfloat16"]  # 8 mantissa bits: looser (README: measured on the demo's models)
    # (this tiny random model: max 0.022, mean 0.0037, score 0.014; float16 is ~10x closer)
    assert 0 < masks.mean() <= 0.01 and masks.max() <= 0.05 and score.max() <= 0.03
    with pytest.raises(CellnetError, match="--precision 'int8': expected one of float32, bfloat16, float16"):
        with_precision(regression, "int8")


def test_precision_is_recorded_and_the_served_signature_is_unchanged(exported, tmp_path):
    path = export_run(exported["root"] / "runs" / "regression", tmp_path / "half", precision="float16")
    meta = json.loads((path / "assets" / "cellnet.json").read_text())
    assert meta["precision"] == "float16"
    signature = tf.saved_model.load(str(path)).signatures[IMAGES_SIGNATURE]
    assert signature.structured_input_signature[1]["images"].dtype == tf.uint8
    served = signature(images=tf.constant(exported["small"]))["cellularity"]
    assert served.dtype == tf.float32
    np.testing.assert_allclose(served.numpy(), exported["expected"]["regression"]["cellularity"], atol=0.01)


def test_xla_export_serves_the_same_outputs_and_refuses_the_gbt(exported, tmp_path):
    root = exported["root"] / "runs"
    path = export_run(root / "regression", tmp_path / "xla", xla=True)
    assert json.loads((path / "assets" / "cellnet.json").read_text())["xla"] is True
    served = _serve(path, exported["small"])
    np.testing.assert_allclose(served["cellularity"], exported["expected"]["regression"]["cellularity"],
                               atol=1e-4, rtol=0)
    graph = tf.saved_model.load(str(path)).signatures[IMAGES_SIGNATURE].graph.as_graph_def()
    compiled = [f for f in graph.library.function if f.attr.get("_XlaMustCompile") and f.attr["_XlaMustCompile"].b]
    assert compiled  # the model part really is an XLA cluster in the SavedModel
    with pytest.raises(CellnetError, match="--xla: the GBT's 81 features"):
        export_run(root / "gbt", tmp_path / "gbt_xla", xla=True)
    assert not (tmp_path / "gbt_xla" / "1").exists()


def test_checkpoint_last_exports_last_keras_and_says_so(exported, tmp_path):
    """``--checkpoint last`` serves the run's last.keras, not best.keras; a run without one is refused in one line."""
    run = tmp_path / "runs" / "regression"
    shutil.copytree(exported["root"] / "runs" / "regression", run)
    last = keras.saving.load_model(run / "best.keras", compile=False)
    _raw_head(last, 0.5)  # another model: about 0.5 everywhere
    last.save(run / "last.keras")
    images = exported["small"]
    for checkpoint, want in (("best", exported["expected"]["regression"]["cellularity"]),
                             ("last", np.clip(np.asarray(last(graph_preprocess(images)))[:, 0], 0, 1))):
        path = export_run(run, tmp_path / checkpoint, checkpoint=checkpoint)
        assert json.loads((path / "assets" / "cellnet.json").read_text())["checkpoint"] == checkpoint
        np.testing.assert_allclose(_serve(path, images)["cellularity"], want, atol=TOLERANCE)
    (run / "last.keras").unlink()
    with pytest.raises(CellnetError, match="has no last.keras"):
        export_run(run, tmp_path / "missing", checkpoint="last")
    with pytest.raises(CellnetError, match="--checkpoint 'first'"):
        export_run(run, tmp_path / "unknown", checkpoint="first")

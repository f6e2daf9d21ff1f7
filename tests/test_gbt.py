"""XGBoost training, persistence, importance, and the booster re-expressed as TF ops."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import xgboost

from cellnet.errors import CellnetError
from cellnet.models.features import FEATURE_NAMES
from cellnet.models.gbt import GBTEnsemble
from cellnet.training.boosting import PAPER_PARAMS, feature_importance, load_gbt, save_gbt
from cellnet.training.boosting import fit_booster

ROUNDS = 50
THREADS = 1  # the test machine is shared: XGBoost's threads spin badly under contention


def synthetic(rng: np.random.Generator, rows: int, missing: float = 0.0):
    """81 features, the target driven by the first three; optional NaNs (missing values)."""
    x = rng.random((rows, 81)).astype(np.float32)
    y = 0.5 * x[:, 0] + 0.3 * (x[:, 1] > 0.5) + 0.2 * x[:, 2] * x[:, 0]
    y = (y + 0.02 * rng.normal(size=rows)).astype(np.float32)
    x[rng.random(x.shape) < missing] = np.nan
    return x, y


@pytest.fixture(scope="module")
def booster() -> xgboost.Booster:
    """Trained with missing values so that learned default directions differ between nodes."""
    x, y = synthetic(np.random.default_rng(0), 400, missing=0.2)
    return fit_booster(x, y, rounds=ROUNDS, learning_rate=0.1, nthread=THREADS)


def xgb_predict(booster: xgboost.Booster, x: np.ndarray) -> np.ndarray:
    return booster.predict(xgboost.DMatrix(x, feature_names=booster.feature_names))


def test_paper_params():
    assert PAPER_PARAMS["objective"] == "reg:squarederror"
    assert PAPER_PARAMS["learning_rate"] == 0.01 and PAPER_PARAMS["rounds"] == 600
    assert PAPER_PARAMS["max_depth"] == 5 and PAPER_PARAMS["max_leaves"] == 8
    assert PAPER_PARAMS["grow_policy"] == "lossguide" and PAPER_PARAMS["tree_method"] == "hist"


def test_training_beats_mean_baseline_and_respects_tree_limits():
    rng = np.random.default_rng(1)
    x, y = synthetic(rng, 300)
    x_val, y_val = synthetic(rng, 100)
    model = fit_booster(x, y, x_val, y_val, seed=3, rounds=ROUNDS, nthread=THREADS)
    assert model.num_boosted_rounds() == ROUNDS
    assert model.feature_names == list(FEATURE_NAMES)
    mse = float(np.mean((xgb_predict(model, x_val) - y_val) ** 2))
    baseline = float(np.mean((y.mean() - y_val) ** 2))
    assert mse < 0.8 * baseline
    assert float(model.attr("val_rmse")) == pytest.approx(np.sqrt(mse), rel=1e-3)
    for tree in json.loads(bytes(model.save_raw("json")))["learner"]["gradient_booster"][
            "model"]["trees"]:
        leaves = sum(child == -1 for child in tree["left_children"])
        assert 2 <= leaves <= 8
    again = fit_booster(x, y, x_val, y_val, seed=3, rounds=ROUNDS, nthread=THREADS)
    np.testing.assert_array_equal(xgb_predict(again, x_val), xgb_predict(model, x_val))


def test_bad_training_input():
    x, y = synthetic(np.random.default_rng(2), 20)
    with pytest.raises(CellnetError, match="y_train"):
        fit_booster(x, y[:10], rounds=2, nthread=THREADS)
    y[3] = np.nan
    with pytest.raises(CellnetError, match="y_train"):
        fit_booster(x, y, rounds=2, nthread=THREADS)


def test_feature_importance(booster):
    frame = feature_importance(booster)
    assert list(frame.columns) == ["feature", "total_gain"]
    assert sorted(frame["feature"]) == sorted(FEATURE_NAMES)
    gains = frame["total_gain"].to_numpy()
    assert np.all(np.diff(gains) <= 0) and gains[-1] == 0.0
    used = booster.get_score(importance_type="total_gain")
    for name, gain in zip(frame["feature"], gains):
        assert gain == pytest.approx(used.get(name, 0.0))
    assert set(frame["feature"][:2]) <= set(FEATURE_NAMES[:3])


def test_save_load_round_trip(booster, tmp_path):
    path = tmp_path / "gbt.json"
    save_gbt(booster, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gbt.json"]  # no temporary left
    loaded = load_gbt(path)
    x, _ = synthetic(np.random.default_rng(4), 50, missing=0.1)
    np.testing.assert_array_equal(xgb_predict(loaded, x), xgb_predict(booster, x))
    assert loaded.feature_names == booster.feature_names
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(CellnetError, match="a_file/gbt.json: cannot write"):
        save_gbt(booster, tmp_path / "a_file" / "gbt.json")
    with pytest.raises(CellnetError, match="missing.json"):
        load_gbt(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("not a model")
    with pytest.raises(CellnetError, match="junk.json"):
        load_gbt(tmp_path / "junk.json")


def tricky_inputs(layer: GBTEnsemble, rng: np.random.Generator) -> np.ndarray:
    """Random rows, rows sitting exactly on split thresholds (and one float32 step below), NaNs."""
    x, _ = synthetic(rng, 300, missing=0.15)
    splits = [(f, t) for tree_f, tree_t, tree_l in
              zip(layer.split_feature, layer.threshold, layer.left)
              for node, (f, t, l) in enumerate(zip(tree_f, tree_t, tree_l)) if l != node]
    for row, (f, t) in zip(x[:100], splits):
        row[f] = np.float32(t)
    for row, (f, t) in zip(x[100:200], splits[::-1]):
        row[f] = np.nextafter(np.float32(t), np.float32(-np.inf))
    return x


def test_ensemble_matches_booster(booster):
    layer = GBTEnsemble.from_booster(booster)
    default_left = np.asarray(layer.default_left)
    internal = np.asarray(layer.left) != np.arange(np.shape(layer.left)[1])
    assert default_left[internal].min() == 0 and default_left[internal].max() == 1
    assert 3 <= layer.depth <= 5
    x = tricky_inputs(layer, np.random.default_rng(5))
    np.testing.assert_allclose(layer(x).numpy(), xgb_predict(booster, x), rtol=0, atol=1e-5)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, 81], tf.float32)])
    np.testing.assert_allclose(fn(x[:7]).numpy(), xgb_predict(booster, x[:7]), atol=1e-5)


def test_ensemble_keeps_base_score():
    x, y = synthetic(np.random.default_rng(6), 100)
    model = fit_booster(x, y, rounds=3, base_score=0.3, nthread=THREADS)
    layer = GBTEnsemble.from_booster(model)
    assert layer.base_score == pytest.approx(0.3)
    np.testing.assert_allclose(layer(x).numpy(), xgb_predict(model, x), atol=1e-6)


def test_ensemble_rejects_other_objectives_and_widths(booster):
    x, y = synthetic(np.random.default_rng(7), 60)
    classifier = fit_booster(x, (y > 0.4).astype(np.float32), rounds=2, nthread=THREADS,
                           objective="binary:logistic")
    with pytest.raises(CellnetError, match="objective"):
        GBTEnsemble.from_booster(classifier)
    with pytest.raises(CellnetError, match="GBT features"):
        GBTEnsemble.from_booster(booster)(np.zeros((2, 80), np.float32))


def test_ensemble_in_keras_model_survives_keras_file(booster, tmp_path):
    inputs = keras.Input(shape=(81,), name="features")
    outputs = GBTEnsemble.from_booster(booster, name="gbt")(inputs)
    model = keras.Model(inputs, outputs, name="gbt_model")
    path = tmp_path / "gbt.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.get_layer("gbt"), GBTEnsemble)
    x = tricky_inputs(reloaded.get_layer("gbt"), np.random.default_rng(8))
    want = xgb_predict(booster, x)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), want, atol=1e-5)

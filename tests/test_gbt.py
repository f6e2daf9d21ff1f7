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
from cellnet.training.boosting import (LIGHTGBM_EQUIVALENTS, PAPER_PARAMS, TREE_PARAMS, dmatrix,
                                      feature_importance, fit_booster, load_gbt, save_gbt)

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
    assert dict(TREE_PARAMS) == dict(LIGHTGBM_EQUIVALENTS)
    assert {k: PAPER_PARAMS[k] for k in LIGHTGBM_EQUIVALENTS} == dict(LIGHTGBM_EQUIVALENTS)


#: What XGBoost must report for the authors' lgbm.py settings (save_config names and strings).
LIGHTGBM_IN_XGBOOST = {
    "min_child_weight": "20",   # min_data_in_leaf=20 (LightGBM default)
    "reg_lambda": "0",          # lambda_l2=0 (LightGBM default; XGBoost's is 1)
    "lambda": "0",
    "reg_alpha": "0",           # lambda_l1=0
    "alpha": "0",
    "gamma": "0",               # min_gain_to_split=0
    "min_split_loss": "0",
    "max_bin": "255",           # max_bin=255 (XGBoost's default is 256)
    "max_delta_step": "0",      # max_delta_step=0
    "colsample_bytree": "0.949999988",  # feature_fraction=0.95 (float32)
    "subsample": "1",           # bagging_fraction=0.5 with bagging_freq=0: no bagging
    "grow_policy": "lossguide",  # leaf-wise growth
    "max_leaves": "8",          # num_leaves=8
    "max_depth": "5",           # max_depth=5
    "learning_rate": "0.00999999978",  # learning_rate=0.01 (float32)
}


def test_lightgbm_settings_reach_xgboost():
    x, y = synthetic(np.random.default_rng(9), 120)
    model = fit_booster(x, y, nthread=THREADS)  # the paper's settings, nothing overridden
    config = json.loads(model.save_config())["learner"]
    tree = config["gradient_booster"]["tree_train_param"]
    assert {key: tree[key] for key in LIGHTGBM_IN_XGBOOST} == LIGHTGBM_IN_XGBOOST
    assert config["gradient_booster"]["gbtree_train_param"]["tree_method"] == "hist"
    assert config["objective"]["name"] == "reg:squarederror"
    assert model.num_boosted_rounds() == 600  # the paper's rounds (lgbm.py: 6000)
    # boost_from_average (LightGBM's default for regression): the first prediction is the mean.
    base = float(json.loads(config["learner_model_param"]["base_score"])[0])
    assert base == pytest.approx(float(y.mean()), abs=1e-5)
    # An override still wins over the mapping.
    tuned = fit_booster(x, y, rounds=2, min_child_weight=5, reg_lambda=1.0, nthread=THREADS)
    tree = json.loads(tuned.save_config())["learner"]["gradient_booster"]["tree_train_param"]
    assert tree["min_child_weight"] == "5" and tree["reg_lambda"] == "1"


def leaf_sizes(model: xgboost.Booster, x: np.ndarray) -> list[int]:
    """Training rows per leaf, over every leaf of every tree (XGBoost's pred_leaf indices)."""
    leaves = model.predict(dmatrix(x), pred_leaf=True).astype(int)  # (rows, trees)
    return [count for tree in leaves.T for count in np.unique(tree, return_counts=True)[1]]


@pytest.mark.parametrize("min_rows", [7, 20])
def test_min_child_weight_counts_training_rows_per_leaf(min_rows):
    # A target that rewards tiny leaves: 60 rows in steps of 3, fitted hard (learning rate 1).
    rng = np.random.default_rng(10)
    x = rng.random((60, 81)).astype(np.float32)
    y = (np.floor(x[:, 0] * 20) % 2 + 0.5 * (x[:, 1] > 0.9)).astype(np.float32)
    loose = fit_booster(x, y, rounds=5, learning_rate=1.0, min_child_weight=1, nthread=THREADS)
    assert min(leaf_sizes(loose, x)) < min_rows  # unconstrained, the trees do make smaller leaves
    kwargs = {} if min_rows == PAPER_PARAMS["min_child_weight"] else {"min_child_weight": min_rows}
    model = fit_booster(x, y, rounds=5, learning_rate=1.0, nthread=THREADS, **kwargs)
    sizes = leaf_sizes(model, x)
    assert min(sizes) >= min_rows, sizes
    assert max(sizes) < len(x)  # the trees did split


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

"""Fitting the gradient-boosted trees on the 81 map features (SPEC 3, paper 3.3 / 4.3).

XGBoost stands in for the paper's LightGBM. ``LIGHTGBM_EQUIVALENTS`` maps the authors'
LightGBM settings (``lgbm.py`` in alexander-rakhlin/BreastPathQ, with LightGBM's defaults for
what it leaves unset) onto XGBoost, key by key; the tuned numbers (learning rate, rounds, depth,
leaves) are the paper's and live in the ``gbt`` presets. LightGBM grows trees leaf-wise (best
split first) with ``num_leaves=8`` and ``max_depth=5``; XGBoost's ``grow_policy="lossguide"``
is the same growth strategy and, with ``tree_method="hist"``, honours ``max_leaves``. The
default ``depthwise`` policy would fill levels in order and stop at 8 leaves, i.e. a balanced
depth-3 tree, which is not the paper's model.

Not matched: the histogram bins (LightGBM bins each feature from a 200,000-row sample with at
least 3 rows a bin; XGBoost's hist uses a weighted quantile sketch, so thresholds can differ),
the random streams behind ``feature_fraction_seed`` / ``seed`` (same fraction, other columns),
tie-breaking between equal-gain splits, and the monitored metric (lgbm.py prints MSE; XGBoost
logs RMSE, its square root). lgbm.py uses no early stopping, and neither does ``fit_booster``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import xgboost

from cellnet.errors import CellnetError
from cellnet.files import write_bytes
from cellnet.models.features import FEATURE_NAMES
from cellnet.training.presets import preset

log = logging.getLogger(__name__)

#: The authors' LightGBM settings in XGBoost terms: XGBoost key -> value, each commented with
#: the LightGBM setting it stands for ("default" = LightGBM's default; lgbm.py leaves it unset).
#: The learning rate, rounds, depth and leaves are the paper's and come from the presets.
#: LightGBM's boost_from_average=true (the first prediction is the label mean) needs no key:
#: XGBoost estimates base_score the same way unless one is given (its own boost_from_average
#: key would override a given base_score).
LIGHTGBM_EQUIVALENTS: Mapping[str, Any] = MappingProxyType({
    # objective="mse" (L2 regression)
    "objective": "reg:squarederror",
    # LightGBM's histogram-based split finding (the bins themselves differ, see above)
    "tree_method": "hist",
    # LightGBM's leaf-wise growth: the leaf with the largest gain splits next, up to max_leaves
    # (num_leaves) and max_depth
    "grow_policy": "lossguide",
    # min_data_in_leaf=20 (default): under squared error every row's hessian is 1, so the
    # hessian sum min_child_weight counts training rows. It also covers
    # min_sum_hessian_in_leaf=1e-3 (default), which 20 rows always exceed.
    "min_child_weight": 20,
    # lambda_l2=0 (default); XGBoost's own default is 1
    "reg_lambda": 0.0,
    # lambda_l1=0 (default)
    "reg_alpha": 0.0,
    # min_gain_to_split=0 (default, alias min_split_gain)
    "gamma": 0.0,
    # max_bin=255 (default); XGBoost's own default is 256
    "max_bin": 255,
    # max_delta_step=0 (default: leaf outputs unconstrained)
    "max_delta_step": 0.0,
    # feature_fraction=0.95: a new column sample for every tree
    "colsample_bytree": 0.95,
    # bagging_fraction=0.5 with bagging_freq=0: LightGBM bags only when bagging_freq > 0, so
    # lgbm.py trains every tree on all rows
    "subsample": 1.0,
})
#: How XGBoost grows the paper's LightGBM trees (kept under this name for callers).
TREE_PARAMS: Mapping[str, Any] = LIGHTGBM_EQUIVALENTS
#: The paper's settings in XGBoost terms (``rounds`` is the number of boosting rounds).
PAPER_PARAMS: Mapping[str, Any] = MappingProxyType({
    **TREE_PARAMS,
    **{k: v for k, v in preset("gbt", "paper").items() if k != "batch_size"},
})
_LOG_EVERY = 100


def _as_matrix(x: Any, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise CellnetError(f"{name}: expected a non-empty (N, features) array, got {array.shape}")
    return array


def _as_labels(y: Any, rows: int, name: str) -> np.ndarray:
    labels = np.asarray(y, dtype=np.float32).reshape(-1)
    if labels.shape[0] != rows:
        raise CellnetError(f"{name}: {labels.shape[0]} labels for {rows} feature rows")
    if not np.all(np.isfinite(labels)):
        raise CellnetError(f"{name}: labels contain NaN or infinity")
    return labels


def dmatrix(x: np.ndarray, y: np.ndarray | None = None) -> xgboost.DMatrix:
    names = list(FEATURE_NAMES) if x.shape[1] == len(FEATURE_NAMES) else None
    return xgboost.DMatrix(x, label=y, feature_names=names)


def fit_booster(x_train: Any, y_train: Any, x_val: Any = None, y_val: Any = None, seed: int = 0,
              **overrides: Any) -> xgboost.Booster:
    """Fit the GBT regressor with ``PAPER_PARAMS`` updated by ``overrides``.

    ``PAPER_PARAMS`` are the paper's learning rate, rounds, depth and leaves on top of
    ``LIGHTGBM_EQUIVALENTS`` (e.g. ``min_child_weight=20``: no leaf holds fewer than 20
    training rows, as LightGBM's ``min_data_in_leaf``).

    ``rounds=`` sets the number of boosting rounds; any other override is an XGBoost
    parameter. With validation data, the train and val metrics (RMSE for the paper's objective)
    are logged every 100 rounds and their last values kept as booster attributes
    (``train_rmse``, ``val_rmse``), which ``save_gbt`` stores with the model.
    """
    x_train = _as_matrix(x_train, "x_train")
    dtrain = dmatrix(x_train, _as_labels(y_train, len(x_train), "y_train"))
    params = {**PAPER_PARAMS, "seed": seed, **overrides}
    rounds = int(params.pop("rounds"))
    if len(x_train) < 2 * params["min_child_weight"]:
        log.warning("gbt: %d training rows cannot fill two leaves of min_child_weight=%s rows "
                    "(LightGBM's min_data_in_leaf): every tree is a single leaf",
                    len(x_train), params["min_child_weight"])
    evals = []
    if x_val is not None:
        if y_val is None:
            raise CellnetError("y_val: validation features given without labels")
        x_val = _as_matrix(x_val, "x_val")
        if x_val.shape[1] != x_train.shape[1]:
            raise CellnetError(f"x_val: {x_val.shape[1]} features, x_train has {x_train.shape[1]}")
        dval = dmatrix(x_val, _as_labels(y_val, len(x_val), "y_val"))
        evals = [(dtrain, "train"), (dval, "val")]
    history: dict[str, dict[str, list[float]]] = {}
    booster = xgboost.train(params, dtrain, num_boost_round=rounds, evals=evals,
                            evals_result=history, verbose_eval=False)
    for name, metrics in history.items():
        for metric, curve in metrics.items():
            for i in [*range(_LOG_EVERY - 1, len(curve) - 1, _LOG_EVERY), len(curve) - 1]:
                log.info("gbt round %d: %s %s %.5f", i + 1, name, metric, curve[i])
            booster.set_attr(**{f"{name}_{metric}": repr(curve[-1])})
    return booster


def feature_importance(booster: xgboost.Booster) -> pd.DataFrame:
    """Total gain of every feature (unused ones 0), most important first."""
    names = booster.feature_names or [f"f{i}" for i in range(booster.num_features())]
    gain = booster.get_score(importance_type="total_gain")
    frame = pd.DataFrame({"feature": names,
                          "total_gain": [float(gain.get(name, 0.0)) for name in names]})
    return frame.sort_values("total_gain", ascending=False, kind="stable").reset_index(drop=True)


def save_gbt(booster: xgboost.Booster, path: str | os.PathLike) -> None:
    """Write the booster as XGBoost JSON, atomically (``cellnet.files``)."""
    write_bytes(path, bytes(booster.save_raw("json")))


def load_gbt(path: str | os.PathLike) -> xgboost.Booster:
    """Read a booster written by :func:`save_gbt`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CellnetError(f"{path}: cannot read GBT model ({e.strerror})") from e
    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(raw))
    except xgboost.core.XGBoostError as e:
        raise CellnetError(f"{path}: not an XGBoost model ({str(e).splitlines()[0]})") from e
    return booster

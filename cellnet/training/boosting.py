"""Fitting the gradient-boosted trees on the 81 map features (SPEC 3, paper 3.3 / 4.3).

XGBoost stands in for the paper's LightGBM. LightGBM grows trees leaf-wise (best split first)
with ``num_leaves=8`` and ``max_depth=5``; XGBoost's ``grow_policy="lossguide"`` is the same
growth strategy and, with ``tree_method="hist"``, honours ``max_leaves``. The default
``depthwise`` policy would fill levels in order and stop at 8 leaves, i.e. a balanced depth-3
tree, which is not the paper's model.
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

#: How XGBoost grows the paper's LightGBM trees; the tuned values live in the presets.
TREE_PARAMS: Mapping[str, Any] = MappingProxyType({
    "objective": "reg:squarederror",
    "tree_method": "hist",
    "grow_policy": "lossguide",
})
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

    ``rounds=`` sets the number of boosting rounds; any other override is an XGBoost
    parameter. With validation data, the train and val metrics (RMSE for the paper's objective)
    are logged every 100 rounds and their last values kept as booster attributes
    (``train_rmse``, ``val_rmse``), which ``save_gbt`` stores with the model.
    """
    x_train = _as_matrix(x_train, "x_train")
    dtrain = dmatrix(x_train, _as_labels(y_train, len(x_train), "y_train"))
    params = {**PAPER_PARAMS, "seed": seed, **overrides}
    rounds = int(params.pop("rounds"))
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

"""The trained XGBoost ensemble as TF ops, and the image -> score GBT model (paper 3.3).

``GBTEnsemble`` evaluates the booster's trees with gathers, so the GBT method (segmenter ->
81 features -> trees) exports as one SavedModel like every other model. Fitting the booster
is training's job (``cellnet.training.boosting``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import xgboost

from cellnet.errors import CellnetError

#: Objectives whose prediction is the raw sum of leaves plus base_score (identity link).
_IDENTITY_OBJECTIVES = ("reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror")


def _parse_base_score(text: str) -> float:
    """``learner_model_param.base_score``: ``"0.5"`` before XGBoost 3, ``"[5E-1]"`` since."""
    values = json.loads(text) if text.startswith("[") else [float(text)]
    if len(values) != 1:
        raise CellnetError(f"GBT model: expected one base_score, got {text}")
    return float(np.float32(values[0]))


def ensemble_arrays(booster: xgboost.Booster) -> dict[str, Any]:
    """The booster's trees as padded (trees, nodes) lists, plus base_score, depth, num_features.

    Read from ``save_raw("json")``, whose floats are the exact float32 values XGBoost uses
    (the text dump rounds them) and which holds the real base_score. A leaf points to itself
    on both sides, so walking ``depth`` steps from the root always ends on a leaf.
    """
    model = json.loads(bytes(booster.save_raw("json")))["learner"]
    objective = model["objective"]["name"]
    if objective not in _IDENTITY_OBJECTIVES:
        raise CellnetError(f"GBT model: objective {objective} is not a plain regression")
    params = model["learner_model_param"]
    if int(params.get("num_target", "1")) != 1 or int(params.get("num_class", "0")) > 1:
        raise CellnetError("GBT model: only single-output regression boosters are supported")
    if model["gradient_booster"]["name"] != "gbtree":
        raise CellnetError(f"GBT model: booster {model['gradient_booster']['name']} is not "
                           "a plain tree ensemble (gbtree)")
    trees = model["gradient_booster"]["model"]["trees"]
    width = max(len(tree["left_children"]) for tree in trees) if trees else 1
    fields = {key: [] for key in ("split_feature", "threshold", "left", "right", "default_left",
                                  "leaf_value")}
    depth = 0
    for tree in trees:
        if any(tree["split_type"]):
            raise CellnetError("GBT model: categorical splits are not supported")
        arrays = _tree_arrays(tree, width)
        for key in fields:
            fields[key].append(arrays[key])
        depth = max(depth, arrays["depth"])
    return {**fields, "base_score": _parse_base_score(params["base_score"]), "depth": depth,
            "num_features": int(params["num_feature"])}


def _tree_arrays(tree: Mapping[str, Any], width: int) -> dict[str, Any]:
    """One tree's node arrays padded to ``width`` nodes, and its depth."""
    nodes = range(width)
    size = len(tree["left_children"])
    left = [tree["left_children"][i] if i < size else -1 for i in nodes]
    is_leaf = [child == -1 for child in left]
    arrays = {
        "split_feature": [0 if is_leaf[i] else tree["split_indices"][i] for i in nodes],
        "threshold": [0.0 if is_leaf[i] else tree["split_conditions"][i] for i in nodes],
        "left": [i if is_leaf[i] else left[i] for i in nodes],
        "right": [i if is_leaf[i] else tree["right_children"][i] for i in nodes],
        "default_left": [0 if is_leaf[i] else int(tree["default_left"][i]) for i in nodes],
        "leaf_value": [tree["split_conditions"][i] if is_leaf[i] and i < size else 0.0
                       for i in nodes],
    }
    depth, frontier = 0, [0]
    while True:
        frontier = [child for i in frontier if not is_leaf[i]
                    for child in (arrays["left"][i], arrays["right"][i])]
        if not frontier:
            break
        depth += 1
    arrays["depth"] = depth
    return arrays


@keras.saving.register_keras_serializable(package="cellnet")
class GBTEnsemble(keras.layers.Layer):
    """A trained XGBoost regressor evaluated with TF ops: (N, F) features -> (N,) predictions.

    All trees advance together, one level per step (``depth`` steps of ``tf.gather``), so the
    cost is vectorised over trees and batch and the layer runs on GPU and inside SavedModels.
    A sample goes left when ``x < threshold`` (float32, as XGBoost compares) and follows the
    node's default direction when ``x`` is NaN. The ensemble lives in the config as plain lists,
    so a ``.keras`` file carries it.
    """

    def __init__(self, split_feature: list[list[int]], threshold: list[list[float]],
                 left: list[list[int]], right: list[list[int]], default_left: list[list[int]],
                 leaf_value: list[list[float]], base_score: float, depth: int,
                 num_features: int, **kwargs: Any):
        kwargs.setdefault("dtype", "float32")  # thresholds are float32: never autocast to half
        super().__init__(**kwargs)
        self.split_feature = split_feature
        self.threshold = threshold
        self.left = left
        self.right = right
        self.default_left = default_left
        self.leaf_value = leaf_value
        self.base_score = float(base_score)
        self.depth = int(depth)
        self.num_features = int(num_features)
        self._width = len(split_feature[0]) if split_feature else 1
        # Flat (trees * width,) tables indexed by a global node id, tree * width + node, so one
        # gather serves every tree; children are stored as global ids too.
        roots = np.arange(len(split_feature), dtype=np.int32)[:, np.newaxis] * self._width
        self._roots = roots.reshape(-1)
        self._nodes = {
            "split_feature": np.asarray(split_feature, np.int32).reshape(-1),
            "threshold": np.asarray(threshold, np.float32).reshape(-1),
            "left": (np.asarray(left, np.int32) + roots).reshape(-1),
            "right": (np.asarray(right, np.int32) + roots).reshape(-1),
            "default_left": np.asarray(default_left, bool).reshape(-1),
            "leaf_value": np.asarray(leaf_value, np.float32).reshape(-1),
        }

    @classmethod
    def from_booster(cls, booster: xgboost.Booster, **kwargs: Any) -> GBTEnsemble:
        """Build the layer from a trained single-output regression booster."""
        return cls(**ensemble_arrays(booster), **kwargs)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        features = tf.convert_to_tensor(features, tf.float32)
        if features.shape.rank != 2 or features.shape[-1] not in (None, self.num_features):
            raise CellnetError(f"GBT features: expected shape (N, {self.num_features}), "
                               f"got {features.shape}")
        node = tf.tile(self._roots[np.newaxis, :], [tf.shape(features)[0], 1])  # (N, trees)
        nodes = {key: tf.constant(value) for key, value in self._nodes.items()}
        for _ in range(self.depth):
            value = tf.gather(features, tf.gather(nodes["split_feature"], node), batch_dims=1)
            go_left = tf.where(tf.math.is_nan(value), tf.gather(nodes["default_left"], node),
                               value < tf.gather(nodes["threshold"], node))
            node = tf.where(go_left, tf.gather(nodes["left"], node),
                            tf.gather(nodes["right"], node))
        leaves = tf.gather(nodes["leaf_value"], node)
        return tf.reduce_sum(leaves, axis=1) + self.base_score

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None]:
        return (input_shape[0],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "split_feature": self.split_feature,
                "threshold": self.threshold, "left": self.left, "right": self.right,
                "default_left": self.default_left, "leaf_value": self.leaf_value,
                "base_score": self.base_score, "depth": self.depth,
                "num_features": self.num_features}


@keras.saving.register_keras_serializable(package="cellnet")
class GBTCellularity(keras.Model):
    """The GBT method end to end: image -> segmenter -> 81 features -> tree ensemble.

    One graph from pixels to score, so the GBT exports and serves like the other methods.
    The score is the raw tree sum, which can leave [0, 1]; the export and the evaluation engine
    clip it (``cellnet.models.cellularity.clip_score``) as they do the linear regression heads.

    Args:
        segmenter: a trained ``CellSegmenter`` (frozen: the trees are fitted on its maps).
        ensemble: a ``GBTEnsemble`` or an ``xgboost.Booster`` to convert.
        **kwargs: passed to ``keras.Model``.

    Example:
    ```python
    model = GBTCellularity(segmenter, booster)   # booster from train_gbt on extract_features
    p = model.predict(images_in_minus1_1)        # (N, 1), raw tree sums
    ```
    """

    def __init__(self, segmenter: keras.Model, ensemble: "GBTEnsemble | xgboost.Booster", **kwargs):
        from cellnet.models.features import FeatureExtractor

        kwargs.pop("trainable", None)
        # === Layers ===
        self.segmenter = segmenter
        self.segmenter.trainable = False
        self.ensemble = (GBTEnsemble.from_booster(ensemble, name="gbt_ensemble")
                         if isinstance(ensemble, xgboost.Booster) else ensemble)
        self.features = FeatureExtractor(name="features")
        # === Functional Model ===
        inputs = keras.Input(shape=segmenter.input.shape[1:], name="image")
        maps = self.segmenter(inputs)
        score = keras.layers.Reshape((1,), name="cellularity", dtype="float32")(
            self.ensemble(self.features(maps)))
        super().__init__(inputs=inputs, outputs=score, trainable=False, **kwargs)
        # === Config ===
        self.segmenter_maps = maps

    def get_config(self) -> dict:
        return {"name": self.name,
                "segmenter": keras.saving.serialize_keras_object(self.segmenter),
                "ensemble": keras.saving.serialize_keras_object(self.ensemble)}

    @classmethod
    def from_config(cls, config: dict) -> "GBTCellularity":
        config = dict(config)
        config["segmenter"] = keras.saving.deserialize_keras_object(config["segmenter"])
        config["ensemble"] = keras.saving.deserialize_keras_object(config["ensemble"])
        return cls(**config)

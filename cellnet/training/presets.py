"""Training presets: data, not code paths.

``paper`` holds the settings the paper states (section 4.2: Adam, learning rate decaying from
1e-4 to 1e-5 over 150 epochs, random 256x256 crops of x2-downsampled images, alpha 0.15 (``jaccard_weight``),
malignant weight 4; GBT: learning rate 0.01, 600 rounds, depth 5, 8 leaves). Where the paper is
silent (batch sizes, the cellularity models' epochs, the cascade's fine-tuning schedule) the
values are ours and marked so in the README. ``cpu`` is a width-reduced, short schedule that
trains every method on the synthetic demo set in minutes on two CPU cores; ``tissue-cpu``
(segmentation only) is the recipe for real tissue on a CPU, chosen by leave-one-site-out.
"""
from __future__ import annotations

from cellnet.errors import CellnetError

PRESETS: dict[str, dict[str, dict]] = {
    "segmentation": {
        "paper": dict(epochs=150, batch_size=8, lr=1e-4, lr_final=1e-5, width=1.0, unit="preact",
                      crop=256, steps_per_epoch=None, jaccard_weight=0.15),
        "cpu": dict(epochs=10, batch_size=8, lr=2e-3, lr_final=2e-4, width=0.25, unit="preact",
                    crop=128, steps_per_epoch=12, jaccard_weight=0.15),
        # real tissue on two CPU cores (875 s measured while sharing them): the cpu network trained 8x longer
        # with stain augmentation (README, "Real tissue from a hospital the model has not seen")
        "tissue-cpu": dict(epochs=80, batch_size=8, lr=2e-3, lr_final=2e-4, width=0.25, unit="preact",
                           crop=128, steps_per_epoch=12, stain_aug=True, jaccard_weight=0.15),
    },
    "cellularity": {
        "paper": dict(epochs=100, batch_size=16, lr=1e-4, lr_final=1e-5, width=1.0, unit="preact",
                      steps_per_epoch=None, regression_activation="linear"),
        # sigmoid: on the demo's ~40 steps a linear head ended 2.4x worse (README, Models)
        "cpu": dict(epochs=6, batch_size=16, lr=2e-3, lr_final=2e-4, width=0.25, unit="preact",
                    steps_per_epoch=None, regression_activation="sigmoid"),
    },
    "cascade": {
        "paper": dict(epochs=50, finetune_epochs=50, batch_size=16, lr=1e-4, lr_final=1e-5,
                      finetune_lr=1e-5, width=1.0, unit="preact", steps_per_epoch=None,
                      regression_activation="linear"),
        "cpu": dict(epochs=4, finetune_epochs=1, batch_size=16, lr=2e-3, lr_final=2e-4,
                    finetune_lr=2e-4, width=0.25, unit="preact", steps_per_epoch=None,
                    regression_activation="sigmoid"),
    },
    # XGBoost names for the paper's LightGBM numbers (the rest of the mapping, from the authors'
    # lgbm.py, is LIGHTGBM_EQUIVALENTS in cellnet.training.boosting): rounds = num_boost_round
    # (the paper's 600; lgbm.py has NUM_ROUND = 6000), learning_rate = learning_rate,
    # max_depth = max_depth, max_leaves = num_leaves. batch_size is the feature extraction's.
    "gbt": {
        "paper": dict(rounds=600, learning_rate=0.01, max_depth=5, max_leaves=8, batch_size=16),
        "cpu": dict(rounds=600, learning_rate=0.01, max_depth=5, max_leaves=8, batch_size=16),
    },
}


def preset(task: str, name: str) -> dict:
    try:
        return dict(PRESETS[task][name])
    except KeyError:
        raise CellnetError(f"--preset: unknown preset {name!r} for {task} "
                           f"(choose from {', '.join(PRESETS.get(task, {}))})") from None

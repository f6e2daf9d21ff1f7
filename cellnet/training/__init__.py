"""Stage 3, training: how a model from :mod:`cellnet.models` is fitted and what a run leaves.

Per-task configuration with presets as data (``config``, ``presets``), run folders and resume
(``runs``), the augmenting training wrapper and the resumable fit (``trainer``), callbacks
(``callbacks``), losses and training metrics (``losses``), XGBoost fitting (``boosting``) and
the four training tasks the command line calls (``tasks``).
"""

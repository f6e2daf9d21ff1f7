"""Stage 1, data: from files on disk to batches of tensors.

The BreastPathQ reader (``breastpathq``), importers of other point formats (``importers``), the
synthetic dataset (``synth``), weak masks from points (``masks``), image reading at the edge
(``imageio``), TFRecord preparation with group-aware splits (``records``), the tf.data pipelines
(``pipeline``) and the batched on-device augmentation (``augment``). Nothing here knows a model.
"""

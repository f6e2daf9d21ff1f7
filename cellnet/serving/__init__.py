"""Stage 5, serving: what leaves cellnet and what runs it.

SavedModel export for TF Serving (``export``), batch prediction through an exported model
(``predict``) and whole-slide heatmaps for QuPath (``slide``).
"""

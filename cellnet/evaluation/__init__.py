"""Stage 4, evaluation: scoring trained runs on held-out data.

Metrics with confidence intervals (``metrics``), the engine that applies a model over a
prepared split (``engine``), the report with the paper's Tables 1-3 (``report``) and its
plots (``plots``).
"""

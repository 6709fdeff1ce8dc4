"""Continual-learning metrics (RA/ACC, BTI, BWT, FWT, forgetting, LA) and matrix plots."""

from metacl.metrics.continual import METRIC_KEYS, compute_metrics, partial_metrics
from metacl.metrics.plots import load_matrix_csv, save_matrix_csv, save_matrix_heatmap

__all__ = [
    "METRIC_KEYS",
    "compute_metrics",
    "load_matrix_csv",
    "partial_metrics",
    "save_matrix_csv",
    "save_matrix_heatmap",
]

"""Metrics in plain torch/numpy (no ``evaluate`` package): accuracy, base/novel/harmonic mean, and the
accuracy-matrix metrics of continual learning (Transfer, Average, Last, BWT, Plasticity)."""

from hf_cft.metrics.classification import (
    accuracy,
    base_novel_hm,
    base_novel_summary,
    harmonic_mean,
    per_class_accuracy,
)
from hf_cft.metrics.continual import (
    AccuracyMatrix,
    average,
    bwt,
    last,
    matrix_metrics,
    plasticity,
    round1,
    transfer,
)

__all__ = [
    "AccuracyMatrix",
    "accuracy",
    "average",
    "base_novel_hm",
    "base_novel_summary",
    "bwt",
    "harmonic_mean",
    "last",
    "matrix_metrics",
    "per_class_accuracy",
    "plasticity",
    "round1",
    "transfer",
]

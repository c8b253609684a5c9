"""Evaluation metrics, computed streaming in the evaluation loop: loss, perplexity and bits
per byte (`LossMetrics`), token accuracy, and functions users register by name."""

from .base import (
    FunctionMetric,
    LossMetrics,
    Metric,
    TokenAccuracy,
    build_metrics,
    register_metric,
)

__all__ = [
    "FunctionMetric",
    "LossMetrics",
    "Metric",
    "TokenAccuracy",
    "build_metrics",
    "register_metric",
]

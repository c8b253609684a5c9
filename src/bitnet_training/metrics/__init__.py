"""Evaluation metrics, computed streaming in the evaluation loop: loss, perplexity and bits
per byte (`LossMetrics`), token accuracy, functions users register by name, and BLEU / chrF
of generations (`GenerationScores`)."""

from .base import (
    FunctionMetric,
    LossMetrics,
    Metric,
    TokenAccuracy,
    build_metrics,
    register_metric,
)
from .generation import GenerationScores, read_pairs

__all__ = [
    "FunctionMetric",
    "GenerationScores",
    "LossMetrics",
    "Metric",
    "TokenAccuracy",
    "build_metrics",
    "read_pairs",
    "register_metric",
]

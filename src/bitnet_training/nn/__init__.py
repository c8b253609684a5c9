"""Modules: `BitLinear`, `RMSNorm`, the `quantize_model` transform, and the callbacks that
drive quantized layers during training."""

from .bitlinear import BitLinear
from .convert import ConversionReport, quantize_model
from .norm import RMSNorm
from .qat_callbacks import (
    LatentClipping,
    LinearWeightDecay,
    MultiStage,
    QATControl,
    QuantizationTuner,
    TernaryDiagnostics,
    TrainingStage,
)

__all__ = [
    "BitLinear",
    "ConversionReport",
    "LatentClipping",
    "LinearWeightDecay",
    "MultiStage",
    "QATControl",
    "QuantizationTuner",
    "RMSNorm",
    "TernaryDiagnostics",
    "TrainingStage",
    "quantize_model",
]

"""Modules: `BitLinear`, `RMSNorm`, and the `quantize_model` transform."""

from .bitlinear import BitLinear
from .convert import ConversionReport, quantize_model
from .norm import RMSNorm

__all__ = ["BitLinear", "ConversionReport", "RMSNorm", "quantize_model"]

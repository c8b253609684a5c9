"""Quantizers (pure functions), fake quantization with STE, and `QATConfig`."""

from .config import QATConfig
from .fake_quant import FakeQuantize, QuantSpec, clip_mask, fake_quantize, quantize, ste
from .functional import (
    Quantized,
    binary_quantize,
    bitnet_activation_quantize,
    dequantize,
    int_quantize,
    ternary_quantize,
)

__all__ = [
    "FakeQuantize",
    "QATConfig",
    "QuantSpec",
    "Quantized",
    "binary_quantize",
    "bitnet_activation_quantize",
    "clip_mask",
    "dequantize",
    "fake_quantize",
    "int_quantize",
    "quantize",
    "ste",
    "ternary_quantize",
]

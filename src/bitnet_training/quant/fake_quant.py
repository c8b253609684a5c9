"""Fake quantization with a straight-through estimator, as a function and as a module.

`fake_quantize(x, spec)` returns the dequantized value of `x` in the forward and passes the
gradient straight through in the backward, in the form of the BitNet training code:

    y = x + stopgrad(q(x) - x)

With `ste="clipped"` the gradient is zero where the quantizer clamped (the value lay outside
the grid's representable range), as PyTorch's own `torch.fake_quantize_per_tensor_affine`
does; for 1-bit weights, outside [alpha - beta, alpha + beta] (the hard-tanh STE of
BinaryConnect, scaled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .functional import (
    GRANULARITIES,
    Quantized,
    _grouped,
    _reduce,
    binary_quantize,
    dequantize,
    int_quantize,
    ternary_quantize,
    wide,
)

WEIGHT_BITS = (1, 1.58, 2, 3, 4, 5, 6, 7, 8)
STE_MODES = ("identity", "clipped")


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize a tensor to.

    bits: 1 (sign, BitNet), 1.58 (ternary absmean, BitNet b1.58) or an integer 2..8.
    symmetric: absmax grid around zero (True) or min-max grid with a zero point (False);
        only for integer bits.
    granularity: "tensor", "channel" (dim 0), "token" (last dim) or "group".
    group_size: elements per group of the last dim, with granularity "group".
    ste: "identity" (plain straight-through) or "clipped" (zero gradient where clamped).
    """

    bits: float = 1.58
    symmetric: bool = True
    granularity: str = "tensor"
    group_size: int | None = None
    ste: str = "identity"

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ConfigError("bits", self.bits, f"one of {', '.join(map(str, WEIGHT_BITS))}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError("granularity", self.granularity, f"one of {', '.join(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ConfigError(
                "group_size", self.group_size, "set exactly when granularity is 'group'"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ConfigError("group_size", self.group_size, "a positive integer")
        if self.ste not in STE_MODES:
            raise ConfigError("ste", self.ste, f"one of {', '.join(STE_MODES)}")
        if self.bits in (1, 1.58) and not self.symmetric:
            raise ConfigError("symmetric", self.symmetric, "True for 1-bit and 1.58-bit weights")


def quantize(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize `x` by `spec`, returning codes and scales (see `quant.functional`)."""
    if spec.bits == 1.58:
        return ternary_quantize(x, spec.granularity, spec.group_size)
    if spec.bits == 1:
        return binary_quantize(x, spec.granularity, spec.group_size)
    return int_quantize(x, int(spec.bits), spec.symmetric, spec.granularity, spec.group_size)


def _binary_mask(x: torch.Tensor, spec: QuantSpec, beta: torch.Tensor) -> torch.Tensor:
    # Recompute alpha = mean(W) per slice; the mask is |W - alpha| <= beta.
    g = _grouped(wide(x), spec.granularity, spec.group_size)
    if spec.granularity == "group":
        beta = beta.unsqueeze(-1)  # stored without the trailing group dim
    m = (g - _reduce(g, spec.granularity, "meanv")).abs() <= beta
    return m.reshape(x.shape)


def clip_mask(x: torch.Tensor, q: Quantized, spec: QuantSpec) -> torch.Tensor:
    """True where `x` lies inside the representable range of `q` (no clamping happened).

    For grid quantizers that is |x - dequantized| <= step / 2: rounding moves a value by at
    most half a step, clamping by more.
    """
    if spec.bits == 1:
        return _binary_mask(x, spec, q.scale)
    dq = dequantize(q)
    step = q.scale
    if step.dim() == x.dim() and step.shape[-1] not in (1, x.shape[-1]):  # per group
        step = step.repeat_interleave(x.shape[-1] // step.shape[-1], dim=-1)
    # The relative slack absorbs float rounding in x / step; only values within ~1e-6 of a
    # step of the range's edge could be classified differently from exact arithmetic.
    return (x.float() - dq).abs() <= 0.5 * step * (1 + 1e-6)


def ste(x: torch.Tensor, x_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through estimator: forward value `x_q`, gradient into `x` (masked if given)."""
    if mask is not None:
        x = torch.where(mask, x, x.detach())
    return x + (x_q - x).detach()


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize `x` in the forward, straight-through gradient in the backward.

    x: any float tensor; returns a tensor of the same shape and dtype.
    """
    q = quantize(x.detach(), spec)
    x_q = dequantize(q, x.dtype)
    mask = clip_mask(x.detach(), q, spec) if spec.ste == "clipped" else None
    return ste(x, x_q, mask)


class FakeQuantize(nn.Module):
    """Fake-quantizes any tensor by a `QuantSpec`; `enabled=False` makes it the identity.

    >>> fq = FakeQuantize(QuantSpec(bits=4, granularity="token"))
    >>> y = fq(torch.randn(2, 8))   # forward: on the 4-bit grid; backward: straight through
    """

    def __init__(self, spec: QuantSpec | None = None, enabled: bool = True):
        super().__init__()
        self.spec = spec or QuantSpec()
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec) if self.enabled else x

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, granularity={s.granularity}, ste={s.ste}, enabled={self.enabled}"

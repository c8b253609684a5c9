"""`QATConfig`: how `BitLinear` quantizes its weights and input activations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..errors import ConfigError
from .fake_quant import STE_MODES, WEIGHT_BITS, QuantSpec

ACTIVATION_BITS = (4, 8, None)
ACTIVATION_GRANULARITIES = ("token", "tensor")


@dataclass
class QATConfig:
    """Quantization-aware training settings; the defaults reproduce BitNet b1.58.

    weight_bits: 1 (BitNet sign), 1.58 (ternary absmean, the default) or 2..8 (integer).
    activation_bits: 8 (BitNet b1.58), 4 (BitNet a4.8 / v2) or None (full precision).
    symmetric: absmax grid (True) or min-max with zero point (False) for 2..8-bit weights.
    activation_symmetric: the same choice for activations (BitNet: True).
    per_channel: one weight scale per output channel instead of one per tensor.
    group_size: one weight scale per `group_size` input elements (excludes `per_channel`).
    activation_granularity: "token" (per token, BitNet) or "tensor".
    straight_through_estimator: "identity" or "clipped" (zero gradient where clamped).
    enable_weight_quantization / enable_activation_quantization: switch either side off.
    input_norm: RMSNorm inside BitLinear before quantizing (the BitNet FAQ form; the
        b1.58-2B4T architecture uses sub-norms outside the layer instead).
    fused: run BitLinear as one autograd function that saves int8 activation codes and
        per-token scales for the backward (less memory, same gradients); False runs the
        plain `x + stopgrad(q(x) - x)` form of the reference code.
    integer_matmul: in the fused form, run the forward matmul as an exact integer GEMM of
        activation and weight codes where the backend and layout allow it.
    cache_quantized_weight: quantize each weight once per optimizer step (re-quantize only
        when the latent weight changes) instead of once per forward.
    """

    weight_bits: float = 1.58
    activation_bits: int | None = 8
    symmetric: bool = True
    activation_symmetric: bool = True
    per_channel: bool = False
    group_size: int | None = None
    activation_granularity: str = "token"
    straight_through_estimator: str = "identity"
    enable_weight_quantization: bool = True
    enable_activation_quantization: bool = True
    input_norm: bool = False
    fused: bool = True
    integer_matmul: bool = True
    cache_quantized_weight: bool = True

    def __post_init__(self):
        def need(name, ok, allowed):
            if not ok:
                raise ConfigError(f"QATConfig.{name}", getattr(self, name), allowed)

        if isinstance(self.weight_bits, float) and self.weight_bits.is_integer():
            self.weight_bits = int(self.weight_bits)
        need(
            "weight_bits",
            not isinstance(self.weight_bits, bool) and self.weight_bits in WEIGHT_BITS,
            f"one of {', '.join(map(str, WEIGHT_BITS))}",
        )
        need(
            "activation_bits",
            not isinstance(self.activation_bits, bool) and self.activation_bits in ACTIVATION_BITS,
            "4, 8 or None",
        )
        for name in (
            "symmetric",
            "activation_symmetric",
            "per_channel",
            "enable_weight_quantization",
            "enable_activation_quantization",
            "input_norm",
            "fused",
            "integer_matmul",
            "cache_quantized_weight",
        ):
            need(name, isinstance(getattr(self, name), bool), "true or false")
        need(
            "group_size",
            self.group_size is None
            or (
                (isinstance(self.group_size, int) and not isinstance(self.group_size, bool))
                and self.group_size > 0
            ),
            "a positive integer or None",
        )
        need(
            "group_size",
            not (self.per_channel and self.group_size is not None),
            "None when per_channel is true (choose one granularity)",
        )
        need(
            "activation_granularity",
            self.activation_granularity in ACTIVATION_GRANULARITIES,
            " or ".join(ACTIVATION_GRANULARITIES),
        )
        need(
            "straight_through_estimator",
            self.straight_through_estimator in STE_MODES,
            " or ".join(STE_MODES),
        )
        need(
            "symmetric",
            self.symmetric or self.weight_bits not in (1, 1.58),
            "true for 1-bit and 1.58-bit weights",
        )

    @classmethod
    def off(cls) -> QATConfig:
        """A config with quantization switched off: BitLinear then equals nn.Linear."""
        return cls(enable_weight_quantization=False, enable_activation_quantization=False)

    def weight_spec(self) -> QuantSpec | None:
        """The weight quantizer, or None when weight quantization is off."""
        if not self.enable_weight_quantization:
            return None
        granularity = "group" if self.group_size else "channel" if self.per_channel else "tensor"
        return QuantSpec(
            bits=self.weight_bits,
            symmetric=self.symmetric,
            granularity=granularity,
            group_size=self.group_size,
            ste=self.straight_through_estimator,
        )

    def activation_spec(self) -> QuantSpec | None:
        """The activation quantizer, or None when activations stay full precision."""
        if not self.enable_activation_quantization or self.activation_bits is None:
            return None
        return QuantSpec(
            bits=self.activation_bits,
            symmetric=self.activation_symmetric,
            granularity=self.activation_granularity,
            ste=self.straight_through_estimator,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QATConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(
                    f"QATConfig.{key}", d[key], f"a known field ({', '.join(sorted(known))})"
                )
        return cls(**d)

    def replace(self, **changes) -> QATConfig:
        return replace(self, **changes)

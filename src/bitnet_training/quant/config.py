"""`QATConfig`: how `BitLinear` quantizes its weights and input activations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import ConfigError
from .fake_quant import STE_MODES, WEIGHT_BITS, QuantSpec
from .observers import OBSERVERS
from .schedule import BitStage, QuantizationSchedule

ACTIVATION_BITS = (4, 8, None)
ACTIVATION_GRANULARITIES = ("token", "tensor")
NORM_PLACEMENTS = ("model", "input", "subln")


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
    norm_placement: where the norms that feed quantized layers sit: `model` (the model's own;
        `BitNetLM` has 2B4T's sub-norms), `input` (an RMSNorm inside each BitLinear before
        quantizing: the BitNet FAQ form) or `subln` (sub-norms inserted before `o_proj` and
        `down_proj` under 2B4T's names, BitDistill's SubLN step; for models without them).
    latent_clip: after every optimizer step, clamp each BitLinear's latent weights to
        +-latent_clip times its quantization scale (a latent weight far beyond the rounding
        threshold could never flip back; None: off).
    weight_decay_on: `matrices` (every weight of 2+ dimensions, embeddings included, as
        nanoGPT) or `linear` (only linear layers' weights: no decay on embeddings, norms,
        biases or quantizer scales).
    fused: run BitLinear as one autograd function that saves int8 activation codes and
        per-token scales for the backward (less memory, same gradients); False runs the
        plain `x + stopgrad(q(x) - x)` form of the reference code.
    integer_matmul: in the fused form, run the forward matmul as an exact integer GEMM of
        activation and weight codes where the backend and layout allow it.
    cache_quantized_weight: quantize each weight once per optimizer step (re-quantize only
        when the latent weight changes) instead of once per forward.
    weight_schedule / activation_schedule: progressive quantization, a `QuantizationSchedule`
        of the blend strength lambda in `x + lambda * stopgrad(q(x) - x)` (None: lambda = 1).
    weight_bit_stages: `BitStage(step, bits)` list, e.g. 8 -> 4 -> 2 -> 1.58 bits; before the
        first stage, and without stages, weights use `weight_bits`.
    quant_noise: Quant-Noise (Fan et al. 2020, arXiv 2004.07320): in training, each forward
        quantizes a random fraction `quant_noise` of weight blocks (`quant_noise_block_size`
        consecutive input elements of a row) and leaves the rest full precision (None: off,
        every block quantized).
    noise_factor: in training, add uniform noise of `noise_factor` quantization steps,
        U(-1/2, 1/2) * noise_factor * scale, to the quantized weights (0: off).
    activation_observer: static activation quantization with ranges from an observer,
        `minmax`, `ema` (moving average, `observer_momentum`) or `percentile`
        (`observer_percentile`), per tensor or, with `activation_per_channel`, per input
        feature; symmetric or not by `activation_symmetric`; 8 or 4 bits. None (default):
        BitNet's dynamic per-token absmax.
    online_calibration / calibration_frequency / calibration_samples / calibration_until: the
        observer watches the first `calibration_samples` training samples (sequences), then
        its ranges freeze; with online calibration it watches that many again every
        `calibration_frequency` steps, until step `calibration_until` (None: throughout).
    learnable_scales: LSQ (Esser et al. 2019, arXiv 1902.08153): the activation step size is a
        parameter, initialized from the observer's first calibration, trained with LSQ's
        gradient scaling (needs an observer and symmetric activations).
    The schedules, stages and noise act only in training and need the step from a
    `QATControl` callback (the CLI adds it); evaluation sees the current lambda and bits.
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
    norm_placement: str = "model"
    latent_clip: float | None = None
    weight_decay_on: str = "matrices"
    fused: bool = True
    integer_matmul: bool = True
    cache_quantized_weight: bool = True
    weight_schedule: QuantizationSchedule | None = None
    activation_schedule: QuantizationSchedule | None = None
    weight_bit_stages: list[BitStage] = field(default_factory=list)
    quant_noise: float | None = None
    quant_noise_block_size: int = 8
    noise_factor: float = 0.0
    activation_observer: str | None = None
    activation_per_channel: bool = False
    observer_momentum: float = 0.01
    observer_percentile: float = 99.99
    online_calibration: bool = True
    calibration_frequency: int = 1000
    calibration_samples: int = 512
    calibration_until: int | None = None
    learnable_scales: bool = False

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
        need("norm_placement", self.norm_placement in NORM_PLACEMENTS, "model, input or subln")
        need(
            "weight_decay_on", self.weight_decay_on in ("matrices", "linear"), "matrices or linear"
        )
        lc = self.latent_clip
        need(
            "latent_clip",
            lc is None or (isinstance(lc, int | float) and not isinstance(lc, bool) and lc > 0),
            "a positive number or None",
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

        for name in ("weight_schedule", "activation_schedule"):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, QuantizationSchedule(**v))
            need(
                name,
                v is None or isinstance(getattr(self, name), QuantizationSchedule),
                "a QuantizationSchedule, a mapping of its fields, or None",
            )
        stages = []
        for st in self.weight_bit_stages or []:
            if isinstance(st, dict):
                st = BitStage(**st)
            elif isinstance(st, list | tuple) and len(st) == 2:
                st = BitStage(*st)
            need(
                "weight_bit_stages",
                isinstance(st, BitStage),
                "a list of BitStage(step, bits), {step, bits} mappings or [step, bits] pairs",
            )
            stages.append(st)
        self.weight_bit_stages = sorted(stages, key=lambda st: st.step)
        need(
            "quant_noise",
            self.quant_noise is None
            or (
                isinstance(self.quant_noise, int | float)
                and not isinstance(self.quant_noise, bool)
                and 0 < self.quant_noise <= 1
            ),
            "a fraction in (0, 1] or None (off)",
        )
        need(
            "quant_noise_block_size",
            isinstance(self.quant_noise_block_size, int)
            and not isinstance(self.quant_noise_block_size, bool)
            and self.quant_noise_block_size > 0,
            "a positive integer",
        )
        need(
            "noise_factor",
            isinstance(self.noise_factor, int | float)
            and not isinstance(self.noise_factor, bool)
            and self.noise_factor >= 0,
            "a number >= 0",
        )

        obs = self.activation_observer
        need(
            "activation_observer",
            obs is None or obs in OBSERVERS,
            f"{', '.join(OBSERVERS)} or None (dynamic per-token)",
        )
        need(
            "activation_observer",
            obs is None or self.activation_bits is not None,
            "None when activation_bits is None",
        )
        for name in ("activation_per_channel", "online_calibration", "learnable_scales"):
            need(name, isinstance(getattr(self, name), bool), "true or false")
        need(
            "activation_per_channel",
            not self.activation_per_channel or obs is not None,
            "false unless activation_observer is set (dynamic activations are per token)",
        )
        m = self.observer_momentum
        need("observer_momentum", isinstance(m, int | float) and 0 < m <= 1, "a number in (0, 1]")
        pc = self.observer_percentile
        need(
            "observer_percentile",
            isinstance(pc, int | float) and 50 < pc <= 100,
            "a number in (50, 100]",
        )
        for name in ("calibration_frequency", "calibration_samples"):
            v = getattr(self, name)
            need(
                name, isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"
            )
        u = self.calibration_until
        need(
            "calibration_until",
            u is None or (isinstance(u, int) and u >= 0),
            "an integer >= 0 or None",
        )
        need(
            "learnable_scales",
            not self.learnable_scales or obs is not None,
            "false unless activation_observer is set (LSQ starts from its calibration)",
        )
        need(
            "learnable_scales",
            not self.learnable_scales or self.activation_symmetric,
            "false unless activation_symmetric is true (LSQ's signed grid)",
        )

    @property
    def progressive(self) -> bool:
        """Whether anything here depends on the training step (schedules, stages, noise)."""
        return bool(
            self.weight_schedule
            or self.activation_schedule
            or self.weight_bit_stages
            or self.quant_noise
            or self.noise_factor
            or self.activation_observer
        )

    @property
    def input_norm(self) -> bool:
        """Whether each BitLinear normalizes its own input (`norm_placement: input`)."""
        return self.norm_placement == "input"

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

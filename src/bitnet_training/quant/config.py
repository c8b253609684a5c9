"""`QATConfig`: how `BitLinear` quantizes its weights and input activations."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..settings import Section
from .fake_quant import STE_MODES, WEIGHT_BITS, QuantSpec
from .observers import OBSERVERS
from .schedule import BitStage, QuantizationSchedule


class QATConfig(Section):
    """Quantization-aware training settings; the defaults reproduce BitNet b1.58. The
    schedules, stages and noise act only in training and follow the step a `QATControl`
    callback gives (every `BitLinear` declares it); evaluation sees the current lambda and
    bits."""

    _path = "QATConfig"
    _moved: ClassVar = {"input_norm": (False, "qat.norm_placement=input")}

    weight_bits: Literal[WEIGHT_BITS] = Field(
        1.58, description="1 (BitNet sign), 1.58 (ternary absmean) or 2..8 (integer)"
    )
    activation_bits: Literal[4, 8] | None = Field(
        8, description="8 (BitNet b1.58), 4 (BitNet a4.8 / v2) or None (full precision)"
    )
    symmetric: bool = Field(
        True, description="absmax grid, or min-max with a zero point, for 2..8-bit weights"
    )
    activation_symmetric: bool = Field(True, description="the same choice for activations")
    per_channel: bool = Field(False, description="one weight scale per output channel")
    group_size: int | None = Field(
        None, gt=0, description="one weight scale per this many input elements"
    )
    activation_granularity: Literal["token", "tensor"] = Field(
        "token", description="one activation scale per token (BitNet) or per tensor"
    )
    straight_through_estimator: Literal[STE_MODES] = Field(
        "identity", description="clipped: zero gradient where the quantizer clamps"
    )
    enable_weight_quantization: bool = Field(True, description="false: full-precision weights")
    enable_activation_quantization: bool = Field(
        True, description="false: full-precision activations"
    )
    norm_placement: Literal["model", "input", "subln"] = Field(
        "model",
        description="the norms feeding quantized layers: the model's own (BitNetLM has "
        "2B4T's sub-norms), an RMSNorm inside each BitLinear (the BitNet FAQ form) or "
        "sub-norms inserted before o_proj and down_proj (BitDistill's SubLN)",
    )
    latent_clip: float | None = Field(
        None,
        gt=0,
        description="after each optimizer step, clamp latent weights to +-this times the "
        "quantization scale, so they can still flip (None: off)",
    )
    weight_decay_on: Literal["matrices", "linear"] = Field(
        "matrices",
        description="decay every 2-D weight, embeddings included (nanoGPT), or only linear "
        "layers' weights",
    )
    fused: bool = Field(
        True,
        description="one autograd function saving int8 activation codes for the backward "
        "(or the bf16 x_q its GEMM made: saved_activations; less memory, same gradients)",
    )
    integer_matmul: Literal["auto", True, False] = Field(
        "auto",
        description="fused: the forward matmul as an exact integer GEMM of the codes (true) or "
        "the float GEMM of the quantized values (false, the reference's numbers); auto: "
        "integer in float32 / float64 or where gemm names a kernel, float in fp16, and in "
        "bf16 the faster of the two, measured once per layer shape (kept in checkpoints)",
    )
    saved_activations: Literal["auto", "codes", "values"] = Field(
        "auto",
        description="fused: what the backward keeps of each quantized input: its int8 codes "
        "and one scale per token (1 byte an element; x_q rebuilt in the backward) or x_q "
        "itself in the compute dtype (no rebuild); auto: values where the forward runs the "
        "float GEMM of x_q in bf16 / fp16 (2 bytes, already made), codes otherwise",
    )
    gemm: Literal["auto", "onednn", "int_mm", "float"] = Field(
        "auto",
        description="the integer GEMM's kernel: oneDNN's int8 linear, torch._int_mm, or the "
        "codes in the compute dtype; auto: the fastest, measured once per shape (all exact, "
        "same results)",
    )
    kernels: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="the quantizers' kernels: native fuses each into one pass (on CPU in C, "
        "built with the C compiler on first use; on CUDA the activation quantizer in Triton, "
        "checked against PyTorch's ops on the device first), torch runs PyTorch ops; auto: "
        "native where it runs (same values)",
    )
    cache_quantized_weight: bool = Field(
        True, description="quantize each weight once per optimizer step, not per forward"
    )
    weight_schedule: QuantizationSchedule | None = Field(
        None,
        description="progressive quantization: lambda of x + lambda * stopgrad(q(x) - x) "
        "over the steps (None: 1)",
    )
    activation_schedule: QuantizationSchedule | None = Field(
        None, description="the same for activations"
    )
    weight_bit_stages: list[BitStage] = Field(
        default_factory=list,
        description="weight bit widths by step, e.g. 8 -> 4 -> 2 -> 1.58 (before the first "
        "stage: weight_bits)",
    )
    quant_noise: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Quant-Noise (arXiv 2004.07320): the share of weight blocks quantized in "
        "each training forward (None: all)",
    )
    quant_noise_block_size: int = Field(
        8, gt=0, description="Quant-Noise: consecutive input elements of a row per block"
    )
    noise_factor: float = Field(
        0.0, ge=0, description="training: add U(-1/2, 1/2) * this * scale to quantized weights"
    )
    activation_observer: Literal[OBSERVERS] | None = Field(
        None,
        description="static activation ranges from an observer (None: BitNet's dynamic "
        "per-token absmax)",
    )
    activation_per_channel: bool = Field(False, description="observer: one range per input feature")
    observer_momentum: float = Field(0.01, gt=0, le=1, description="ema: the average's momentum")
    observer_percentile: float = Field(
        99.99, gt=50, le=100, description="percentile: the range's percentile"
    )
    online_calibration: bool = Field(
        True, description="observer: recalibrate every calibration_frequency steps"
    )
    calibration_frequency: int = Field(1000, gt=0, description="steps between calibrations")
    calibration_samples: int = Field(
        512, gt=0, description="sequences each calibration watches before the ranges freeze"
    )
    calibration_until: int | None = Field(
        None, ge=0, description="no calibration from this step on (None: throughout)"
    )
    learnable_scales: bool = Field(
        False,
        description="LSQ (arXiv 1902.08153): a trained activation step size, from the "
        "observer's first calibration",
    )

    @field_validator("integer_matmul", mode="before")
    @classmethod
    def _not_a_number(cls, v):
        # A Literal of True / False would also take 1 and 0.0 (they compare equal).
        if not isinstance(v, bool) and v != "auto":
            raise ValueError("expected auto, true or false")
        return v

    @field_validator("weight_bit_stages")
    @classmethod
    def _in_order(cls, stages):
        return sorted(stages, key=lambda st: st.step)

    @model_validator(mode="after")
    def _check(self):
        obs = self.activation_observer
        rules = [
            ("group_size", self.per_channel and self.group_size is not None,
             "None when per_channel is true (choose one granularity)"),
            ("symmetric", not self.symmetric and self.weight_bits in (1, 1.58),
             "true for 1-bit and 1.58-bit weights"),
            ("activation_observer", obs is not None and self.activation_bits is None,
             "None when activation_bits is None"),
            ("activation_per_channel", self.activation_per_channel and obs is None,
             "false unless activation_observer is set (dynamic activations are per token)"),
            ("learnable_scales", self.learnable_scales and obs is None,
             "false unless activation_observer is set (LSQ starts from its calibration)"),
            ("learnable_scales", self.learnable_scales and not self.activation_symmetric,
             "false unless activation_symmetric is true (LSQ's signed grid)"),
        ]  # fmt: skip
        for name, broken, allowed in rules:
            if broken:
                raise ConfigError(name, getattr(self, name), allowed)
        if self.kernels == "native":
            from . import native  # builds the kernel once per process

            if native.library() is None:
                raise ConfigError(
                    "kernels",
                    "native",
                    f"auto or torch here: it cannot be built ({native.build_error()})",
                )
        return self

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

    def replace(self, **changes) -> QATConfig:
        """A validated copy with `changes` applied."""
        return type(self)(**{**dict(self), **changes})

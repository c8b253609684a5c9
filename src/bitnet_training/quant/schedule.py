"""Progressive quantization: how strongly, and at how many bits, quantization acts at a step.

`QuantizationSchedule` gives the blend strength lambda in [0, 1] of

    y = x + lambda * stopgrad(q(x) - x)

(lambda = 0: full precision, 1: fully quantized), rising from `start` to `end` along a
shape: the warm-up of Hugging Face's "Fine-tuning LLMs to 1.58bit" recipe, which is what makes
converting a trained full-precision model to ternary work (switching at once destroys it).
`BitStage`s give a weight bit width per step range (e.g. 8 -> 4 -> 2 -> 1.58 bits).
Both are pure functions of the optimizer step, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .fake_quant import WEIGHT_BITS

SHAPES = ("linear", "cosine", "sigmoid", "step")


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class QuantizationSchedule:
    """lambda(step): 0 before `start_step`, 1 from `end_step` on, and between them

    linear: t;  cosine: (1 - cos(pi t)) / 2;  sigmoid: a logistic in t centred at 1/2 with
    slope `sharpness`, rescaled to run exactly from 0 to 1;  step: 0 until `end_step`,

    with t = (step - start_step) / (end_step - start_step). `start_epoch` / `end_epoch`, when
    set, replace the step bounds (epochs may be fractional) once the run's steps per epoch are
    known (see `resolve`).
    """

    shape: str = "linear"
    start_step: int = 0
    end_step: int = 1000
    start_epoch: float | None = None
    end_epoch: float | None = None
    sharpness: float = 10.0

    def __post_init__(self):
        p = "qat.schedule"
        if self.shape not in SHAPES:
            raise ConfigError(f"{p}.shape", self.shape, ", ".join(SHAPES))
        for name in ("start_step", "end_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{p}.{name}", v, "an integer >= 0")
        if self.end_step < self.start_step:
            raise ConfigError(f"{p}.end_step", self.end_step, f">= start_step ({self.start_step})")
        for name in ("start_epoch", "end_epoch"):
            v = getattr(self, name)
            if v is not None and not (_num(v) and v >= 0):
                raise ConfigError(f"{p}.{name}", v, "a number >= 0 or None")
        if (self.start_epoch is None) != (self.end_epoch is None):
            raise ConfigError(f"{p}.end_epoch", self.end_epoch, "set together with start_epoch")
        if self.start_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError(f"{p}.end_epoch", self.end_epoch, ">= start_epoch")
        if not (_num(self.sharpness) and self.sharpness > 0):
            raise ConfigError(f"{p}.sharpness", self.sharpness, "a positive number")

    def resolve(self, steps_per_epoch: float) -> QuantizationSchedule:
        """The same schedule in steps (epoch bounds converted; step bounds kept)."""
        if self.start_epoch is None:
            return self
        return QuantizationSchedule(
            self.shape,
            round(self.start_epoch * steps_per_epoch),
            round(self.end_epoch * steps_per_epoch),
            sharpness=self.sharpness,
        )

    def value(self, step: int) -> float:
        """lambda at optimizer step `step` (0-based)."""
        if self.start_epoch is not None:
            raise ConfigError("qat.schedule", "epochs", "resolve(steps_per_epoch) before value()")
        if step >= self.end_step:
            return 1.0
        if step < self.start_step:
            return 0.0
        if self.shape == "step":
            return 0.0
        t = (step - self.start_step) / (self.end_step - self.start_step)
        if self.shape == "linear":
            return t
        if self.shape == "cosine":
            return 0.5 * (1 - math.cos(math.pi * t))

        def logistic(u):
            return 1 / (1 + math.exp(-self.sharpness * (u - 0.5)))

        lo, hi = logistic(0.0), logistic(1.0)
        return (logistic(t) - lo) / (hi - lo)


@dataclass
class BitStage:
    """Weights quantize to `bits` from optimizer step `step` on (until the next stage)."""

    step: int = 0
    bits: float = 1.58

    def __post_init__(self):
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise ConfigError("qat.weight_bit_stages.step", self.step, "an integer >= 0")
        if isinstance(self.bits, float) and self.bits.is_integer():
            self.bits = int(self.bits)
        if self.bits not in WEIGHT_BITS:
            raise ConfigError(
                "qat.weight_bit_stages.bits",
                self.bits,
                f"one of {', '.join(map(str, WEIGHT_BITS))}",
            )


def bits_at(stages: list[BitStage], step: int, default: float) -> float:
    """The weight bit width at `step`: the last stage that has begun, else `default`."""
    bits = default
    for s in sorted(stages, key=lambda s: s.step):
        if step >= s.step:
            bits = s.bits
    return bits

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
from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..settings import Section
from .fake_quant import WEIGHT_BITS


class QuantizationSchedule(Section):
    """lambda(step): 0 before `start_step`, 1 from `end_step` on, and between them

    linear: t;  cosine: (1 - cos(pi t)) / 2;  sigmoid: a logistic in t centred at 1/2 with
    slope `sharpness`, rescaled to run exactly from 0 to 1;  step: 0 until `end_step`,

    with t = (step - start_step) / (end_step - start_step). `start_epoch` / `end_epoch`, when
    set, replace the step bounds (epochs may be fractional) once the run's steps per epoch are
    known (see `resolve`).
    """

    _path = "QuantizationSchedule"

    shape: Literal["linear", "cosine", "sigmoid", "step"] = Field(
        "linear", description="how lambda rises from 0 to 1"
    )
    start_step: int = Field(0, ge=0, description="lambda is 0 before this optimizer step")
    end_step: int = Field(1000, ge=0, description="lambda is 1 from this optimizer step on")
    start_epoch: float | None = Field(
        None, ge=0, description="replaces start_step when set (fractional epochs allowed)"
    )
    end_epoch: float | None = Field(None, ge=0, description="replaces end_step when set")
    sharpness: float = Field(10.0, gt=0, description="sigmoid: the logistic's slope")

    @model_validator(mode="after")
    def _check(self):
        if self.end_step < self.start_step:
            raise ConfigError("end_step", self.end_step, f">= start_step ({self.start_step})")
        if (self.start_epoch is None) != (self.end_epoch is None):
            raise ConfigError("end_epoch", self.end_epoch, "set together with start_epoch")
        if self.start_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError("end_epoch", self.end_epoch, ">= start_epoch")
        return self

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


class BitStage(Section):
    """Weights quantize to `bits` from optimizer step `step` on (until the next stage)."""

    _path = "BitStage"
    _as_list = True

    step: int = Field(0, ge=0, description="the first optimizer step of the stage")
    bits: Literal[WEIGHT_BITS] = Field(1.58, description="the weight bit width from then on")


def bits_at(stages: list[BitStage], step: int, default: float) -> float:
    """The weight bit width at `step`: the last stage that has begun, else `default`."""
    bits = default
    for s in sorted(stages, key=lambda s: s.step):
        if step >= s.step:
            bits = s.bits
    return bits

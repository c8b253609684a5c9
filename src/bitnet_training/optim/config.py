"""Configs of the optimizer and the learning-rate schedule."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..settings import Refused, Section


class OptimizerConfig(Section):
    """The optimizer. Weight decay applies to matrices (linear and embedding weights), never
    to norms or biases (`qat.weight_decay_on: linear` narrows it to linear layers)."""

    _path = "training.optimizer"
    _shorthand = "name"
    _moved: ClassVar = {"latent_clip": (None, "qat.latent_clip")}

    name: Literal["adamw", "adamw8bit", "sgd"] = Field(
        "adamw",
        description="the optimizer; adamw8bit: AdamW with 8-bit block-quantized moments "
        "(bitsandbytes)",
    )
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay of matrices")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay (BitNet)")
    eps: float = Field(1e-8, gt=0, description="AdamW's denominator epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD's momentum")
    nesterov: bool = Field(False, description="SGD's Nesterov momentum (needs momentum > 0)")
    paged: bool = Field(
        False,
        description="AdamW: page optimizer states out of GPU memory under pressure "
        "(bitsandbytes; needs a CUDA GPU)",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _moved_names(cls, v):
        if v in ("qat_adamw", "qat_sgd"):
            raise Refused(
                "",
                "{key}=" + repr(v) + f" moved: set {{key}}={v[4:]} with "
                "qat.weight_decay_on=linear instead",
            )
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("momentum", self.momentum, "> 0 when nesterov is on")
        if self.paged and self.name == "sgd":
            raise ConfigError("paged", True, "false with sgd (bitsandbytes pages AdamW's states)")
        return self


class SchedulerConfig(Section):
    """The learning-rate schedule, applied per optimizer step after `warmup_steps` of linear
    warm-up from 0. constant: the peak LR throughout. linear / cosine: decay from the peak to
    `eta_min` over `t_max` steps. two_stage: BitNet b1.58's recipe (training-tips FAQ): linear
    decay from the peak; at the halfway point the LR drops to `stage_two_lr_factor` of its
    value and decays on, and weight decay changes to `stage_two_weight_decay` (0: a latent
    weight's magnitude is the confidence of its ternary value, and decay would make it flip).
    wsd (warmup-stable-decay): the peak LR until the last `decay_fraction` of the run, then
    linear decay to `eta_min`."""

    _path = "training.scheduler"
    _shorthand = "name"

    name: Literal["constant", "linear", "cosine", "two_stage", "wsd"] = Field(
        "two_stage", description="the schedule's shape (two_stage: BitNet b1.58's)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from LR 0")
    t_max: int | None = Field(
        None, gt=0, description="linear / cosine: decay steps (None: the rest of the run)"
    )
    eta_min: float = Field(0.0, ge=0, description="linear / cosine / wsd: the final LR")
    stage_two_lr_factor: float = Field(
        2 / 3,  # 700M recipe: peak 1.5e-3, stage two 1e-3
        gt=0,
        le=1,
        description="two_stage: LR factor at the halfway drop",
    )
    stage_two_weight_decay: float = Field(
        0.0, ge=0, description="two_stage: weight decay from the halfway point on"
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: the final share of the run that decays"
    )

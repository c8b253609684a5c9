"""Configs of the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "two_stage", "wsd")


def _need(path: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(path, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(path, v, optional=False):
    _need(
        path,
        v,
        (optional and v is None) or (_is_int(v) and v > 0),
        "a positive integer" + (" or None" if optional else ""),
    )


@dataclass
class OptimizerConfig:
    """The optimizer: `adamw` (default; BitNet uses betas (0.9, 0.95)) or `sgd`. Weight
    decay applies to matrices (linear and embedding weights), never to norms or biases
    (quantization's `qat.weight_decay_on: linear` narrows it to linear layers).
    `momentum` and `nesterov` are SGD's; `beta1`, `beta2`, `eps` are AdamW's.
    """

    name: str = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self):
        p = "training.optimizer"
        _need(f"{p}.name", self.name, self.name in OPTIMIZERS, " or ".join(OPTIMIZERS))
        _need(
            f"{p}.weight_decay",
            self.weight_decay,
            _is_num(self.weight_decay) and self.weight_decay >= 0,
            "a number >= 0",
        )
        for name in ("beta1", "beta2", "momentum"):
            v = getattr(self, name)
            _need(f"{p}.{name}", v, _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
        _need(f"{p}.eps", self.eps, _is_num(self.eps) and self.eps > 0, "a positive number")
        _need(f"{p}.nesterov", self.nesterov, isinstance(self.nesterov, bool), "true or false")
        if self.nesterov and self.name == "sgd":
            _need(f"{p}.momentum", self.momentum, self.momentum > 0, "> 0 when nesterov is on")


@dataclass
class SchedulerConfig:
    """The learning-rate schedule, applied per optimizer step after `warmup_steps` of linear
    warm-up from 0.

    constant: the peak LR throughout. linear / cosine: decay from the peak to `eta_min`
    (an absolute LR) over `t_max` steps (default: the rest of the run). two_stage: BitNet
    b1.58's recipe (training-tips FAQ): linear decay from the peak; at the halfway point the LR
    drops to `stage_two_lr_factor` of its value and decays on, and weight decay changes
    from the optimizer's value to `stage_two_weight_decay` (0: the latent weights' magnitude
    is the confidence of their ternary value, and decay would make them flip). wsd
    (warmup-stable-decay): the peak LR until the last `decay_fraction` of the run, then linear
    decay to `eta_min`.
    """

    name: str = "two_stage"
    warmup_steps: int = 0
    t_max: int | None = None
    eta_min: float = 0.0
    stage_two_lr_factor: float = 2 / 3  # 700M recipe: peak 1.5e-3, stage two 1e-3
    stage_two_weight_decay: float = 0.0
    decay_fraction: float = 0.2

    def __post_init__(self):
        p = "training.scheduler"
        _need(f"{p}.name", self.name, self.name in SCHEDULERS, ", ".join(SCHEDULERS))
        _need(
            f"{p}.warmup_steps",
            self.warmup_steps,
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "an integer >= 0",
        )
        _positive_int(f"{p}.t_max", self.t_max, optional=True)
        _need(
            f"{p}.eta_min",
            self.eta_min,
            _is_num(self.eta_min) and self.eta_min >= 0,
            "a number >= 0",
        )
        f = self.stage_two_lr_factor
        _need(f"{p}.stage_two_lr_factor", f, _is_num(f) and 0 < f <= 1, "a number in (0, 1]")
        df = self.decay_fraction
        _need(f"{p}.decay_fraction", df, _is_num(df) and 0 < df <= 1, "a number in (0, 1]")
        wd = self.stage_two_weight_decay
        _need(f"{p}.stage_two_weight_decay", wd, _is_num(wd) and wd >= 0, "a number >= 0")

"""Learning-rate (and weight-decay) schedules as `torch.optim.lr_scheduler.LambdaLR`s.

Each schedule is a small picklable callable `step -> factor of the peak LR`, so
`LambdaLR.state_dict()` captures it and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .config import SchedulerConfig


@dataclass
class ScheduleFn:
    """The LR factor at optimizer step `step` (0-based: the factor used by the step-th update).

    warmup: linear 1/(warmup) ... 1 over the first `warmup` steps (never 0, so the first
    update is not wasted). After warm-up, `kind` decays the factor from 1 to `floor` over
    `decay_steps`: constant (no decay), linear, cosine (`floor + (1-floor)(1+cos(pi t))/2`),
    two_stage (linear, times `stage_two_factor` from step `halfway` on), wsd (1 for `stable`
    steps, then linear over `decay_steps`).
    """

    kind: str
    warmup: int
    decay_steps: int
    floor: float
    halfway: int = 0
    stage_two_factor: float = 1.0
    stable: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":  # warmup-stable-decay: hold the peak, then decay at the end
            if step < self.warmup + self.stable:
                return 1.0
            t = min(1.0, (step - self.warmup - self.stable) / max(1, self.decay_steps))
            return self.floor + (1 - self.floor) * (1 - t)
        t = min(1.0, (step - self.warmup) / max(1, self.decay_steps))
        if self.kind == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))
        f = self.floor + (1 - self.floor) * (1 - t)
        if self.kind == "two_stage" and step >= self.halfway:
            f *= self.stage_two_factor
        return f


class ScheduledLR(LambdaLR):
    """`LambdaLR` over a `ScheduleFn` that can also switch the weight decay of the decayed
    parameter groups at a step (BitNet's two-stage recipe: 0.1, then 0 from the halfway
    point). Groups whose initial weight decay is 0 are never touched."""

    def __init__(self, optimizer, fn: ScheduleFn, wd_switch_step=None, wd_after=0.0):
        self.fn, self.wd_switch_step, self.wd_after = fn, wd_switch_step, wd_after
        for g in optimizer.param_groups:
            g.setdefault("initial_weight_decay", g.get("weight_decay", 0.0))
        super().__init__(optimizer, fn)

    def get_lr(self):
        if self.wd_switch_step is not None:
            late = self.last_epoch >= self.wd_switch_step
            for g in self.optimizer.param_groups:
                if g["initial_weight_decay"] > 0:
                    g["weight_decay"] = self.wd_after if late else g["initial_weight_decay"]
        return super().get_lr()

    def state_dict(self) -> dict:
        state = {k: v for k, v in super().state_dict().items() if k != "fn"}
        state["lr_lambdas"] = [asdict(self.fn)]  # plain numbers: JSON-safe
        return state

    def continue_at(self, step: int) -> None:
        """Jump to optimizer step `step` on this schedule (its own shape and peak LR): how a
        resumed run applies the schedule its current config describes. The schedule is a
        pure function of the step, so this equals having stepped `step` times."""
        self.last_epoch = step
        self._get_lr_called_within_step = True  # get_lr is called on purpose, not by a user
        try:
            lrs = self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        self._last_lr = list(lrs)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.fn = ScheduleFn(**state.pop("lr_lambdas")[0])
        n = len(self.optimizer.param_groups)
        self.lr_lambdas = [self.fn] * n
        super().load_state_dict({**state, "lr_lambdas": [None] * n})


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, total_steps: int, peak_lr: float
) -> ScheduledLR:
    """The schedule of `config` over a run of `total_steps` optimizer steps whose peak LR is
    `peak_lr` (`eta_min` is an absolute LR, turned into a factor of the peak here)."""
    warmup = min(config.warmup_steps, total_steps)
    decay = config.t_max if config.t_max is not None else max(1, total_steps - warmup)
    stable = 0
    if config.name == "wsd":
        decay = max(1, round(config.decay_fraction * (total_steps - warmup)))
        stable = max(0, total_steps - warmup - decay)
    fn = ScheduleFn(
        kind=config.name,
        warmup=warmup,
        decay_steps=decay,
        floor=min(1.0, config.eta_min / peak_lr),
        halfway=total_steps // 2,
        stage_two_factor=config.stage_two_lr_factor,
        stable=stable,
    )
    two = config.name == "two_stage"
    return ScheduledLR(
        optimizer,
        fn,
        wd_switch_step=total_steps // 2 if two else None,
        wd_after=config.stage_two_weight_decay,
    )

"""Optimizers, learning-rate schedules and gradient clipping, with their configs."""

from .builders import build_optimizer, parameter_groups
from .clipping import adaptive_clip_grad_, clip_gradients
from .config import OptimizerConfig, SchedulerConfig
from .schedulers import ScheduledLR, ScheduleFn, build_scheduler

__all__ = [
    "OptimizerConfig",
    "ScheduleFn",
    "ScheduledLR",
    "SchedulerConfig",
    "adaptive_clip_grad_",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "parameter_groups",
]

"""Optimizers and learning-rate schedules built from a `TrainingConfig`."""

from .builders import build_optimizer, parameter_groups, qat_parameter_groups
from .clipping import adaptive_clip_grad_, clip_gradients
from .schedulers import ScheduledLR, ScheduleFn, build_scheduler

__all__ = [
    "ScheduleFn",
    "ScheduledLR",
    "adaptive_clip_grad_",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "parameter_groups",
    "qat_parameter_groups",
]

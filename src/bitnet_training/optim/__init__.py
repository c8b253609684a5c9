"""Optimizers and learning-rate schedules built from a `TrainingConfig`."""

from .builders import build_optimizer, parameter_groups
from .schedulers import ScheduledLR, ScheduleFn, build_scheduler

__all__ = ["ScheduleFn", "ScheduledLR", "build_optimizer", "build_scheduler", "parameter_groups"]

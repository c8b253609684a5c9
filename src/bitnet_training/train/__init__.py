"""Training: the `Trainer`, its config, callbacks and checkpoints."""

from .callbacks import (
    Callback,
    Checkpointing,
    EarlyStopping,
    LRScheduling,
    MetricsLogging,
    ProgressBar,
    TrainingCallbacks,
)
from .checkpoint import FORMAT_VERSION, list_checkpoints, resolve_checkpoint
from .config import OptimizerConfig, SchedulerConfig, TrainingConfig
from .qat import QATControl, TernaryDiagnostics
from .trainer import Trainer, TrainerState, TrainResult, causal_lm_targets

__all__ = [
    "FORMAT_VERSION",
    "Callback",
    "Checkpointing",
    "EarlyStopping",
    "LRScheduling",
    "MetricsLogging",
    "OptimizerConfig",
    "ProgressBar",
    "QATControl",
    "SchedulerConfig",
    "TernaryDiagnostics",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "TrainingCallbacks",
    "TrainingConfig",
    "causal_lm_targets",
    "list_checkpoints",
    "resolve_checkpoint",
]

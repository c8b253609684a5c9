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
from .qat import MultiStage, QATControl, QuantizationTuner, TernaryDiagnostics, TrainingStage
from .trainer import Trainer, TrainerState, TrainResult, causal_lm_targets

__all__ = [
    "FORMAT_VERSION",
    "Callback",
    "Checkpointing",
    "EarlyStopping",
    "LRScheduling",
    "MetricsLogging",
    "MultiStage",
    "OptimizerConfig",
    "ProgressBar",
    "QATControl",
    "QuantizationTuner",
    "SchedulerConfig",
    "TernaryDiagnostics",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "TrainingCallbacks",
    "TrainingConfig",
    "TrainingStage",
    "causal_lm_targets",
    "list_checkpoints",
    "resolve_checkpoint",
]

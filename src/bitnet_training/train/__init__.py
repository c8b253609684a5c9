"""Training: the `Trainer`, its config, built-in callbacks, evaluation metrics, checkpoints."""

from ..callback import Callback
from ..metrics import LossMetrics, Metric
from .callbacks import (
    BestMetric,
    Checkpointing,
    EarlyStopping,
    History,
    LogRecords,
    LRScheduling,
    MetricsLogging,
    PeriodicEvaluation,
    ProgressBar,
    TrainingCallbacks,
)
from .checkpoint import FORMAT_VERSION, list_checkpoints, resolve_checkpoint
from .checkpoint_io import CheckpointIO
from .config import TrainingConfig
from .trainer import Trainer, TrainerState, TrainResult, causal_lm_targets, model_loss

__all__ = [
    "FORMAT_VERSION",
    "BestMetric",
    "Callback",
    "CheckpointIO",
    "Checkpointing",
    "EarlyStopping",
    "History",
    "LRScheduling",
    "LogRecords",
    "LossMetrics",
    "Metric",
    "MetricsLogging",
    "PeriodicEvaluation",
    "ProgressBar",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "TrainingCallbacks",
    "TrainingConfig",
    "causal_lm_targets",
    "list_checkpoints",
    "model_loss",
    "resolve_checkpoint",
]

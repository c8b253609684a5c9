"""Monitoring: where metrics go (JSON lines, TensorBoard, Weights & Biases) and the
profiler."""

from .profiler import Profiling
from .wandb_logger import WandbLogging
from .writers import JsonlWriter, TensorBoardWriter

__all__ = ["JsonlWriter", "Profiling", "TensorBoardWriter", "WandbLogging"]

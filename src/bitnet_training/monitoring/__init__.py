"""Monitoring: where metrics go (JSON lines, TensorBoard) and the profiler."""

from .profiler import Profiling
from .writers import JsonlWriter, TensorBoardWriter

__all__ = ["JsonlWriter", "Profiling", "TensorBoardWriter"]

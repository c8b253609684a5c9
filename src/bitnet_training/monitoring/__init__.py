"""Monitoring: where metrics go (JSON lines, TensorBoard)."""

from .writers import JsonlWriter, TensorBoardWriter

__all__ = ["JsonlWriter", "TensorBoardWriter"]

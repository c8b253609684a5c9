"""Metric sinks: JSON lines (always) and TensorBoard event files (when installed)."""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger(__name__)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf / nan
    return v


class JsonlWriter:
    """Appends one JSON object per record to `path` and flushes it, so a crash loses at
    most the record being written and `tail -f` shows progress."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a")  # noqa: SIM115 - lives as long as the writer

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalars to TensorBoard event files under `log_dir`, via `torch.utils.tensorboard`.
    `TensorBoardWriter.available()` is False when the `tensorboard` package is missing."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=log_dir)

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, record: dict, step: int, prefix: str = "") -> None:
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                self._w.add_scalar(f"{prefix}{k}", v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()

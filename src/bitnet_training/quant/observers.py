"""Observers: running estimates of an activation's range, for static quantization.

Each keeps `min_val` / `max_val` buffers (one pair per tensor, or per channel of the last
dimension) updated from the batches it is shown, and turns them into quantization
parameters with `qparams(bits, symmetric)`, by the same conventions as `int_quantize` and
PyTorch's `torch.ao` observers: symmetric scale = max(|min|, |max|) / (2^(b-1) - 1) on the
grid [-2^(b-1), 2^(b-1) - 1]; asymmetric scale = (max(hi, 0) - min(lo, 0)) / (2^b - 1) with
zero point round(-lo / scale) on [0, 2^b - 1].

  minmax       the running minimum and maximum of everything seen
  ema          an exponential moving average of each batch's min and max (`momentum`)
  percentile   the mean over batches of each batch's `percentile`-th and (100 - p)-th
               percentiles: robust to rare outliers
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..errors import ConfigError
from .functional import SCALE_EPS

OBSERVERS = ("minmax", "ema", "percentile")
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit; larger batches are strided


class Observer(nn.Module, metaclass=abc.ABCMeta):
    """Base: buffers `min_val`, `max_val`, `batches` (batches seen) and `samples` (leading-dim
    rows seen). `channels`: None for one range per tensor, else the size of the last dim."""

    def __init__(self, channels: int | None = None):
        super().__init__()
        shape = () if channels is None else (channels,)
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("samples", torch.zeros((), dtype=torch.int64))
        self.per_channel = channels is not None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        return x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(1, -1)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(x)
        dim = 0 if self.per_channel else 1
        lo, hi = rows.amin(dim=dim), rows.amax(dim=dim)
        return (lo, hi) if self.per_channel else (lo[0], hi[0])

    @abc.abstractmethod
    def combine(self, lo, hi) -> None:
        """Fold a later batch's range (lo, hi) into `min_val` / `max_val`."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the range from `x` (any shape; channels are its last dim); returns `x`."""
        lo, hi = self.batch_range(x)
        if int(self.batches) == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.combine(lo, hi)
        self.batches += 1
        self.samples += x.shape[0] if x.ndim > 1 else 1
        return x

    @property
    def initialized(self) -> bool:
        return int(self.batches) > 0

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32), shaped like `min_val`."""
        lo, hi = self.min_val.clamp(max=0.0), self.max_val.clamp(min=0.0)
        if symmetric:
            qp = 2 ** (bits - 1) - 1
            scale = (torch.maximum(-lo, hi) / qp).clamp(min=SCALE_EPS / qp)
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        qmax = 2**bits - 1
        scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
        zero_point = (-lo / scale).round().clamp(0, qmax).to(torch.int32)
        return scale, zero_point


class MinMaxObserver(Observer):
    def combine(self, lo, hi) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)


class MovingAverageObserver(Observer):
    def __init__(self, channels: int | None = None, momentum: float = 0.01):
        super().__init__(channels)
        self.momentum = momentum

    def combine(self, lo, hi) -> None:
        self.min_val.lerp_(lo, self.momentum)
        self.max_val.lerp_(hi, self.momentum)


class PercentileObserver(Observer):
    def __init__(self, channels: int | None = None, percentile: float = 99.99):
        super().__init__(channels)
        self.percentile = percentile

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(x)
        if self.per_channel:
            rows = rows.t()  # (channels, n): one quantile per channel
        if rows.numel() > _QUANTILE_MAX:
            rows = rows[:, :: -(-rows.numel() // _QUANTILE_MAX)]
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(rows, q, dim=1)
        return (lo, hi) if self.per_channel else (lo[0], hi[0])

    def combine(self, lo, hi) -> None:
        n = float(self.batches) + 1  # running mean over batches
        self.min_val.add_((lo - self.min_val) / n)
        self.max_val.add_((hi - self.max_val) / n)


def make_observer(kind: str, channels: int | None, momentum: float, percentile: float):
    if kind == "minmax":
        return MinMaxObserver(channels)
    if kind == "ema":
        return MovingAverageObserver(channels, momentum)
    if kind == "percentile":
        return PercentileObserver(channels, percentile)
    raise ConfigError("qat.activation_observer", kind, ", ".join(OBSERVERS))

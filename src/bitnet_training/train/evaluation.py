"""Evaluation metrics as pluggable pieces, computed streaming over the evaluation batches.

A metric sees each evaluation batch once (`update`) and reports at the end (`compute`); it
never holds all predictions. The `Trainer` evaluates with `LossMetrics` (loss, perplexity,
bits per byte) unless given others.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..errors import BitNetError


class Metric(ABC):
    """Base class of an evaluation metric: `reset()`, then `update(batch, loss, n_targets)`
    per batch (`loss`: the batch's mean loss over its `n_targets` prediction targets, 0-dim
    tensors), then `compute(eval_data) -> {name: value}` with names prefixed `val_`."""

    @abstractmethod
    def reset(self) -> None:
        """Forget what earlier evaluations saw."""

    @abstractmethod
    def update(self, batch: dict, loss: torch.Tensor, n_targets: torch.Tensor) -> None:
        """Take one evaluation batch into account."""

    @abstractmethod
    def compute(self, eval_data) -> dict[str, float]:
        """The metric's values over the batches seen since `reset`."""


class LossMetrics(Metric):
    """Target-weighted mean loss (`val_loss`, nats per target), `val_perplexity` = exp(loss),
    and, when the dataset knows its `bytes_per_token`, `val_bits_per_byte` = loss / ln 2 /
    bytes per token. Accumulated in float64 on the batches' device (no host sync per batch)."""

    def reset(self) -> None:
        self.nats: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None

    def update(self, batch, loss, n_targets):
        nats = loss.double() * n_targets
        self.nats = nats if self.nats is None else self.nats + nats
        self.targets = n_targets if self.targets is None else self.targets + n_targets

    def compute(self, eval_data):
        if self.targets is None or int(self.targets) == 0:
            raise BitNetError("the evaluation data has no prediction targets")
        loss = float(self.nats / self.targets)
        out = {"val_loss": loss, "val_perplexity": math.exp(loss) if loss < 700 else math.inf}
        bpt = getattr(eval_data, "bytes_per_token", None)
        if bpt:
            out["val_bits_per_byte"] = loss / math.log(2) / bpt
        return out

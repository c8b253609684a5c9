"""Evaluation metrics as pluggable pieces, computed streaming over the evaluation batches.

A metric sees each evaluation batch once (`update`) and reports at the end (`compute`); it
never holds all predictions. The `Trainer` evaluates with `LossMetrics` (loss, perplexity,
bits per byte) unless given others. A metric that sets `needs_logits = True` also gets the
batch's logits (`update(..., logits=...)`), captured from the model's output head in the
same forward that computed the loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..errors import BitNetError


class Metric(ABC):
    """Base class of an evaluation metric: `reset()`, then `update(batch, loss, n_targets)`
    per batch (`loss`: the batch's mean loss over its `n_targets` prediction targets, 0-dim
    tensors; plus `logits=` when `needs_logits`), then `compute(eval_data) -> {name: value}`
    with names prefixed `val_`. `names` lists the names `compute` returns (what
    `training.best_metric` may name)."""

    needs_logits = False
    names: tuple[str, ...] = ()
    can_sync = False  # whether `sync` sums the state over data-parallel ranks

    def sync(self, sum_over_ranks) -> None:
        """Replace this metric's accumulated state by its sum over the data-parallel ranks
        (`sum_over_ranks(tensor) -> tensor`); metrics that implement it set `can_sync`, and
        the evaluation then shards its batches over the ranks."""
        raise NotImplementedError

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

    names = ("val_loss", "val_perplexity", "val_bits_per_byte")
    can_sync = True

    def sync(self, sum_over_ranks) -> None:
        zero = torch.zeros((), dtype=torch.float64)
        self.nats = sum_over_ranks(zero if self.nats is None else self.nats.double())
        self.targets = sum_over_ranks(zero if self.targets is None else self.targets.double())

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


class TokenAccuracy(Metric):
    """`val_token_accuracy`: the share of predicted tokens (labels other than -100, position
    i predicting labels[i + 1]) whose argmax logit is the label. Streaming: two counters."""

    needs_logits = True
    names = ("val_token_accuracy",)
    can_sync = True

    def sync(self, sum_over_ranks) -> None:
        zero = torch.zeros((), dtype=torch.float64)
        self.correct = sum_over_ranks(zero if self.correct is None else self.correct.double())
        self.total = sum_over_ranks(zero if self.total is None else self.total.double())

    def reset(self) -> None:
        self.correct = self.total = None

    def update(self, batch, loss, n_targets, logits=None):
        if logits is None:
            raise BitNetError(
                "val_token_accuracy needs the logits, which this evaluation did not compute "
                "(loss.chunk_size never makes them all): drop token_accuracy or the chunking"
            )
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        hit = ((logits[:, :-1].argmax(-1) == targets) & keep).sum()
        n = keep.sum()
        self.correct = hit if self.correct is None else self.correct + hit
        self.total = n if self.total is None else self.total + n

    def compute(self, eval_data):
        if self.total is None or int(self.total) == 0:
            raise BitNetError("the evaluation data has no prediction targets")
        return {"val_token_accuracy": int(self.correct) / int(self.total)}


class FunctionMetric(Metric):
    """A user's metric from a function `fn(logits, labels) -> (sum, count)` over one batch
    (tensors or numbers): `val_<name>` = total sum / total count over the evaluation."""

    needs_logits = True

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn
        self.names = (f"val_{name}",)

    can_sync = True

    def reset(self) -> None:
        self.sum, self.count = 0.0, 0.0

    def sync(self, sum_over_ranks) -> None:
        both = sum_over_ranks(torch.tensor([self.sum, self.count], dtype=torch.float64))
        self.sum, self.count = float(both[0]), float(both[1])

    def update(self, batch, loss, n_targets, logits=None):
        if logits is None:
            raise BitNetError(f"metric {self.name!r} needs the logits (loss.chunk_size is on)")
        s, c = self.fn(logits, batch["labels"])
        self.sum += float(s)
        self.count += float(c)

    def compute(self, eval_data):
        if not self.count:
            raise BitNetError(f"metric {self.name!r} counted nothing over the evaluation data")
        return {f"val_{self.name}": self.sum / self.count}


# name -> a factory of the Metric; `training.metrics` names them.
_REGISTRY: dict = {"loss": LossMetrics, "token_accuracy": TokenAccuracy}


def register_metric(name: str, fn) -> None:
    """Make `fn(logits, labels) -> (sum, count)` an evaluation metric named `name`
    (`training.metrics: [name]`, reported as `val_<name>`, usable as `training.best_metric`).
    Registering a name twice is refused, so two metrics never mix."""
    if not name.isidentifier():
        raise BitNetError(f"metric name {name!r} is invalid: expected an identifier")
    if name in _REGISTRY:
        raise BitNetError(f"a metric named {name!r} is already registered")
    _REGISTRY[name] = lambda: FunctionMetric(name, fn)


def build_metrics(names: list[str]) -> list[Metric]:
    """The metrics `names` select, the loss metrics always first (they are the run's own).
    An unknown name is a one-line error listing the known ones."""
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise BitNetError(
            f"training.metrics: unknown metric {unknown[0]!r}; known: {', '.join(_REGISTRY)}"
        )
    return [LossMetrics()] + [_REGISTRY[n]() for n in dict.fromkeys(names) if n != "loss"]

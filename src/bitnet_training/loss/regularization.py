"""`Penalty`: L1 / L2 penalties on chosen parameters, added to every optimizer step's loss.

    loss += l1 * sum |p| + l2 * sum p^2     over the trainable parameters whose names match

This is the classic coupled penalty: its gradient goes through the optimizer (and Adam's
normalization), unlike the optimizer's decoupled `weight_decay`, which shrinks weights
directly. Use `weight_decay` for AdamW-style decay; the penalties for sparsity (L1) or an
explicit L2 term on a chosen group (e.g. only the adapters, or only the embeddings).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from ..callback import Callback
from ..errors import BitNetError


class Penalty(Callback):
    """Adds `l1 * sum|p| + l2 * sum p^2` over the trainable parameters whose dotted names match
    one of `patterns` (globs; `*` matches dots too) to each optimizer step's loss, via the
    Trainer's `aux_loss`. Patterns that match no trainable parameter are refused at setup."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0, patterns: list[str] | tuple = ("*",)):
        if l1 < 0 or l2 < 0 or not (l1 or l2):
            raise BitNetError(f"penalties l1={l1}, l2={l2}: expected >= 0 and one of them > 0")
        self.l1, self.l2, self.patterns = l1, l2, list(patterns)
        self.params: list[torch.Tensor] = []

    def setup(self, trainer):
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        for pat in self.patterns:
            if not any(fnmatchcase(n, pat) for n, _ in named):
                raise BitNetError(
                    f"loss.penalty_params pattern {pat!r} matches no trainable parameter"
                )
        self.params = [p for n, p in named if any(fnmatchcase(n, pat) for pat in self.patterns)]

    def aux_loss(self, trainer):
        total = None
        for p in self.params:
            term = 0.0
            if self.l1:
                term = term + self.l1 * p.abs().sum(dtype=torch.float32)
            if self.l2:
                term = term + self.l2 * p.float().square().sum()
            total = term if total is None else total + term
        return total

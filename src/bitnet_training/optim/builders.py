"""Optimizers built from a `TrainingConfig`, with weight decay on matrices only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import BitNetError

if TYPE_CHECKING:
    from ..train.config import TrainingConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (linear and embedding weights, ndim >= 2)
    with `weight_decay`, everything else (norm gains, biases) without, as nanoGPT and most LLM
    recipes do. Shared parameters appear once. Empty groups are left out."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """`torch.optim.AdamW` or `torch.optim.SGD` over `parameter_groups(model)` at the peak
    learning rate (the scheduler scales it from there)."""
    oc = config.optimizer
    groups = parameter_groups(model, oc.weight_decay)
    if not groups:
        raise BitNetError("the model has no trainable parameters")
    if oc.name == "sgd":
        return torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=oc.momentum, nesterov=oc.nesterov
        )
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(oc.beta1, oc.beta2), eps=oc.eps
    )

"""Optimizers built from an `OptimizerConfig`, with weight decay on matrices only."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..callback import collect_callbacks
from ..errors import BitNetError
from .config import OptimizerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (linear and embedding weights, ndim >= 2)
    with `weight_decay`, everything else (norm gains, biases, scales) without, as nanoGPT and
    most LLM recipes do. Shared parameters appear once; empty groups are left out."""
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


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, learning_rate: float, callbacks=()
) -> torch.optim.Optimizer:
    """The optimizer `config` names (`torch.optim.AdamW`, `torch.optim.SGD`, or bitsandbytes'
    8-bit / paged AdamW) over the
    trainable parameters of `model` at the peak `learning_rate` (the schedule scales it from
    there). Groups start as `parameter_groups`; then every callback that the model's modules
    declare (`trainer_callbacks()`) may rewrite them through `configure_param_groups`, which
    is how a transform (quantization's `weight_decay_on: linear`) shapes them, and so may the
    `callbacks` given (a callback of the same key replaces the model's). The optimizer records
    the keys that shaped it (`configured_by`), so a Trainer can tell it was built with them."""
    groups = parameter_groups(model, config.weight_decay)
    shaping = {cb.key: cb for cb in [*collect_callbacks(model), *callbacks]}
    for cb in shaping.values():
        groups = cb.configure_param_groups(model, groups)
    if not groups:
        raise BitNetError("the model has no trainable parameters")
    adam = dict(lr=learning_rate, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.name == "sgd":
        opt = torch.optim.SGD(
            groups, lr=learning_rate, momentum=config.momentum, nesterov=config.nesterov
        )
    elif config.name == "adamw8bit" or config.paged:
        opt = _bitsandbytes_adamw(groups, config, adam)
    else:
        opt = torch.optim.AdamW(groups, **adam)
    opt.configured_by = set(shaping)
    return opt


def _bitsandbytes_adamw(groups: list[dict], config: OptimizerConfig, adam: dict):
    """bitsandbytes' AdamW: 8-bit moments (`adamw8bit`: block-wise quantized, dynamic
    exponent code; tensors under 4,096 elements keep 32-bit moments, as bitsandbytes
    decides), paged (`paged`: unified memory that moves to the CPU under GPU pressure)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BitNetError(
            f"training.optimizer.name={config.name}"
            + (" with paged=true" if config.paged else "")
            + " needs bitsandbytes (pip install 'bitnet-training[qlora]')"
        )
    if config.paged and not torch.cuda.is_available():
        raise BitNetError(
            "training.optimizer.paged=true needs a CUDA GPU: paging moves optimizer states "
            "between GPU and CPU memory, and this machine has no GPU (turn it off)"
        )
    import bitsandbytes as bnb

    eight = config.name == "adamw8bit"
    if config.paged:
        cls = bnb.optim.PagedAdamW8bit if eight else bnb.optim.PagedAdamW
    else:
        cls = bnb.optim.AdamW8bit
    return cls(groups, **adam)

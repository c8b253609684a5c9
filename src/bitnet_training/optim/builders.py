"""Optimizers built from a `TrainingConfig`, with weight decay on matrices only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from ..quant.fake_quant import quantize
from ..quant.functional import Quantized, dequantize

if TYPE_CHECKING:
    from ..train.config import TrainingConfig


def _two_groups(model: nn.Module, weight_decay: float, decays) -> list[dict]:
    """Trainable parameters split by `decays(p)` into a group with `weight_decay` and one
    without. Shared parameters appear once; empty groups are left out."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(p) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights, ndim >= 2) with `weight_decay`, everything
    else (norm gains, biases) without, as nanoGPT and most LLM recipes do."""
    return _two_groups(model, weight_decay, lambda p: p.ndim >= 2)


def qat_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Groups for quantization-aware training: weight decay only on the weights of linear
    layers (`nn.Linear`, `BitLinear`); none on norms, biases, embeddings or quantizer
    scales (anything else). A weight tied to an embedding counts as an embedding."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = linear - embeddings
    return _two_groups(model, weight_decay, lambda p: id(p) in decayed)


def _latent_clip_hook(model: nn.Module, factor: float):
    """An optimizer post-step hook clamping each BitLinear's latent weight to +-factor times
    its quantization scale (per tensor, channel or group, as the layer quantizes)."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        for m in layers:
            spec = m.weight_spec()
            if spec is None:
                continue
            q = quantize(m.weight.detach(), spec)
            bound = dequantize(Quantized(torch.ones_like(q.codes), q.scale, None), torch.float32)
            bound = (factor * bound).reshape(m.weight.shape).to(m.weight.dtype)
            torch.minimum(m.weight, bound, out=m.weight)
            torch.maximum(m.weight, -bound, out=m.weight)

    return hook


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, at the peak learning rate (the scheduler scales
    it from there): `torch.optim.AdamW` or `torch.optim.SGD` over `parameter_groups`, or, for
    `qat_adamw` / `qat_sgd`, over `qat_parameter_groups` with the optional latent-weight
    clipping hook."""
    oc = config.optimizer
    qat = oc.name.startswith("qat_")
    groups = (qat_parameter_groups if qat else parameter_groups)(model, oc.weight_decay)
    if not groups:
        raise BitNetError("the model has no trainable parameters")
    if oc.name.endswith("sgd"):
        opt = torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=oc.momentum, nesterov=oc.nesterov
        )
    else:
        opt = torch.optim.AdamW(
            groups, lr=config.learning_rate, betas=(oc.beta1, oc.beta2), eps=oc.eps
        )
    if qat and oc.latent_clip is not None:
        opt.register_step_post_hook(_latent_clip_hook(model, oc.latent_clip))
    return opt

"""Activation (gradient) checkpointing of transformer blocks with `torch.utils.checkpoint`.

Each block's forward runs without keeping its intermediate activations; the backward runs it
again to rebuild them. Memory for activations drops to one block's worth plus the block
inputs, for about one more forward per step. Gradients are equal with and without (the
recomputation is the same computation, with the RNG state preserved, so quantization noise
draws the same values).
"""

from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn

from ..errors import BitNetError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`: the `ModuleList` named `layers` (or `h`, `blocks`)
    with the most parameters, found through wrappers such as peft's."""
    candidates = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        return []
    return list(max(candidates, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def _checkpointed(block: nn.Module, forward, *args, **kwargs):
    if not block.training or not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # nothing to save memory on
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of `model` in place (its parameter names and state
    dict are unchanged: the block's `forward` is wrapped, not the block). Returns the number
    of blocks; a model without recognizable blocks is a one-line error."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise BitNetError(
            "training.activation_checkpointing: the model has no transformer blocks (a "
            "ModuleList named layers, h or blocks) to checkpoint"
        )
    for block in blocks:
        if getattr(block, "_checkpointed", False):
            continue
        forward = block.forward
        block.forward = functools.partial(_checkpointed, block, forward)
        block._checkpointed = True
    return len(blocks)

"""`insert_subln`: BitNet's sub-norms (SubLN) for a model that lacks them.

BitNet b1.58 2B4T normalises the attention output before `o_proj` (`attn_sub_norm`) and the
gated FFN activation before `down_proj` (`ffn_sub_norm`); BitDistill (BitNet Distillation) adds
the same SubLN to a full-precision model before turning it ternary, because the inputs of those
two projections have a variance that low-bit quantization handles badly. `insert_subln` adds
them to a Llama-style model (`self_attn.o_proj`, `mlp.down_proj`) under `transformers`' BitNet
names, so the parameters read `...self_attn.attn_sub_norm.weight`, `...mlp.ffn_sub_norm.weight`.

How the norm reaches the projection input: a forward pre-hook on the projection. Transforms
that run later replace or wrap that projection (`quantize_model` swaps `nn.Linear` for a new
`BitLinear`; PEFT wraps it in a LoRA layer keeping the old one as `base_layer`), which would
drop the hook or apply it to half of the layer. So the block that owns the projection also gets
a pre-hook that, before each forward, moves the projection hook to whatever module now sits at
`o_proj` / `down_proj`, exactly once. Hooks hold the norm module itself (not a name), so
`copy.deepcopy` maps them to the copy's norm; a state_dict holds only the norm weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import BitNetError
from .norm import RMSNorm

log = logging.getLogger(__name__)

# (projection, the sub-norm applied to its input), named as transformers' BitNet names them.
SUBLN = (("o_proj", "attn_sub_norm"), ("down_proj", "ffn_sub_norm"))
DEFAULT_EPS = 1e-5  # BitNet b1.58 2B4T's rms_norm_eps


class SubNormInput:
    """Forward pre-hook of a projection: its input x (..., in_features) becomes norm(x)."""

    def __init__(self, norm: nn.Module):
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple):
        if not args:
            raise BitNetError(
                f"{type(module).__name__} with a sub-norm was called without a positional input"
            )
        return (self.norm(args[0]), *args[1:])


class KeepSubNorm:
    """Forward pre-hook of the block owning a projection: before each forward, the module now
    at `block.<proj>` carries exactly one `SubNormInput(block.<norm>)`, and modules nested in
    it (e.g. PEFT's `base_layer`) carry none, so the norm is applied once."""

    def __init__(self, proj: str, norm: str):
        self.proj, self.norm = proj, norm

    def __call__(self, block: nn.Module, args: tuple) -> None:
        attach(block, self.proj, self.norm)


def _drop_pre_hook(module: nn.Module, key: int) -> None:
    # What RemovableHandle.remove() does for a forward pre-hook; we hold no handle (handles
    # do not survive deepcopy), so remove by key from every dict torch keeps them in.
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        hooks = module.__dict__.get(attr)
        if hooks is not None:
            hooks.pop(key, None)


def attach(block: nn.Module, proj: str, norm: str) -> None:
    """Make `block.<norm>` apply to the input of the module now at `block.<proj>`, once."""
    target, sub_norm = getattr(block, proj), getattr(block, norm)
    have = False
    for m in target.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if not isinstance(hook, SubNormInput):
                continue
            if m is target and not have:
                hook.norm, have = sub_norm, True
            else:  # a second hook, or one left on a module that is now wrapped
                _drop_pre_hook(m, key)
    if not have:
        target.register_forward_pre_hook(SubNormInput(sub_norm))


def _proj_dim_device_dtype(proj: nn.Module) -> tuple[int, torch.device, torch.dtype]:
    params = [p for p in proj.parameters() if p.is_floating_point()]
    if not params:
        raise BitNetError(f"{type(proj).__name__} has no floating-point weight to size a sub-norm")
    dim = getattr(proj, "in_features", None) or params[0].shape[-1]
    return int(dim), params[0].device, params[0].dtype


def insert_subln(model: nn.Module, eps: float | None = None) -> list[str]:
    """Add BitNet's sub-norms to `model` in place; returns the inserted norms' module names.

    For each module with an `o_proj` child (attention) and each with a `down_proj` child (MLP)
    that lacks the norm, registers an `RMSNorm(o_proj.in_features)` as `attn_sub_norm`
    (resp. `RMSNorm(down_proj.in_features)` as `ffn_sub_norm`), weight ones, on the projection's
    device and dtype, and applies it to the projection's input: o_proj(attn_sub_norm(x)).
    `eps` defaults to `model.config.rms_norm_eps`, else 1e-5. Modules that already have the norm
    (BitNetLM, transformers' BitNet) are skipped, so a second call returns []. Raises
    `BitNetError` when the model has no `o_proj` or `down_proj` at all.
    """
    if eps is None:
        eps = getattr(getattr(model, "config", None), "rms_norm_eps", None) or DEFAULT_EPS
    if not eps > 0:
        raise BitNetError(f"eps={eps!r} is invalid: expected a positive number")
    inserted, found = [], set()
    for name, block in list(model.named_modules()):
        for proj, norm in SUBLN:
            if not isinstance(getattr(block, proj, None), nn.Module):
                continue
            found.add(proj)
            if hasattr(block, norm):
                continue
            dim, device, dtype = _proj_dim_device_dtype(getattr(block, proj))
            block.add_module(norm, RMSNorm(dim, eps=float(eps), device=device, dtype=dtype))
            attach(block, proj, norm)
            block.register_forward_pre_hook(KeepSubNorm(proj, norm))
            inserted.append(f"{name}.{norm}" if name else norm)
    if not found:
        raise BitNetError(
            f"insert_subln found no o_proj or down_proj in {type(model).__name__}: expected "
            "Llama-style attention (self_attn.o_proj) and MLP (mlp.down_proj) modules"
        )
    for proj, norm in SUBLN:
        if proj not in found:
            log.warning("insert_subln: no %s in %s, so no %s", proj, type(model).__name__, norm)
    return inserted

"""Gradient clipping: by global norm, by value, and adaptive (AGC)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dims but the first for matrices and convolutions, the
    whole tensor for vectors and scalars (NFNets' convention)."""
    if x.ndim <= 1:
        return x.norm()
    return x.norm(dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(
    params: Iterable[torch.Tensor], clip_factor: float, eps: float = 1e-3
) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, arXiv 2102.06171, eq. 3), in place:
    for each unit i, if ||G_i|| / max(||W_i||, eps) > clip_factor, scale G_i to
    clip_factor * max(||W_i||, eps) / ||G_i|| times itself."""
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad
        local = g  # what is scaled in place
        if _is_dtensor(g):
            # FSDP shards dim 0, so a matrix's rows (its units) are whole on each rank: work
            # on the local rows; a vector is one unit, gathered whole (it is small).
            if g.ndim > 1:
                w, g = w.to_local(), g.to_local()
                local = g
            else:
                w, local, g = w.full_tensor(), g.to_local(), g.full_tensor()
        w_norm = _unitwise_norm(w.float()).clamp_(min=eps)
        g_norm = _unitwise_norm(g.float())
        max_norm = w_norm * clip_factor
        # Where the ratio is within bounds the factor is 1; 1e-6 guards against 0 / 0.
        factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), 1.0)
        local.mul_(factor.to(local.dtype))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor (FSDP2 / tensor parallel shards)


def clip_gradients(
    params: list[torch.Tensor],
    max_norm: float | None = None,
    max_value: float | None = None,
    agc_clip_factor: float | None = None,
    agc_eps: float = 1e-3,
) -> torch.Tensor:
    """Apply, in this order, AGC, clipping by value and clipping by global norm (each when
    set), and return the global gradient norm measured before the norm clipping (a tensor,
    no host sync)."""
    if agc_clip_factor is not None:
        adaptive_clip_grad_(params, agc_clip_factor, agc_eps)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if _is_dtensor(norm):  # the norm of sharded gradients: a partial sum until reduced
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm

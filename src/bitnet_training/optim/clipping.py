"""Gradient clipping: by global norm, by value, and adaptive (AGC)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dims but the first for matrices and convolutions, the
    whole tensor for vectors and scalars (NFNets' convention). As sqrt(sum(x^2)), which a
    DTensor computes over shards (each unit's squares summed over its shards); in float32 at
    least (a float64 tensor stays float64)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.ndim <= 1:
        return x.pow(2).sum().sqrt()
    return x.pow(2).sum(dim=tuple(range(1, x.ndim)), keepdim=True).sqrt()


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
        # DTensor shards (FSDP, tensor parallel, both) take the same ops: each unit's squares
        # are reduced over its shards, and the factor lands on each rank's slice.
        w, g = p.detach(), p.grad
        w_norm = _unitwise_norm(w).clamp(min=eps)
        g_norm = _unitwise_norm(g)
        max_norm = w_norm * clip_factor
        # Where the ratio is within bounds the factor is 1; 1e-6 guards against 0 / 0.
        ratio = max_norm / g_norm.clamp(min=1e-6)
        factor = torch.where(g_norm > max_norm, ratio, torch.ones_like(ratio))
        g.mul_(factor.to(g.dtype))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor (FSDP2 / tensor parallel shards)


def clip_gradients(
    params: list[torch.Tensor],
    max_norm: float | None = None,
    max_value: float | None = None,
    agc_clip_factor: float | None = None,
    agc_eps: float = 1e-3,
    split_over_ranks: bool = False,
) -> torch.Tensor:
    """Apply, in this order, AGC, clipping by value and clipping by global norm (each when
    set), and return the global gradient norm measured before the norm clipping (a tensor,
    no host sync). `split_over_ranks`: the (non-DTensor) parameters are this rank's part of
    a model split over every rank (pipeline stages): their squared norms are summed over the
    ranks."""
    if agc_clip_factor is not None:
        adaptive_clip_grad_(params, agc_clip_factor, agc_eps)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    grads = [p.grad for p in params if p.grad is not None]
    # Sharded gradients (DTensors) and whole ones are normed apart and combined: one
    # foreach over both kinds is refused by DTensor.
    sharded = [g for g in grads if _is_dtensor(g)]
    whole = [g for g in grads if not _is_dtensor(g)]
    norm = torch.nn.utils.get_total_norm(whole)
    if split_over_ranks:
        squares = norm.to(torch.promote_types(norm.dtype, torch.float32)).pow(2)
        torch.distributed.all_reduce(squares)
        norm = squares.sqrt()
    by_mesh: dict = {}  # FSDP x TP leaves DTensors on two meshes, which DTensor won't mix
    for g in sharded:
        by_mesh.setdefault(g.device_mesh, []).append(g)
    if by_mesh:
        # each mesh's norm is a partial sum over its shards until reduced (full_tensor)
        parts = [torch.nn.utils.get_total_norm(gs).full_tensor() for gs in by_mesh.values()]
        norm = torch.linalg.vector_norm(torch.stack([norm.to(parts[0]), *parts]))
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef.to(g.dtype))
    return norm

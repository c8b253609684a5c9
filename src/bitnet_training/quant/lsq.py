"""Learned step size quantization (LSQ, Esser et al. 2019, arXiv 1902.08153)."""

from __future__ import annotations

import math

import torch


def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    # Forward: s. Backward: the gradient times g.
    return (s - s * g).detach() + s * g


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    # Forward: round(x). Backward: identity (straight through).
    return (x.round() - x).detach() + x


def lsq_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize `x` with the learnable step size `scale` (a tensor scalar, or one per
    channel of x's last dim) on the signed grid [-2^(b-1), 2^(b-1) - 1]:

        x_q = round(clamp(x / s, -Qn, Qp)) * s,

    with LSQ's gradients: to x, straight through inside the range and 0 outside; to s,
    eq. 3 of the paper (-x/s + round(x/s) inside, -Qn or Qp outside), scaled by
    g = 1 / sqrt(N * Qp), N the number of elements sharing one step size (section 2.2).
    """
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    n_per_scale = x.numel() / max(1, scale.numel())
    s = _grad_scale(scale, 1.0 / math.sqrt(n_per_scale * qp))
    return _round_pass((x / s).clamp(-qn, qp)) * s

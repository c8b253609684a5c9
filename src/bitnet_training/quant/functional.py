"""Quantizers as pure functions: tensors in, integer codes and scales out, no state.

Every quantizer returns a `Quantized(codes, scale, zero_point)` with one convention:

    dequantized = (codes - zero_point) * scale

where `scale` (the step between two adjacent levels) and `zero_point` broadcast against
`codes`, except for per-group scales, whose last dimension has one entry per group of
`group_size` consecutive elements (what export stores). `dequantize` undoes any of them.

Granularities (the `granularity` argument):
    "tensor"   one scale for the whole tensor; scale shape ()
    "channel"  one scale per slice along dim 0 (a weight's output channel); shape (C, 1, ...)
    "token"    one scale per vector along the last dim (an activation's token); shape (..., 1)
    "group"    one scale per `group_size` consecutive elements of the last dim; shape (..., n/G)

Codes are computed with the exact arithmetic of the BitNet team's released training code
(multiply by the reciprocal scale, round half to even, clamp), so ternary and int8 codes are
bit-identical to theirs. Inputs are never modified. All-zero and constant inputs give finite
results: every denominator is clamped below by an epsilon documented where it is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError

GRANULARITIES = ("tensor", "channel", "token", "group")

# BitNet b1.58 (arXiv 2402.17764) eq. 1-3 and the team's FAQ code: the absmean gamma (and the
# per-token absmax of activations) is clamped below at 1e-5 so an all-zero tensor quantizes to
# zeros with a finite scale. Eq. 3 writes W / (gamma + eps); the released code clamps gamma
# at eps instead, which is what trained checkpoints use, so we follow the code.
SCALE_EPS = 1e-5


class Quantized(NamedTuple):
    """Integer codes with the scales (and zero points) that map them back to real values.

    codes: integer tensor, same shape as the input (int8, or uint8 for asymmetric codes).
    scale: float32 step size, broadcastable to `codes` (per-group: one entry per group).
    zero_point: integer offset of the asymmetric quantizers, shaped like `scale`; None when
        the grid is symmetric around zero.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 at least: quantizers compute in float32, a float64 tensor stays float64
    (so float64 comparisons see no float32 rounding)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_granularity(granularity: str, group_size: int | None, x: torch.Tensor) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", granularity, f"one of {', '.join(GRANULARITIES)}")
    if granularity == "group":
        if group_size is None or group_size < 1:
            raise ConfigError(
                "group_size", group_size, "a positive integer with granularity='group'"
            )
        if x.shape[-1] % group_size:
            raise ConfigError(
                "group_size", group_size, f"a divisor of the last dimension ({x.shape[-1]})"
            )
    if granularity == "channel" and x.dim() < 2:
        raise ConfigError("granularity", granularity, "'channel' only for tensors of 2+ dims")


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View `x` so the reduction for one scale runs over everything but the kept dims."""
    if granularity == "group":
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return x


def _reduce(x: torch.Tensor, granularity: str, op: str) -> torch.Tensor:
    """Reduce |x| (op 'mean' or 'max') or x (op 'meanv', 'min', 'maxv') to one value per scale."""
    if granularity == "tensor":
        dims = None
    elif granularity == "channel":
        dims = tuple(range(1, x.dim()))
    else:  # token and group both reduce over the last dim of the (grouped) view
        dims = (-1,)
    keep = granularity != "tensor"
    if op == "mean":
        return x.abs().mean(dim=dims, keepdim=keep) if dims else x.abs().mean()
    if op == "max":
        # abs().amax() measured ~10x faster on CPU than linalg.vector_norm(ord=inf).
        return x.abs().amax(dim=dims, keepdim=keep) if dims else x.abs().amax()
    if op == "meanv":
        return x.mean(dim=dims, keepdim=keep) if dims else x.mean()
    if op == "min":
        return x.amin(dim=dims, keepdim=keep) if dims else x.amin()
    return x.amax(dim=dims, keepdim=keep) if dims else x.amax()


def _ungroup_scale(s: torch.Tensor, granularity: str) -> torch.Tensor:
    # Per-group scales are stored without their trailing singleton: (..., n_groups).
    return s.squeeze(-1) if granularity == "group" else s


def absmean_scale(w: torch.Tensor, granularity: str = "tensor", group_size=None) -> torch.Tensor:
    """gamma of the ternary and binary quantizers: mean(|W|) per slice, clamped below at
    `SCALE_EPS`, float32 (shaped as `ternary_quantize` returns it)."""
    wg = _grouped(w.float(), granularity, group_size)
    return _ungroup_scale(_reduce(wg, granularity, "mean").clamp(min=SCALE_EPS), granularity)


def ternary_quantize(
    w: torch.Tensor, granularity: str = "tensor", group_size: int | None = None
) -> Quantized:
    """1.58-bit absmean quantizer of BitNet b1.58 (arXiv 2402.17764, eq. 1-3).

    gamma = mean(|W|) over the granularity's slice, clamped below at `SCALE_EPS`;
    codes = clamp(round(W / gamma), -1, 1) as int8; dequantized as codes * gamma.

    w: any shape (a weight is (out_features, in_features)). Returns codes shaped like `w`
    and gamma as float32 (see the module docstring for its shape per granularity).
    """
    _check_granularity(granularity, group_size, w)
    wg = _grouped(w.float(), granularity, group_size)
    gamma = _reduce(wg, granularity, "mean").clamp(min=SCALE_EPS)
    # The reference multiplies by 1/gamma; doing the same keeps codes bit-identical to it.
    codes = (wg * (1.0 / gamma)).round_().clamp_(-1, 1).to(torch.int8)
    return Quantized(codes.reshape(w.shape), _ungroup_scale(gamma, granularity))


def binary_quantize(
    w: torch.Tensor, granularity: str = "tensor", group_size: int | None = None
) -> Quantized:
    """1-bit quantizer of BitNet (arXiv 2310.11453, eq. 1-3).

    alpha = mean(W), codes = sign(W - alpha) with 0 mapped to +1 (int8 in {-1, +1}),
    beta = mean(|W|) clamped below at `SCALE_EPS`; dequantized as codes * beta (the paper
    centres W before the sign but does not add alpha back).
    """
    _check_granularity(granularity, group_size, w)
    wg = _grouped(w.float(), granularity, group_size)
    alpha = _reduce(wg, granularity, "meanv")
    beta = _reduce(wg, granularity, "mean").clamp(min=SCALE_EPS)
    codes = torch.where(wg >= alpha, 1, -1).to(torch.int8)
    return Quantized(codes.reshape(w.shape), _ungroup_scale(beta, granularity))


def int_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "tensor",
    group_size: int | None = None,
) -> Quantized:
    """n-bit integer quantizer, 2 <= bits <= 8, for weights or activations.

    Symmetric (absmax): Qp = 2^(b-1) - 1, scale = max(|x|) / Qp (max clamped below at
    `SCALE_EPS`), codes = clamp(round(x / scale), -Qp - 1, Qp) as int8. The grid is the
    restricted one of the BitNet activation code (scale from Qp, clamp at -Qp - 1).
    Asymmetric (min-max): range [min(x, 0), max(x, 0)] (zero stays exactly representable),
    scale = (hi - lo) / (2^b - 1) clamped below at `SCALE_EPS`, zero_point =
    clamp(round(-lo / scale), 0, 2^b - 1), codes = clamp(round(x / scale) + zero_point,
    0, 2^b - 1) as uint8; the convention of PyTorch's `torch.ao` observers.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError("bits", bits, "an integer from 2 to 8")
    _check_granularity(granularity, group_size, x)
    xg = _grouped(wide(x), granularity, group_size)
    if symmetric:
        qp = 2 ** (bits - 1) - 1
        inv = qp / _reduce(xg, granularity, "max").clamp(min=SCALE_EPS)
        codes = (xg * inv).round_().clamp_(-qp - 1, qp).to(torch.int8)
        return Quantized(codes.reshape(x.shape), _ungroup_scale(1.0 / inv, granularity))
    qmax = 2**bits - 1
    lo = _reduce(xg, granularity, "min").clamp(max=0.0)
    hi = _reduce(xg, granularity, "maxv").clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
    zero_point = (-lo / scale).round_().clamp_(0, qmax)
    codes = ((xg / scale).round_() + zero_point).clamp_(0, qmax).to(torch.uint8)
    return Quantized(
        codes.reshape(x.shape),
        _ungroup_scale(scale, granularity),
        _ungroup_scale(zero_point.to(torch.int32), granularity),
    )


def absmax_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The BitNet training code's per-token activation codes and multiplier, as BitLinear's
    fused path uses them: s = Qp / max(|x|) over the last dim (max clamped below at
    `SCALE_EPS`), codes = round(x * s) as int8, computed in float32 (float64 stays float64).
    Returns (codes, s); the clamp to [-Qp - 1, Qp] is skipped: with s from the row's own
    absmax, |x * s| <= Qp. The native and Triton kernels reproduce these bits."""
    xf = wide(x)
    inv = (2 ** (bits - 1) - 1) / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=SCALE_EPS)
    return (xf * inv).round_().to(torch.int8), inv


def bitnet_activation_quantize(x: torch.Tensor, bits: int = 8) -> Quantized:
    """Per-token absmax activation quantizer exactly as in the BitNet team's training code.

    s = Qp / max(|x|) over the last dim, the max clamped below at 1e-5 (`SCALE_EPS`);
    codes = clamp(round(x * s), -Qp - 1, Qp) with Qp = 2^(bits-1) - 1: [-128, 127] for
    8 bits (BitNet b1.58), [-8, 7] for 4 bits (the low-bit activations of BitNet a4.8 / v2).
    Returned scale is the step 1 / s, shape (..., 1).
    """
    if bits not in (4, 8):
        raise ConfigError("activation_bits", bits, "4 or 8")
    return int_quantize(x, bits, symmetric=True, granularity="token")


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map `Quantized` codes back to real values: (codes - zero_point) * scale, as `dtype`."""
    codes, scale, zp = q
    grouped = scale.dim() == codes.dim() and scale.shape[-1] not in (1, codes.shape[-1])
    if grouped:
        g = codes.shape[-1] // scale.shape[-1]
        c = codes.reshape(*codes.shape[:-1], scale.shape[-1], g).float()
        s = scale.unsqueeze(-1)
        z = zp.unsqueeze(-1) if zp is not None else None
    else:
        c, s, z = codes.float(), scale, zp
    if z is not None:
        c = c - z
    return (c * s).reshape(codes.shape).to(dtype)

"""FSDP2's all-gather of BitLinear weights as packed ternary codes: 2 bits per weight instead
of the latent weight's 32 (16x less traffic than float32, 8x less than bf16), as torchao's
BitNet prototype does (`distributed.fsdp_ternary_all_gather=true`).

Each rank ternarizes its own shard before the all-gather, with the absmean scale of the
*whole* weight (one all-reduce of the shards' sums of |w|, in float64, divided by the whole
weight's size; torchao averages per-shard means instead, which is only right for equal
shards), packs the codes 4 per byte and sends those; the gathered bytes are unpacked into
the codes the forward multiplies with. The codes equal those of the unpacked gather; the
scale may differ from `mean(|W|)` in float32 by float rounding (the sums are ordered
differently), so the two paths agree to about 1e-7 relative, not bit for bit.

FSDP2 calls two hooks on the local shard of a parameter whose tensor has them
(`fsdp_pre_all_gather`, `fsdp_post_all_gather`), so each BitLinear weight is wrapped, before
`fully_shard`, in `TernaryShard`, a tensor subclass that behaves as its data everywhere else
(the optimizer, clipping and loading act on the latent values); state dicts hold the plain
tensor, so checkpoints are the same as without packing. The gathered weight is a
`TernaryGathered`: the packed codes and the scale, read by `BitLinear` in its forward; its
gradient is the latent weight's (straight through), reduce-scattered as usual.

Where it applies: plainly ternary weights, the final form BitNet trains (1.58 bits, one
absmean scale per tensor, lambda = 1, no noise, no bit stages, identity STE: the clipped
STE's mask needs the latent weight), under `strategy=fsdp` with shards of whole bytes.
Anything else is refused with the setting named.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from ..quant.functional import SCALE_EPS, Quantized
from ..quant.packing import pack_2bit, unpack_2bit

aten = torch.ops.aten
# Ops whose result is (a view or copy of) the weight itself: it stays a TernaryShard, so
# FSDP2's sharding (chunk, narrow, new_zeros, view) keeps the hooks on the local shard.
_KEEP = {
    aten.detach.default,
    aten.alias.default,
    aten.view.default,
    aten.t.default,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.as_strided.default,
    aten.clone.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten._to_copy.default,
    aten._pin_memory.default,
}


class TernaryShard(torch.Tensor):
    """A BitLinear latent weight (or FSDP2's shard of it) whose all-gather sends packed
    ternary codes. Every op runs on the plain data (`_data`); view-like ops keep the wrapper,
    in-place ops return the wrapper itself."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), dtype=data.dtype, device=data.device
        )

    def __init__(self, data: torch.Tensor):
        self._data = data

    def __repr__(self):
        return f"TernaryShard({self._data!r})"

    def __tensor_flatten__(self):
        return ["_data"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["_data"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        plain = pytree.tree_map_only(cls, lambda t: t._data, (args, kwargs or {}))
        out = func(*plain[0], **plain[1])
        if func._schema.name.endswith("_") or func is aten.copy_.default:
            return args[0]  # in place: the data changed under the wrapper
        if func in _KEEP:
            return pytree.tree_map_only(torch.Tensor, cls, out)
        return out

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This shard's ternary codes, packed 4 per byte, with the whole weight's scale."""
        w = self._data.float()
        total = w.abs().sum(dtype=torch.float64)
        torch.distributed.all_reduce(total, group=mesh.get_group())
        gamma = (total / outer_size.numel()).float().clamp(min=SCALE_EPS)
        codes = (w * (1.0 / gamma)).round_().clamp_(-1, 1).to(torch.int8)
        return (pack_2bit(codes),), (gamma, tuple(outer_size))

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (packed,) = outputs
        gamma, shape = metadata
        if out is not None:  # FSDP2 refilled the same buffer: only the scale is new
            out._gamma = gamma
            return None
        return TernaryGathered(packed, gamma, shape, param_dtype), (packed,)


class TernaryGathered(torch.Tensor):
    """The gathered weight: packed ternary codes (uint8, 4 per byte) and their absmean scale,
    shaped and typed as the weight. BitLinear reads `quantized()`; nothing else computes with
    it (any other op is refused by name)."""

    @staticmethod
    def __new__(cls, packed, gamma, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device)

    def __init__(self, packed, gamma, shape, dtype):
        self._packed, self._gamma = packed, gamma

    def __repr__(self):
        return f"TernaryGathered(shape={tuple(self.shape)}, scale={float(self._gamma):.4g})"

    def quantized(self) -> Quantized:
        """The weight's ternary codes (int8) and its scale (float32), as `quantize` returns."""
        codes = unpack_2bit(self._packed, self.numel(), check=False).view(self.shape)
        return Quantized(codes, self._gamma)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (aten.detach.default, aten.alias.default, aten.as_strided.default):
            t = args[0]  # FSDP2 wraps the gathered tensor in a Parameter: the same bytes
            return cls(t._packed, t._gamma, t.shape, t.dtype)
        raise BitNetError(
            f"{func} is not defined on a packed ternary weight (FSDP2's "
            "fsdp_ternary_all_gather): only BitLinear's forward reads it"
        )


def check_plainly_ternary(layer: BitLinear, name: str) -> None:
    """Refuse, naming the setting, a layer whose weights are not plainly ternary."""
    cfg = layer.config
    spec = cfg.weight_spec()
    rules = [
        ("qat.enable_weight_quantization", spec is None),
        ("qat.weight_bits", cfg.weight_bits != 1.58),
        ("qat.per_channel", cfg.per_channel),
        ("qat.group_size", cfg.group_size is not None),
        ("qat.weight_schedule", cfg.weight_schedule is not None),
        ("qat.weight_bit_stages", bool(cfg.weight_bit_stages)),
        ("qat.quant_noise", cfg.quant_noise is not None),
        ("qat.noise_factor", bool(cfg.noise_factor)),
        ("qat.straight_through_estimator", cfg.straight_through_estimator != "identity"),
    ]
    for setting, broken in rules:
        if broken:
            raise BitNetError(
                f"distributed.fsdp_ternary_all_gather needs plainly ternary weights (1.58 "
                f"bits, one scale per tensor, lambda 1, no noise or stages, identity STE): "
                f"{setting} breaks that ({name})"
            )


def pack_weight_gathers(model: nn.Module, world: int) -> int:
    """Wrap every BitLinear weight of `model` in `TernaryShard` (before `fully_shard`), so
    its FSDP2 all-gather sends packed codes; returns how many. Each shard must be whole
    bytes of codes: out_features divisible by `world`, and each shard's size by 4."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, BitLinear):
            continue
        check_plainly_ternary(m, name)
        out_f, in_f = m.weight.shape
        if out_f % world or (out_f // world) * in_f % 4:
            raise BitNetError(
                f"distributed.fsdp_ternary_all_gather: {name} ({out_f} x {in_f}) does not "
                f"split into {world} equal shards of whole bytes (4 codes each): turn it off"
            )
        m.weight = nn.Parameter(TernaryShard(m.weight.data), m.weight.requires_grad)
        m._register_state_dict_hook(_plain_weight)
        n += 1
    return n


def _plain_weight(module, state_dict, prefix, local_metadata):
    """State dicts hold the plain latent weight: checkpoints do not depend on packing."""
    key = prefix + "weight"
    v = state_dict.get(key)
    if v is None:
        return
    local = getattr(v, "_local_tensor", None)
    if isinstance(local, TernaryShard):
        from torch.distributed.tensor import DTensor

        state_dict[key] = DTensor.from_local(
            local._data, v.device_mesh, v.placements, run_check=False, shape=v.shape,
            stride=v.stride(),
        )  # fmt: skip
    elif isinstance(v, TernaryShard):
        state_dict[key] = v._data

"""Fully sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each transformer block is one FSDP unit and the root module (embeddings, final norm, head)
another: parameters, gradients and optimizer states are sharded over the ranks (dim 0 of
every tensor, as DTensors); a block's parameters are all-gathered just before its forward
and freed after it (`reshard_after_forward`), gradients are reduce-scattered in its backward.
The module keeps its class and parameter names, so quantization and adapters applied before
stay as they are. BitLinear quantizes the gathered latent weight, so the ternary codes and
their absmean scale are those of the whole weight, not of a shard.

FSDP2 refills a gathered weight in place without bumping its version counter
(`_unsafe_preserve_version_counter`), so BitLinear's once-per-step weight cache, keyed on that
counter, would serve the previous step's codes: sharding turns the cache off (measured: the
step after an optimizer step trained on stale weights before). The weight is quantized once
per forward instead, as it is gathered once per forward anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from .activation_checkpoint import transformer_blocks

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(
    model: nn.Module,
    device: torch.device,
    param_dtype: str = "auto",
    reduce_dtype: str = "auto",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mesh=None,
    ternary_all_gather: bool = False,
) -> nn.Module:
    """Shard `model` (moved to `device`) over 1-D device mesh `mesh` (default: all ranks of
    the default process group; the data-parallel dimension of a 2-D mesh after tensor
    parallelism) with FSDP2, one unit
    per transformer block plus the root; returns the same module. `param_dtype`: the dtype
    parameters are gathered and computed in (`auto`: their own; the shards keep their own
    dtype); `reduce_dtype`: the dtype gradients are reduce-scattered in (`auto`: the
    parameters'); `cpu_offload`: keep
    shards, gradients and the optimizer step on the CPU (GPUs only). A model without
    recognizable blocks is sharded as one unit. `ternary_all_gather`: BitLinear weights
    are gathered as packed 2-bit ternary codes (`ternary_gather`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cpu_offload and device.type != "cuda":
        raise BitNetError(
            "distributed.fsdp_cpu_offload=true offloads GPU memory to the CPU; this run is on "
            f"{device.type}, where it changes nothing (turn it off)"
        )
    model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    kwargs = {"mp_policy": mp, "mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.cache_weight, m._cache = False, None
    if ternary_all_gather:
        from .ternary_gather import pack_weight_gathers

        size = mesh.size() if mesh is not None else torch.distributed.get_world_size()
        pack_weight_gathers(model, size)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by the backward: keep them.
        keep = not reshard_after_forward or i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=not keep, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model

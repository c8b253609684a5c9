"""The layout a run asks for (`distributed.strategy`), applied to a model over the process
group `torchrun` started: DDP, FSDP2, tensor parallel, or FSDP2 across tensor-parallel groups
on a 2-D device mesh (torchtitan's order: tensor parallel first, then FSDP over the
data-parallel dimension)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitNetError
from .config import DistributedConfig
from .ddp import wrap_ddp
from .fsdp import apply_fsdp
from .pp import apply_pipeline, stage_layers
from .tp import apply_tensor_parallel

# Adapters that a layout cannot carry, and why.
FSDP_PEFT = {
    "prefix": "its virtual-token encoder lives outside the sharded blocks",
    "ptuning_v2": "its virtual-token encoder lives outside the sharded blocks",
    "qlora": "bitsandbytes' NF4 weights carry their quantization state beside the tensor, "
    "which FSDP2's shards do not; qlora_ternary shards",
    "adalora": "peft's rank allocator reads the adapters' whole importance scores, which "
    "FSDP2 shards",
}


def apply_layout(
    model: nn.Module, d: DistributedConfig, device: torch.device, peft_method: str = "none"
) -> tuple[nn.Module, str, int]:
    """Lay `model` out over every rank of the default process group as `d` says; returns the
    model to train, a one-line description, and the data-parallel degree (the number of
    distinct data streams: ranks of one tensor-parallel group read the same batches)."""
    world = torch.distributed.get_world_size()
    strategy = "ddp" if d.strategy == "auto" else d.strategy
    dp_mesh, dp, how = None, world, ""
    if strategy == "pp":
        if peft_method != "none":
            raise BitNetError(
                f"peft.method={peft_method} is not built for distributed.strategy=pp: use ddp "
                "or fsdp"
            )
        model = apply_pipeline(model, device, d.pp_schedule, d.pp_microbatches)
        per = model.pipeline.microbatches
        n = model.config.num_hidden_layers
        layers = ", ".join(str(len(stage_layers(n, world, r))) for r in range(world))
        how = (
            f"pipeline parallel over {world} stages ({layers} layers), {d.pp_schedule} "
            f"schedule, {per} micro-batches per batch (one data stream)"
        )
        return model, how, 1
    if "tp" in strategy:
        if peft_method != "none":
            raise BitNetError(
                f"peft.method={peft_method} is not built for distributed.strategy={strategy} "
                "(adapters wrap the layers tensor parallelism splits): use ddp or fsdp"
            )
        tp = d.tp_size or world
        if strategy == "tp" and tp != world:
            raise BitNetError(
                f"distributed.tp_size={tp} with strategy tp must be the number of ranks "
                f"({world}): use strategy fsdp+tp to shard data across the groups"
            )
        if world % tp:
            raise BitNetError(
                f"distributed.tp_size={tp} does not divide the {world} ranks torchrun started"
            )
        from torch.distributed.device_mesh import init_device_mesh

        dp = world // tp
        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        model.to(device)
        apply_tensor_parallel(model, mesh["tp"])
        dp_mesh = mesh["dp"]
        # Ranks of one tensor-parallel group share a data stream: the dp coordinate is theirs.
        model.data_parallel_place = (dp_mesh.get_local_rank(), dp)
        how = f"tensor parallel over {tp} ranks"
    if strategy in ("fsdp", "fsdp+tp"):
        if peft_method in FSDP_PEFT:
            raise BitNetError(
                f"peft.method={peft_method} is not built for distributed.strategy={strategy} "
                f"({FSDP_PEFT[peft_method]}): use ddp"
            )
        model = apply_fsdp(
            model,
            device,
            d.fsdp_param_dtype,
            d.fsdp_reduce_dtype,
            d.fsdp_reshard_after_forward,
            d.fsdp_cpu_offload,
            mesh=dp_mesh,
            ternary_all_gather=d.fsdp_ternary_all_gather,
        )
        fsdp = f"FSDP2 over {dp} rank{'s' if dp > 1 else ''}"
        if d.fsdp_param_dtype != "auto" or d.fsdp_reduce_dtype != "auto":
            fsdp += (
                f", parameters gathered in {d.fsdp_param_dtype}, gradients reduced in "
                f"{d.fsdp_reduce_dtype}"
            )
        if d.fsdp_ternary_all_gather:
            fsdp += ", BitLinear weights gathered as packed 2-bit ternary codes"
        how = f"{fsdp} x {how}" if how else fsdp
    elif strategy == "ddp":
        model = wrap_ddp(
            model, device, d.gradient_compression, d.powersgd_rank, d.powersgd_start_step
        )
        how = f"DDP over {world} ranks"
        if d.gradient_compression != "none":
            how += f", gradients compressed to {d.gradient_compression}"
    elif strategy == "tp":
        how += " (one data stream)"
    return model, how, dp

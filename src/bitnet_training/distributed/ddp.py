"""Data parallelism on `torch.distributed`: joining the process group `torchrun` describes,
and wrapping the model in `DistributedDataParallel`.

`torchrun --nproc-per-node=N -m bitnet_training train ...` (or the `bitnet-train` script)
sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_from_env` joins that
group (a single process without them stays alone). The backend: `nccl` on GPUs, `gloo` on
CPUs, `mpi` where torch was built with it; `auto` picks nccl or gloo.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import BitNetError


def launched_world_size() -> int:
    """WORLD_SIZE as `torchrun` set it (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BitNetError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> nccl on a CUDA device, else gloo; a backend torch lacks is a one-line error."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    available = {
        "nccl": torch.distributed.is_nccl_available(),
        "gloo": torch.distributed.is_gloo_available(),
        "mpi": torch.distributed.is_mpi_available(),
    }
    if backend not in available:
        raise BitNetError(
            f"distributed.backend={backend!r} is invalid: expected auto, nccl, gloo or mpi"
        )
    if not available[backend]:
        raise BitNetError(
            f"distributed.backend={backend} is not available in this torch build "
            f"({torch.__version__}): use auto"
            + (" (mpi needs torch built from source with MPI)" if backend == "mpi" else "")
        )
    if backend == "nccl" and device.type != "cuda":
        raise BitNetError("distributed.backend=nccl needs CUDA devices: use gloo on CPUs")
    return backend


def init_from_env(backend: str, device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun's environment describes, once; returns (rank, world
    size), (0, 1) for a process not launched by torchrun. On CUDA each process takes the GPU
    of its LOCAL_RANK."""
    world = launched_world_size()
    if world <= 1:
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(resolve_backend(backend, device), **_restart_store())
    return dist.get_rank(), dist.get_world_size()


def _restart_store() -> dict:
    """On a torchrun restart (`--max-restarts`), the process group's rendezvous keys under a
    prefix of their own. The workers join the store torchrun's agent hosts, which outlives
    the failed attempt and still holds its keys: without the prefix gloo reads the dead
    workers' addresses and fails ("Connection refused"; measured with torch 2.13). Empty
    (torch's own rendezvous) on a first attempt or outside torchrun's agent store."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    dist = torch.distributed
    world = launched_world_size()
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    prefix = dist.PrefixStore(f"bitnet_training/attempt_{attempt}", store)
    return {"store": prefix, "rank": int(os.environ["RANK"]), "world_size": world}


def wrap_ddp(
    model: nn.Module,
    device: torch.device,
    compression: str = "none",
    powersgd_rank: int = 4,
    powersgd_start_step: int = 10,
) -> nn.Module:
    """`model` on `device`, wrapped in `DistributedDataParallel` (gradients averaged over the
    ranks in the backward). Parameters that do not train are left out of the reduction.
    `compression`: the gradient all-reduce in `fp16` (torch's hook) or `bf16` (ours:
    torch's refuses any backend but NCCL / XCCL; gloo sums bf16 too) or `powersgd`
    (torch's PowerSGD hook: rank
    `powersgd_rank` factors with error feedback, plain all-reduce before
    `powersgd_start_step`)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    model.to(device)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        ddp.register_comm_hook(None, bf16_allreduce_hook)
    elif compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start_step,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif compression != "none":
        raise BitNetError(
            f"gradient_compression={compression!r} is invalid: expected none, fp16, bf16 or "
            "powersgd"
        )
    return ddp


def bf16_allreduce_hook(process_group, bucket):
    """DDP communication hook: the bucket's gradients averaged in bf16 (half the bytes of
    float32), cast back into the bucket. What torch's `bf16_compress_hook` does, on any
    backend that sums bf16 (gloo and NCCL do)."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    fut = torch.distributed.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(f):
        buffer.copy_(f.value()[0])
        return buffer

    return fut.then(decompress)

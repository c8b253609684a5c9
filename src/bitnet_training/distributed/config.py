"""`DistributedConfig`: how a run launched by `torchrun` spreads over its processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..settings import Section


class DistributedConfig(Section):
    """Data parallelism under `torchrun --nproc-per-node=N` (one process alone ignores
    nothing: strategy and backend only act with several processes, and a single process
    asked for `ddp` says so). `training.batch_size` is per rank; the global batch is
    batch_size x gradient_accumulation_steps x ranks."""

    _path = "distributed"

    strategy: Literal["auto", "none", "ddp"] = Field(
        "auto",
        description="auto: ddp when launched with several processes; ddp: "
        "DistributedDataParallel (FSDP, tensor and pipeline parallelism are not built yet)",
    )
    backend: Literal["auto", "nccl", "gloo", "mpi"] = Field(
        "auto", description="the process group's backend (auto: nccl on GPUs, gloo on CPUs)"
    )

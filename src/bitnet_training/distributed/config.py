"""`DistributedConfig`: how a run launched by `torchrun` spreads over its processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
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
    gradient_compression: Literal["none", "fp16", "bf16", "powersgd"] = Field(
        "none",
        description="DDP's gradient all-reduce in fp16 or bf16 (half the bytes), or PowerSGD "
        "(low-rank, with error feedback)",
    )
    powersgd_rank: int = Field(4, gt=0, description="PowerSGD's matrix approximation rank")
    powersgd_start_step: int = Field(
        10, ge=2, description="PowerSGD: plain all-reduce before this step (its warm-up)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.strategy == "none" and self.gradient_compression != "none":
            raise ConfigError(
                "gradient_compression", self.gradient_compression, "none with strategy none"
            )
        return self

"""`DistributedConfig`: how a run launched by `torchrun` spreads over its processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..settings import Section


class DistributedConfig(Section):
    """Data parallelism under `torchrun --nproc-per-node=N` (one process alone ignores
    nothing: strategy and backend only act with several processes, and a single process
    asked for `ddp` or `fsdp` says so). `training.batch_size` is per rank; the global batch
    is batch_size x gradient_accumulation_steps x ranks."""

    _path = "distributed"

    strategy: Literal["auto", "none", "ddp", "fsdp", "tp", "pp", "fsdp+tp"] = Field(
        "auto",
        description="auto: ddp when launched with several processes; ddp: "
        "DistributedDataParallel (a replica per rank); fsdp: FSDP2, parameters, gradients "
        "and optimizer states sharded over the ranks, sharded checkpoints; tp: tensor "
        "parallel, each block's attention and FFN split over the ranks, which share one "
        "data stream; pp: pipeline parallel, the model's layers split into one stage per "
        "rank (pp_schedule, pp_microbatches); fsdp+tp: a 2-D mesh, tensor parallel within "
        "groups of tp_size ranks, FSDP across the groups",
    )
    pp_schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b",
        description="pp: the pipeline schedule (gpipe: every micro-batch's forward, then "
        "every backward; 1f1b: alternating, fewer activations alive at once)",
    )
    pp_microbatches: int | None = Field(
        None,
        gt=0,
        description="pp: micro-batches per batch the schedule pipelines (default: the "
        "number of stages); must divide training.batch_size",
    )
    tp_size: int | None = Field(
        None,
        gt=1,
        description="ranks per tensor-parallel group (tp: all ranks when unset; fsdp+tp: "
        "required, and must divide the number of ranks)",
    )
    backend: Literal["auto", "nccl", "gloo", "mpi"] = Field(
        "auto", description="the process group's backend (auto: nccl on GPUs, gloo on CPUs)"
    )
    gradient_compression: Literal["none", "fp16", "bf16", "powersgd"] = Field(
        "none",
        description="DDP's gradient all-reduce in fp16 or bf16 (half the bytes), or PowerSGD "
        "(low-rank, with error feedback); with fsdp use fsdp_reduce_dtype",
    )
    powersgd_rank: int = Field(4, gt=0, description="PowerSGD's matrix approximation rank")
    powersgd_start_step: int = Field(
        10, ge=2, description="PowerSGD: plain all-reduce before this step (its warm-up)"
    )
    fsdp_param_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="fsdp: the dtype parameters are all-gathered and computed in (auto: their "
        "own; bfloat16 halves the all-gather, the sharded master weights keep theirs)",
    )
    fsdp_reduce_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="fsdp: the dtype gradients are reduce-scattered in (auto: the parameters' own)",
    )
    fsdp_reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each block's gathered parameters after its forward and gather "
        "them again for the backward (ZeRO-3; false keeps them, as ZeRO-2: more memory, "
        "less traffic)",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="fsdp: keep the sharded parameters, gradients and optimizer step on the "
        "CPU (for GPUs short of memory; on a CPU run it changes nothing and is refused)",
    )
    fsdp_ternary_all_gather: bool = Field(
        False,
        description="fsdp: all-gather BitLinear weights as ternary codes packed 2 bits each "
        "(16x less than float32) with the whole weight's absmean scale; for plainly ternary "
        "weights (1.58 bits, per tensor, no schedules, noise or stages, identity STE)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.strategy == "none" and self.gradient_compression != "none":
            raise ConfigError(
                "gradient_compression", self.gradient_compression, "none with strategy none"
            )
        if self.tp_size is not None and self.strategy not in ("tp", "fsdp+tp"):
            raise ConfigError("tp_size", self.tp_size, "set only with strategy tp or fsdp+tp")
        if self.strategy == "fsdp+tp" and self.tp_size is None:
            raise ConfigError("tp_size", None, "an integer >= 2 with strategy fsdp+tp")
        if self.strategy in ("tp", "fsdp+tp") and self.gradient_compression != "none":
            raise ConfigError(
                "gradient_compression",
                self.gradient_compression,
                f"none with strategy {self.strategy}",
            )
        if self.strategy in ("fsdp", "fsdp+tp") and self.gradient_compression != "none":
            raise ConfigError(
                "gradient_compression",
                self.gradient_compression,
                "none with strategy fsdp (its reduce-scatter dtype is fsdp_reduce_dtype)",
            )
        fsdp_set = [
            name
            for name in (
                "fsdp_param_dtype",
                "fsdp_reduce_dtype",
                "fsdp_reshard_after_forward",
                "fsdp_cpu_offload",
                "fsdp_ternary_all_gather",
            )
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if fsdp_set and self.strategy not in ("fsdp", "fsdp+tp"):
            raise ConfigError(
                fsdp_set[0], getattr(self, fsdp_set[0]), "set only with strategy fsdp or fsdp+tp"
            )
        pp_set = [n for n in ("pp_schedule", "pp_microbatches")
                  if getattr(self, n) != type(self).model_fields[n].default]  # fmt: skip
        if pp_set and self.strategy != "pp":
            raise ConfigError(pp_set[0], getattr(self, pp_set[0]), "set only with strategy pp")
        if self.strategy == "pp" and self.gradient_compression != "none":
            raise ConfigError("gradient_compression", self.gradient_compression, "none with pp")
        if self.fsdp_ternary_all_gather and self.strategy != "fsdp":
            raise ConfigError(
                "fsdp_ternary_all_gather",
                True,
                "set only with strategy fsdp (under fsdp+tp the scale would need both meshes)",
            )
        return self

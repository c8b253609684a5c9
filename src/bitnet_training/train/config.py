"""`TrainingConfig`: how the `Trainer` runs (optimizer, schedule, precision, evaluation, saving)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..optim.config import OptimizerConfig, SchedulerConfig
from ..settings import Section
from .allocator import available


class TrainingConfig(Section):
    """Everything the `Trainer` needs besides the model and data. Defaults work on a CPU.
    Gradient clipping applies AGC (NFNets, arXiv 2102.06171), then by value, then by norm."""

    _path = "training"

    learning_rate: float = Field(
        1.5e-3, gt=0, description="peak LR (BitNet trains at several times a full-precision LR)"
    )
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch")
    num_epochs: int = Field(1, gt=0, description="run length in epochs (max_steps wins)")
    max_steps: int | None = Field(None, gt=0, description="run length in optimizer steps")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="the optimizer (a name: its defaults)"
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="the LR schedule (a name: its defaults)"
    )
    gradient_clip_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this (None: off)"
    )
    gradient_clip_value: float | None = Field(
        None, gt=0, description="clip each gradient element to [-v, v] (None: off)"
    )
    agc_clip_factor: float | None = Field(
        None,
        gt=0,
        description="adaptive gradient clipping: each unit's gradient norm to this fraction "
        "of its weight norm (None: off)",
    )
    agc_eps: float = Field(1e-3, gt=0, description="AGC's floor of the weight norm")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step"
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast where supported, else fp16; fp16 adds dynamic loss "
        "scaling (slow matmuls on CPUs); true / false: auto / fp32",
    )
    init_scale: float = Field(2.0**16, gt=0, description="fp16: initial loss scale")
    growth_factor: float = Field(2.0, gt=1, description="fp16: loss-scale growth factor")
    backoff_factor: float = Field(0.5, gt=0, lt=1, description="fp16: loss-scale backoff")
    growth_interval: int = Field(
        2000, gt=0, description="fp16: steps without overflow before the scale grows"
    )
    eval_every: int | None = Field(
        None, gt=0, description="evaluate every N steps (None: at the end, given eval data)"
    )
    eval_steps: int | None = Field(
        None, gt=0, description="at most N evaluation batches (None: the whole set)"
    )
    save_every: int | None = Field(
        None, gt=0, description="checkpoint every N steps (None: only at the end)"
    )
    save_total_limit: int | None = Field(
        3, gt=0, description="keep the newest N checkpoints, and the best (None: all)"
    )
    save_best_only: bool = Field(
        False, description="save only when best_metric improves (and at the end)"
    )
    wandb: Literal["off", "online", "offline"] = Field(
        "off",
        description="log to Weights & Biases: offline writes <output_dir>/wandb/ with no network",
    )
    wandb_project: str = Field("bitnet-training", min_length=1, description="the W&B project")
    wandb_name: str = Field("", description="the W&B run name ('': the output directory's name)")
    profile_steps: list[int] = Field(
        default_factory=list,
        description="record these optimizer steps (first to last) with torch.profiler: a "
        "Chrome / TensorBoard trace under <output_dir>/profile/ and the top operators logged",
    )
    metrics: list[str] = Field(
        default_factory=list,
        description="evaluation metrics beyond loss / perplexity / bits per byte: "
        "token_accuracy, or names given to register_metric",
    )
    best_metric: str = Field(
        "val_loss", min_length=1, description="the metric for the best checkpoint and stopping"
    )
    best_mode: Literal["auto", "min", "max"] = Field(
        "auto",
        description="whether lower or higher wins (auto: higher for accuracy, BLEU and chrF, "
        "lower otherwise)",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after N evaluations without improvement (None: never)"
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="the least change that counts as an improvement"
    )
    log_every: int = Field(10, gt=0, description="log (progress, JSON lines, TensorBoard) every N")
    dataloader_workers: int = Field(
        0, ge=0, description="DataLoader processes for streaming datasets"
    )
    seed: int = Field(0, ge=0, description="drives initialization, data order and sampling")
    output_dir: str = Field("runs/default", min_length=1, description="checkpoints and logs")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    activation_checkpointing: bool = Field(
        False,
        description="recompute each transformer block in the backward instead of keeping its "
        "activations (less memory, about one more forward per step)",
    )
    keep_freed_memory: bool = Field(
        True,
        description="CPU heap (glibc): keep a step's freed activations for the next step "
        "(mmap threshold 32 MiB, trim threshold 1 GiB) instead of faulting them in again; "
        "process-wide. false: the C library's defaults. true is refused without glibc",
    )

    @model_validator(mode="after")
    def _heap(self):
        asked = "keep_freed_memory" in self.model_fields_set and self.keep_freed_memory
        if asked and not available():
            raise ConfigError("keep_freed_memory", True, "false here (the C library is not glibc)")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _on_off(cls, v):
        return ("fp32", "auto")[v] if isinstance(v, bool) else v  # true / false: auto / fp32

    @property
    def best_direction(self) -> str:
        """`best_mode` resolved: "max" or "min"."""
        if self.best_mode != "auto":
            return self.best_mode
        higher = ("accuracy", "bleu", "chrf")
        return "max" if any(h in self.best_metric for h in higher) else "min"

"""`TrainingConfig`: how the `Trainer` runs (optimizer, schedule, precision, evaluation, saving)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..optim.config import OptimizerConfig, SchedulerConfig, _is_int, _is_num, _need, _positive_int

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainingConfig:
    """Everything the `Trainer` needs besides the model and data. Defaults work on a CPU.

    learning_rate: peak LR (BitNet trains at several times a full-precision model's LR).
    batch_size: sequences per micro-batch; an optimizer step sees
        `batch_size * gradient_accumulation_steps` sequences.
    num_epochs / max_steps: run length; `max_steps` (optimizer steps), when set, wins.
    gradient_clip_norm: clip the global gradient norm to this (None: no clipping);
        gradient_clip_value: clip each gradient element to [-v, v]; agc_clip_factor:
        adaptive gradient clipping (NFNets, arXiv 2102.06171) of each unit's gradient to
        this fraction of its weight norm (floored at `agc_eps`). Applied AGC, value, norm.
    mixed_precision: `auto` (bf16 autocast on CPU and on GPUs that support it, else fp16),
        `bf16`, `fp16` (autocast + dynamic loss scaling with `init_scale`, `growth_factor`,
        `backoff_factor`, `growth_interval`; for GPUs: fp16 matmuls are slow on CPUs) or
        `fp32`.
    eval_every: evaluate every N steps (None: only at the end, when there is eval data);
        eval_steps: at most N evaluation batches (None: the whole evaluation set).
    save_every: checkpoint every N steps (None: only at the end); save_total_limit: keep the
        newest N checkpoints (the best is always kept; None keeps all); save_best_only: save
        only when `best_metric` improves at an evaluation (and at the end).
    best_metric / best_mode: the metric that picks the best checkpoint and drives early
        stopping; early_stopping_patience: stop after N evaluations without improvement of at
        least `early_stopping_min_delta` (None: never stop early).
    log_every: log (progress bar, JSON lines, TensorBoard) every N steps.
    dataloader_workers: DataLoader processes for streaming (iterable) datasets.
    seed: drives initialization order, data order and sampling; output_dir: checkpoints and
        logs; device: `auto` (CUDA when available), `cpu` or `cuda`.
    """

    learning_rate: float = 1.5e-3
    batch_size: int = 16
    num_epochs: int = 1
    max_steps: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    gradient_clip_norm: float | None = 1.0
    gradient_clip_value: float | None = None
    agc_clip_factor: float | None = None
    agc_eps: float = 1e-3
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    eval_every: int | None = None
    eval_steps: int | None = None
    save_every: int | None = None
    save_total_limit: int | None = 3
    save_best_only: bool = False
    best_metric: str = "val_loss"
    best_mode: str = "min"
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    log_every: int = 10
    dataloader_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    device: str = "auto"

    def __post_init__(self):
        p = "training"
        for name, cls in (("optimizer", OptimizerConfig), ("scheduler", SchedulerConfig)):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, cls(name=v))
            elif isinstance(v, dict):
                setattr(self, name, cls(**v))
            _need(
                f"{p}.{name}",
                v,
                isinstance(getattr(self, name), cls),
                f"a name or a mapping of {cls.__name__} fields",
            )
        if self.mixed_precision is True:
            self.mixed_precision = "auto"
        elif self.mixed_precision is False:
            self.mixed_precision = "fp32"
        lr = self.learning_rate
        _need(f"{p}.learning_rate", lr, _is_num(lr) and lr > 0, "a positive number")
        for name in (
            "batch_size",
            "num_epochs",
            "gradient_accumulation_steps",
            "log_every",
            "growth_interval",
        ):
            _positive_int(f"{p}.{name}", getattr(self, name))
        for name in (
            "max_steps",
            "eval_every",
            "eval_steps",
            "save_every",
            "save_total_limit",
            "early_stopping_patience",
        ):
            _positive_int(f"{p}.{name}", getattr(self, name), optional=True)
        for name in ("gradient_clip_value", "agc_clip_factor"):
            v = getattr(self, name)
            _need(
                f"{p}.{name}", v, v is None or (_is_num(v) and v > 0), "a positive number or None"
            )
        _need(
            f"{p}.agc_eps",
            self.agc_eps,
            _is_num(self.agc_eps) and self.agc_eps > 0,
            "a positive number",
        )
        c = self.gradient_clip_norm
        _need(
            f"{p}.gradient_clip_norm",
            c,
            c is None or (_is_num(c) and c > 0),
            "a positive number or None",
        )
        _need(
            f"{p}.mixed_precision",
            self.mixed_precision,
            self.mixed_precision in PRECISIONS,
            ", ".join(PRECISIONS),
        )
        _need(
            f"{p}.init_scale",
            self.init_scale,
            _is_num(self.init_scale) and self.init_scale > 0,
            "a positive number",
        )
        _need(
            f"{p}.growth_factor",
            self.growth_factor,
            _is_num(self.growth_factor) and self.growth_factor > 1,
            "a number > 1",
        )
        _need(
            f"{p}.backoff_factor",
            self.backoff_factor,
            _is_num(self.backoff_factor) and 0 < self.backoff_factor < 1,
            "a number in (0, 1)",
        )
        _need(
            f"{p}.save_best_only",
            self.save_best_only,
            isinstance(self.save_best_only, bool),
            "true or false",
        )
        _need(
            f"{p}.best_metric",
            self.best_metric,
            isinstance(self.best_metric, str) and bool(self.best_metric),
            "a metric name",
        )
        _need(f"{p}.best_mode", self.best_mode, self.best_mode in ("min", "max"), "min or max")
        d = self.early_stopping_min_delta
        _need(f"{p}.early_stopping_min_delta", d, _is_num(d) and d >= 0, "a number >= 0")
        w = self.dataloader_workers
        _need(f"{p}.dataloader_workers", w, _is_int(w) and w >= 0, "an integer >= 0")
        _need(f"{p}.seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        _need(
            f"{p}.output_dir",
            self.output_dir,
            isinstance(self.output_dir, str) and bool(self.output_dir),
            "a directory path",
        )
        _need(f"{p}.device", self.device, self.device in DEVICES, ", ".join(DEVICES))

    def to_dict(self) -> dict:
        return asdict(self)

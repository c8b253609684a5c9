"""The one training loop: steps, accumulation, precision, evaluation, checkpoints, resume.

It knows nothing about quantization, adapters or model architecture. It receives built
pieces: a model, an optimizer and a schedule (built from the config when not given), data,
a `loss_fn(model, batch)` (default: the model's own loss: its forward, called with the
batch's tensors as keyword arguments, returns a loss tensor, a dict or tuple with it first,
or an object with `.loss`, as Hugging Face models do), evaluation metrics, and callbacks:
those passed, those the model's modules declare (`trainer_callbacks()`, e.g. quantization's
step clock) and the defaults. Everything optional (log records, evaluation cadence, best
tracking, history, schedule, early stopping, logging, progress) is a callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from ..callback import Callback, collect_callbacks, merge_callbacks
from ..data.sampler import IterableBatches, ResumableBatchSampler
from ..distributed.pp import pipeline_of
from ..distributed.wrappers import (
    averages_gradients,
    data_parallel_place,
    gathers_in_forward,
    no_gradient_sync,
    unwrap,
)
from ..errors import BitNetError
from ..metrics import Metric, build_metrics
from ..monitoring import Profiling, WandbLogging
from ..nn.convert import output_head
from ..optim import build_optimizer, clip_gradients
from ..quant import gemm
from .allocator import keep_freed_memory
from .callbacks import (
    BestMetric,
    Checkpointing,
    EarlyStopping,
    History,
    LogRecords,
    LRScheduling,
    MetricsLogging,
    PeriodicEvaluation,
)
from .checkpoint import STATE_FILE, checkpoint_name
from .checkpoint_io import CheckpointIO
from .config import TrainingConfig
from .precision import resolve_device, resolve_precision
from .rng import capture_rng, restore_rng
from .signals import GracefulStop

log = logging.getLogger(__name__)

# Callbacks' tensors (`Callback.state_tensors`) travel in the checkpoint's tensor file of the
# trainer state (rng.safetensors) under this prefix, then the callback's key.
CALLBACK_TENSORS = "callback/"
# Under data parallelism, rank r > 0's generator states are stored under this prefix, then r.
RANK_RNG = "rank"


def causal_lm_targets(batch: dict) -> torch.Tensor:
    """Prediction targets in a causal-LM batch: labels after the first position that are not
    -100 (Hugging Face's convention: the model shifts labels by one and ignores -100). Without
    labels, each sequence counts once."""
    labels = batch.get("labels")
    if labels is None:
        first = next(iter(batch.values()))
        return torch.tensor(first.shape[0], device=first.device)
    return (labels[..., 1:] != -100).sum()


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The default `loss_fn`: `model(**batch)`'s loss (a 0-dim tensor, the first item of a
    tuple or dict, or `.loss`); a model that returns none is a one-line error."""
    out = model(**batch)
    loss = out
    if isinstance(out, dict):
        loss = out.get("loss")
    elif isinstance(out, tuple | list):
        loss = out[0] if out else None
    elif not isinstance(out, torch.Tensor):
        loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise BitNetError(
            "the model returned no scalar loss: it must return a loss tensor (or an output "
            "with .loss) when called with the batch, e.g. with labels"
        )
    return loss


def pipeline_loss(loss_fn):
    """The summed-over-targets form of `loss_fn` that a pipeline's last stage computes from
    the logits, or a one-line refusal naming why the loss needs more of the model."""
    from ..loss.lm import causal_lm_loss

    if loss_fn is model_loss:
        return lambda logits, labels, training: causal_lm_loss(logits, labels, reduction="sum")
    summed = getattr(loss_fn, "summed_from_logits", None)
    config = getattr(loss_fn, "config", None)
    why = None
    if summed is None:
        why = f"its loss ({type(loss_fn).__name__}) needs the whole model, not only the logits"
    elif getattr(config, "chunk_size", None) is not None:
        why = "loss.chunk_size computes the loss from the last hidden states and the head"
    if why:
        raise BitNetError(f"distributed.strategy=pp cannot train this run: {why}")
    return summed


def default_callbacks(config: TrainingConfig) -> list[Callback]:
    """The callbacks every run has unless replaced (same key): schedule, checkpointing,
    log records, evaluation cadence, best tracking, history, JSON lines / TensorBoard, and
    early stopping when `early_stopping_patience` is set."""
    out: list[Callback] = [
        LRScheduling(),
        Checkpointing(config.save_every, config.save_best_only),
        LogRecords(),
        PeriodicEvaluation(),
        BestMetric(),
        History(),
        MetricsLogging(),
    ]
    if config.profile_steps:
        out.append(Profiling(config.profile_steps))
    if config.wandb != "off":
        out.append(WandbLogging(config.wandb, config.wandb_project, config.wandb_name))
    if config.early_stopping_patience:
        out.append(
            EarlyStopping(
                config.early_stopping_patience,
                config.best_metric,
                config.early_stopping_min_delta,
                config.best_direction,
            )
        )
    return out


@dataclass
class TrainerState:
    """Where a run stands; saved in every checkpoint. `step` counts optimizer steps."""

    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    should_stop: bool = False
    should_save: bool = False


@dataclass
class TrainResult:
    """What `Trainer.train()` returns. `metrics`: the last training loss and the last
    evaluation's metrics; `tokens` counts the whole run, `tokens_per_s` this call (a resumed
    run's time starts at the resume); `history`: every log record and evaluation, in order."""

    metrics: dict
    best_metric: float | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    steps: int
    tokens: int
    tokens_per_s: float
    wall_time_s: float
    interrupted: bool
    precision: str
    device: str
    history: list[dict] = field(default_factory=list)
    signal: int | None = None


class Trainer:
    """Trains `model` on `train_data` (a map-style dataset of dicts of tensors, or an
    `IterableDataset`) as `config` says, evaluating on `eval_data`.

    Keyword pieces (each built from `config` when not given):
        optimizer: a `torch.optim.Optimizer` over the parameters to train.
        scheduler: an LR scheduler stepped once per optimizer step.
        loss_fn: `loss_fn(model, batch) -> 0-dim tensor` (default `model_loss`).
        metrics: evaluation `Metric`s (default: `config.metrics` after `LossMetrics`'s loss,
            perplexity and bits per byte).
        checkpoint_io: a `CheckpointIO` (how checkpoints are read and written).
        rank, world_size: this process's data-parallel place (default: from
            `torch.distributed` when initialized, else 0 of 1); only rank 0 writes logs.
    Callbacks: the defaults (`default_callbacks`), then those the model's modules declare,
    then `callbacks`; a later one replaces an earlier one of the same key. `metadata`
    (JSON-serializable) is stored in every checkpoint. `count_targets(batch)` gives the
    number of prediction targets of a batch, by which gradient accumulation weighs
    micro-batches (default: `causal_lm_targets`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig | None = None,
        train_data: Dataset | None = None,
        eval_data: Dataset | None = None,
        callbacks: Sequence[Callback] = (),
        metadata: dict | None = None,
        count_targets: Callable[[dict], torch.Tensor] = causal_lm_targets,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler=None,
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] = model_loss,
        metrics: Sequence[Metric] | None = None,
        checkpoint_io: CheckpointIO | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.model, self.config = model, config or TrainingConfig()
        self.train_data, self.eval_data = train_data, eval_data
        self.metadata, self.count_targets = metadata or {}, count_targets
        self.optimizer, self.loss_fn = optimizer, loss_fn
        if metrics is None:
            metrics = build_metrics(self.config.metrics)
        elif self.config.metrics:
            raise BitNetError(
                "training.metrics names metrics, and metrics= gives others: use one of the two"
            )
        self.metrics = list(metrics)
        known = {name for m in self.metrics for name in m.names}
        if known and all(m.names for m in self.metrics) and self.config.best_metric not in known:
            raise BitNetError(
                f"training.best_metric={self.config.best_metric!r} is not an evaluation metric "
                f"of this run; it has {', '.join(sorted(known))}"
            )
        self.checkpoint_io = checkpoint_io or CheckpointIO()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size or (torch.distributed.get_world_size() if dist else 1)
        # Among the data-parallel replicas (all ranks, unless tensor parallel ranks share data)
        self.dp_rank, self.dp_size = data_parallel_place(model, self.rank, self.world_size)
        self.device = resolve_device(self.config.device)
        self.precision = resolve_precision(self.config.mixed_precision, self.device)
        given = list(callbacks) + ([LRScheduling(scheduler=scheduler)] if scheduler else [])
        self.callbacks = merge_callbacks(
            default_callbacks(self.config), collect_callbacks(model), given
        )
        self.state = TrainerState()
        self.scaler: torch.amp.GradScaler | None = None
        self.sampler: ResumableBatchSampler | IterableBatches | None = None
        self.total_steps = 0
        self.steps_per_epoch = 1
        self.history: list[dict] = []
        self.last_step: dict = {}
        self.interrupted = False
        # Several processes: SIGTERM kills at once (see signals.py), Ctrl-C stops together.
        self._stop = GracefulStop(catch_sigterm=self.world_size == 1)
        self._ranks_stopping = False

    @property
    def data_parallel(self) -> bool:
        """Whether gradients are averaged over ranks (a process group of several ranks and a
        model that averages them: `DistributedDataParallel` or FSDP2)."""
        return self.dp_size > 1 and averages_gradients(self.model)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the data-parallel ranks (itself in a single process)."""
        if not self.data_parallel:
            return value
        value = value.detach().clone()
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        torch.distributed.all_reduce(value)
        return value / self.world_size

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the data-parallel ranks (an all-reduce over every rank, each
        tensor-parallel group's copies counted once)."""
        value = value.detach().clone().to(self.device)
        torch.distributed.all_reduce(value)
        copies = self.world_size // self.dp_size
        if copies > 1:
            value = value // copies if not value.is_floating_point() else value / copies
        return value

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, metadata and (unsharded) checkpoints."""
        return self.rank == 0

    # ----------------------------------------------------------------------- setup
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this run's precision (None: fp32, no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _autocast(self):
        dtype = self._autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _setup(self) -> None:
        c = self.config
        if self.train_data is None:
            raise BitNetError("Trainer.train() needs train_data")
        if os.path.exists(c.output_dir) and not os.path.isdir(c.output_dir):
            raise BitNetError(f"training.output_dir {c.output_dir!r} is a file, not a directory")
        if c.save_best_only and self.eval_data is None:
            raise BitNetError("training.save_best_only needs evaluation data (eval_data)")
        if c.keep_freed_memory:
            keep_freed_memory()  # no page faults for the same activations every step
        self.model.to(self.device).train()
        packed = any(getattr(p, "quant_state", None) is not None for p in self.model.parameters())
        if packed and not getattr(self.checkpoint_io, "trainable_only", False):
            raise BitNetError(
                "the model has a 4-bit (bitsandbytes) frozen base, which checkpoints do not hold "
                "(it is rebuilt from its source): pass checkpoint_io=CheckpointIO("
                "trainable_only=True) to checkpoint what trains, as PEFT runs do"
            )
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model, c.optimizer, c.learning_rate, self.callbacks
            )
        shaping = [
            cb.key
            for cb in self.callbacks
            if type(cb).configure_param_groups is not Callback.configure_param_groups
            and cb.key not in getattr(self.optimizer, "configured_by", set())
        ]
        if shaping:  # its groups would silently not apply
            raise BitNetError(
                f"callback {shaping[0]} shapes the optimizer's parameter groups, but the "
                "optimizer given was built without it: build it with "
                "build_optimizer(model, ..., callbacks=...) or let the Trainer build it"
            )
        if pipeline_of(unwrap(self.model)) is not None:
            self._check_pipeline()
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                self.device.type,
                init_scale=c.init_scale,
                growth_factor=c.growth_factor,
                backoff_factor=c.backoff_factor,
                growth_interval=c.growth_interval,
            )
        if isinstance(self.train_data, IterableDataset):
            if c.max_steps is None:
                raise BitNetError(
                    "training.max_steps is needed with a streaming dataset (its length is unknown)"
                )
            self.sampler = IterableBatches(self.train_data, c.batch_size, c.dataloader_workers)
            per_epoch = c.max_steps
        else:
            self.sampler = ResumableBatchSampler(
                len(self.train_data),
                c.batch_size,
                c.seed,
                rank=self.dp_rank,
                world_size=self.dp_size,
            )
            per_epoch = len(self.sampler) // c.gradient_accumulation_steps
        if c.max_steps is None and per_epoch == 0:
            raise BitNetError(
                f"one epoch has {len(self.sampler)} batches, fewer than "
                f"gradient_accumulation_steps={c.gradient_accumulation_steps}: set "
                "training.max_steps or use more data"
            )
        self.total_steps = c.max_steps or c.num_epochs * per_epoch
        self.steps_per_epoch = max(1, per_epoch)
        # Where the quantized layers' matmul is measured (bf16 `integer_matmul: auto`), it is
        # decided now for every layer, and every rank holds rank 0's decisions (the same
        # numbers on every replica; a collective at a point every rank reaches).
        floats = (p.dtype for p in self.model.parameters() if p.is_floating_point())
        dt = self._autocast_dtype() or next(floats, torch.float32)
        for module in self.model.modules():
            if hasattr(module, "decide_matmul"):
                module.decide_matmul(dt)
        gemm.agree_paths()
        self._call("setup")

    def _check_pipeline(self) -> None:
        """Refuse what a pipeline schedule cannot run (its backward is its own, its last
        stage alone has the logits), and take the loss's summed form."""
        why = None
        aux = [cb.key for cb in self.callbacks if type(cb).aux_loss is not Callback.aux_loss]
        if self.precision == "fp16":
            why = "fp16 loss scaling would act outside the schedule's backward (use bf16)"
        elif aux:
            why = f"callback {aux[0]} adds a loss outside the schedule's backward"
        elif any(m.needs_logits for m in self.metrics):
            why = "a metric needs the logits, which only the last stage has"
        if why:
            raise BitNetError(f"distributed.strategy=pp cannot run this: {why}")
        summed = pipeline_loss(self.loss_fn)
        self._pipeline_loss = lambda logits, labels: summed(logits, labels, True)
        self._pipeline_eval_loss = lambda logits, labels: summed(logits, labels, False)

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds of this trainer besides the model's and optimizer's
        own tensors: step, tokens, best metric, data position, callback states (schedule,
        QAT clock, early stopping, ...), grad scaler, NumPy / Python RNG, precision, config.
        JSON-serializable. The torch generator states are `capture_rng()`'s tensors."""
        s, data = self.state, self.train_data
        _, rng_json = capture_rng()
        return {
            "step": s.step,
            "tokens_seen": s.tokens_seen,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "data_parallel_size": self.dp_size,
            "best_metric": s.best_metric,
            "best_step": s.best_step,
            "best_checkpoint": s.best_checkpoint and os.path.basename(s.best_checkpoint),
            "data": {
                **self.sampler.state_dict(),
                "num_items": self.sampler.num_items,
                "fingerprint": getattr(data, "fingerprint", None),
                "dataset": data.state_dict() if hasattr(data, "state_dict") else None,
            },
            "callbacks": {
                k: v
                for k, v in ((cb.key, cb.state_dict()) for cb in self.callbacks)
                if v is not None
            },
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_json,
            "precision": self.precision,
            # The matmul each quantized layer shape measured faster (bf16 `integer_matmul:
            # auto`): a resumed run keeps it, so its numbers.
            "matmul_paths": gemm.path_state(),
            "optimizer": type(self.optimizer).__name__,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, st: dict) -> None:
        """Put back what `state_dict` returned (after `train()`'s setup: the optimizer, data
        plan and callbacks exist). Data of another size or fingerprint, or another
        optimizer, is refused; a changed learning rate, schedule or run length is applied
        from the saved step on, and said."""
        data = st["data"]
        if data["num_items"] != self.sampler.num_items:
            raise BitNetError(
                f"the checkpoint was trained on {data['num_items']} sequences, this run has "
                f"{self.sampler.num_items}: resuming needs the same data and seq_len"
            )
        ours = getattr(self.train_data, "fingerprint", None)
        if data.get("fingerprint") and ours and data["fingerprint"] != ours:
            raise BitNetError(
                f"the checkpoint was trained on other data (fingerprint {data['fingerprint']}, "
                f"this run's is {ours}): resuming needs the same data"
            )
        old = st.get("config") or {}
        # The data position counts global batches: another world size resumes exactly when
        # batch_size x ranks (the sequences of one micro-step) stays the same.
        dp = st.get("data_parallel_size", st.get("world_size", 1))
        theirs = old.get("batch_size", self.config.batch_size) * dp
        ours = self.config.batch_size * self.dp_size
        if theirs != ours:
            raise BitNetError(
                f"the checkpoint was trained with training.batch_size={old.get('batch_size')} "
                f"on {dp} data-parallel rank(s) ({theirs} sequences per micro-step); "
                f"this run has {self.config.batch_size} on {self.dp_size} ({ours}): the "
                "saved data position needs the same global batch to resume"
            )
        for key in ("gradient_accumulation_steps", "seed"):
            if key in old and old[key] != getattr(self.config, key):
                raise BitNetError(
                    f"the checkpoint was trained with training.{key}={old[key]!r}, this run has "
                    f"{getattr(self.config, key)!r}: the saved data position needs the same "
                    "value to resume"
                )
        saved_opt, ours_opt = st.get("optimizer"), type(self.optimizer).__name__
        if saved_opt is not None and saved_opt != ours_opt:
            raise BitNetError(
                f"the checkpoint was trained with {saved_opt}, this run uses {ours_opt}: "
                "resuming needs the same optimizer"
            )
        for cb in self.callbacks:
            if cb.key in st.get("callbacks", {}):
                cb.load_state_dict(st["callbacks"][cb.key])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.sampler.load_state_dict(data)
        if data.get("dataset") is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(data["dataset"])
        self._say_schedule_changes(st)
        gemm.load_path_state(st.get("matmul_paths", []))
        s = self.state
        s.step, s.tokens_seen = int(st["step"]), int(st["tokens_seen"])
        s.best_metric, s.best_step = st.get("best_metric"), st.get("best_step")
        restore_rng({}, st.get("rng", {}))

    def _say_schedule_changes(self, st: dict) -> None:
        old, new = st.get("config") or {}, self.config.to_dict()
        changed = []
        for k in ("learning_rate", "max_steps", "num_epochs", "scheduler", "optimizer"):
            if k not in old or old[k] == new[k]:
                continue
            if isinstance(new[k], dict) and isinstance(old[k], dict):
                changed += [
                    f"{k}.{f} {old[k].get(f)!r} -> {v!r}"
                    for f, v in new[k].items()
                    if old[k].get(f) != v
                ]
            else:
                changed.append(f"{k} {old[k]!r} -> {new[k]!r}")
        if st.get("total_steps") not in (None, self.total_steps):
            changed.append(f"total steps {st['total_steps']} -> {self.total_steps}")
        if changed:
            log.warning(
                "resuming with changed settings (%s): the new schedule and optimizer "
                "settings apply from step %d",
                "; ".join(changed),
                int(st["step"]),
            )

    def save_checkpoint(self, _before_commit=None) -> str:
        """Write a checkpoint of the current step (atomically), move `latest` (and `best`
        when this step's evaluation is the best so far), prune old ones, call `on_save`."""
        c, s, io = self.config, self.state, self.checkpoint_io
        if s.best_step == s.step and s.best_metric is not None:
            s.best_checkpoint = os.path.join(c.output_dir, checkpoint_name(s.step))
        path = os.path.join(c.output_dir, checkpoint_name(s.step))
        rng_tensors, state = capture_rng()[0], self.state_dict()
        if self.world_size > 1 and torch.distributed.is_initialized():
            # Every rank's generators (ranks draw apart: dropout, noise, augmentation);
            # rank 0's keep the plain names, so another world size can fall back on them.
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, (rng_tensors, state["rng"]))
            for r, (tensors, _) in enumerate(ranks[1:], 1):
                rng_tensors.update({f"{RANK_RNG}{r}/{k}": v for k, v in tensors.items()})
            state["rank_rng"] = [j for _, j in ranks]
        if self.is_main or io.sharded:
            for cb in self.callbacks:  # the callbacks' tensors, by key
                for name, t in (cb.state_tensors() or {}).items():
                    rng_tensors[f"{CALLBACK_TENSORS}{cb.key}/{name}"] = t.detach().cpu()
            args = (c.output_dir, s.step, unwrap(self.model), self.optimizer, state)
            path = io.save(*args, rng_tensors, self.metadata, _before_commit)
        if self.is_main:
            io.point(c.output_dir, "latest", path)
            if s.best_step == s.step and s.best_metric is not None:
                io.point(c.output_dir, "best", path)
            io.prune(c.output_dir, c.save_total_limit, {path, s.best_checkpoint})
        s.last_checkpoint = path
        self._call("on_save", path)
        return path

    def load_checkpoint(self, path: str) -> str:
        """Restore model, optimizer and trainer state (`load_state_dict`) and the torch RNG
        from checkpoint `path` ("latest" = this run's newest); returns the checkpoint used."""
        io = self.checkpoint_io
        ckpt = io.resolve(self.config.output_dir if path == "latest" else path)
        st = io.read_state(ckpt)
        try:
            io.load_model(unwrap(self.model), ckpt)
            # The moments come from the checkpoint, the settings (betas, weight decay,
            # momentum, ...) from this run's config: a changed one takes effect.
            settings = [
                {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                for g in self.optimizer.param_groups
            ]
            if io.load_optimizer(ckpt, unwrap(self.model), self.optimizer):
                for g, kept in zip(self.optimizer.param_groups, settings, strict=True):
                    g.update(kept)
            self.load_state_dict(st)
        except BitNetError as e:
            if ckpt in str(e):  # the message names the checkpoint already
                raise
            raise BitNetError(f"checkpoint {ckpt!r}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BitNetError(
                f"checkpoint {ckpt!r} has an invalid {STATE_FILE}: {type(e).__name__}: {e}"
            ) from None
        best = st.get("best_checkpoint")  # a sibling of the checkpoint we resume from
        best = os.path.join(os.path.dirname(os.path.abspath(ckpt)), best) if best else None
        self.state.best_checkpoint = best if best and os.path.isdir(best) else None
        self.state.last_checkpoint = ckpt
        tensors = io.load_rng(ckpt)
        for cb in self.callbacks:
            prefix = f"{CALLBACK_TENSORS}{cb.key}/"
            mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if mine:
                cb.load_state_tensors(mine)
        mine = f"{RANK_RNG}{self.rank}/"
        if self.rank and st.get("world_size") == self.world_size and st.get("rank_rng"):
            restore_rng(
                {k[len(mine) :]: v for k, v in tensors.items() if k.startswith(mine)},
                st["rank_rng"][self.rank],
            )
        else:  # rank 0, or a single rank's checkpoint, or another world size: rank 0's
            plain = (CALLBACK_TENSORS, RANK_RNG)
            restore_rng({k: v for k, v in tensors.items() if not k.startswith(plain)}, {})
        log.info("resumed from %s at step %d", ckpt, self.state.step)
        return ckpt

    # ----------------------------------------------------------------------- the loop
    def _to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _next_batch(self, batches) -> dict:
        if isinstance(self.sampler, IterableBatches):
            return self._to_device(next(batches))
        idx = next(batches)
        set_epoch = getattr(self.train_data, "set_epoch", None)
        if set_epoch is not None:  # datasets whose items depend on the epoch (random windows)
            set_epoch(self.sampler.epoch)
        return self._to_device(default_collate([self.train_data[i] for i in idx]))

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _stopping(self) -> bool:
        """Whether a signal asked to stop: on any rank, as the last step's all-reduce told,
        under data parallelism (every rank stops after the same step); else on this one."""
        if self.data_parallel or self._agrees_on_stop:
            return self._ranks_stopping
        return self._stop.received is not None

    @property
    def _agrees_on_stop(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_initialized()

    def _train_step(self, micro: list[dict]) -> dict:
        """One optimizer step over `micro` batches. The loss is weighted by target tokens
        across all micro-batches (and all data-parallel ranks), so k micro-batches of b
        sequences on W ranks give the gradient of one batch of k*b*W; callbacks' auxiliary
        losses are added once per step. Only the last micro-batch synchronizes gradients.
        Returns the step's loss (this rank's share, which averages over the ranks to the
        step's loss), gradient norm before clipping and input tokens, as tensors."""
        counts = [self.count_targets(b) for b in micro]
        total = torch.stack(counts).sum()
        ntok = torch.tensor(
            # token ids of every text in the batch (input_ids; query_ids and positive_ids)
            sum(v.numel() for b in micro for k, v in b.items() if k.endswith("_ids")),
            device=total.device,
        )
        scale = 1.0
        if self.data_parallel:
            # Weight by the targets of every rank: the wrapper (DDP / FSDP) averages the
            # ranks' gradients, so a rank's share is scaled by the world size. Tokens are
            # counted over all ranks too (one all-reduce for both).
            # A stop requested on any rank (Ctrl-C) rides along, so all stop after one step.
            stop = torch.tensor(int(self._stop.received is not None), device=ntok.device)
            both = torch.stack([total.to(ntok.dtype), ntok, stop.to(ntok.dtype)])
            torch.distributed.all_reduce(both)
            copies = self.world_size // self.dp_size  # ranks that share a batch count it once
            total, ntok = both[0] // copies, both[1] // copies
            self._ranks_stopping = bool(both[2])
            scale = float(self.dp_size)
        elif self._agrees_on_stop:  # ranks that share the data (tensor parallel) agree too
            stop = torch.tensor(int(self._stop.received is not None), device=ntok.device)
            torch.distributed.all_reduce(stop)
            self._ranks_stopping = bool(stop)
        total = total.clamp_min(1)
        loss_sum = torch.zeros((), device=self.device)
        pipe = pipeline_of(unwrap(self.model))
        for i, (b, n) in enumerate(zip(micro, counts, strict=True)):
            last = i == len(micro) - 1
            if pipe is not None:  # the schedule runs forward and backward itself
                with self._autocast():
                    part = pipe.forward_backward(b, self._pipeline_loss, float(total) / scale)
                loss_sum = loss_sum + part
                continue
            sync = (
                no_gradient_sync(self.model)
                if self.data_parallel and not last
                else contextlib.nullcontext()
            )
            with sync:
                with self._autocast():
                    loss = self.loss_fn(self.model, b)
                wide = torch.promote_types(loss.dtype, torch.float32)  # float64 stays
                part = loss.to(wide) * (n * scale / total)
                if last:  # callbacks' auxiliary losses, once per step, in the same backward
                    aux = [a for a in (cb.aux_loss(self) for cb in self.callbacks) if a is not None]
                    if aux:
                        part = part + torch.stack([a.to(wide) for a in aux]).sum()
                self._backward(part)
            loss_sum = loss_sum + part.detach()  # float64 when the model is
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._call("on_after_backward")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        c = self.config
        norm = clip_gradients(
            params, c.gradient_clip_norm, c.gradient_clip_value, c.agc_clip_factor, c.agc_eps,
            split_over_ranks=pipe is not None,  # each stage holds its own parameters
        )  # fmt: skip
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf / nan
            self.scaler.update()
        else:
            self.optimizer.step()
        self._call("on_optimizer_step")
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "grad_norm": norm, "tokens": ntok}

    def log(self, logs: dict) -> None:
        """Hand a log record to every callback's `on_log` (they may add to it)."""
        self._call("on_log", logs)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict:
        """The evaluation metrics (default: target-weighted loss, perplexity and, when the
        dataset knows its `bytes_per_token`, bits per byte) over `eval_data`, at most
        `max_batches` (default the config's `eval_steps`). Calls `on_evaluate`."""
        if self.eval_data is None:
            raise BitNetError("Trainer.evaluate() needs eval_data")
        max_batches = max_batches or self.config.eval_steps
        self.model.to(self.device)
        was_training = self.model.training
        self.model.eval()
        for m in self.metrics:
            m.reset()
        bs, n_items = self.config.batch_size, len(self.eval_data)
        seen: list[torch.Tensor] = []  # the output head's output of the batch (logits)
        hook = None
        if any(m.needs_logits for m in self.metrics):
            head = output_head(unwrap(self.model))
            if head is None:
                raise BitNetError("a metric needs the logits, but the model has no output head")
            hook = head.register_forward_hook(lambda _m, _a, out: seen.append(out))
        # Data-parallel: each rank evaluates every world_size-th batch and the metrics are
        # summed over the ranks (metrics that cannot be summed see every batch on every rank).
        # A DDP model is unwrapped (its forward would sync buffers); an FSDP one all-gathers in
        # its forward, so every rank runs as many forwards, the last ones on a spare batch.
        model = unwrap(self.model)
        pipe = pipeline_of(model)
        if pipe is not None:
            self._check_pipeline()
        shard = self.data_parallel and all(m.can_sync for m in self.metrics)
        starts: list[int | None] = list(range(0, n_items, bs))
        if max_batches is not None:
            starts = starts[:max_batches]
        if shard:
            rounds = -(-len(starts) // self.dp_size)
            starts = starts[self.dp_rank :: self.dp_size]
            if gathers_in_forward(model):
                starts += [None] * (rounds - len(starts))
        try:
            for start in starts:
                first = start if start is not None else 0
                idx = range(first, min(first + bs, n_items))
                batch = self._to_device(default_collate([self.eval_data[j] for j in idx]))
                seen.clear()
                with self._autocast():
                    if pipe is not None:
                        loss = pipe.eval_loss(batch, self._pipeline_eval_loss)
                    else:
                        loss = self.loss_fn(model, batch)
                if start is None:
                    continue  # a spare forward: counted by no metric
                n = self.count_targets(batch)
                for m in self.metrics:
                    if m.needs_logits:
                        m.update(batch, loss, n, logits=seen[-1] if seen else None)
                    else:
                        m.update(batch, loss, n)
        finally:
            if hook is not None:
                hook.remove()
        self.model.train(was_training)
        if shard:
            for m in self.metrics:
                m.sync(self._sum_over_ranks)
        metrics = {"step": self.state.step}
        for m in self.metrics:
            metrics.update(m.compute(self.eval_data))
        self._call("on_evaluate", metrics)
        return metrics

    def train(self, resume_from: str | None = None) -> TrainResult:
        """Run to `max_steps` / `num_epochs` (or until a callback or a signal stops it),
        resuming from checkpoint `resume_from` ("latest": this run's newest) if given."""
        c, s = self.config, self.state
        self._setup()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        try:
            os.makedirs(c.output_dir, exist_ok=True)
        except OSError as e:
            raise BitNetError(
                f"training.output_dir {c.output_dir!r} cannot be created: {e.strerror}"
            ) from None
        tokens_at_start, self.history = s.tokens_seen, []
        with self._stop:
            self._call("on_train_begin")
            t_start, batches = time.perf_counter(), iter(self.sampler)
            while s.step < self.total_steps and not s.should_stop and not self._stopping():
                self._call("on_step_begin")
                lr = self.optimizer.param_groups[0]["lr"]  # as the callbacks set it
                micro = [self._next_batch(batches) for _ in range(c.gradient_accumulation_steps)]
                self.last_step = {**self._train_step(micro), "lr": lr}
                s.step += 1
                s.tokens_seen += int(self.last_step["tokens"])
                self._call("on_step_end")
                if s.should_save:
                    s.should_save = False
                    self.save_checkpoint()
            self.interrupted = self._stopping()
            self._call("on_train_loop_end")
            final = not c.save_best_only or s.best_step == s.step or self.interrupted
            saved = s.last_checkpoint and os.path.basename(s.last_checkpoint) == (
                checkpoint_name(s.step)
            )
            if final and not saved:
                self.save_checkpoint()
            wall = time.perf_counter() - t_start
            result = self._result(wall, (s.tokens_seen - tokens_at_start) / max(wall, 1e-9))
            self._call("on_train_end", result)
        return result

    def _result(self, wall: float, tokens_per_s: float) -> TrainResult:
        s = self.state
        last_train = next((h for h in reversed(self.history) if h["kind"] == "train"), {})
        last_eval = next((h for h in reversed(self.history) if h["kind"] == "eval"), {})
        metrics = {
            "train_loss": last_train.get("loss"),
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
        }
        return TrainResult(
            metrics=metrics,
            best_metric=s.best_metric,
            best_checkpoint=s.best_checkpoint,
            last_checkpoint=s.last_checkpoint,
            steps=s.step,
            tokens=s.tokens_seen,
            tokens_per_s=tokens_per_s,
            wall_time_s=wall,
            interrupted=self.interrupted,
            signal=self._stop.received,
            precision=self.precision,
            device=str(self.device),
            history=list(self.history),
        )

"""The one training loop: steps, accumulation, precision, evaluation, checkpoints, resume.

It knows nothing about quantization or model architecture: it trains any `nn.Module` whose
forward takes a batch's tensors as keyword arguments and returns a loss (a tensor, a dict or
tuple with it first, or an object with `.loss`, as Hugging Face models return). Everything
optional (schedules, early stopping, logging, progress) is a callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from ..data.sampler import IterableBatches, ResumableBatchSampler
from ..errors import BitNetError
from ..optim import build_optimizer, clip_gradients
from . import checkpoint as ckpt_io
from .callbacks import Callback, Checkpointing, EarlyStopping, LRScheduling, MetricsLogging
from .config import TrainingConfig
from .precision import resolve_device, resolve_precision
from .resume import restore, snapshot
from .rng import capture_rng
from .signals import GracefulStop

log = logging.getLogger(__name__)


def causal_lm_targets(batch: dict) -> torch.Tensor:
    """Prediction targets in a causal-LM batch: labels after the first position that are not
    -100 (Hugging Face's convention: the model shifts labels by one and ignores -100). Without
    labels, each sequence counts once."""
    labels = batch.get("labels")
    if labels is None:
        first = next(iter(batch.values()))
        return torch.tensor(first.shape[0], device=first.device)
    return (labels[..., 1:] != -100).sum()


def _loss_of(out) -> torch.Tensor:
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
    """Trains `model` on `train_data` (a map-style dataset of dicts of tensors) as `config`
    says, evaluating on `eval_data`.

    Default callbacks come from `config` (LR schedule, checkpointing, metrics logging, early
    stopping when `early_stopping_patience` is set); a callback of the same type in
    `callbacks` replaces its default. `metadata` (JSON-serializable) is stored in every
    checkpoint. `count_targets(batch)` gives the number of prediction targets of a batch, by
    which gradient accumulation weighs micro-batches (default: `causal_lm_targets`).
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
    ):
        self.model, self.config = model, config or TrainingConfig()
        self.train_data, self.eval_data = train_data, eval_data
        self.metadata, self.count_targets = metadata or {}, count_targets
        self.device = resolve_device(self.config.device)
        self.precision = resolve_precision(self.config.mixed_precision, self.device)
        user = list(callbacks)
        c = self.config
        defaults: list[Callback] = [
            LRScheduling(),
            Checkpointing(c.save_every, c.save_best_only),
            MetricsLogging(),
        ]
        if c.early_stopping_patience:
            defaults.append(
                EarlyStopping(
                    c.early_stopping_patience,
                    c.best_metric,
                    c.early_stopping_min_delta,
                    c.best_mode,
                )
            )
        chosen = [d for d in defaults if not any(type(u) is type(d) for u in user)] + user
        self.callbacks = sorted(chosen, key=lambda cb: cb.order)
        self.state = TrainerState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.sampler: ResumableBatchSampler | None = None
        self.total_steps = 0
        self.steps_per_epoch = 1
        self.history: list[dict] = []
        self._stop = GracefulStop()

    # ----------------------------------------------------------------- setup and state
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _setup(self) -> None:
        c = self.config
        if self.train_data is None:
            raise BitNetError("Trainer.train() needs train_data")
        if os.path.exists(c.output_dir) and not os.path.isdir(c.output_dir):
            raise BitNetError(f"training.output_dir {c.output_dir!r} is a file, not a directory")
        if c.save_best_only and self.eval_data is None:
            raise BitNetError("training.save_best_only needs evaluation data (eval_data)")
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, c)
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
            self.sampler = ResumableBatchSampler(len(self.train_data), c.batch_size, c.seed)
            per_epoch = len(self.sampler) // c.gradient_accumulation_steps
        if c.max_steps is None and per_epoch == 0:
            raise BitNetError(
                f"one epoch has {len(self.sampler)} batches, fewer than "
                f"gradient_accumulation_steps={c.gradient_accumulation_steps}: set "
                "training.max_steps or use more data"
            )
        self.total_steps = c.max_steps or c.num_epochs * per_epoch
        self.steps_per_epoch = max(1, per_epoch)
        self._call("setup")

    def save_checkpoint(self, _before_commit=None) -> str:
        """Write a checkpoint of the current step (atomically), move `latest` (and `best`
        when this step's evaluation is the best so far), prune old ones, call `on_save`."""
        c, s = self.config, self.state
        if s.best_step == s.step and s.best_metric is not None:
            s.best_checkpoint = os.path.join(c.output_dir, ckpt_io.checkpoint_name(s.step))
        rng_tensors, rng_json = capture_rng()
        state = snapshot(self, rng_json)
        path = ckpt_io.save_checkpoint(
            c.output_dir,
            s.step,
            self.model,
            self.optimizer,
            state,
            rng_tensors,
            self.metadata,
            _before_commit,
        )
        ckpt_io.write_pointer(c.output_dir, "latest", os.path.basename(path))
        if s.best_step == s.step and s.best_metric is not None:
            ckpt_io.write_pointer(c.output_dir, "best", os.path.basename(path))
        s.last_checkpoint = path
        ckpt_io.prune_checkpoints(c.output_dir, c.save_total_limit, {path, s.best_checkpoint})
        self._call("on_save", path)
        return path

    def load_checkpoint(self, path: str) -> str:
        """Restore model, optimizer, scheduler and callback states, grad scaler, data position
        and RNG from `path` ("latest" = this run's newest); returns the checkpoint used."""
        ckpt = ckpt_io.resolve_checkpoint(self.config.output_dir if path == "latest" else path)
        st = ckpt_io.read_state(ckpt)
        try:
            return restore(self, ckpt, st)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            if isinstance(e, BitNetError):
                raise
            raise BitNetError(
                f"checkpoint {ckpt!r} has an invalid {ckpt_io.STATE_FILE}: {type(e).__name__}: {e}"
            ) from None

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

    def _train_step(self, micro: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `micro` batches. The loss is weighted by target tokens
        across all micro-batches, so k micro-batches of b sequences give the gradient of one
        batch of k*b. Returns (loss, grad norm before clipping, input tokens), as tensors
        (no host sync)."""
        counts = [self.count_targets(b) for b in micro]
        total = torch.stack(counts).sum().clamp_min(1)
        loss_sum = torch.zeros((), device=self.device)
        for b, n in zip(micro, counts, strict=True):
            with self._autocast():
                loss = _loss_of(self.model(**b))
            part = loss.float() * (n / total)
            (self.scaler.scale(part) if self.scaler is not None else part).backward()
            loss_sum += part.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        c = self.config
        norm = clip_gradients(
            params, c.gradient_clip_norm, c.gradient_clip_value, c.agc_clip_factor, c.agc_eps
        )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf / nan
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ntok = sum(b["input_ids"].numel() if "input_ids" in b else 0 for b in micro)
        return loss_sum, norm, torch.tensor(ntok)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict:
        """Token-weighted mean loss over `eval_data` (at most `max_batches`, default the
        config's `eval_steps`), with perplexity and, when the dataset knows its
        `bytes_per_token`, bits per byte. Calls `on_evaluate`."""
        if self.eval_data is None:
            raise BitNetError("Trainer.evaluate() needs eval_data")
        max_batches = max_batches or self.config.eval_steps
        self.model.to(self.device)
        was_training = self.model.training
        self.model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = torch.zeros((), dtype=torch.int64, device=self.device)
        bs = self.config.batch_size
        for i, start in enumerate(range(0, len(self.eval_data), bs)):
            if max_batches is not None and i >= max_batches:
                break
            end = min(start + bs, len(self.eval_data))
            batch = self._to_device(default_collate([self.eval_data[j] for j in range(start, end)]))
            with self._autocast():
                loss = _loss_of(self.model(**batch))
            n = self.count_targets(batch)
            nats += loss.double() * n
            targets += n
        self.model.train(was_training)
        if int(targets) == 0:
            raise BitNetError("the evaluation data has no prediction targets")
        loss = float(nats / targets)
        metrics = {
            "step": self.state.step,
            "val_loss": loss,
            "val_perplexity": math.exp(loss) if loss < 700 else math.inf,
        }
        bpt = getattr(self.eval_data, "bytes_per_token", None)
        if bpt:
            metrics["val_bits_per_byte"] = loss / math.log(2) / bpt
        if self.config.best_metric not in metrics:
            raise BitNetError(
                f"training.best_metric={self.config.best_metric!r} is not an evaluation metric "
                f"here: expected one of {', '.join(k for k in metrics if k != 'step')}"
            )
        self._track_best(metrics)
        self._call("on_evaluate", metrics)
        self.history.append({"kind": "eval", **metrics})
        return metrics

    def _track_best(self, metrics: dict) -> None:
        c, s = self.config, self.state
        if c.best_metric in metrics:
            v = float(metrics[c.best_metric])
            better = (s.best_metric is None and math.isfinite(v)) or (
                s.best_metric is not None
                and (v < s.best_metric if c.best_mode == "min" else v > s.best_metric)
            )
            if better:
                s.best_metric, s.best_step = v, s.step

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
        t_start = time.perf_counter()
        tokens_at_start = s.tokens_seen
        self.history = []
        last_eval_step = None
        with self._stop:
            self._call("on_train_begin")
            batches = iter(self.sampler)
            window_loss, window_tok = [], []
            t_log = time.perf_counter()
            while s.step < self.total_steps and not s.should_stop and not self._stop.received:
                self._call("on_step_begin")
                lr_used = self.optimizer.param_groups[0]["lr"]  # after callbacks set it
                micro = [self._next_batch(batches) for _ in range(c.gradient_accumulation_steps)]
                loss, norm, ntok = self._train_step(micro)
                s.step += 1
                s.tokens_seen += int(ntok)
                window_loss.append(loss)
                window_tok.append(ntok)
                self._call("on_step_end")
                if s.step % c.log_every == 0 or s.step == self.total_steps:
                    now = time.perf_counter()
                    logs = {
                        "step": s.step,
                        "epoch": self.sampler.epoch,
                        "loss": float(torch.stack(window_loss).mean()),
                        "lr": lr_used,
                        "grad_norm": float(norm),
                        "tokens_per_s": float(sum(window_tok)) / max(now - t_log, 1e-9),
                        "tokens_seen": s.tokens_seen,
                        "elapsed_s": now - t_start,
                    }
                    if self.scaler is not None:
                        logs["loss_scale"] = float(self.scaler.get_scale())
                    window_loss, window_tok, t_log = [], [], now
                    self._call("on_log", logs)  # callbacks may add to logs (diagnostics)
                    self.history.append({"kind": "train", **logs})
                if self.eval_data is not None and c.eval_every and s.step % c.eval_every == 0:
                    self.evaluate()
                    last_eval_step = s.step
                if s.should_save:
                    s.should_save = False
                    self.save_checkpoint()
            interrupted = self._stop.received is not None
            if self.eval_data is not None and last_eval_step != s.step and not interrupted:
                self.evaluate()
            needs_final = not c.save_best_only or s.best_step == s.step or interrupted
            already = s.last_checkpoint and os.path.basename(s.last_checkpoint) == (
                ckpt_io.checkpoint_name(s.step)
            )
            if needs_final and not already:
                self.save_checkpoint()
            last_train = next((h for h in reversed(self.history) if h["kind"] == "train"), {})
            last_eval = next((h for h in reversed(self.history) if h["kind"] == "eval"), {})
            metrics = {
                "train_loss": last_train.get("loss"),
                **{k: v for k, v in last_eval.items() if k.startswith("val_")},
            }
            wall = time.perf_counter() - t_start
            result = TrainResult(
                metrics=metrics,
                best_metric=s.best_metric,
                best_checkpoint=s.best_checkpoint,
                last_checkpoint=s.last_checkpoint,
                steps=s.step,
                tokens=s.tokens_seen,
                tokens_per_s=(s.tokens_seen - tokens_at_start) / max(wall, 1e-9),
                wall_time_s=wall,
                interrupted=interrupted,
                signal=self._stop.received,
                precision=self.precision,
                device=str(self.device),
                history=list(self.history),
            )
            self._call("on_train_end", result)
        return result

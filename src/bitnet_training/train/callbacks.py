"""Callbacks: everything optional about a run, so the loop itself stays short.

Hooks, in the order the `Trainer` calls them:
    setup(trainer)                  before a resume is loaded (build state here)
    on_train_begin(trainer)
    on_step_begin(trainer)          per optimizer step
    on_step_end(trainer)
    on_log(trainer, logs)           every `log_every` steps
    on_evaluate(trainer, metrics)   after each evaluation
    on_save(trainer, path)          after each checkpoint
    on_train_end(trainer, result)
Callbacks run in list order, stable-sorted by their `order` (default 0; the loggers,
`MetricsLogging` and `ProgressBar`, have 100 so that they see what other callbacks add to
`logs` and `metrics`). They steer the run through `trainer.state` (`should_stop`,
`should_save`) and may keep state across a resume with `state_dict` / `load_state_dict`
(JSON-serializable), saved in every checkpoint under the callback's `key`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING

from ..errors import BitNetError, ConfigError
from ..monitoring import JsonlWriter, TensorBoardWriter
from ..optim import build_scheduler
from .config import SchedulerConfig

if TYPE_CHECKING:
    from .trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing. Override the ones you need."""

    order = 0

    @property
    def key(self) -> str:
        """Name of this callback's entry in a checkpoint's callback states."""
        return type(self).__name__

    def setup(self, trainer: Trainer) -> None: ...
    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_step_begin(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, logs: dict) -> None: ...
    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_save(self, trainer: Trainer, path: str) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class LRScheduling(Callback):
    """Builds the learning-rate (and, for `two_stage`, weight-decay) schedule of `config`
    over the run's total steps and steps it after every optimizer step. Its state (the
    schedule's position and shape) is saved, so a resumed run stays on the same curve."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config
        self.scheduler = None

    def setup(self, trainer):
        cfg = self.config or trainer.config.scheduler
        self.scheduler = build_scheduler(
            trainer.optimizer, cfg, trainer.total_steps, trainer.config.learning_rate
        )

    def on_step_end(self, trainer):
        with warnings.catch_warnings():
            # fp16 loss scaling skips the optimizer step on overflow; the schedule still
            # advances one step per attempted update, by design.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class EarlyStopping(Callback):
    """Stops training when `metric` has not improved by more than `min_delta` for
    `patience` evaluations in a row (`mode` "min" for losses, "max" for accuracies)."""

    def __init__(
        self, patience: int = 5, metric: str = "val_loss", min_delta: float = 0.0, mode: str = "min"
    ):
        if not isinstance(patience, int) or patience < 1:
            raise ConfigError("early_stopping.patience", patience, "a positive integer")
        if mode not in ("min", "max"):
            raise ConfigError("early_stopping.mode", mode, "min or max")
        self.patience, self.metric, self.min_delta, self.mode = patience, metric, min_delta, mode
        self.best: float | None = None
        self.wait = 0

    def on_evaluate(self, trainer, metrics):
        if self.metric not in metrics:
            raise BitNetError(
                f"early stopping metric {self.metric!r} is not an evaluation metric here: "
                f"expected one of {', '.join(k for k in metrics if k != 'step')}"
            )
        value = float(metrics[self.metric])
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            log.info(
                "early stopping: %s did not improve for %d evaluations (best %.4f)",
                self.metric,
                self.wait,
                self.best if self.best is not None else math.nan,
            )
            trainer.state.should_stop = True

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], int(state["wait"])


class Checkpointing(Callback):
    """Asks for a checkpoint every `save_every` steps, or, with `best_only`, after each
    evaluation that improves the trainer's best metric. (The trainer also saves at the end
    of training, and on SIGINT / SIGTERM.)"""

    def __init__(self, save_every: int | None = None, best_only: bool = False):
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ConfigError("checkpointing.save_every", save_every, "a positive integer")
        self.save_every, self.best_only = save_every, best_only

    def on_step_end(self, trainer):
        if not self.best_only and self.save_every and trainer.state.step % self.save_every == 0:
            trainer.state.should_save = True

    def on_evaluate(self, trainer, metrics):
        if self.best_only and trainer.state.best_step == trainer.state.step:
            trainer.state.should_save = True


class MetricsLogging(Callback):
    """Writes each log record and each evaluation to `<output_dir>/metrics.jsonl`, and to
    TensorBoard event files under `<output_dir>/tensorboard` when `tensorboard` is
    installed and `tensorboard` is True. `log_every` (a multiple of the trainer's) thins
    the training records."""

    order = 100

    def __init__(self, log_every: int | None = None, tensorboard: bool = True):
        self.log_every, self.tensorboard = log_every, tensorboard
        self.jsonl: JsonlWriter | None = None
        self.tb: TensorBoardWriter | None = None

    def on_train_begin(self, trainer):
        out = trainer.config.output_dir
        self.jsonl = JsonlWriter(os.path.join(out, "metrics.jsonl"))
        if self.tensorboard and TensorBoardWriter.available():
            self.tb = TensorBoardWriter(os.path.join(out, "tensorboard"))

    def on_log(self, trainer, logs):
        if self.jsonl is None or (self.log_every and logs["step"] % self.log_every):
            return  # not training (a stand-alone evaluate), or thinned out
        self.jsonl.write({"kind": "train", **logs})
        if self.tb:
            self.tb.write(logs, logs["step"], "train/")

    def on_evaluate(self, trainer, metrics):
        if self.jsonl is None:
            return
        self.jsonl.write({"kind": "eval", **metrics})
        if self.tb:
            self.tb.write(metrics, metrics["step"], "eval/")

    def on_train_end(self, trainer, result):
        for w in (self.jsonl, self.tb):
            if w is not None:
                w.close()
        self.jsonl = self.tb = None


class ProgressBar(Callback):
    """A `tqdm` progress bar on `file` (stderr): step / total, ETA, and the latest loss,
    learning rate and tokens per second."""

    order = 100

    def __init__(self, file=None):
        self.file, self.bar = file, None

    def on_train_begin(self, trainer):
        from tqdm.auto import tqdm

        file = self.file or sys.stderr
        interactive = hasattr(file, "isatty") and file.isatty()
        # In a log file, \r-updates pile up: redraw every 30 s there instead of 10 times a second.
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            unit="step",
            file=file,
            mininterval=0.1 if interactive else 30.0,
            dynamic_ncols=True,
            desc="train",
        )

    def on_step_end(self, trainer):
        self.bar.update(1)

    def on_log(self, trainer, logs):
        extra = {}
        if "w_zero" in logs:  # ternary diagnostics, when a TernaryDiagnostics callback runs
            extra["w0"] = f"{logs['w_zero']:.2f}"
        if "flip_rate" in logs:
            extra["flip"] = f"{logs['flip_rate']:.1e}"
        if "qat_weight_lambda" in logs and logs["qat_weight_lambda"] < 1:
            extra["lam"] = f"{logs['qat_weight_lambda']:.2f}"
        self.bar.set_postfix(
            loss=f"{logs['loss']:.4f}",
            lr=f"{logs['lr']:.2e}",
            tok_s=f"{logs['tokens_per_s']:.0f}",
            **extra,
            refresh=False,
        )

    def on_evaluate(self, trainer, metrics):
        if self.bar is None:
            return
        self.bar.write(
            f"step {metrics['step']}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
        )

    def on_train_end(self, trainer, result):
        self.bar.close()


class TrainingCallbacks:
    """Builds a callback list in the original design's style:

    callbacks = (TrainingCallbacks.builder()
                 .add_early_stopping(patience=5, metric="val_loss")
                 .add_lr_scheduler("cosine", warmup_steps=100)
                 .add_model_checkpointing(save_every=1000)
                 .add_metrics_logging(log_every=100)
                 .build())
    """

    def __init__(self):
        self._callbacks: list[Callback] = []

    @classmethod
    def builder(cls) -> TrainingCallbacks:
        return cls()

    def add(self, callback: Callback) -> TrainingCallbacks:
        self._callbacks.append(callback)
        return self

    def add_early_stopping(self, patience=5, metric="val_loss", min_delta=0.0, mode="min"):
        return self.add(EarlyStopping(patience, metric, min_delta, mode))

    def add_lr_scheduler(self, scheduler: str | SchedulerConfig = "cosine", **settings):
        if isinstance(scheduler, str):
            scheduler = SchedulerConfig(name=scheduler, **settings)
        return self.add(LRScheduling(scheduler))

    def add_model_checkpointing(self, save_every: int | None = None, best_only: bool = False):
        return self.add(Checkpointing(save_every, best_only))

    def add_metrics_logging(self, log_every: int | None = None, tensorboard: bool = True):
        return self.add(MetricsLogging(log_every, tensorboard))

    def add_progress_bar(self, file=None):
        return self.add(ProgressBar(file))

    def build(self) -> list[Callback]:
        return list(self._callbacks)

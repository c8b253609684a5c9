"""The loop's built-in callbacks: everything optional about a run, so the loop stays short.

The interface (`Callback`, its hooks and their order) is `bitnet_training.callback`. The
`Trainer` installs `LogRecords`, `PeriodicEvaluation`, `BestMetric`, `History`,
`LRScheduling`, `Checkpointing` and `MetricsLogging` by default (and `EarlyStopping` when the
config asks); a callback of the same key replaces a default. The loggers (`MetricsLogging`,
`ProgressBar`, order 100) run after the callbacks that add to `logs` and `metrics`, and write
on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings

import torch

from ..atomic import atomic_file
from ..callback import Callback
from ..errors import BitNetError, ConfigError
from ..monitoring import JsonlWriter, TensorBoardWriter
from ..optim import ScheduledLR, SchedulerConfig, build_scheduler

log = logging.getLogger(__name__)


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class LRScheduling(Callback):
    """Steps the learning-rate schedule after every optimizer step. Without a `scheduler`,
    builds the config's (`SchedulerConfig`; default the trainer's `config.scheduler`) over the
    run's total steps at setup. On resume a `ScheduledLR` continues the schedule the *current*
    config describes at the checkpoint's step (as Hugging Face's Trainer does): a changed
    learning rate, schedule or run length takes effect, and the Trainer says what changed.
    Any other scheduler restores its own state."""

    def __init__(self, config: SchedulerConfig | None = None, scheduler=None):
        self.config, self.scheduler = config, scheduler

    def setup(self, trainer):
        if self.scheduler is None:
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
        if isinstance(self.scheduler, ScheduledLR):
            self.scheduler.continue_at(int(state["last_epoch"]))
        else:
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far, MiB: the CUDA caching allocator's peak on a GPU, else the
    process's peak resident set size (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LogRecords(Callback):
    """Every `log_every` steps (and at the last), turns the steps since the previous record
    into one log record (`step`, `epoch`, mean `loss`, `lr`, `grad_norm`, `tokens_per_s`,
    `tokens_seen`, `elapsed_s`, `peak_mem_mb`, `loss_scale` under fp16) and hands it to
    `trainer.log`."""

    order = 50  # after the schedule and the QAT callbacks have stepped

    def on_train_begin(self, trainer):
        self.losses: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.t_start = self.t_last = time.perf_counter()

    def on_step_end(self, trainer):
        out, s = trainer.last_step, trainer.state
        self.losses.append(out["loss"])
        self.tokens.append(out["tokens"])
        if s.step % trainer.config.log_every and s.step != trainer.total_steps:
            return
        now = time.perf_counter()
        logs = {
            "step": s.step,
            "epoch": trainer.sampler.epoch,
            # the only host sync per record (and, data-parallel, one all-reduce)
            "loss": float(trainer.mean_over_ranks(torch.stack(self.losses).mean())),
            "lr": out["lr"],
            "grad_norm": float(out["grad_norm"]),
            "tokens_per_s": float(sum(self.tokens)) / max(now - self.t_last, 1e-9),
            "tokens_seen": s.tokens_seen,
            "elapsed_s": now - self.t_start,
        }
        logs["peak_mem_mb"] = peak_memory_mb(trainer.device)
        if trainer.scaler is not None:
            logs["loss_scale"] = float(trainer.scaler.get_scale())
        self.losses, self.tokens, self.t_last = [], [], now
        trainer.log(logs)


class PeriodicEvaluation(Callback):
    """Evaluates every `eval_every` steps and once more when the loop ends (unless the last
    step was just evaluated or the run was interrupted), when there is evaluation data."""

    order = 60  # after the step's log record

    def __init__(self):
        self.last_step: int | None = None

    def on_step_end(self, trainer):
        every = trainer.config.eval_every
        if trainer.eval_data is not None and every and trainer.state.step % every == 0:
            trainer.evaluate()
            self.last_step = trainer.state.step

    def on_train_loop_end(self, trainer):
        if trainer.eval_data is None or trainer.interrupted:
            return
        if self.last_step != trainer.state.step:
            trainer.evaluate()
            self.last_step = trainer.state.step


class BestMetric(Callback):
    """Tracks the best value of `config.best_metric` (`best_mode` min or max) in
    `trainer.state` (`best_metric`, `best_step`); the checkpoint of that step becomes `best`.
    A metric name that no evaluation produces is a one-line error."""

    order = -50  # before Checkpointing and EarlyStopping read it

    def on_evaluate(self, trainer, metrics):
        c, s = trainer.config, trainer.state
        if c.best_metric not in metrics:
            raise BitNetError(
                f"training.best_metric={c.best_metric!r} is not an evaluation metric "
                f"here: expected one of {', '.join(k for k in metrics if k != 'step')}"
            )
        v = float(metrics[c.best_metric])
        if _improved(v, s.best_metric, c.best_direction, 0.0):
            s.best_metric, s.best_step = v, s.step


class History(Callback):
    """Keeps every log record and evaluation, in order, in `trainer.history` (what
    `TrainResult.history` returns)."""

    order = 1000  # last: it records what every other callback added

    def on_log(self, trainer, logs):
        trainer.history.append({"kind": "train", **logs})

    def on_evaluate(self, trainer, metrics):
        trainer.history.append({"kind": "eval", **metrics})


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
        self.out: str | None = None

    def on_train_begin(self, trainer):
        # The files open with the first record, so a run refused in its first step (a loss
        # or metric that cannot apply) leaves no log files behind.
        self.out = trainer.config.output_dir if trainer.is_main else None  # rank 0 writes
        if self.out is not None and trainer.state.step > 0:
            drop_records_after(os.path.join(self.out, "metrics.jsonl"), trainer.state.step)

    def _writers(self) -> bool:
        if self.out is None:
            return False  # not training (a stand-alone evaluate), or not rank 0
        if self.jsonl is None:
            self.jsonl = JsonlWriter(os.path.join(self.out, "metrics.jsonl"))
            if self.tensorboard and TensorBoardWriter.available():
                self.tb = TensorBoardWriter(os.path.join(self.out, "tensorboard"))
        return True

    def on_log(self, trainer, logs):
        if (self.log_every and logs["step"] % self.log_every) or not self._writers():
            return  # thinned out, or nothing to write to
        self.jsonl.write({"kind": "train", **logs})
        if self.tb:
            self.tb.write(logs, logs["step"], "train/")

    def on_evaluate(self, trainer, metrics):
        if not self._writers():
            return
        self.jsonl.write({"kind": "eval", **metrics})
        if self.tb:
            self.tb.write(metrics, metrics["step"], "eval/")

    def on_train_end(self, trainer, result):
        for w in (self.jsonl, self.tb):
            if w is not None:
                w.close()
        self.jsonl = self.tb = self.out = None


def drop_records_after(path: str, step: int) -> None:
    """Forget the records of steps after `step` in the metrics log at `path` (a resumed run
    trains them again: after a crash, a torchrun restart or an interrupted save, the log
    then holds each step once). Rewritten atomically; nothing to do without such records."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) == len(lines):
        return
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.writelines(keep)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0  # a torn last line or a foreign record: kept, as it was


class ProgressBar(Callback):
    """A `tqdm` progress bar on `file` (stderr): step / total, ETA, and the latest loss,
    learning rate and tokens per second."""

    order = 100

    def __init__(self, file=None):
        self.file, self.bar = file, None

    def on_train_begin(self, trainer):
        if not trainer.is_main:
            return
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
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer, logs):
        if self.bar is None:
            return
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
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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

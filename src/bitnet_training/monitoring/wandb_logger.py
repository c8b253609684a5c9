"""`WandbLogging`: log records and evaluations to Weights & Biases, on rank 0, when asked.

`mode="offline"` needs no network and no account: the run is written under
`<output_dir>/wandb/` and `wandb sync <that dir>` uploads it later; `mode="online"` logs live
(it needs `wandb login` and a network). The W&B run id is part of the checkpoint, so a resumed
run continues the same W&B run (`resume="allow"`) instead of starting a new one.
"""

from __future__ import annotations

import importlib.util
import os

from ..callback import Callback
from ..errors import BitNetError


class WandbLogging(Callback):
    """Sends every log record (`train/...`) and evaluation (`eval/...`) to W&B, keyed by
    optimizer step. The run records `config` if given, else the trainer's run config (its
    metadata's, as the CLI stores it) or training config."""

    order = 100

    def __init__(self, mode: str, project: str, name: str = "", config: dict | None = None):
        if mode not in ("online", "offline"):
            raise BitNetError(f"training.wandb={mode!r} is invalid: expected off, online, offline")
        if importlib.util.find_spec("wandb") is None:
            raise BitNetError(
                f"training.wandb={mode} needs wandb (pip install 'bitnet-training[wandb]')"
            )
        self.mode, self.project, self.name, self.config = mode, project, name, config or {}
        self.run_id: str | None = None
        self.run = None

    def state_dict(self):
        return {"run_id": self.run_id} if self.run_id else None

    def load_state_dict(self, state):
        self.run_id = state.get("run_id")

    def on_train_begin(self, trainer):
        if not trainer.is_main:
            return
        import wandb

        out = trainer.config.output_dir
        os.makedirs(out, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            name=self.name or os.path.basename(os.path.abspath(out)),
            dir=out,
            mode=self.mode,
            id=self.run_id,
            resume="allow" if self.run_id else None,
            config=self.config or trainer.metadata.get("run_config") or trainer.config.to_dict(),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id

    def on_log(self, trainer, logs):
        if self.run is not None:
            self.run.log(
                {f"train/{k}": v for k, v in logs.items() if k != "step"}, step=logs["step"]
            )

    def on_evaluate(self, trainer, metrics):
        if self.run is not None:
            step = metrics["step"]
            self.run.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def on_train_end(self, trainer, result):
        if self.run is not None:
            self.run.finish()
            self.run = None

"""`Profiling`: `torch.profiler` over chosen training steps, as a callback.

The profiler starts before the first chosen optimizer step and stops after the last one
(every step in between is recorded), then writes one trace, `<output_dir>/profile/
<host>_<pid>.<step>.pt.trace.json`, which Chrome (`chrome://tracing`, Perfetto) opens and
TensorBoard's profiler plugin reads (`tensorboard --logdir <output_dir>/profile`), and logs
the operators that took the most self time. Only the main process (rank 0) profiles.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from ..callback import Callback
from ..errors import BitNetError

log = logging.getLogger(__name__)


class Profiling(Callback):
    """Records optimizer steps `steps` (1-based, as `trainer.state.step` counts them after the
    step) with `torch.profiler`; `top` operators by self time are logged. The trace's path is
    `self.trace` once written."""

    order = 5  # begins a step's recording before the other callbacks' work

    def __init__(self, steps: list[int], top: int = 10):
        if not steps or min(steps) < 1:
            raise BitNetError(f"training.profile_steps={steps} is invalid: expected steps >= 1")
        self.first, self.last, self.top = min(steps), max(steps), top
        self.prof: torch.profiler.profile | None = None
        self.trace: str | None = None
        self.table: str | None = None

    def setup(self, trainer):
        if self.first > trainer.total_steps:
            raise BitNetError(
                f"training.profile_steps starts at step {self.first}, after the run's last "
                f"({trainer.total_steps})"
            )

    def on_step_begin(self, trainer):
        # `state.step` counts finished steps: the coming one is step + 1.
        if trainer.is_main and self.prof is None and trainer.state.step + 1 == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def on_step_end(self, trainer):
        if self.prof is not None and trainer.state.step >= self.last:
            self._finish(trainer)

    def on_train_loop_end(self, trainer):
        if self.prof is not None:  # stopped early: keep what was recorded
            self._finish(trainer)

    def _finish(self, trainer):
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        out = os.path.join(trainer.config.output_dir, "profile")
        os.makedirs(out, exist_ok=True)
        name = f"{socket.gethostname()}_{os.getpid()}.{trainer.state.step}.pt.trace.json"
        self.trace = os.path.join(out, name)
        prof.export_chrome_trace(self.trace)
        sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
        self.table = prof.key_averages().table(sort_by=sort, row_limit=self.top)
        log.info(
            "profile of steps %d-%d: %s\n%s", self.first, trainer.state.step, self.trace, self.table
        )

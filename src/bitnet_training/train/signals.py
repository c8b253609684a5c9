"""Stop a run cleanly on SIGINT / SIGTERM: the first signal asks for a checkpoint and a stop,
a second one exits at once. In a run of several processes SIGTERM is left to kill at once:
torchrun's agent sends it to the surviving workers when one dies, and a checkpoint then
would be a collective with a dead rank (a hang, or a checkpoint missing a rank's part); the
restart resumes from the last complete checkpoint. SIGINT (Ctrl-C) still saves: the ranks
agree on the step to stop after (the Trainer's per-step all-reduce carries the request)."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class GracefulStop:
    """Context manager: while active, SIGINT and SIGTERM set `received` (the signal number)
    instead of killing the process, and restore the default handlers so that a second signal
    acts at once (Ctrl-C raises KeyboardInterrupt, SIGTERM terminates). Outside the main
    thread, where Python cannot install handlers, it does nothing. Handlers are restored on
    exit."""

    def __init__(self, catch_sigterm: bool = True):
        self.received: int | None = None
        self._old: dict = {}
        self.signals = (signal.SIGINT, signal.SIGTERM) if catch_sigterm else (signal.SIGINT,)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping "
            "(press Ctrl-C again to exit at once)",
            signal.Signals(signum).name,
            extra={"every_rank": True},  # under torchrun, perhaps this rank's alone
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.SIGTERM in self.signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> GracefulStop:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in self.signals}
            for s in self.signals:
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

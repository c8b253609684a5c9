"""Stop a run cleanly on SIGINT / SIGTERM: the first signal asks for a checkpoint and a stop,
a second one exits at once."""

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

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping "
            "(press Ctrl-C again to exit at once)",
            signal.Signals(signum).name,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> GracefulStop:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

"""Stop signals: how a run ends early without losing work.

The first SIGINT, SIGTERM or SIGUSR1 (a scheduler's warning before a time limit: ``#SBATCH --signal=TERM@120``)
sets a flag that the loop reads between steps; it then saves a checkpoint and raises :class:`Stopped`. A second
SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class Stopped(Exception):
    """A stop signal arrived; a checkpoint of ``step`` was saved and the run can continue with ``--resume``."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(f"stopped by {signame} after step {step}; a checkpoint was saved: continue with --resume")
        self.step, self.signame = step, signame


class StopFlag:
    """Turns the first SIGINT/SIGTERM/SIGUSR1 into a flag read between steps; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signame is not None and signum == signal.SIGINT:
            previous = self._previous.get(signum)
            if callable(previous):  # the command's own handler: it says how the command ended
                previous(signum, frame)
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

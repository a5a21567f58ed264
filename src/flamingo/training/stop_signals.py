"""SIGTERM (a scheduler's preemption, torchrun's shutdown) and SIGINT (Ctrl-C) during a training
loop: the first one is remembered and the loop stops after the current update with a checkpoint
(every rank agrees on it through the update's collective); a second one acts as usual."""

from __future__ import annotations

import signal
import sys
import threading
from types import TracebackType
from typing import Any


class StopSignals:
    """A context manager installing the handlers (main thread only; elsewhere it does nothing).
    `received` names the first signal ("SIGTERM", "SIGINT"), or None."""

    def __init__(self, command: str, announce: bool = True) -> None:
        self.command, self.announce = command, announce
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received:  # the second one: stop now
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        if self.announce:
            print(f"\nflamingo {self.command}: {self.received} received; stopping after this update with a "
                  f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            for sig in self._previous:
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

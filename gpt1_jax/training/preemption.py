"""SIGTERM (the preemption notice of TPU VMs and most schedulers) and SIGINT as a stop request.

The handler only sets a flag: the loop finishes the step in flight, writes a checkpoint and
returns, so the next start in the same workdir resumes. A second SIGINT restores Python's
default behaviour (KeyboardInterrupt) for a user who really wants out.
"""

from __future__ import annotations

import signal
import threading

import jax


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into `requested == True`."""

    def __init__(self):
        # With several processes a signal reaches only some of them; they stop together through
        # JAX's coordination service, whose own SIGTERM handler must stay in place
        # (checkpoint.TrainCheckpointer.reached_preemption).
        self.local = jax.process_count() == 1
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.requested = True
        self.signal_name = reason

    def __enter__(self) -> "StopRequest":
        if self.local and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""SIGTERM and SIGINT sent to a handler for a while, then back to what had them: the one way the training loop
(`gpt1_jax.training.preemption`) and the task queue of `gpt1-reproduce` take over the stop signals.

Python runs signal handlers in the main thread only, and only the main thread may install them: elsewhere (a
test calling `main` from a worker thread) the signals keep their handlers and the caller sees no stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def sent_to(handler: Callable) -> Iterator[None]:
    """Within it, SIGTERM and SIGINT call `handler(signum, frame)` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

"""SIGTERM (the preemption notice of TPU VMs and most schedulers) and SIGINT as a stop request.

The handler only sets a flag: the loop finishes the step in flight, writes a checkpoint and
returns, so the next start in the same workdir resumes. A second SIGINT restores Python's
default behaviour (KeyboardInterrupt) for a user who really wants out.

A TPU VM gives 30 s between the notice and the kill, so a long phase must not run to its end first:
an evaluation, the test predictions, the zero-shot probes call `check` between batches, which raises
`Interrupted` once a stop is requested; what the phase did is dropped and redone by the next start. A
phase with nothing worth finishing and no batches short enough to wait for (tokenizing a corpus into
the token cache: one batch of text can take a minute) uses `StopRequest(at_once=True)`, whose handler
raises `Interrupted` wherever the main thread is, as Ctrl-C raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal

import jax

from gpt1_jax import stop_signals


class Interrupted(BaseException):
    """A stop request that ended a long phase before its end; the message says which, and that a rerun redoes it.

    A BaseException, as KeyboardInterrupt, so that no `except Exception` on its way takes it for a failure
    (a checkpoint restore falls back to an earlier step on any Exception).
    """


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into `requested == True` (and `check` raising).

    `phase` says what the process does meanwhile, for the message of `Interrupted`.
    """

    def __init__(self, phase: str = "training", *, at_once: bool = False):
        # With several processes a signal reaches only some of them; they stop together through
        # JAX's coordination service, whose own SIGTERM handler must stay in place
        # (checkpoint.TrainCheckpointer.reached_preemption).
        self.local = jax.process_count() == 1
        self.phase, self.at_once = phase, at_once
        self.requested = False
        self.signal_name: str | None = None
        self._signals = contextlib.ExitStack()

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # a repeated SIGTERM must not cut short the clean-up the first one started
        self.request(signal.Signals(signum).name)
        if self.at_once:
            raise self._interrupted()

    def request(self, reason: str) -> None:
        self.requested = True
        self.signal_name = reason

    def check(self) -> None:
        """Raise `Interrupted` once a stop was requested; called between the batches of a long phase.

        Single-process runs only: with several processes a signal reaches some of them, and one leaving an
        evaluation whose batches are collectives would leave the others waiting in it for ever. There the
        phase runs to its end and every process stops at the next step (`reached_preemption`).
        """
        if self.requested and self.local:
            raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        return Interrupted(f"{self.signal_name} while {self.phase}: stopped before the end, leaving nothing "
                           "half-written; rerun the same command to do it again.")

    def __enter__(self) -> "StopRequest":
        if self.local:
            self._signals.enter_context(stop_signals.sent_to(self._handle))
        return self

    def __exit__(self, *exc_info) -> None:
        self._signals.close()

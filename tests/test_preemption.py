"""gpt1_jax/preemption.py: real SIGTERM / SIGINT as a stop request, the program's own handlers back on exit."""

import os
import signal
import threading

import pytest

from gpt1_jax.preemption import StopRequest


@pytest.fixture
def program_handlers():
    """Recording SIGTERM / SIGINT handlers, as the program around the loop had (so no signal kills pytest)."""
    received = []

    def record(signum, frame):
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield record, received
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def send(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)  # handled on the main thread before os.kill returns


def test_sigterm_becomes_a_stop_request_instead_of_reaching_the_program(program_handlers):
    _, received = program_handlers
    with StopRequest() as stop:
        assert not stop.requested
        send(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert received == []


def test_the_programs_handlers_are_back_after_a_normal_or_failing_exit(program_handlers):
    record, received = program_handlers
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is not record
    with pytest.raises(RuntimeError):
        with StopRequest():
            raise RuntimeError("the loop failed")
    assert signal.getsignal(signal.SIGTERM) is record and signal.getsignal(signal.SIGINT) is record
    send(signal.SIGTERM)
    assert received == ["SIGTERM"]


def test_a_second_sigint_raises_keyboard_interrupt(program_handlers):
    with StopRequest() as stop:
        send(signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)


def test_off_the_main_thread_it_leaves_signal_handlers_alone(program_handlers):
    record, _ = program_handlers
    seen = []

    def loop():  # e.g. training started on a worker thread of a notebook
        with StopRequest() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM)))

    worker = threading.Thread(target=loop)
    worker.start()
    worker.join()
    assert seen == [(False, record)]

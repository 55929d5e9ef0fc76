"""gpt1_jax/training/preemption.py: real SIGTERM / SIGINT as a stop request, the program's own handlers back on exit."""

import os
import signal
import subprocess
import threading
import time

import pytest

from gpt1_jax.training import checkpoint
from gpt1_jax.training.preemption import StopRequest
from pretrain_helpers import REPO, tiny_config, train_py_command, wait_for_step


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


@pytest.mark.slow
def test_a_sigterm_between_logging_steps_stops_at_the_next_update(tmp_path, token_cache_dir):
    """A TPU VM's grace period is ~30 s: the loop acts on a stop request within an update or two, not at the
    next `log_every`. Dispatch is asynchronous, so besides checking the flag after every update the loop
    must not run ahead of the device: it did, up to the next logging step, and the save waited for those.

    Logging every 50 updates, a SIGTERM right after step 50 is logged must save a step well before 100.
    """
    config = tiny_config(token_cache_dir, **{"train.num_steps": 100_000, "train.log_every": 50,
                                             "checkpoint.every": 100_000})
    proc = subprocess.Popen(train_py_command(config, tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 50, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - sent < 10
    saved = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=3).steps()
    assert len(saved) == 1 and 50 < saved[0] < 60, (saved, output[-2000:])
    assert f"SIGTERM at step {saved[0]}: saved step {saved[0]}" in output

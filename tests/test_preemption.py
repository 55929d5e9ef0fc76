"""gpt1_jax/training/preemption.py: real SIGTERM / SIGINT as a stop request, the program's own handlers back on exit."""

import os
import signal
import subprocess
import threading
import time

import pytest

from gpt1_jax.training import checkpoint, train_lib
from gpt1_jax.training.preemption import Interrupted, StopRequest
from gpt1_jax.training.run_log import read_metrics
from pretrain_helpers import (
    REPO,
    assert_trees_equal,
    final_params,
    run_train_py,
    tiny_config,
    train_py_command,
    wait_for_step,
)


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


def test_check_raises_once_a_stop_is_requested_and_at_once_raises_in_the_handler(program_handlers):
    with StopRequest("evaluating") as stop:
        stop.check()
        send(signal.SIGTERM)
        with pytest.raises(Interrupted, match="SIGTERM while evaluating: stopped before the end"):
            stop.check()
    with pytest.raises(Interrupted, match="SIGTERM while tokenizing"):
        with StopRequest("tokenizing", at_once=True):
            send(signal.SIGTERM)
            pytest.fail("the handler should have raised")


def val_losses(workdir) -> list[tuple[int, float]]:
    return [(m["step"], m["val_loss"]) for m in read_metrics(workdir) if "val_loss" in m]


@pytest.mark.slow
def test_a_sigterm_during_a_long_evaluation_exits_within_seconds_and_the_rerun_evaluates_that_step(
        tmp_path, token_cache_dir):
    """A TPU VM's grace period is 30 s; a SIGTERM was honoured only when the evaluation ended (54.6 s with
    train.eval_batches=40). The evaluation now checks the stop between batches: step 3 is saved without it, and the
    rerun evaluates step 3 first, giving the uninterrupted run's value.

    Validation pads with zero-weight batches up to train.eval_batches (a few real ones here, then empty ones, ~25 s
    in all on two cores): they make the evaluation long without changing its value, so a straight run over the
    real batches alone is the reference, at a fraction of the time."""
    long_evaluation = {"train.num_steps": 3, "train.eval_every": 3, "train.eval_batch_size": 16}
    config = tiny_config(token_cache_dir, **long_evaluation, **{"train.eval_batches": 100})
    straight = tmp_path / "straight"
    run_train_py(tiny_config(token_cache_dir, **long_evaluation, **{"train.eval_batches": 0}), straight)
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(train_py_command(config, stopped), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(stopped, 3, proc)  # step 3's loss is logged: its evaluation starts
    time.sleep(2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and time.monotonic() - sent < 10, output[-3000:]
    assert "SIGTERM at step 3: saved step 3" in output and "without its evaluation" in output
    assert checkpoint.read_metadata(stopped / "checkpoints", 3)[train_lib.EVALUATION_PENDING] is True
    assert not [m for m in read_metrics(stopped) if "val_loss" in m]
    resumed = run_train_py(config, stopped)
    assert "Evaluating step 3 first" in resumed.stdout + resumed.stderr
    assert val_losses(stopped) == val_losses(straight) and len(val_losses(straight)) == 1
    assert_trees_equal(final_params(stopped), final_params(straight))

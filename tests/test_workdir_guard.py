"""A workdir holds one run: locked while it runs, config.json records it, a launch of another config or
another schedule length is refused, start_over moves it aside.

(The same refusal through a whole pre-training launch: test_pretrain.py.)
"""

import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from gpt1_jax.config_check import ConfigError
from gpt1_jax.configs import finetune, tiny_pretrain
from gpt1_jax.training import checkpoint, workdir_guard
from gpt1_jax.training.workdir_guard import LOCK_FILE, RUN_CONFIG_FILE, WorkdirError
from pretrain_helpers import REPO, tiny_config, train_py_command, wait_for_step


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def claimed_workdir(folder: pathlib.Path, config) -> pathlib.Path:
    """A workdir claimed by `config` that also holds a checkpoint file, as after some training."""
    claim(folder, config)
    (folder / "checkpoints" / "3").mkdir(parents=True)
    (folder / "checkpoints" / "3" / "state").write_bytes(b"step 3")
    return folder


def claim(workdir: pathlib.Path, config) -> None:
    """A run's claim of `workdir` from start to end."""
    with workdir_guard.claim(workdir, config):
        pass


def save_checkpoint(workdir: pathlib.Path, step: int) -> None:
    """A real (tiny) checkpoint of `step` in workdir/checkpoints, as training leaves one."""
    saver = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=1, async_save=False)
    saver.save(step, {"w": np.zeros(2, np.float32)}, {"step": np.int32(step)}, {"kind": "test"})
    saver.close()


@contextlib.contextmanager
def unwritable(path: pathlib.Path):
    """`path` made unwritable for the test's duration: chattr +i as root (chmod does not stop root)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory unwritable here (chattr unavailable)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_first_claim_creates_the_workdir_and_records_the_config(tmp_path):
    config = tiny_pretrain.get_config()
    workdir = tmp_path / "runs" / "a"
    claim(workdir, config)
    assert json.loads((workdir / RUN_CONFIG_FILE).read_text()) == json.loads(config.to_json_best_effort())


def test_same_identity_may_change_other_keys(tmp_path):
    workdir = claimed_workdir(tmp_path / "run", tiny_pretrain.get_config())
    again = tiny_pretrain.get_config()
    again.train.log_every = 1
    again.train.eval_every = 7
    claim(workdir, again)
    recorded = json.loads((workdir / RUN_CONFIG_FILE).read_text())
    assert (recorded["train"]["log_every"], recorded["train"]["eval_every"]) == (1, 7)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", RUN_CONFIG_FILE, LOCK_FILE]


@pytest.mark.parametrize("recipe, key, value, named", [
    (tiny_pretrain.get_config, "seed", 7, "seed"),
    (tiny_pretrain.get_config, "model.width", 128, "model"),
    (tiny_pretrain.get_config, "train.batch_size", 32, "train.batch_size"),
    (finetune.get_config, "task", "rte", "task"),
    (finetune.get_config, "init", "gs://bucket/run/checkpoints", "init"),
    (finetune.get_config, "finetune.lm_coef", 0.0, "finetune.lm_coef"),
    (finetune.get_config, "finetune.train_from_eval", True, "finetune.train_from_eval"),
])
def test_another_identity_is_refused_naming_the_key_and_leaving_the_workdir(tmp_path, recipe, key, value, named):
    workdir = claimed_workdir(tmp_path / "run", recipe())
    before = snapshot(workdir)
    other = recipe()
    section, _, name = key.rpartition(".")
    (other[section] if section else other)[name] = value
    with pytest.raises(ConfigError, match=rf"different {re.escape(named)}\. .*--config\.start_over=True"):
        claim(workdir, other)
    assert snapshot(workdir) == before


def test_how_a_step_is_computed_may_change_between_restarts(tmp_path):
    """layers, remat and attention change the program, not the run: a run moved to a TPU slice (or given remat to
    fit) resumes, and so does one recorded before `layers` replaced `scan_layers`."""
    workdir = claimed_workdir(tmp_path / "run", tiny_pretrain.get_config())
    recorded = json.loads((workdir / RUN_CONFIG_FILE).read_text())
    recorded["model"]["scan_layers"] = recorded["model"].pop("layers") == "auto"
    (workdir / RUN_CONFIG_FILE).write_text(json.dumps(recorded))
    moved = tiny_pretrain.get_config()
    moved.model.update(layers="unrolled", remat="full", attention="fused")
    claim(workdir, moved)
    assert json.loads((workdir / RUN_CONFIG_FILE).read_text())["model"]["layers"] == "unrolled"


def test_start_over_moves_the_old_run_aside_and_records_the_new_config(tmp_path):
    workdir = claimed_workdir(tmp_path / "run", tiny_pretrain.get_config())
    before = snapshot(workdir)
    other = tiny_pretrain.get_config()
    other.seed = 7
    other.start_over = True
    claim(workdir, other)
    (aside,) = [p for p in workdir.iterdir() if p.name.startswith("previous-")]
    assert snapshot(aside) == {name: data for name, data in before.items() if name != LOCK_FILE}
    assert sorted(p.name for p in workdir.iterdir()) == [RUN_CONFIG_FILE, aside.name, LOCK_FILE]
    assert json.loads((workdir / RUN_CONFIG_FILE).read_text())["seed"] == 7


def test_start_over_with_an_unchanged_config_still_starts_afresh_and_twice_in_a_second_keeps_both(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setattr(workdir_guard.time, "strftime", lambda *args: "20250101-120000")  # one second for both
    config = tiny_pretrain.get_config()
    workdir = claimed_workdir(tmp_path / "run", config)
    config.start_over = True
    claim(workdir, config)
    (workdir / "checkpoints").mkdir()  # the second fresh run's progress
    claim(workdir, config)  # within the same second: a second previous-<time> folder, not a crash
    asides = sorted(p for p in workdir.iterdir() if p.name.startswith("previous-"))
    assert [p.name for p in asides] == ["previous-20250101-120000", "previous-20250101-120000-2"]
    assert (asides[0] / "checkpoints" / "3" / "state").read_bytes() == b"step 3"
    assert sorted(p.name for p in asides[1].iterdir()) == ["checkpoints", RUN_CONFIG_FILE]
    assert not (workdir / "checkpoints").exists()


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder_and_the_lock_outlives_no_run(tmp_path):
    config = tiny_pretrain.get_config()
    workdir = tmp_path / "run"
    with workdir_guard.claim(workdir, config):
        with pytest.raises(WorkdirError, match=rf"{re.escape(str(workdir))} is in use by pid {os.getpid()} on host "
                                               rf"{re.escape(socket.gethostname())} since .*; wait for it or stop it"):
            claim(workdir, config)
    with pytest.raises(RuntimeError, match="training failed"):  # a run that fails still frees the workdir
        with workdir_guard.claim(workdir, config):
            raise RuntimeError("training failed")
    claim(workdir, config)
    assert (workdir / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning_naming_it(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                 "since": "2024-01-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING), workdir_guard.claim(workdir, tiny_pretrain.get_config()):
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"Took over {workdir / LOCK_FILE} from pid {dead.pid} on host {socket.gethostname()}" in caplog.text


def test_the_other_processes_of_a_multi_host_run_share_the_workdir_process_0_holds(tmp_path, monkeypatch):
    config = tiny_pretrain.get_config()
    workdir = tmp_path / "run"
    with workdir_guard.claim(workdir, config):
        monkeypatch.setattr(workdir_guard.jax, "process_index", lambda: 1)
        claim(workdir, config)


@pytest.mark.slow
def test_a_second_train_py_on_a_running_workdir_exits_2_at_once_and_sigterm_frees_it(tmp_path, token_cache_dir):
    """Before the lock, the second launch hung (or failed "Directory not empty") and both appended metrics."""
    config = tiny_config(token_cache_dir, **{"train.num_steps": 10_000, "checkpoint.every": 10_000})
    workdir = tmp_path / "run"
    first = subprocess.Popen(train_py_command(config, workdir), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(workdir, 2, first)
        # train.py probes the lock before it imports the training code (TensorFlow through clu: seconds to a
        # minute on two busy cores), so what the refusal takes is Python's, jax's and Orbax's start-up.
        started = time.monotonic()
        second = subprocess.run(train_py_command(config, workdir), cwd=REPO, capture_output=True, text=True,
                                timeout=180)
        assert time.monotonic() - started < 30
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in errors[0]
        assert first.poll() is None  # refused while the first runs, not once it ended
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=60)[0]
        assert first.returncode == 0, output[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    claim(workdir, config)  # a third start gets the workdir


@pytest.mark.parametrize("immutable", ["parent", "workdir"])
def test_an_unwritable_workdir_is_one_error_naming_it(tmp_path, immutable):
    workdir = tmp_path / "runs" / "run"
    workdir.mkdir(parents=True)
    if immutable == "parent":
        workdir.rmdir()  # the claim has to create it
    with unwritable(workdir if immutable == "workdir" else workdir.parent):
        with pytest.raises(WorkdirError, match=rf"Cannot write the workdir {re.escape(str(workdir))} \("):
            claim(workdir, tiny_pretrain.get_config())


def test_a_config_json_that_is_not_json_is_named_and_start_over_moves_it_aside(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    garbage = '{"mode": "pretrain", "mod'
    (workdir / RUN_CONFIG_FILE).write_text(garbage)
    config = tiny_pretrain.get_config()
    with pytest.raises(WorkdirError, match=rf"{re.escape(str(workdir / RUN_CONFIG_FILE))} is not a run's config "
                                           r"\(Unterminated string .*--config\.start_over=True"):
        claim(workdir, config)
    config.start_over = True
    claim(workdir, config)
    (aside,) = [p for p in workdir.iterdir() if p.name.startswith("previous-")]
    assert (aside / RUN_CONFIG_FILE).read_text() == garbage
    assert json.loads((workdir / RUN_CONFIG_FILE).read_text())["mode"] == "pretrain"


def test_a_resume_with_another_num_steps_is_refused_unless_extend_which_says_how_the_lr_changes(tmp_path, caplog):
    config = tiny_pretrain.get_config()  # warmup_cosine, lr 3e-3, no warm-up
    config.train.num_steps = 20
    workdir = tmp_path / "run"
    claim(workdir, config)
    save_checkpoint(workdir, 10)
    config.train.num_steps = 40
    with pytest.raises(ConfigError, match=r"holds a run at step 10 with train\.num_steps 20 -> 40: resuming would "
                                          r"recompute the warmup_cosine .*--config\.extend=True"):
        claim(workdir, config)
    config.extend = True
    with caplog.at_level(logging.WARNING):
        claim(workdir, config)
    # 3e-3 * (1 + cos(pi * 10 / 20)) / 2 = 1.5e-3 before; 3e-3 * (1 + cos(pi * 10 / 40)) / 2 = 2.56e-3 now.
    assert ("train.num_steps 20 -> 40 (extend=True): the warmup_cosine schedule is recomputed for 40 steps; at the "
            "resumed step 10 the learning rate goes from 0.0015 to 0.00256.") in caplog.text
    config.extend = False
    claim(workdir, config)  # the new length is the recorded one now


def test_a_finetuning_resume_with_more_epochs_is_refused_and_a_new_length_without_checkpoints_is_not(tmp_path):
    config = finetune.get_config("tiny")
    workdir = tmp_path / "run"
    claim(workdir, config)
    config.finetune.epochs = 2
    claim(workdir, config)  # nothing saved yet: nothing to resume
    save_checkpoint(workdir, 4)
    config.finetune.epochs = 3
    with pytest.raises(ConfigError, match=r"at step 4 with finetune\.epochs 2 -> 3: .*warmup_linear"):
        claim(workdir, config)
    config.train.num_steps = 5  # not fine-tuning's length: it may change
    config.finetune.epochs = 2
    claim(workdir, config)


def test_a_constant_learning_rate_may_resume_with_another_num_steps(tmp_path):
    config = tiny_pretrain.get_config()
    config.optimizer.schedule = "constant"
    workdir = tmp_path / "run"
    claim(workdir, config)
    save_checkpoint(workdir, 10)
    config.train.num_steps = 40
    claim(workdir, config)
    assert json.loads((workdir / RUN_CONFIG_FILE).read_text())["train"]["num_steps"] == 40

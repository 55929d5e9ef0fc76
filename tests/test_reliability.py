"""Preemption, kills at any moment, damaged checkpoints, non-finite losses, failing disks."""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from gpt1_jax.pretraining import pretrain
from gpt1_jax.training import checkpoint, train_lib
from gpt1_jax.training.run_log import read_metrics
from pretrain_helpers import (
    REPO,
    assert_trees_equal,
    final_params,
    losses,
    run_train_py,
    tiny_config,
    train_py_command,
    wait_for_step,
)

pytestmark = pytest.mark.slow


def start_train_py(config, workdir) -> subprocess.Popen:
    return subprocess.Popen(train_py_command(config, workdir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kill_9_at_three_random_points_then_resume_is_bitwise_equal(tmp_path, token_cache_dir):
    config = tiny_config(token_cache_dir,
                         **{"train.num_steps": 16, "checkpoint.every": 2, "checkpoint.async_save": True})
    pretrain.pretrain(config, str(tmp_path / "straight"))
    workdir = tmp_path / "killed"
    rng = random.Random(1234)
    for kill_after in sorted(rng.sample(range(2, 15), 3)):
        proc = start_train_py(config, workdir)
        wait_for_step(workdir, kill_after, proc)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step, possibly during an asynchronous save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_train_py(config, workdir)
    assert_trees_equal(final_params(workdir), final_params(tmp_path / "straight"))
    resumed_losses = {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}
    assert resumed_losses == losses(tmp_path / "straight")


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, token_cache_dir, caplog, damage):
    config = tiny_config(token_cache_dir)
    pretrain.pretrain(config, str(tmp_path / "straight"))
    workdir = tmp_path / "damaged"
    pretrain.pretrain(config, str(workdir))
    params_dir = workdir / "checkpoints" / "6" / "params"
    files = sorted(p for p in params_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    if damage == "truncate":
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":  # one byte of the arrays' data: the files still parse, a weight changes
        data_file = max(files, key=lambda f: f.stat().st_size)
        data = bytearray(data_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        data_file.write_bytes(bytes(data))
    else:
        shutil.rmtree(workdir / "checkpoints" / "6" / "params")
    config.train.num_steps = 6
    with caplog.at_level("WARNING"):
        pretrain.pretrain(config, str(workdir))
    assert "Checkpoint step 6" in caplog.text and "unusable" in caplog.text
    assert damage != "flip" or "does not match the checksum" in caplog.text
    assert any(p.name.startswith("6.unusable-") for p in (workdir / "checkpoints").iterdir())
    assert_trees_equal(final_params(workdir), final_params(tmp_path / "straight"))


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, token_cache_dir):
    # A learning rate of 1e30 makes the second forward pass overflow.
    config = tiny_config(token_cache_dir, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                                             "optimizer.schedule": "constant", "checkpoint.every": 1})
    with pytest.raises(train_lib.NonFiniteError, match=r"not finite at step \d+.*Last good checkpoint: step \d+"):
        pretrain.pretrain(config, str(tmp_path))
    _, params, _ = checkpoint.load_pretrained(tmp_path / "checkpoints")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_skip_mode_counts_non_finite_steps_and_fails_past_the_allowed_fraction(tmp_path, token_cache_dir, capsys):
    config = tiny_config(token_cache_dir, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                                             "optimizer.schedule": "constant", "train.nonfinite": "skip",
                                             "train.max_nonfinite_fraction": 1.0})
    final = pretrain.pretrain(config, str(tmp_path / "allowed"))
    assert final["nonfinite_steps"] >= 1
    assert f"Warning: {int(final['nonfinite_steps'])} of 6 updates had a non-finite loss" in capsys.readouterr().out
    config.train.max_nonfinite_fraction = 0.1
    with pytest.raises(train_lib.NonFiniteError, match=r"of 6 updates \(\d+%\) were skipped as non-finite, more than "
                                                       r"train.max_nonfinite_fraction=0.1"):
        pretrain.pretrain(config, str(tmp_path / "refused"))


def _make_unwritable(path: pathlib.Path) -> bool:
    if os.geteuid() == 0:
        return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    path.chmod(0o555)
    return True


def _make_writable(path: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_a_failing_disk_gives_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, token_cache_dir):
    config = tiny_config(token_cache_dir, **{"train.stop_at": 3})
    pretrain.pretrain(config, str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints"
    if not _make_unwritable(ckpt_dir):
        pytest.skip("cannot make a directory unwritable here (chattr unavailable)")
    try:
        config.train.stop_at = 0
        with pytest.raises(checkpoint.CheckpointError, match="Earlier checkpoints are untouched"):
            pretrain.pretrain(config, str(tmp_path))
    finally:
        _make_writable(ckpt_dir)
    assert checkpoint.TrainCheckpointer(ckpt_dir, keep=3).steps() == [3]
    step3 = checkpoint.load_pretrained(ckpt_dir)
    assert step3[2]["kind"] == "pretrain"


def test_a_full_disk_is_one_error_line_and_keeps_earlier_checkpoints(tmp_path, token_cache_dir):
    """On a full disk Orbax's writer threads each logged a traceback (877 lines and 51 tracebacks in the probe)
    before the error reached us. A save the disk has no room for is now refused before it starts."""
    disk = tmp_path / "disk"
    disk.mkdir()
    # 45 MB: room for one tiny checkpoint (~32 MB of parameters and Adam moments), not two.
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        config = tiny_config(token_cache_dir, **{"train.num_steps": 9, "checkpoint.keep": 5})
        result = subprocess.run(train_py_command(config, disk / "run"), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
        assert errors[0].startswith(f"error: No room for checkpoint step 6 in {disk / 'run' / 'checkpoints'}")
        assert "Earlier checkpoints are untouched" in errors[0] and "Traceback" not in result.stderr
        assert checkpoint.TrainCheckpointer(disk / "run" / "checkpoints", keep=5).steps() == [3]
        assert checkpoint.load_pretrained(disk / "run" / "checkpoints")[2]["kind"] == "pretrain"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("failure", ["unwritable folder", "file size limit"])
def test_a_failed_save_ends_train_py_at_once_with_one_error_line(tmp_path, token_cache_dir, failure):
    """Orbax made each step's folder in a background thread; when that failed (an unwritable folder), the
    threads writing the items waited 300 s for it and the process could not exit after its error. A write
    that fails later, in the background (a full disk: here, a 4 MB file size limit), surfaces at the next
    save or at the end, naming its step."""
    config = tiny_config(token_cache_dir, **{"checkpoint.async_save": True})
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    command = train_py_command(config, tmp_path)
    if failure == "file size limit":
        command = ["bash", "-c", 'ulimit -f 4096 && exec "$@"', "bash", *command]
    elif not _make_unwritable(ckpt_dir):
        pytest.skip("cannot make a directory unwritable here (chattr unavailable)")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(tmp_path, 3, proc)  # logged just before the save of step 3
        since_step_3 = time.time()
        output = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"train.py still running 120 s after its save failed:\n{proc.communicate()[0][-3000:]}")
    finally:
        if failure == "unwritable folder":
            _make_writable(ckpt_dir)
    assert time.time() - since_step_3 < 30, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "Writing checkpoint step 3 to" in errors[0]
    assert failure != "unwritable folder" or "Traceback" not in output

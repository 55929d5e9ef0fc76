"""Distribution: 8 simulated devices (data and fsdp), 2 real processes, restore across meshes."""

import os
import socket
import subprocess

import pytest

from gpt1_jax import train_lib
from pretrain_helpers import REPO, assert_trees_equal, final_params, losses, run_train_py, tiny_config, train_py_command

pytestmark = pytest.mark.slow
TOLERANCE = dict(rel=2e-4)


def assert_losses_match(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], **TOLERANCE), f"step {step}"


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, token_cache_dir):
    workdir = tmp_path_factory.mktemp("one_device")
    train_lib.pretrain(tiny_config(token_cache_dir), str(workdir))
    return workdir


@pytest.mark.parametrize("fsdp", [1, 2, 8])
def test_eight_devices_match_one_device(tmp_path, token_cache_dir, one_device_run, fsdp):
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": fsdp}), tmp_path, devices=8)
    assert_losses_match(losses(tmp_path), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path), final_params(one_device_run), atol=2e-5)


def test_checkpoint_moves_between_eight_devices_and_one(tmp_path, token_cache_dir, one_device_run):
    # Save on 8 devices with fsdp sharding, finish on 1 device.
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": 8, "train.stop_at": 3}), tmp_path / "a", devices=8)
    train_lib.pretrain(tiny_config(token_cache_dir), str(tmp_path / "a"))
    assert_losses_match(losses(tmp_path / "a"), losses(one_device_run))
    # Save on 1 device, finish on 8.
    train_lib.pretrain(tiny_config(token_cache_dir, **{"train.stop_at": 3}), str(tmp_path / "b"))
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": 2}), tmp_path / "b", devices=8)
    assert_losses_match(losses(tmp_path / "b"), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path / "b"), final_params(one_device_run), atol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(tmp_path, token_cache_dir, one_device_run):
    config = tiny_config(token_cache_dir, **{"data.shard_by_process": False})
    port = free_port()
    procs = []
    for index in range(2):
        env = {**os.environ, "GPT1_JAX_COORDINATOR": f"127.0.0.1:{port}", "GPT1_JAX_NUM_PROCESSES": "2",
               "GPT1_JAX_PROCESS_ID": str(index)}
        procs.append(subprocess.Popen(train_py_command(config, tmp_path), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert_losses_match(losses(tmp_path), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path), final_params(one_device_run), atol=2e-5)

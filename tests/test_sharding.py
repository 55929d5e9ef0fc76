"""Distribution: parameter names for the partition rules, 8 simulated devices (data and fsdp), 2 real processes,
restore across meshes."""

import os
import re
import socket
import subprocess

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gpt1_jax.pretraining import pretrain
from gpt1_jax.training import sharding
from pretrain_helpers import REPO, assert_trees_equal, final_params, losses, run_train_py, tiny_config, train_py_command

TOLERANCE = dict(rel=2e-4)


def test_path_names_are_the_slash_joined_keys_the_partition_rules_match():
    """Adam's moments carry their parameter's path as a suffix, so one rule places a kernel and its moments."""
    params = {"tokens_embed": np.zeros((8, 4)), "blocks": {"attn": {"qkv": {"kernel": np.zeros((2, 4, 12))}}},
              "head": {"dense": {"bias": np.zeros((2,))}}}
    state = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(params)
    specs = {}
    for path, _ in jax.tree_util.tree_leaves_with_path((params, state)):
        name = sharding.path_name(path)
        specs[name] = next(spec for pattern, spec in sharding.PARTITION_RULES if re.search(pattern, name))
    assert specs == {
        "0/tokens_embed": P("fsdp", None), "0/blocks/attn/qkv/kernel": P(None, "fsdp", None), "0/head/dense/bias": P(),
        "1/1/0/count": P(),
        "1/1/0/mu/tokens_embed": P("fsdp", None), "1/1/0/mu/blocks/attn/qkv/kernel": P(None, "fsdp", None),
        "1/1/0/mu/head/dense/bias": P(),
        "1/1/0/nu/tokens_embed": P("fsdp", None), "1/1/0/nu/blocks/attn/qkv/kernel": P(None, "fsdp", None),
        "1/1/0/nu/head/dense/bias": P(),
    }


def assert_losses_match(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], **TOLERANCE), f"step {step}"


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, token_cache_dir):
    workdir = tmp_path_factory.mktemp("one_device")
    pretrain.pretrain(tiny_config(token_cache_dir), str(workdir))
    return workdir


@pytest.mark.parametrize("fsdp", [1, 2, 8])
@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path, token_cache_dir, one_device_run, fsdp):
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": fsdp}), tmp_path, devices=8)
    assert_losses_match(losses(tmp_path), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path), final_params(one_device_run), atol=2e-5)


@pytest.mark.slow
def test_checkpoint_moves_between_eight_devices_and_one(tmp_path, token_cache_dir, one_device_run):
    # Save on 8 devices with fsdp sharding, finish on 1 device.
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": 8, "train.stop_at": 3}), tmp_path / "a", devices=8)
    pretrain.pretrain(tiny_config(token_cache_dir), str(tmp_path / "a"))
    assert_losses_match(losses(tmp_path / "a"), losses(one_device_run))
    # Save on 1 device, finish on 8.
    pretrain.pretrain(tiny_config(token_cache_dir, **{"train.stop_at": 3}), str(tmp_path / "b"))
    run_train_py(tiny_config(token_cache_dir, **{"mesh.fsdp": 2}), tmp_path / "b", devices=8)
    assert_losses_match(losses(tmp_path / "b"), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path / "b"), final_params(one_device_run), atol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process(tmp_path, token_cache_dir, one_device_run):
    config = tiny_config(token_cache_dir, **{"data.shard_by_process": False})
    port = free_port()
    procs = []
    for index in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "GPT1_JAX_NUM_PROCESSES": "2",
               "GPT1_JAX_PROCESS_ID": str(index)}
        procs.append(subprocess.Popen(train_py_command(config, tmp_path), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert_losses_match(losses(tmp_path), losses(one_device_run))
    assert_trees_equal(final_params(tmp_path), final_params(one_device_run), atol=2e-5)

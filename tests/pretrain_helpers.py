"""Small pre-training runs shared by the training, sharding and reliability tests."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from ml_collections import ConfigDict

from gpt1_jax.configs import tiny_pretrain
from gpt1_jax.training import checkpoint
from gpt1_jax.training.run_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = REPO / "gpt1_jax" / "configs"  # the recipe files
ALICE = "local:corpus/gutenberg/11-0.txt"


def tiny_config(cache_dir, **overrides) -> ConfigDict:
    """The tiny recipe on one small book, every key overridable as 'section.key': value."""
    config = tiny_pretrain.get_config()
    config.data.source = ALICE
    config.data.cache_dir = str(cache_dir)
    config.model.n_ctx = 32
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.eval_batches = 2
    config.train.num_steps = 6
    config.train.log_every = 1
    config.train.eval_every = 0
    config.checkpoint.every = 3
    config.checkpoint.async_save = False
    # Adam's first update is g / |g|: for coordinates whose gradient is round-off, its sign decides a full
    # step. A warm-up keeps those first steps small, so runs that differ only in summation order (device
    # layouts, micro-batches) agree to float tolerance after a few steps.
    config.optimizer.warmup_steps = 50
    for key, value in overrides.items():
        section, name = key.split(".") if "." in key else (None, key)
        if section:
            config[section][name] = value
        else:
            config[name] = value
    return config


def as_flags(config: ConfigDict) -> list[str]:
    """The config as --config.x=value flags for train.py (the recipe file plus overrides)."""
    flags = []
    for section, values in config.items():
        if isinstance(values, ConfigDict):
            flags += [f"--config.{section}.{k}={v}" for k, v in values.items()]
        else:
            flags.append(f"--config.{section}={values}")
    return flags


def train_py_command(config: ConfigDict, workdir) -> list[str]:
    """python train.py with the tiny recipe file and `config` as overrides."""
    return [sys.executable, str(REPO / "train.py"), "--config", str(RECIPES / "tiny_pretrain.py"),
            "--workdir", str(workdir), *as_flags(config)]


def run_train_py(config: ConfigDict, workdir, *, devices: int = 1, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """python train.py in a fresh process, optionally with N simulated CPU devices."""
    full_env = {**os.environ, **(env or {})}
    if devices > 1:
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run(train_py_command(config, workdir), cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def wait_for_step(workdir: pathlib.Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll the run's metrics.jsonl until `step` is logged; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and any(m["step"] >= step for m in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def final_params(workdir) -> dict:
    _, params, _ = checkpoint.load_pretrained(pathlib.Path(workdir) / "checkpoints")
    return params


def assert_trees_equal(a, b, *, atol: float = 0.0) -> None:
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if atol == 0.0:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0)

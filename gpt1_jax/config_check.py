"""Validate a run's configuration before any compilation or data work.

Every message names the config key and the fix, so a bad launch on a pod slice fails in seconds
instead of after minutes of compiling. It knows no module above the optimizer: checks that need the
model, the data or the probe registry (sizes, files, zero-shot task names) run where those are built,
still before compilation.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from gpt1_jax import optim, vocab_files


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its key."""


def check_batching(config: ConfigDict) -> None:
    """The global batch must split evenly over processes, devices and accumulation steps."""
    batch, accum = config.train.batch_size, config.train.grad_accum_steps
    devices, processes = jax.device_count(), jax.process_count()
    if accum < 1:
        raise ConfigError(f"train.grad_accum_steps={accum} must be >= 1.")
    if batch % (accum * devices):
        raise ConfigError(
            f"train.batch_size={batch} must be divisible by train.grad_accum_steps x device count "
            f"= {accum} x {devices}; choose a multiple of {accum * devices}.")
    if batch % processes:
        raise ConfigError(f"train.batch_size={batch} must be divisible by the {processes} processes.")
    if config.mesh.fsdp < 1 or devices % config.mesh.fsdp:
        raise ConfigError(f"mesh.fsdp={config.mesh.fsdp} must divide the device count {devices}.")


def check_common(config: ConfigDict) -> None:
    positive = ["train.log_every", "checkpoint.every", "checkpoint.keep", "train.batch_size", "train.eval_batch_size"]
    for key in positive:
        section, name = key.split(".")
        if config[section][name] < 1:
            raise ConfigError(f"{key}={config[section][name]} must be >= 1.")
    if config.optimizer.kind not in optim.KINDS:
        raise ConfigError(f"optimizer.kind={config.optimizer.kind!r}: use 'released' (the released code's Adam) "
                          "or 'adamw' (optax.adamw).")
    if config.train.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={config.train.nonfinite!r}: use 'stop' or 'skip'.")
    if config.data.task_source not in ("local", "tfds"):
        raise ConfigError(f"data.task_source={config.data.task_source!r}: use 'local' "
                          f"(files under ${vocab_files.DATA_ENV}) or 'tfds'.")
    if config.train.eval_batch_size % jax.process_count():
        raise ConfigError(f"train.eval_batch_size={config.train.eval_batch_size} must be divisible by "
                          f"the {jax.process_count()} processes.")
    check_batching(config)
    profile_window(config)


def check_pretrain(config: ConfigDict) -> None:
    check_common(config)
    if config.train.num_steps < 1:
        raise ConfigError(f"train.num_steps={config.train.num_steps} must be >= 1.")
    if config.model.n_special:
        raise ConfigError("model.n_special must be 0 for pre-training: special tokens are added by fine-tuning.")


def profile_window(config: ConfigDict) -> tuple[int, int] | None:
    """(first, last) update of `train.profile_steps` ("FIRST-LAST" or "STEP"), None when it is "" (off)."""
    text = str(config.train.profile_steps).strip()
    if not text:
        return None
    try:
        first, dash, last = text.partition("-")
        window = int(first), int(last if dash else first)
    except ValueError:
        window = (0, -1)
    if not 1 <= window[0] <= window[1]:
        raise ConfigError(f"train.profile_steps={text!r}: give the updates to trace as FIRST-LAST (e.g. 10-15) "
                          "or one update number, counting from 1; '' turns profiling off.")
    return window

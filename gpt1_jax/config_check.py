"""Validate a run's configuration before any compilation or data work.

Every message names the config key and the fix, so a bad launch on a pod slice fails in seconds
instead of after minutes of compiling. It knows no module above the optimizer: checks that need the
model, the data or the probe registry (sizes, files, zero-shot task names) run where those are built,
still before compilation.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from ml_collections import ConfigDict

from gpt1_jax import constants
from gpt1_jax.constants import SHAPE_KEYS
from gpt1_jax.errors import UserError
from gpt1_jax.training import optim


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work, named by its key."""


def _interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """(test, wording) of a range of finite values: [low, high], each end open or closed."""
    def test(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below

    if math.isinf(high):
        return test, f"{'>' if low_open else '>='} {low:g}"
    return test, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _seed(bits: int):
    """(test, wording) of a seed: an integer in [0, 2**bits - 1].

    NumPy's generators refuse a negative seed (`default_rng`, `SeedSequence`: the batches, the epochs' order),
    `RandomState` one of 2**32 or more (Story Cloze's held-out draw), and `jax.random.key` one past int64. A
    negative `seed` used to fail with NumPy's traceback when the first batch was drawn, after config.json was
    written and the step compiled.
    """
    return (lambda value: 0 <= value < 2**bits), f"an integer in [0, 2**{bits} - 1]"


AT_LEAST_1, AT_LEAST_0 = _interval(1, math.inf), _interval(0, math.inf)
POSITIVE, PROBABILITY = _interval(0, math.inf, low_open=True), _interval(0, 1, high_open=True)
# The valid values of every numeric key that has a range, as "section.key" or a top-level "key"; keys a
# recipe lacks (finetune.* when pre-training) are skipped. Walked by `check_ranges` before anything compiles.
RANGES = {
    "seed": _seed(63), "finetune.heldout_seed": _seed(32),
    "optimizer.lr": POSITIVE, "optimizer.eps": POSITIVE, "optimizer.b1": PROBABILITY, "optimizer.b2": PROBABILITY,
    "optimizer.weight_decay": AT_LEAST_0, "optimizer.grad_clip_norm": AT_LEAST_0,
    "optimizer.warmup_steps": AT_LEAST_0, "optimizer.warmup_fraction": _interval(0, 1),
    # 0 only when fine-tuning (check_pretrain requires >= 1).
    **{f"model.{name}": AT_LEAST_0 for name in SHAPE_KEYS},
    "model.embd_dropout": PROBABILITY, "model.attn_dropout": PROBABILITY, "model.resid_dropout": PROBABILITY,
    "finetune.clf_dropout": PROBABILITY,
    "train.batch_size": AT_LEAST_1, "train.eval_batch_size": AT_LEAST_1, "train.log_every": AT_LEAST_1,
    "train.eval_every": AT_LEAST_0, "train.eval_batches": AT_LEAST_0, "train.stop_at": AT_LEAST_0,
    "train.loss_chunk": AT_LEAST_0, "train.max_nonfinite_fraction": _interval(0, 1),
    "checkpoint.every": AT_LEAST_1, "checkpoint.keep": AT_LEAST_1,
    "data.val_fraction": _interval(0, 1, low_open=True, high_open=True),
}


def check_ranges(config: ConfigDict) -> None:
    """Every key of `RANGES` the config has lies in its range, or a ConfigError names the key and the range."""
    for key, (test, wording) in RANGES.items():
        section, _, name = key.rpartition(".")
        values = config.get(section, {}) if section else config
        if name not in values:
            continue
        value = values[name]
        if not test(value):
            raise ConfigError(f"{key}={value} is out of range: it must be {wording}.")


def _counts(devices: Sequence[jax.Device] | None) -> tuple[int, int]:
    """(devices, processes) of the run: `devices` (a slice compiled for ahead of time), else this run's."""
    if devices is None:
        return jax.device_count(), jax.process_count()
    return len(devices), len({device.process_index for device in devices})


def check_batching(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """The global batch must split evenly over processes, devices and accumulation steps."""
    batch, accum = config.train.batch_size, config.train.grad_accum_steps
    devices, processes = _counts(devices)
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


def check_common(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """Checks every recipe needs; `devices`: those the run will have, when not this process's (a TPU slice)."""
    check_ranges(config)
    if config.model.n_head and config.model.width % config.model.n_head:
        raise ConfigError(f"model.width={config.model.width} must be divisible by model.n_head={config.model.n_head}: "
                          "each head gets width / n_head dimensions.")
    if config.optimizer.kind not in optim.KINDS:
        raise ConfigError(f"optimizer.kind={config.optimizer.kind!r}: use 'released' (the released code's Adam) "
                          "or 'adamw' (optax.adamw).")
    if config.train.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={config.train.nonfinite!r}: use 'stop' or 'skip'.")
    if config.data.on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error={config.data.on_error!r}: use 'raise' (stop at a bad row of a task file, "
                          "naming it) or 'skip' (skip and count such rows).")
    if config.data.task_source not in ("local", "tfds"):
        raise ConfigError(f"data.task_source={config.data.task_source!r}: use 'local' "
                          f"(files under ${constants.DATA_ENV}) or 'tfds'.")
    device_count, process_count = _counts(devices)
    if config.train.eval_batch_size % device_count:
        raise ConfigError(f"train.eval_batch_size={config.train.eval_batch_size} must be divisible by the "
                          f"{device_count} devices (and so by the {process_count} processes).")
    check_batching(config, devices)
    profile_window(config)


def check_pretrain(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    check_common(config, devices)
    if config.train.num_steps < 1:
        raise ConfigError(f"train.num_steps={config.train.num_steps} must be >= 1.")
    for name in SHAPE_KEYS:
        if config.model[name] < 1:
            raise ConfigError(f"model.{name}={config.model[name]} must be >= 1 for pre-training.")
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

"""Validate a run's configuration before any compilation or data work, and guard the workdir.

Every message names the config key and the fix, so a bad launch on a pod slice fails in seconds
instead of after minutes of compiling.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
from ml_collections import ConfigDict

from gpt1_jax import optim, vocab_files
from gpt1_jax.model import GPT1Config
from gpt1_jax.zeroshot import PROBES

RUN_CONFIG_FILE = "config.json"
# Keys that define what a workdir's checkpoints are; changing them mid-run would mix two runs.
IDENTITY_KEYS = ("mode", "model", "data.source", "seed", "optimizer", "train.batch_size", "task", "init")


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its key."""


def model_config(config: ConfigDict) -> GPT1Config:
    try:
        return GPT1Config.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


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


def check_pretrain(config: ConfigDict, model_cfg: GPT1Config) -> None:
    check_common(config)
    if config.train.num_steps < 1:
        raise ConfigError(f"train.num_steps={config.train.num_steps} must be >= 1.")
    if model_cfg.n_special:
        raise ConfigError("model.n_special must be 0 for pre-training: special tokens are added by fine-tuning.")
    zeroshot_probe_names(config)


def zeroshot_probe_names(config: ConfigDict) -> list[str]:
    """The tasks of `zeroshot.tasks` (comma-separated), checked against the available probes."""
    names = [name.strip() for name in config.zeroshot.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROBES]
    if unknown:
        raise ConfigError(f"zeroshot.tasks: no zero-shot probe for {unknown}; available: "
                          f"{', '.join(sorted(PROBES))}.")
    if config.zeroshot.every < 0 or config.zeroshot.max_examples < 0:
        raise ConfigError("zeroshot.every and zeroshot.max_examples must be >= 0 (0: every eval step, all examples).")
    return names


def _identity(config: ConfigDict) -> dict:
    values = json.loads(config.to_json_best_effort())
    picked = {}
    for key in IDENTITY_KEYS:
        node = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return picked


def claim_workdir(workdir: pathlib.Path, config: ConfigDict) -> None:
    """Record the run's config in the workdir; refuse a workdir that holds a run of another config.

    `start_over=True` moves the previous run aside (into `previous-<time>/`) rather than deleting it.
    """
    record = workdir / RUN_CONFIG_FILE
    if record.exists():
        previous = json.loads(record.read_text())
        old, new = _identity(ConfigDict(previous)), _identity(config)
        changed = [key for key in IDENTITY_KEYS if old.get(key) != new.get(key)]
        if changed and not config.start_over:
            raise ConfigError(
                f"{workdir} holds a run with a different {', '.join(changed)}. Use another --workdir, restore those "
                "values, or pass --config.start_over=True to move the old run aside and start afresh.")
        if changed and jax.process_index() == 0:
            aside = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for item in list(workdir.iterdir()):
                if not item.name.startswith("previous-"):
                    shutil.move(str(item), aside / item.name)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        record.write_text(config.to_json_best_effort(indent=2) + "\n")

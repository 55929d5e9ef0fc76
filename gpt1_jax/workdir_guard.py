"""The workdir belongs to one run: its identity is recorded, and another run's launch is refused.

A workdir's checkpoints, metrics and results only make sense for one configuration. The first start
writes `config.json`; a later start with different identity keys (the model, data, seed, optimizer,
batch, task or starting point) is refused naming those keys, unless `start_over=True` moves the old
run aside. Other keys (logging, evaluation, checkpoint cadence) may change between restarts.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
from ml_collections import ConfigDict

from gpt1_jax.config_check import ConfigError

RUN_CONFIG_FILE = "config.json"
# Keys that define what a workdir's checkpoints are; changing them mid-run would mix two runs.
IDENTITY_KEYS = ("mode", "model", "data.source", "seed", "optimizer", "train.batch_size", "task", "custom", "init")


def _identity(config: ConfigDict) -> dict:
    values = json.loads(config.to_json_best_effort())
    picked = {}
    for key in IDENTITY_KEYS:
        node = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return picked


def claim(workdir: pathlib.Path, config: ConfigDict) -> None:
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

"""Orbax checkpoints: training state that survives preemption, and the hand-off to fine-tuning.

A checkpoint directory is an Orbax `CheckpointManager` folder with one sub-folder per step and
three items per step:
  params     the model parameters (pure dict of arrays),
  opt_state  the optax state (absent in converted weights),
  metadata   JSON: the model config, the tokenizer identity and the run config,
so fine-tuning can rebuild the model from the checkpoint alone. Orbax writes each step into a
temporary folder and renames it when complete, so a kill at any moment leaves earlier steps
intact; an incomplete step is never listed.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt1_jax.model import GPT1, GPT1Config

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written."""


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def _params_of(model: GPT1) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_pretrained(directory: str | os.PathLike, model: GPT1, *, metadata: dict[str, Any] | None = None) -> None:
    """Write parameters and model config as step 0 (converted weights, no optimizer state)."""
    meta = {"model_config": model.config.to_dict(), "kind": "converted", **(metadata or {})}
    with _manager(directory) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(_params_of(model)), metadata=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
    path = pathlib.Path(directory)
    if not path.is_dir():
        return None
    with _manager(path, read_only=True) as manager:
        return manager.latest_step()


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    with _manager(directory, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint found.")
        return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def load_pretrained(directory: str | os.PathLike, step: int | None = None) -> tuple[GPT1Config, dict, dict[str, Any]]:
    """(model config, parameters as numpy, metadata) of the latest complete step (or `step`).

    Parameters come back on the host so the caller can place them on any mesh.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist (config key: init).")
    with _manager(directory, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint found (config key: init).")
        restored = manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore(), params=ocp.args.StandardRestore()))
    metadata = restored.metadata
    if "model_config" not in metadata:
        raise CheckpointError(f"{directory}/{step}: metadata has no model_config; not a gpt1_jax checkpoint.")
    config = GPT1Config.from_dict(metadata["model_config"])
    params = jax.tree.map(np.asarray, restored.params)
    return config, params, metadata

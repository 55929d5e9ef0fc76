"""Orbax checkpoints: training state that survives preemption, and the hand-off to fine-tuning.

A checkpoint directory is an Orbax `CheckpointManager` folder with one sub-folder per step and
three items per step:
  params     the model parameters (pure dict of arrays),
  opt_state  the optax state (absent in converted weights),
  metadata   JSON: the model config, the tokenizer identity and the run config,
so fine-tuning can rebuild the model from the checkpoint alone. Orbax writes each step into a
temporary folder and renames it when complete, so a kill at any moment leaves earlier steps
intact; an incomplete step is never listed, and the next writer to open the folder deletes it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gpt1_jax.errors import UserError
from gpt1_jax.model import GPT1, GPT1Config

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or written."""


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The Orbax handler of each item, known before anything is saved or restored.

    With it a manager reads an item's metadata (the shapes and dtypes of `params`) from the step as it
    was written. Reading the item folder as a standalone checkpoint instead looks for the step-level
    `_CHECKPOINT_METADATA` inside it and logs "Metadata file does not exist".
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("params", "train_state"):
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    registry.add("metadata", ocp.args.JsonSave)
    registry.add("metadata", ocp.args.JsonRestore)
    return registry


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
    """A manager of the step folders in `directory`; a writer deletes incomplete saves left by a killed process."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 handler_registry=_handler_registry())


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
    directory = pathlib.Path(directory).absolute()  # Orbax resolves relative paths differently per call
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist (config key: init).")
    with _manager(directory, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint found (config key: init).")
        restored = manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore(), params=ocp.args.StandardRestore(_host_target(manager, step))))
    metadata = restored.metadata
    if "model_config" not in metadata:
        raise CheckpointError(f"{directory}/{step}: metadata has no model_config; not a gpt1_jax checkpoint.")
    config = GPT1Config.from_dict(metadata["model_config"])
    params = jax.tree.map(np.asarray, restored.params)
    return config, params, metadata


def _host_target(manager: ocp.CheckpointManager, step: int):
    """Abstract `params` on this host's first device, whatever mesh the checkpoint was saved from."""
    tree = manager.metadata(step).item_metadata["params"].tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


class TrainCheckpointer:
    """Periodic asynchronous saves of the training state; restore of the latest usable step.

    Parameters and the rest of the training state (optimizer state, counters) are separate items,
    so fine-tuning reads `params` alone. The abstract trees given to `restore_latest` carry the
    target shardings, so a checkpoint saved on one mesh restores onto another. Opening it deletes, in
    the background and before its first save, the temporary folders of saves a killed process left
    incomplete; each would otherwise keep up to a whole checkpoint's worth of disk.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        try:
            self._manager = _manager(self.directory, max_to_keep=keep, async_save=async_save)
        except Exception as err:  # noqa: BLE001 - Orbax wraps OS errors in its own types
            raise CheckpointError(f"Cannot create or open the checkpoint directory {self.directory}: {err}") from err

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, train_state, metadata: dict[str, Any]) -> None:
        """Start writing `step`; Orbax commits it by an atomic rename when complete."""
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
                metadata=ocp.args.JsonSave(metadata)), force=True)
        except Exception as err:  # noqa: BLE001 - Orbax wraps OS errors in its own types
            raise CheckpointError(f"Writing checkpoint step {step} to {self.directory} failed: {err}. "
                                  "Earlier checkpoints are untouched; free space or fix permissions and rerun."
                                  ) from err

    def restore_latest(self, abstract_params, abstract_train_state):
        """(step, params, train_state) of the newest step that restores cleanly, or Nones for a fresh run.

        A step whose files are truncated or missing is renamed to `<step>.unusable-<time>` (kept
        for inspection, never loaded again) with a warning, and the previous one is tried, so a
        damaged checkpoint never strands the run.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    train_state=ocp.args.StandardRestore(abstract_train_state)))
                return step, restored.params, restored.train_state
            except Exception as err:  # noqa: BLE001 - any unreadable step falls back to the previous one
                log.warning("Checkpoint step %d in %s is unusable (%s: %s); trying the previous one.",
                            step, self.directory, type(err).__name__, err)
                self._set_aside(step)
        return None, None, None

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any of them got a preemption notice.

        Multi-process runs rely on JAX's coordination service (which receives the SIGTERM) so that
        all processes stop at the same step and write one checkpoint together.
        """
        return self._manager.reached_preemption(step)

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / f"{step}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self._manager.reload()

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - errors of the asynchronous save surface here
            raise CheckpointError(f"Writing a checkpoint to {self.directory} failed: {err}. "
                                  "Earlier checkpoints are untouched; free space or fix permissions and rerun."
                                  ) from err

    def close(self) -> None:
        self.wait()
        self._manager.close()

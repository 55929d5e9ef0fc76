"""Orbax checkpoints: training state that survives preemption, and the hand-off to fine-tuning.

A checkpoint directory is an Orbax `CheckpointManager` folder with one sub-folder per step and
three items per step:
  params       the model parameters (pure dict of arrays),
  train_state  the optimizer state and counters (absent in converted weights),
  metadata     JSON: the model config, the tokenizer identity, the run config and the checksums of
               the arrays,
so fine-tuning can rebuild the model from the checkpoint alone. Orbax writes each step into a
temporary folder and renames it when complete, so a kill at any moment leaves earlier steps
intact; an incomplete step is never listed, and the next writer to open the folder deletes it.
What the rename cannot catch, bytes changed after the write (a failing disk, a bad copy), the
checksums do: Orbax's OCDBT files carry none, and a flipped byte in them loads as a changed weight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from gpt1_jax import storage
from gpt1_jax.errors import UserError
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.weights import pretrained
from gpt1_jax.weights.weight_files import name_mismatch

log = logging.getLogger(__name__)

CHECKSUMS = "checksums"  # metadata key: {item: {leaf path: 8 hex digits}}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or written."""


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint where the caller pointed: a missing folder, or one without a complete step.

    This module does not know which flag or config key named the folder: within `named_by`, the message
    names it in the caller's words (`--checkpoint` for the tools, `--config.init` for fine-tuning). It named
    the config key `init` for every caller, and `generate --checkpoint` has no such key.
    """

    def __init__(self, location: str | os.PathLike, problem: str, flag: str | None = None):
        self.location, self.problem = location, problem
        super().__init__(f"{flag}={location}: {problem}" if flag else f"Checkpoint {location}: {problem}")


@contextlib.contextmanager
def named_by(flag: str):
    """Within it, a CheckpointNotFoundError names `flag`, the caller's flag or config key for the folder."""
    try:
        yield
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(err.location, err.problem, flag) from err


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
    """A manager of the step folders in `directory`; a writer deletes incomplete saves left by a killed process.

    The step's temporary folder is created before `save` returns, not in Orbax's background threads:
    when that creation fails (an unwritable or full directory), the threads writing the items wait for
    its "created" signal, which never comes, for Orbax's coordination timeout (300 s), and the process
    cannot exit until then. Created up front, the failure is an error of `save` and no thread waits.

    A reader gives Orbax no option to reset (`save_interval_steps=0`, ...), each of which it would announce in
    a warning, and its "Given directory is read only" notice is dropped: loading the shipped `mini` printed
    both, twice, on every command that read it.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    absl_logger = logging.getLogger("absl")
    if read_only:
        absl_logger.addFilter(_not_the_read_only_notice)
    try:
        return ocp.CheckpointManager(storage.path(directory), options=options,
                                     handler_registry=_handler_registry())
    finally:
        absl_logger.removeFilter(_not_the_read_only_notice)


def _not_the_read_only_notice(record: logging.LogRecord) -> bool:
    """A logging filter passing every record but the notice Orbax logs for a manager opened read-only."""
    return record.msg != "Given directory is read only=%s"


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit moves about half the output."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32 []: sum over elements of mix(bits ^ mix(position)), wrapping; the same on any mesh.

    Each term is a bijection of its element's bits, so any single changed element changes the sum,
    and the position in it catches swapped elements. Integer sums are exact in any order, so every
    process of a multi-host run gets the same value from its shards of the global array, and a step
    saved on one mesh verifies on another. It reads each array once: for GPT-1's parameters and Adam
    state (350M float32) 0.66 s on 2 CPU cores, against 4.7-6 s to write them there.
    """
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., itemsize / 4] for 64-bit types
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    position, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):  # row-major index, built per axis so shards stay local
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(_mix(words ^ _mix(position)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
    return jax.tree.map(_fingerprint, tree)


def checksums(tree) -> dict[str, str]:
    """{leaf path: 8 hex digits} of a tree of arrays (host or sharded), e.g. {"blocks/mlp/fc/kernel": "1f03a2c4"}."""
    sums = jax.device_get(_fingerprints(tree))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{int(value):08x}"
            for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def _verify(metadata: dict, items: dict[str, Any], where: str) -> bool:
    """Check restored `items` against the checksums saved with them; False when the step has none (older runs)."""
    saved = metadata.get(CHECKSUMS)
    if saved is None:
        return False
    for item, tree in items.items():
        for key, value in checksums(tree).items():
            expected = saved.get(item, {}).get(key) if isinstance(saved, dict) else None
            if expected != value:
                raise CheckpointError(
                    f"{where}: {item}/{key} does not match the checksum saved with it (saved {expected}, read "
                    f"{value}): its files changed after they were written. Use another step.")
    return True


def _params_of(model: GPT1) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_pretrained(directory: str | os.PathLike, model: GPT1, *, metadata: dict[str, Any] | None = None,
                    dtype: str = "float32") -> None:
    """Write parameters and model config as step 0 (converted weights, no optimizer state).

    `dtype` "bfloat16" halves the files, for a checkpoint that ships (`gpt1_jax.weights.pretrained`); loading
    widens the values back to the float32 the model keeps its parameters in.
    """
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _params_of(model))
    meta = {"model_config": model.config.to_dict(), "kind": "converted", **(metadata or {}),
            CHECKSUMS: {"params": checksums(params)}}
    with _manager(directory) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
    path = storage.path(directory)
    if not path.is_dir():
        return None
    with _manager(path, read_only=True) as manager:
        return manager.latest_step()


def _read_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The step's metadata JSON object, or a CheckpointError naming the file when it is unreadable or not one."""
    file = manager.directory / str(step) / "metadata" / "metadata"
    try:
        metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    except (OSError, ValueError) as err:  # a missing file; empty or garbage JSON (JSONDecodeError)
        raise CheckpointError(f"{file} is unreadable ({type(err).__name__}: {err}); it should hold the JSON the "
                              "run wrote with the step. Use another step, or move the step folder aside.") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file} holds {type(metadata).__name__}, not the JSON object the run wrote with the "
                              "step. Use another step, or move the step folder aside.")
    return metadata


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint's latest step (or `step`), wherever `_existing_checkpoint` finds it."""
    directory, step = _existing_checkpoint(directory, step)
    with _manager(directory, read_only=True) as manager:
        return _read_metadata(manager, _step_or_latest(manager, directory, step))


def read_model_config(directory: str | os.PathLike) -> GPT1Config:
    """The model config of a checkpoint's latest step (a shipped name too), from its metadata alone."""
    directory, step = _existing_checkpoint(directory, None)
    with _manager(directory, read_only=True) as manager:
        step = _step_or_latest(manager, directory, step)
        return _model_config(_read_metadata(manager, step), directory / str(step) / "metadata" / "metadata")


_STEP_FILE = "_CHECKPOINT_METADATA"  # what Orbax writes into each step folder, and into no other


def _existing_checkpoint(location: str | os.PathLike, step: int | None) -> tuple[storage.Path, int | None]:
    """(folder of step folders, step) of `location`, once it is known to exist: such a folder (`step`, None for
    its latest), one of its step folders (`<workdir>/checkpoints/300`: that step), or a shipped name ("mini").

    A step folder is what a listing shows and what a user copies; it used to be "no complete checkpoint found".
    """
    directory = storage.path(pretrained.resolve(location))
    try:
        found = storage.is_dir(directory)
    except OSError as err:  # a bucket that refuses this machine, or cannot be reached
        raise CheckpointError(str(storage.explain(err, directory, "read the checkpoint"))) from err
    if not found:
        raise CheckpointNotFoundError(directory, "does not exist. Give a run's checkpoints folder, one of its step "
                                      f"folders, or a shipped name: {', '.join(pretrained.SHIPPED)}.")
    if step is None and directory.name.isdigit() and (directory / _STEP_FILE).exists():
        return directory.parent, int(directory.name)
    return directory, step


def _step_or_latest(manager: ocp.CheckpointManager, directory: storage.Path, step: int | None) -> int:
    """`step`, or the latest complete one; a CheckpointNotFoundError when there is none, naming the folder to give
    instead when `directory` is a workdir."""
    steps = manager.all_steps()
    if step is None and steps:
        return max(steps)
    if step in steps:
        return step
    if step is not None:
        raise CheckpointNotFoundError(directory, f"has no complete step {step}; its steps: {sorted(steps)}.")
    if (directory / "checkpoints").is_dir():
        best = f" (its latest step), or {directory / 'best'} (its best)" if (directory / "best").is_dir() else ""
        raise CheckpointNotFoundError(directory, f"is a workdir: give {directory / 'checkpoints'}{best}.")
    raise CheckpointNotFoundError(directory, "holds no complete checkpoint. Give a run's checkpoints folder, one of "
                                  f"its step folders, or a shipped name: {', '.join(pretrained.SHIPPED)}.")


def load_pretrained(directory: str | os.PathLike, step: int | None = None) -> tuple[GPT1Config, dict, dict[str, Any]]:
    """(model config, float32 parameters as numpy, metadata) of the latest complete step (or `step`).

    `directory` may also name a checkpoint shipped with the package (`gpt1_jax.weights.pretrained`, e.g. "mini").

    Parameters come back on the host so the caller can place them on any mesh, checked against the
    shapes the metadata's model config implies and against the checksums saved with them. Given a
    fine-tuning checkpoint (a TaskModel's {"backbone", "head"}), it returns the backbone, whose config
    the metadata records: fine-tuning again, generating or converting from it then works as from a
    pre-trained one.
    """
    directory, step = _existing_checkpoint(directory, step)
    with _manager(directory, read_only=True) as manager:
        step = _step_or_latest(manager, directory, step)
        metadata = _read_metadata(manager, step)
        config = _model_config(metadata, directory / str(step) / "metadata" / "metadata")
        params = _restore_host_params(manager, step, config, f"Checkpoint step {step} in {directory}")
    _verify(metadata, {"params": params}, f"Checkpoint step {step} in {directory}")
    if _is_task_model(params):
        log.info("%s step %d is a fine-tuning checkpoint (kind %r): using its backbone, dropping its task head.",
                 directory, step, metadata.get("kind"))
        params = params["backbone"]
    return config, jax.tree.map(lambda x: np.asarray(x, np.float32), params), metadata


def _restore_host_params(manager: ocp.CheckpointManager, step: int, config: GPT1Config, where: str) -> dict:
    """The step's `params` on this host's first device, whatever mesh saved them, once their shapes match `config`."""
    damaged = "Use another step, or move the step folder aside."
    try:
        stored = manager.metadata(step).item_metadata["params"].tree
    except Exception as err:  # noqa: BLE001 - a missing item is a KeyError, a damaged one whatever Orbax raises
        raise CheckpointError(f"{where}: its params cannot be read ({type(err).__name__}: {err}). {damaged}") from err
    _check_shapes(config, stored["backbone"] if _is_task_model(stored) else stored, where)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
    try:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    except Exception as err:  # noqa: BLE001 - truncated or missing files: tensorstore's ValueError, OSError, ...
        raise CheckpointError(f"{where}: its params cannot be read ({type(err).__name__}: {err}). {damaged}") from err


def _is_task_model(tree: dict) -> bool:
    """Whether a checkpoint's `params` are a fine-tuning TaskModel's ({"backbone", "head"}), not a GPT1's."""
    return set(tree) == {"backbone", "head"}


def _model_config(metadata: dict, file: storage.Path) -> GPT1Config:
    if "model_config" not in metadata:
        raise CheckpointError(f"{file} has no model_config; not a gpt1_jax checkpoint.")
    try:
        return GPT1Config.from_dict(metadata["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: model_config is not a valid model config ({err}).") from err


def _check_shapes(config: GPT1Config, stored, where: str) -> None:
    """Refuse arrays the metadata's model config does not describe: leaves it has no place for or lacks (all
    named, as every weight reader does: `weight_files.name_mismatch`), then the first shape that differs.

    Without it a metadata file that disagrees with its arrays (edited, or copied from another run)
    fails later, deep inside Flax, with a shape error that names neither the checkpoint nor the key.
    """
    expected = jax.eval_shape(lambda: _params_of(GPT1(config, rngs=nnx.Rngs(0))))
    name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")  # noqa: E731
    want = {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    have = {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(stored)}
    if mismatch := name_mismatch(have, want, noun="parameter"):
        raise CheckpointError(
            f"{where}: its params do not fit the model its metadata's model_config describes ({config.to_dict()}): "
            f"{mismatch}. Use another step, or a checkpoint written by train.py or gpt1-convert.")
    for key in sorted(want):
        if want[key] != have[key]:
            raise CheckpointError(
                f"{where}: parameter {key} has shape {have[key]} in the arrays but {want[key]} by the metadata's "
                f"model_config {config.to_dict()}; the metadata does not describe these arrays. Use another step or "
                "the metadata the run wrote.")


class TrainCheckpointer:
    """Periodic asynchronous saves of the training state; restore of the latest usable step.

    Parameters and the rest of the training state (optimizer state, counters) are separate items,
    so fine-tuning reads `params` alone. The abstract trees given to `restore_latest` carry the
    target shardings, so a checkpoint saved on one mesh restores onto another. Opening it deletes, in
    the background and before its first save, the temporary folders of saves a killed process left
    incomplete; each would otherwise keep up to a whole checkpoint's worth of disk.

    It records what the run did with the folder, so an error can say which steps are trustworthy:
    `resumed_step` (restored by `restore_latest`), `resumed_verified` (its checksums matched) and
    `saved_steps` (written by this process, the last one possibly still in flight).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.directory = storage.path(directory)
        self.resumed_step: int | None = None
        self.resumed_verified = False
        self.saved_steps: list[int] = []
        try:
            self._manager = _manager(self.directory, max_to_keep=keep, async_save=async_save)
        except Exception as err:  # noqa: BLE001 - Orbax wraps OS errors in its own types
            raise CheckpointError(f"Cannot create or open the checkpoint directory {self.directory}: {err}") from err

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, train_state, metadata: dict[str, Any]) -> None:
        """Start writing `step`, with the checksums of its arrays; Orbax commits it by an atomic rename when complete.

        The previous save is waited for first (Orbax would anyway), so its failure names its own step.
        """
        sums = {"params": checksums(params), "train_state": checksums(train_state)}
        self.wait()
        self._check_space(step, (params, train_state))
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
                metadata=ocp.args.JsonSave({**metadata, CHECKSUMS: sums})), force=True)
        except Exception as err:  # noqa: BLE001 - Orbax wraps OS errors in its own types
            raise self._save_failed(f"checkpoint step {step}", err) from err
        self.saved_steps.append(step)

    def _check_space(self, step: int, arrays) -> None:
        """Refuse a save the disk has no room for, before Orbax's writer threads fail one by one on it.

        Single-process runs on a local disk only: with several processes each would judge its own disk,
        and one process refusing while the others save would leave them waiting for it; a bucket has no
        free space to ask for.
        """
        if jax.process_count() > 1 or storage.is_url(self.directory):
            return
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(arrays))
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"No room for checkpoint step {step} in {self.directory}: it needs about {needed / 1e6:,.0f} MB and "
                f"{free / 1e6:,.0f} MB are free. Earlier checkpoints are untouched; free space (or lower "
                "checkpoint.keep) and rerun.")

    def restore_latest(self, abstract_params, abstract_train_state):
        """(step, params, train_state) of the newest step that restores cleanly, or Nones for a fresh run.

        A step whose files are truncated, missing or changed since they were written (checksum
        mismatch), or whose metadata is unreadable, is renamed to `<step>.unusable-<time>` (kept for
        inspection, never loaded again) with a warning, and the previous one is tried, so a damaged
        checkpoint never strands the run.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    train_state=ocp.args.StandardRestore(abstract_train_state), metadata=ocp.args.JsonRestore()))
                if not isinstance(restored.metadata, dict):
                    raise CheckpointError(f"metadata holds {type(restored.metadata).__name__}, not a JSON object")
                self.resumed_verified = _verify(
                    restored.metadata, {"params": restored.params, "train_state": restored.train_state},
                    f"step {step}")
            except Exception as err:  # noqa: BLE001 - any unreadable step falls back to the previous one
                log.warning("Checkpoint step %d in %s is unusable (%s: %s); trying the previous one.",
                            step, self.directory, type(err).__name__, err)
                self._set_aside(step)
                continue
            self.resumed_step = step
            return step, restored.params, restored.train_state
        return None, None, None

    def metadata(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with `step` (a CheckpointError naming the file when unreadable)."""
        return _read_metadata(self._manager, step)

    def restore_params(self, step: int, abstract_params):
        """The parameters of `step` alone, checked against their saved checksums."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), metadata=ocp.args.JsonRestore()))
        _verify(restored.metadata, {"params": restored.params}, f"step {step} in {self.directory}")
        return restored.params

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
        """Block until the save in flight is written; a CheckpointError naming its step if that failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - errors of the asynchronous save surface here
            # The failed step is no longer one this run saved; none is listed when `save` itself raised.
            what = f"checkpoint step {self.saved_steps.pop()}" if self.saved_steps else "a checkpoint"
            raise self._save_failed(what, err) from err

    def _save_failed(self, what: str, err: Exception) -> CheckpointError:
        """One line: the step, the directory, the cause, and what to do on a disk or on a bucket."""
        cause = " ".join(str(err).split())[:300]
        remedy = (storage.remedy(err) if storage.is_url(self.directory) else "free space or fix permissions")
        return CheckpointError(f"Writing {what} to {self.directory} failed: {cause}. Earlier checkpoints are "
                               f"untouched; {remedy}, then rerun.")

    def close(self) -> None:
        """Wait for the last save, then close the manager even if that save failed (its error is raised after).

        Closing joins Orbax's save threads and closes its metadata stores in order; skipped, they were
        left to the interpreter's exit, where they still write and log after the run's error.
        """
        try:
            self.wait()
        finally:
            self._manager.close()

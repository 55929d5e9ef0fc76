"""Where the ConfigDict ends: the typed options a recipe hands to the code below it, built from its config.

`train_cli`, the recipes (`pretrain`, `finetune`) and `config_check` read the ConfigDict; the loop, the
optimizer and the data pipelines take the frozen dataclasses built here, once, after `config_check` has
validated the values they come from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

from ml_collections import ConfigDict

from gpt1_jax import config_check
from gpt1_jax.config_check import ConfigError
from gpt1_jax.finetuning import custom_task, task_inputs
from gpt1_jax.pretraining.lm_pipeline import LMDataOptions
from gpt1_jax.training import optim, train_lib


def optimizer_options(config: ConfigDict) -> optim.OptimizerOptions:
    return optim.OptimizerOptions(**config.optimizer.to_dict())


def loop_options(config: ConfigDict) -> train_lib.LoopOptions:
    return train_lib.LoopOptions(
        seed=config.seed, grad_accum_steps=config.train.grad_accum_steps, fsdp=config.mesh.fsdp,
        log_every=config.train.log_every, checkpoint_every=config.checkpoint.every, stop_at=config.train.stop_at,
        nonfinite=config.train.nonfinite, max_nonfinite_fraction=config.train.max_nonfinite_fraction,
        profile_steps=config_check.profile_window(config))


def lm_data_options(config: ConfigDict) -> LMDataOptions:
    data, train = config.data, config.train
    return LMDataOptions(
        source=data.source, n_ctx=config.model.n_ctx, vocab_size=config.model.vocab_size,
        batch_size=train.batch_size, eval_batch_size=train.eval_batch_size, eval_batches=train.eval_batches,
        seed=config.seed, val_fraction=data.val_fraction, tfds_data_dir=data.tfds_data_dir, vocab_dir=data.vocab_dir,
        cache_dir=data.cache_dir, shard_by_process=data.shard_by_process, allow_replacement=data.allow_replacement)


def task_data_options(config: ConfigDict) -> task_inputs.TaskDataOptions:
    """From `data.*` and, in a fine-tuning config, `finetune.*` (pre-training's zero-shot probes read splits only)."""
    data = config.data
    options = task_inputs.TaskDataOptions(source=data.task_source, tfds_data_dir=data.tfds_data_dir,
                                          vocab_dir=data.vocab_dir, seed=config.seed)
    finetune = config.get("finetune")
    if finetune is None:
        return options
    return dataclasses.replace(
        options, max_train_examples=finetune.max_train_examples, max_text_len=finetune.max_text_len,
        train_from_eval=finetune.train_from_eval, heldout_examples=finetune.heldout_examples,
        heldout_seed=finetune.heldout_seed)


def custom_task_options(config: ConfigDict) -> custom_task.CustomTaskOptions:
    return custom_task.CustomTaskOptions(**config.custom.to_dict())


@contextlib.contextmanager
def task_data_keys():
    """Re-raise what reading a task's data says in its own terms as a ConfigError naming the keys to change."""
    try:
        yield
    except task_inputs.TaskFileMissingError as err:
        tfds = (f", or use --config.data.task_source=tfds (TFDS {', '.join(err.tfds_names)}; data.tfds_data_dir "
                "says where its data is)") if err.tfds_names else ""
        raise ConfigError(f"{err}. Put the file there{tfds}.") from err
    except task_inputs.HeldOutSizeError as err:
        raise ConfigError(f"finetune.{err}") from err


def as_json(config: ConfigDict) -> dict:
    """The config's values as JSON, as the run's checkpoints and results record it."""
    return json.loads(config.to_json_best_effort())

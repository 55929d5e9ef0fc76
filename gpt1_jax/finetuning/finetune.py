"""Supervised fine-tuning (Sec. 3.2-3.3, 4.1 "Fine-tuning details"): starting points, the recipe, outputs.

The recipe of the paper and the released code: objective L3 = L2 + 0.5 * L1, the released Adam at
6.25e-5 with linear decay after a warm-up over 0.2% of training, batch 32, 3 epochs, weight decay 0.01,
clipping at 1. As in the released code (train.py), each epoch drops its last partial batch, so a run
takes (examples // batch) x epochs updates. The loop is pre-training's (`train_lib.run`) with the task
loss of `gpt1_jax.model.heads`, the epochs' batches and the task's evaluation plugged in. The order of each
epoch is a pure function of (seed, epoch) and dropout keys of (seed, step), so a run
killed at any point resumes from the workdir's `checkpoints` on the same batches. The dev split(s) are
scored with the task's metric after each epoch, at the released code's updates 1k, 2k, 4k, 8k, 16k and
32k of the first epoch (`finetune.eval_at`), and every `finetune.eval_every` steps; the best parameters
by the primary metric on the first evaluation split are kept in `best/`, and at the end they write the
GLUE-format test predictions, `results.json` and `results.md` (the paper's number beside ours).

Starting points (`init`: scratch, Orbax, Hugging Face, the OpenAI release) and layer transfer are
`finetune_start`'s; the GLUE prediction files and results.json are `finetune_results`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax import config_check, run_options, storage
from gpt1_jax.aot import measure
from gpt1_jax.config_check import ConfigError
from gpt1_jax.finetuning import custom_task, finetune_results, finetune_start, metrics, task_inputs, tasks
from gpt1_jax.finetuning.best_checkpoint import BestCheckpoint
from gpt1_jax.finetuning.task_inputs import TaskData
from gpt1_jax.model.heads import LM_SOFTMAX_ROWS, predictions, task_loss
from gpt1_jax.training import checkpoint, optim, sharding, train_lib, workdir_guard
from gpt1_jax.training.preemption import StopRequest
from gpt1_jax.training.run_log import RunLog

log = logging.getLogger(__name__)

TRAIN_KEYS = ("tokens", "mask", "classify_positions", "labels", "weights")  # what a train step's batch holds


def task_spec(config: ConfigDict) -> tasks.TaskSpec:
    """The registered task `config.task`, or the user's own (`task=custom`, from `config.custom`).

    A custom task's label set is written back into `custom.labels`, so the run's config.json records the
    mapping from the user's labels to the classifier's outputs.
    """
    if config.task == custom_task.NAME:
        try:
            spec = custom_task.task_spec(run_options.custom_task_options(config), config.data.tfds_data_dir or None)
        except custom_task.CustomTaskError as err:
            raise ConfigError(f"custom.{err}") from None
        if spec.label_names:
            config.custom.labels = ",".join(spec.label_names)
        return spec
    try:
        return dataclasses.replace(tasks.get_task(config.task), on_error=config.data.on_error)
    except ValueError as err:
        raise ConfigError(f"task={config.task!r}: {err} (or {custom_task.NAME!r}: your own files, "
                          "config.custom).") from None


def task_data(config: ConfigDict, spec: tasks.TaskSpec, n_ctx: int) -> task_inputs.TaskData:
    """The task's arrays for this run; a missing file or a bad held-out size is a ConfigError naming the key."""
    with run_options.task_data_keys():
        return task_inputs.load(run_options.task_data_options(config), spec, n_ctx)


def check_config(config: ConfigDict, devices=None) -> tasks.TaskSpec:
    """The task's spec once every key the run reads is valid; `devices`: the run's, when not this process's."""
    config_check.check_common(config, devices)
    spec = task_spec(config)
    ft = config.finetune
    if ft.epochs < 1:
        raise ConfigError(f"finetune.epochs={ft.epochs} must be >= 1.")
    if ft.lm_coef < 0:
        raise ConfigError(f"finetune.lm_coef={ft.lm_coef} must be >= 0 (0 switches the auxiliary LM loss off).")
    if ft.max_train_examples < 0 or ft.eval_every < 0:
        raise ConfigError("finetune.max_train_examples and finetune.eval_every must be >= 0 "
                          "(0: all examples / after each epoch only).")
    if ft.lm_softmax_rows not in LM_SOFTMAX_ROWS:
        raise ConfigError(f"finetune.lm_softmax_rows={ft.lm_softmax_rows!r}: use 'all' (the released code: "
                          "tokens, specials and positions) or 'tokens' (tokens and specials only).")
    if any(step < 1 for step in eval_steps_in_first_epoch(config)):
        raise ConfigError(f"finetune.eval_at={ft.eval_at!r}: give comma-separated update counts >= 1 "
                          "(the release evaluates at 1000,2000,4000,8000,16000,32000), or '' for none.")
    if config.optimizer.schedule != "warmup_linear":
        log.warning("optimizer.schedule=%s; the paper fine-tunes with warmup_linear.", config.optimizer.schedule)
    return spec


# ---------------------------------------------------------------- the recipe


def make_task_loss(config: ConfigDict, lm_target_slots: int = 0, device_count: int | None = None):
    """graphdef -> loss_fn(params, batch of TRAIN_KEYS, key): L3 = L2 + lm_coef * L1 (Sec. 3.2, Eq. 5).

    `lm_target_slots` (from `needed_lm_target_slots`) > 0 takes L1 on the real tokens alone; 0 on every position."""
    lm_coef, chunk, rows = float(config.finetune.lm_coef), config.train.loss_chunk, config.finetune.lm_softmax_rows
    shards = lm_target_shards(config, device_count)

    def make(graphdef):
        def loss_fn(params, batch, key):
            return task_loss(nnx.merge(graphdef, params), batch, key, lm_coef=lm_coef, lm_softmax_rows=rows,
                             loss_chunk=chunk, lm_target_slots=lm_target_slots, lm_target_shards=shards)

        return loss_fn

    return make


def lm_target_shards(config: ConfigDict, device_count: int | None = None) -> int:
    """The groups a (micro-)batch's rows fall into for L1's gather: one per device holding them, so each device
    gathers its own rows; 1 where the micro-batch does not split evenly over the `device_count` (default: all)."""
    micro = config.train.batch_size // config.train.grad_accum_steps
    devices = jax.device_count() if device_count is None else device_count
    return devices if micro % devices == 0 else 1


def needed_lm_target_slots(train: task_inputs.TaskArrays, config: ConfigDict) -> int:
    """How many positions per shard L1 scores: the most real next-token targets that any shard of any
    (micro-)batch of this run's training holds, rounded up to a multiple of 64 (0: every position, where
    that saves nothing or there is no L1).

    The batches are known before the run (`epoch_seed`), so the bound is exact, not a guess: a shard never
    holds more targets than the compiled step has room for, and a resumed run computes the same value.
    The micro-batches are the loop's (`train_lib.micro_batches`); each splits into `lm_target_shards` equal
    groups of consecutive rows, one per device.
    """
    if float(config.finetune.lm_coef) == 0.0:
        return 0
    counts = task_inputs.lm_target_counts(train)
    batch_size, accum, shards = config.train.batch_size, config.train.grad_accum_steps, lm_target_shards(config)
    most = 0
    for epoch in range(config.finetune.epochs):
        order = list(task_inputs.batch_indices(len(train), batch_size, shuffle=True,
                                               seed=epoch_seed(config.seed, epoch), drop_remainder=True))
        per_row = np.stack([train_lib.micro_batches(counts[rows], accum) for rows in order])  # [steps, accum, micro]
        per_shard = per_row.reshape(len(order), accum, shards, -1).sum(-1)
        most = max(most, int(per_shard.max()))
    positions = batch_size // accum // shards * train.tokens.shape[1] * (train.tokens.shape[2] - 1)
    slots = -(-most // 64) * 64
    return 0 if slots >= positions else slots


def train_batch(config: ConfigDict, spec: tasks.TaskSpec, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch without values: TRAIN_KEYS over `[batch, rows, seq]` token rows."""
    rows = (config.train.batch_size, spec.rows_per_example)
    labels = np.float32 if spec.kind == tasks.REGRESSION_SIMILARITY else np.int32
    shapes = {"tokens": (*rows, seq_len, np.int32), "mask": (*rows, seq_len, np.float32),
              "classify_positions": (*rows, np.int32), "labels": (rows[0], labels), "weights": (rows[0], np.float32)}
    return {key: jax.ShapeDtypeStruct(shape[:-1], shape[-1]) for key, shape in shapes.items()}


def compile_finetune(config, model_cfg, spec, optimizer, schedule, lm_target_slots: int = 0, *,
                     seq_len: int | None = None, devices=None) -> tuple[train_lib.Compiled, Callable]:
    """The sharded train step on L3 for a TaskModel, and the jitted eval step (predictions).

    `seq_len`: the padded context of the training rows (default `model_cfg.n_ctx`, the longest a task can
    have); `devices`: the mesh's, when not this process's (a TPU slice compiled for ahead of time).
    """
    batch = train_batch(config, spec, model_cfg.n_ctx if seq_len is None else seq_len)
    device_count = None if devices is None else len(devices)
    model = finetune_start.abstract_model(model_cfg, spec, config.finetune.clf_dropout)
    compiled = train_lib.compile_run(run_options.loop_options(config), model, optimizer, schedule,
                                     make_task_loss(config, lm_target_slots, device_count), batch, devices)

    def eval_step(params, tokens, classify_positions):
        outputs, _ = nnx.merge(compiled.graphdef, params)(tokens, classify_positions)
        return predictions(spec.kind, outputs)  # [batch]

    return compiled, jax.jit(eval_step, out_shardings=sharding.replicated(compiled.mesh))


def eval_steps_in_first_epoch(config: ConfigDict) -> set[int]:
    """The update counts of `finetune.eval_at` (comma-separated): extra evaluations in the first epoch.

    The released code also evaluates, and keeps the best parameters, after updates 1k, 2k, 4k, 8k, 16k
    and 32k of its first epoch: on the large tasks (MNLI, QQP, SNLI, QNLI) the best model can come early.
    """
    try:
        return {int(part) for part in str(config.finetune.eval_at).split(",") if part.strip()}
    except ValueError:
        raise ConfigError(f"finetune.eval_at={config.finetune.eval_at!r}: give comma-separated update counts, "
                          "e.g. 1000,2000,4000.") from None


def steps_per_epoch(n_train: int, config: ConfigDict) -> int:
    """Full batches in one epoch: the release drops the last partial one (`iter_data(..., truncate=True)`)."""
    steps = n_train // config.train.batch_size
    if steps < 1:
        raise ConfigError(f"train.batch_size={config.train.batch_size} exceeds the {n_train} training examples, so "
                          "an epoch has no full batch; lower train.batch_size or use more examples "
                          "(finetune.max_train_examples=0 takes all).")
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a pure function of (seed, epoch), so a resumed run sees the same order."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def evaluation_due(done: int, epoch_steps: int, first_epoch_evals: set[int], every: int) -> bool:
    """Whether update `done` is evaluated: each epoch's end, the first epoch's `eval_at` updates, every `every`."""
    return (done % epoch_steps == 0 or (done <= epoch_steps and done in first_epoch_evals)
            or bool(every and done % every == 0))


def evaluate_splits(eval_step, params, data: TaskData, config, mesh,
                    check_stop: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """{split: {metric: fraction}} for every labelled evaluation split; `check_stop()` runs before each batch."""
    batch = config.train.eval_batch_size
    return {split: metrics.compute(data.spec.metrics,
                                   finetune_results.predict(eval_step, params, arrays, batch, mesh, check_stop),
                                   arrays.labels)
            for split, arrays in data.evals.items()}


def epoch_batches(data: TaskData, config: ConfigDict, epoch_steps: int, start: int, mesh) -> Iterator[dict]:
    """The global training batches of updates start + 1 .. epochs x epoch_steps, epoch by epoch."""
    for epoch in range(start // epoch_steps, config.finetune.epochs):
        batches = task_inputs.batches(data.train, config.train.batch_size, shuffle=True,
                                      seed=epoch_seed(config.seed, epoch), drop_remainder=True)
        for i, batch in enumerate(batches):
            if epoch * epoch_steps + i >= start:
                yield sharding.global_batch(sharding.process_rows({k: batch[k] for k in TRAIN_KEYS}), mesh)


def finetune(config: ConfigDict, workdir: str) -> dict:
    """Fine-tune `config.task` from `config.init`; returns the results written to `results.json`."""
    workdir_path = storage.path(workdir)
    spec = check_config(config)
    model_cfg, initial, description = finetune_start.build_params(config, spec, config.seed)
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(workdir_guard.claim(workdir_path, config))  # locked until the run ends, any way
        data = task_data(config, spec, model_cfg.n_ctx)
        epoch_steps = steps_per_epoch(len(data.train), config)
        total_steps = config.finetune.epochs * epoch_steps
        early_evals = eval_steps_in_first_epoch(config)
        optimizer_options, loop = run_options.optimizer_options(config), run_options.loop_options(config)
        schedule = optim.learning_rate_schedule(optimizer_options, total_steps)
        optimizer = optim.make_optimizer(optimizer_options, total_steps, jax.eval_shape(lambda p: p, initial))
        seq_len = data.train.tokens.shape[2]
        compiled, eval_step = compile_finetune(config, model_cfg, spec, optimizer, schedule,
                                               needed_lm_target_slots(data.train, config), seq_len=seq_len)
        # On a TPU slice, stop here if the step does not fit: its context is the data's longest example, so the
        # memory it needs is known only once the data is read.
        compiled = measure.check_before_training(compiled)
        rolling = cleanup.enter_context(contextlib.closing(checkpoint.TrainCheckpointer(
            workdir_path / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)))
        # The host copy of the starting parameters (~0.5 GB for GPT-1) is handed to the train state once and
        # then dropped, so it does not stay alive for the whole run.
        handed_over = {"params": initial}
        del initial
        state, resumed = train_lib.restore_or_init(rolling, compiled, lambda: handed_over.pop("params"), optimizer)
        handed_over.clear()
        start = int(state.step)
        metadata = train_lib.run_metadata(run_options.as_json(config), model_cfg.to_dict(), data.tokenizer_identity,
                                          kind="finetune")
        best = cleanup.enter_context(contextlib.closing(BestCheckpoint(workdir_path, rolling, metadata,
                                                                       compiled.abstract_state)))
        run_log = cleanup.enter_context(contextlib.closing(RunLog(
            workdir_path, total_steps=total_steps, initial_step=start, description=f"fine-tune {spec.name}")))
        run_log.message(f"Starting point: {description}; {len(data.train)} training examples, {total_steps} steps.")
        if resumed:
            run_log.message(f"Resumed from step {start} in {rolling.directory}.")
        first_split = next(iter(data.evals))

        def evaluate(done: int, state: train_lib.TrainState, check_stop: Callable[[], None]) -> dict[str, float]:
            """The dev metrics when due; a new best by the first split's primary metric goes to `best/`."""
            if not evaluation_due(done, epoch_steps, early_evals, config.finetune.eval_every):
                return {}
            scores = evaluate_splits(eval_step, state.params, data, config, compiled.mesh, check_stop)
            train_lib.check_finite(state, loop, rolling)  # never keep a non-finite state as the best
            best.offer(done, state.params, scores, first_split, spec.primary_metric, epoch=done / epoch_steps)
            return {"val_metric": scores[first_split][spec.primary_metric],
                    **{f"{s}/{m}": v for s, d in scores.items() for m, v in d.items()}}

        recipe = train_lib.Recipe(
            total_steps=total_steps, evaluate=evaluate, metadata=metadata,
            batches=lambda first: contextlib.nullcontext(epoch_batches(data, config, epoch_steps, first,
                                                                       compiled.mesh)),
            save_due=lambda done: done % epoch_steps == 0)
        _, final = train_lib.run(loop, compiled, state, rolling, run_log, recipe)
        if "stopped_at" in final:
            return {"stopped_at": int(final["stopped_at"])}
        # A stop while the test predictions are written ends them at the next batch (`preemption.Interrupted`,
        # which train.py reports and exits 0 on): training is saved, and the rerun writes them.
        with StopRequest(f"writing the test predictions into {workdir_path} (training is finished and saved)") as stop:
            files = finetune_results.write_predictions(eval_step, best.restore(), data, config.train.eval_batch_size,
                                                       compiled.mesh, workdir_path, stop.check)
            return finetune_results.write_results(workdir_path, run_options.as_json(config), model_cfg.to_dict(),
                                                  spec, best.record, description, files)

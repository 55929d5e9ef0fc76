"""Supervised fine-tuning (Sec. 3.2-3.3, 4.1 "Fine-tuning details"): the loop, evaluation and outputs.

The recipe of the paper and the released code: objective L3 = L2 + 0.5 * L1, the released Adam at
6.25e-5 with linear decay after a warm-up over 0.2% of training, batch 32, 3 epochs, weight decay 0.01,
clipping at 1. As in the released code (train.py), each epoch drops its last partial batch, so a run
takes (examples // batch) x epochs updates. The train step is the pre-training one
(`train_lib.accumulate_gradients` / `guarded_update`, jit over a (data, fsdp) mesh) with the task loss.
The order of each epoch is a pure function of (seed, epoch) and dropout keys of (seed, step), so a run
killed at any point resumes from the workdir's `checkpoints` on the same batches. The dev split(s) are
scored with the task's metric after each epoch, at the released code's updates 1k, 2k, 4k, 8k, 16k and
32k of the first epoch (`finetune.eval_at`), and every `finetune.eval_every` steps; the best parameters
by the primary metric on the first evaluation split are kept in `best/`, and at the end they write the
GLUE-format test predictions, `results.json` and `results.md` (the paper's number beside ours).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Callable

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax import checkpoint, config_check, finetune_data, finetune_init, metrics, optim, sharding, tasks, train_lib
from gpt1_jax.config_check import ConfigError
from gpt1_jax.data import task_inputs
from gpt1_jax.preemption import StopRequest
from gpt1_jax.run_log import RunLog
from gpt1_jax.task_model import LM_SOFTMAX_ROWS, predictions, task_loss

log = logging.getLogger(__name__)

TRAIN_KEYS = {"tokens": 3, "mask": 3, "classify_positions": 2, "labels": 1, "weights": 1}  # name -> ndim
# GLUE submission file names (https://gluebenchmark.com/faq): <name>.tsv with `index\tprediction`.
GLUE_FILES = {("cola", "test"): "CoLA", ("sst2", "test"): "SST-2", ("mrpc", "test"): "MRPC",
              ("stsb", "test"): "STS-B", ("qqp", "test"): "QQP", ("mnli", "test_matched"): "MNLI-m",
              ("mnli", "test_mismatched"): "MNLI-mm", ("qnli", "test"): "QNLI", ("rte", "test"): "RTE",
              ("wnli", "test"): "WNLI"}


def check_config(config: ConfigDict) -> tasks.TaskSpec:
    config_check.check_common(config)
    try:
        spec = tasks.get_task(config.task)
    except ValueError as err:
        raise ConfigError(f"task={config.task!r}: {err}.") from None
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
    if config.train.eval_batch_size % jax.device_count():
        raise ConfigError(f"train.eval_batch_size={config.train.eval_batch_size} must be divisible by the "
                          f"{jax.device_count()} devices.")
    if config.optimizer.schedule != "warmup_linear":
        log.warning("optimizer.schedule=%s; the paper fine-tunes with warmup_linear.", config.optimizer.schedule)
    return spec


def make_train_step(graphdef, optimizer, schedule, config: ConfigDict):
    """(state, batch of TRAIN_KEYS) -> (state, metrics): one update on L3 (Sec. 3.2, Eq. 5)."""
    base_key = jax.random.key(config.seed)
    lm_coef, chunk, rows = float(config.finetune.lm_coef), config.train.loss_chunk, config.finetune.lm_softmax_rows

    def loss_fn(params, batch, key):
        return task_loss(nnx.merge(graphdef, params), batch, key, lm_coef=lm_coef, lm_softmax_rows=rows,
                         loss_chunk=chunk)

    def train_step(state: train_lib.TrainState, batch):
        key = jax.random.fold_in(jax.random.fold_in(base_key, 0), state.step)  # stream 0: dropout
        loss, aux, grads = train_lib.accumulate_gradients(loss_fn, state.params, batch,
                                                          config.train.grad_accum_steps, key)
        new_state, grad_norm = train_lib.guarded_update(state, grads, loss, optimizer, config.train.nonfinite)
        return new_state, {"loss": loss, **aux, "grad_norm": grad_norm, "lr": schedule(state.step)}

    return train_step


def compile_finetune(config, model_cfg, spec, optimizer, schedule) -> tuple[train_lib.Compiled, Callable]:
    """The sharded train step (as `train_lib.compile_run` builds it, for a TaskModel) and the eval step."""
    mesh = sharding.make_mesh(config.mesh)
    graphdef, abstract = nnx.split(finetune_init.abstract_model(model_cfg, spec, config.finetune.clf_dropout))
    abstract_state = jax.eval_shape(lambda p: train_lib.init_state(p, optimizer), nnx.to_pure_dict(abstract))
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh, ndim) for k, ndim in TRAIN_KEYS.items()}
    train_step = jax.jit(make_train_step(graphdef, optimizer, schedule, config),
                         in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)

    def eval_step(params, tokens, classify_positions):
        outputs, _ = nnx.merge(graphdef, params)(tokens, classify_positions)
        return predictions(spec.kind, outputs)  # [batch]

    eval_step = jax.jit(eval_step, out_shardings=sharding.replicated(mesh))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
    return train_lib.Compiled(graphdef, mesh, state_shardings, train_step, abstract_state), eval_step


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


def _local(batch: dict) -> dict:
    """This process's rows of a global batch (each process feeds its share to `sharding.global_batch`)."""
    n, count, index = len(next(iter(batch.values()))), jax.process_count(), jax.process_index()
    return {k: v[index * n // count:(index + 1) * n // count] for k, v in batch.items()}


def predict(eval_step, params, arrays: task_inputs.TaskArrays, config: ConfigDict, mesh) -> np.ndarray:
    """Predictions for every example of `arrays`, in order; batch padding is dropped."""
    out = []
    for batch in task_inputs.batches(arrays, config.train.eval_batch_size):
        inputs = _local({"tokens": batch["tokens"], "classify_positions": batch["classify_positions"]})
        result = eval_step(params, *sharding.global_batch((inputs["tokens"], inputs["classify_positions"]), mesh))
        out.append(np.asarray(jax.device_get(result))[batch["weights"] > 0])
    return np.concatenate(out)


def evaluate(eval_step, params, data: finetune_data.TaskData, config, mesh) -> dict[str, dict[str, float]]:
    """{split: {metric: fraction}} for every labelled evaluation split."""
    return {split: metrics.compute(data.spec.metrics, predict(eval_step, params, arrays, config, mesh), arrays.labels)
            for split, arrays in data.evals.items()}


def finetune(config: ConfigDict, workdir: str) -> dict:
    """Fine-tune `config.task` from `config.init`; returns the results written to `results.json`."""
    workdir_path = pathlib.Path(workdir)
    spec = check_config(config)
    model_cfg, initial, description = finetune_init.build_params(config, spec, config.seed)
    config_check.claim_workdir(workdir_path, config)
    data = finetune_data.load(config, spec, model_cfg.n_ctx)
    epoch_steps = steps_per_epoch(len(data.train), config)
    total_steps = config.finetune.epochs * epoch_steps
    early_evals = eval_steps_in_first_epoch(config)
    schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
    optimizer = optim.make_optimizer(config.optimizer, total_steps, jax.eval_shape(lambda p: p, initial))
    compiled, eval_step = compile_finetune(config, model_cfg, spec, optimizer, schedule)
    rolling = checkpoint.TrainCheckpointer(workdir_path / "checkpoints", keep=config.checkpoint.keep,
                                           async_save=config.checkpoint.async_save)
    best_dir = workdir_path / "best"
    best_ckpt = checkpoint.TrainCheckpointer(best_dir, keep=1, async_save=False)
    # The host copy of the starting parameters (~0.5 GB for GPT-1) is handed to the train state once and then
    # dropped, so it does not stay alive for the whole run.
    handed_over = {"params": initial}
    del initial
    state, resumed = train_lib.restore_or_init(rolling, compiled, lambda: handed_over.pop("params"), optimizer)
    handed_over.clear()
    start = int(state.step)
    best = checkpoint.read_metadata(best_dir)["best"] if best_ckpt.steps() else None
    metadata = train_lib.run_metadata(config, model_cfg, data.tokenizer_identity, kind="finetune")
    run_log = RunLog(workdir_path, total_steps=total_steps, initial_step=start, description=f"fine-tune {spec.name}")
    run_log.message(f"Starting point: {description}; {len(data.train)} training examples, {total_steps} steps.")
    if resumed:
        run_log.message(f"Resumed from step {start} in {rolling.directory}.")
    first_split = next(iter(data.evals))
    stopped = False
    try:
        with StopRequest() as stop:
            for epoch in range(start // epoch_steps, config.finetune.epochs):
                batches = task_inputs.batches(data.train, config.train.batch_size, shuffle=True,
                                              seed=epoch_seed(config.seed, epoch), drop_remainder=True)
                for i, batch in enumerate(batches):
                    done = epoch * epoch_steps + i + 1
                    if done <= start:
                        continue
                    inputs = sharding.global_batch(_local({k: batch[k] for k in TRAIN_KEYS}), compiled.mesh)
                    state, step_metrics = compiled.train_step(state, inputs)
                    run_log.advance()
                    if done % config.train.log_every == 0 or done == total_steps:
                        train_lib.check_finite(state, config, rolling)
                        run_log.write(done, {k: float(v) for k, v in jax.device_get(step_metrics).items()})
                    epoch_end = i + 1 == epoch_steps
                    if (epoch_end or (epoch == 0 and done in early_evals)
                            or (config.finetune.eval_every and done % config.finetune.eval_every == 0)):
                        scores = evaluate(eval_step, state.params, data, config, compiled.mesh)
                        primary = scores[first_split][spec.primary_metric]
                        run_log.write(done, {"val_metric": primary, **{f"{s}/{m}": v for s, d in scores.items()
                                                                       for m, v in d.items()}})
                        if best is None or primary > best["primary"]:
                            train_lib.check_finite(state, config, rolling)
                            best = {"primary": primary, "step": done, "epoch": done / epoch_steps, "dev": scores}
                            best_ckpt.save(done, state.params, {"step": state.step}, {**metadata, "best": best})
                    pause = done == config.train.stop_at
                    if jax.process_count() > 1 and rolling.reached_preemption(done):
                        stop.request("preemption notice")
                    if done % config.checkpoint.every == 0 or epoch_end or stop.requested or pause:
                        train_lib.check_finite(state, config, rolling)
                        rolling.save(done, state.params, state.rest(), metadata)
                    if pause or stop.requested:
                        rolling.wait()
                        reason = f"Paused at train.stop_at={done}" if pause else f"{stop.signal_name} at step {done}"
                        run_log.message(f"{reason} in {rolling.directory}; rerun the same command (without stop_at) "
                                        "to resume.")
                        stopped = True
                        break
                if stopped:
                    break
    finally:
        rolling.close()
        run_log.close()
    if stopped:
        best_ckpt.close()
        return {"stopped_at": done}
    _, best_params, _ = best_ckpt.restore_latest(compiled.abstract_state.params, {"step": compiled.abstract_state.step})
    best_ckpt.close()
    files = write_predictions(eval_step, best_params, data, config, compiled.mesh, workdir_path)
    return write_results(workdir_path, config, spec, best, description, files)


def write_predictions(eval_step, params, data, config, mesh, workdir: pathlib.Path) -> list[str]:
    """GLUE submission files for the unlabeled test split(s): `index\\tprediction`, label names or floats."""
    spec, written = data.spec, []
    for split, (arrays, uids) in data.predict.items():
        preds = predict(eval_step, params, arrays, config, mesh)
        name = GLUE_FILES.get((spec.name, split), f"{spec.name.replace('/', '_')}-{split}")
        lines = ["index\tprediction"]
        if spec.kind == tasks.REGRESSION_SIMILARITY:
            lines += [f"{uid}\t{float(p):.3f}" for uid, p in zip(uids, preds)]
        else:
            lines += [f"{uid}\t{spec.raw_labels[int(p)]}" for uid, p in zip(uids, preds)]
        if jax.process_index() == 0:
            path = workdir / "predictions" / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
            written.append(str(path.relative_to(workdir)))
    return written


def write_results(workdir: pathlib.Path, config, spec: tasks.TaskSpec, best: dict, description: str,
                  files: list[str]) -> dict:
    """results.json and results.md: the best dev scores beside the paper's numbers (Tables 2-4)."""
    results = {"task": spec.name, "metric": spec.primary_metric, "metrics": list(spec.metrics), "init": config.init,
               "starting_point": description, "best_step": best["step"], "best_epoch": best["epoch"],
               "dev": best["dev"], "paper": dict(spec.paper), "predictions": files,
               "config": json.loads(config.to_json_best_effort())}
    rows = ["| task | split | metric | ours | paper | starting point |", "|---|---|---|---:|---:|---|"]
    for split, scores in best["dev"].items():
        paper = spec.paper.get(split)
        rows.append(f"| {spec.name} | {split} | {spec.primary_metric} | {100 * scores[spec.primary_metric]:.1f} | "
                    f"{'-' if paper is None else f'{paper:.1f}'} | {description} |")
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (workdir / "results.md").write_text("\n".join(rows) + "\n")
    log.info("Results (best at step %d):\n%s", best["step"], "\n".join(rows))
    return results

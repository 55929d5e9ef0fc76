"""A run's real steps compiled for a TPU slice: `compile_for_topology(config, topology) -> CompileReport`.

The steps are the recipes' own, built by the functions the training loop builds them with
(`pretrain.compile_pretraining`, `finetune.compile_finetune`) on a mesh over the slice's chips, so
the report describes the program a launch would run:
- pre-training: the train step on `[batch, n_ctx + 1]` windows, and validation's evaluation step;
- fine-tuning (any task, `custom` included): the L3 train step and the prediction step on
  `[batch, rows, n_ctx]` token rows. A run's context is its longest example, known only once its data
  is read, so the full context is compiled, with L1 on every position: no task can need more.
  The model's sizes come from `init`'s metadata (config.json, params_shapes.json, or the Orbax
  checkpoint's), no weights are read; a custom task without `custom.labels` reads its label set
  from the training file.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax import config_check, run_options
from gpt1_jax.aot import measure, slices
from gpt1_jax.aot.measure import BATCH, PARAMETERS, Step, StepReport
from gpt1_jax.finetuning import finetune, finetune_start
from gpt1_jax.model.transformer import GPT1Config
from gpt1_jax.pretraining import pretrain
from gpt1_jax.training import optim, sharding

log = logging.getLogger(__name__)

# Fine-tuning's length is set by its data (examples // batch x epochs); only the schedule's constants use it.
FINETUNE_STEPS_FOR_SCHEDULE = 1000


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What a run would be on a slice: the slice, the mesh, the shapes, and each step compiled for it."""

    slice: slices.TpuSlice
    run: str  # "pre-training" or "fine-tuning TASK"
    mesh: dict[str, int]  # {"data": ..., "fsdp": ...}
    shapes: str
    steps: tuple[StepReport, ...]

    @property
    def fits(self) -> bool:
        return all(step.fits for step in self.steps)


def compile_for_topology(config: ConfigDict, topology: str | slices.TpuSlice,
                         only: tuple[str, ...] | None = None) -> CompileReport:
    """Compile the run `config` describes for the TPU slice `topology` (a name, or a resolved slice).

    `only`: the names of the steps to compile ("train step", "eval step"), all by default. Bad input
    (a slice name, a mesh that does not divide it, a batch that does not divide over its chips) is a
    `UserError` naming what to change.
    """
    tpu = slices.resolve(topology) if isinstance(topology, str) else topology
    build = _pretraining_steps if config.mode == "pretrain" else _finetuning_steps
    run, shapes, mesh, steps = build(config, tpu)
    reports = []
    for step in steps:
        if only is None or step.name in only:
            log.info("Compiling the %s for %s ...", step.name, tpu.topology)
            reports.append(measure.compile_step(step, tpu.hbm_bytes, loadable=False)[0])
    return CompileReport(tpu, run, {axis: int(size) for axis, size in mesh.shape.items()}, shapes, tuple(reports))


def _pretraining_steps(config: ConfigDict, tpu: slices.TpuSlice):
    config_check.check_pretrain(config, tpu.devices)
    model_cfg = pretrain.model_config(config)
    total = config.train.num_steps
    abstract_params = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    options = run_options.optimizer_options(config)
    optimizer = optim.make_optimizer(options, total, abstract_params)
    compiled = pretrain.compile_pretraining(config, model_cfg, optimizer, optim.learning_rate_schedule(options, total),
                                            tpu.devices)
    n_ctx, batch = model_cfg.n_ctx, config.train.batch_size
    flops = pretrain.train_flops_per_token(model_cfg, n_ctx) * batch * n_ctx / tpu.chips
    steps = [measure.train_step(compiled, flops)]
    if config.train.eval_every:
        eval_batch = config.train.eval_batch_size
        windows = _on_data_axes(compiled.mesh, (eval_batch, n_ctx + 1), jnp.int32)  # [batch, n_ctx + 1]
        weights = _on_data_axes(compiled.mesh, (eval_batch,), jnp.float32)  # [batch]
        flops = pretrain.forward_flops_per_token(model_cfg, n_ctx) * eval_batch * n_ctx / tpu.chips
        steps.append(_eval_step(jax.jit(pretrain.make_lm_eval_step(compiled.graphdef, config)), compiled,
                                (windows, weights), flops))
    micro = batch // config.train.grad_accum_steps // tpu.chips
    shapes = (f"batch {batch} x {n_ctx + 1} tokens ({micro} per chip per micro-batch, grad_accum_steps "
              f"{config.train.grad_accum_steps}), {_model_summary(model_cfg)}")
    return "pre-training", shapes, compiled.mesh, steps


def _finetuning_steps(config: ConfigDict, tpu: slices.TpuSlice):
    spec = finetune.check_config(config, tpu.devices)
    model_cfg = finetune_start.init_model_config(config)
    abstract = finetune_start.abstract_model(model_cfg, spec, config.finetune.clf_dropout)
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    total = FINETUNE_STEPS_FOR_SCHEDULE
    options = run_options.optimizer_options(config)
    optimizer = optim.make_optimizer(options, total, params)
    compiled, eval_step = finetune.compile_finetune(
        config, model_cfg, spec, optimizer, optim.learning_rate_schedule(options, total), devices=tpu.devices)
    rows, n_ctx, batch = spec.rows_per_example, model_cfg.n_ctx, config.train.batch_size
    lm_head = float(config.finetune.lm_coef) > 0
    per_token = 3 * pretrain.forward_flops_per_token(model_cfg, n_ctx, lm_head=lm_head)
    steps = [measure.train_step(compiled, per_token * batch * rows * n_ctx / tpu.chips)]
    eval_batch = config.train.eval_batch_size
    tokens = _on_data_axes(compiled.mesh, (eval_batch, rows, n_ctx), jnp.int32)  # [batch, rows, seq]
    positions = _on_data_axes(compiled.mesh, (eval_batch, rows), jnp.int32)  # [batch, rows]
    flops = pretrain.forward_flops_per_token(model_cfg, n_ctx, lm_head=False) * eval_batch * rows * n_ctx / tpu.chips
    steps.append(_eval_step(eval_step, compiled, (tokens, positions), flops))
    micro = batch // config.train.grad_accum_steps // tpu.chips
    shapes = (f"batch {batch} x {rows} row{'s' if rows > 1 else ''} x {n_ctx} tokens ({micro} examples per chip per "
              f"micro-batch, grad_accum_steps {config.train.grad_accum_steps}; the full context, L1 on every "
              f"position: the most any data can need), {_model_summary(model_cfg)}")
    return f"fine-tuning {spec.name} ({spec.kind})", shapes, compiled.mesh, steps


def _eval_step(function, compiled, inputs: tuple, model_flops: float) -> Step:
    """An evaluation step: (parameters, *inputs), the parameters placed as the train state holds them."""
    params = compiled.abstract_state.params
    kinds = (jax.tree.map(lambda _: PARAMETERS, params), *(BATCH for _ in inputs))
    return Step("eval step", function, (params, *inputs), kinds, model_flops)


def _on_data_axes(mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _model_summary(cfg: GPT1Config) -> str:
    return (f"{cfg.n_layer} x {cfg.width} model, {cfg.dtype}, remat {cfg.remat}, "
            f"layers {cfg.layers}, attention {cfg.attention}")

"""Generative pre-training (objective L1, Sec. 3.1): the sharded train step and the loop.

The train step is one `jax.jit` over global arrays placed on a (data, fsdp) mesh: no pmap, no
per-step device-to-host transfer (metrics are fetched at logging steps only), buffers donated.
Dropout keys and batches are pure functions of (seed, step), so a run killed at any point and
restarted from its latest checkpoint reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax import checkpoint, config_check, optim, sharding
from gpt1_jax.losses import lm_loss_sum
from gpt1_jax.model import GPT1, GPT1Config
from gpt1_jax.preemption import StopRequest
from gpt1_jax.run_log import RunLog
from gpt1_jax.zeroshot_tracking import ZeroShotTracker

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or the gradients stopped being finite."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates applied
    params: Any  # pure dict of float32 arrays
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 []: updates skipped because loss or gradients were not finite
    first_nonfinite_step: jax.Array  # int32 []: -1 until the first such step

    def rest(self) -> dict:
        """Everything but the parameters, the `train_state` checkpoint item."""
        return {"step": self.step, "opt_state": self.opt_state, "nonfinite_steps": self.nonfinite_steps,
                "first_nonfinite_step": self.first_nonfinite_step}


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32), first_nonfinite_step=jnp.full((), -1, jnp.int32))


def guarded_update(state: TrainState, grads, loss, optimizer, nonfinite: str) -> tuple[TrainState, jax.Array]:
    """Apply the optimizer unless the loss or the gradients are not finite.

    A non-finite step never changes the parameters, so the bad state can never be checkpointed;
    `nonfinite="stop"` makes the host raise at its next check, "skip" counts and carries on.
    """
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    bad = (~finite).astype(jnp.int32)
    first = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           nonfinite_steps=state.nonfinite_steps + bad, first_nonfinite_step=first)
    return new_state, grad_norm


def accumulate_gradients(loss_fn: Callable, params, batch, accum: int, key):
    """Mean loss and gradients over `accum` micro-batches of the batch's leading axis.

    Rows are grouped so each device keeps its own rows: row r goes to micro-batch r % accum.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(params, batch, key)
        return loss, aux, grads
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, xs):
        index, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, key)))
    (loss, aux), grads = zeros
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (jnp.arange(accum), micro))
    return loss / accum, jax.tree.map(lambda a: a / accum, aux), jax.tree.map(lambda g: g / accum, grads)


def make_lm_train_step(graphdef, optimizer, schedule, config: ConfigDict):
    """(state, tokens [batch, n_ctx + 1]) -> (state, metrics); tokens sharded over the data axes."""
    base_key = jax.random.key(config.seed)
    chunk = config.train.loss_chunk

    def loss_fn(params, tokens, key):
        model = nnx.merge(graphdef, params)
        hidden = model(tokens[:, :-1], dropout_key=key)  # [batch, n_ctx, width]
        total, count = lm_loss_sum(model, hidden, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape),
                                   table=model.head_table(dropout_key=key), chunk=chunk)
        return total / count, None

    def train_step(state: TrainState, tokens):
        key = jax.random.fold_in(jax.random.fold_in(base_key, 0), state.step)  # stream 0: dropout
        loss, _, grads = accumulate_gradients(loss_fn, state.params, tokens, config.train.grad_accum_steps, key)
        new_state, grad_norm = guarded_update(state, grads, loss, optimizer, config.train.nonfinite)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}

    return train_step


def make_lm_eval_step(graphdef, config: ConfigDict):
    """(params, tokens [batch, n_ctx + 1], weights [batch]) -> (sum NLL, number of tokens)."""

    def eval_step(params, tokens, weights):
        model = nnx.merge(graphdef, params)
        hidden = model(tokens[:, :-1])
        token_weights = jnp.broadcast_to(weights[:, None], tokens[:, 1:].shape)
        return lm_loss_sum(model, hidden, tokens[:, 1:], token_weights, chunk=config.train.loss_chunk)

    return eval_step


def train_flops_per_token(cfg: GPT1Config, seq: int) -> float:
    """Model FLOPs of forward + backward per token (3 x forward), counting matmuls only."""
    per_layer = 2 * (3 * cfg.width**2 + cfg.width**2 + 2 * cfg.width * cfg.mlp_width) + 2 * 2 * seq * cfg.width
    forward = cfg.n_layer * per_layer + 2 * cfg.width * cfg.n_vocab
    return 3.0 * forward


PEAK_FLOPS = {  # bfloat16 dense peak per device; used for MFU when train.peak_flops is 0.
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops(config: ConfigDict) -> float:
    if config.train.peak_flops > 0:
        return config.train.peak_flops * jax.device_count()
    kind = jax.devices()[0].device_kind
    return PEAK_FLOPS.get(kind, math.nan) * jax.device_count()


@dataclasses.dataclass
class Compiled:
    """The model graph, mesh, shardings and jitted functions of one run."""

    graphdef: Any
    mesh: jax.sharding.Mesh
    state_shardings: Any
    train_step: Callable
    abstract_state: TrainState


def compile_run(config: ConfigDict, model_cfg: GPT1Config, optimizer, schedule, make_step) -> Compiled:
    """Shapes, shardings and the jitted step for `model_cfg` on the configured mesh."""
    mesh = sharding.make_mesh(config.mesh)
    abstract_model = nnx.eval_shape(lambda: GPT1(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    step_fn = make_step(graphdef, optimizer, schedule, config)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
    return Compiled(graphdef, mesh, state_shardings, train_step, abstract_state)


def initial_params(model_cfg: GPT1Config, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(GPT1(model_cfg, rngs=nnx.Rngs(params=seed))))


def place_state(params, optimizer, compiled: Compiled) -> TrainState:
    """Initial TrainState laid out on the mesh (parameters given on the host)."""
    init = jax.jit(lambda p: init_state(p, optimizer), out_shardings=compiled.state_shardings)
    return init(jax.tree.map(jnp.asarray, params))


def restore_or_init(checkpointer: checkpoint.TrainCheckpointer, compiled: Compiled, make_params: Callable,
                    optimizer) -> tuple[TrainState, bool]:
    """The latest usable checkpoint of the workdir, else a fresh state from `make_params()`."""
    abstract = compiled.abstract_state
    step, params, rest = checkpointer.restore_latest(abstract.params, abstract.rest())
    if step is None:
        return place_state(make_params(), optimizer, compiled), False
    return TrainState(params=params, **rest), True


def check_finite(state: TrainState, config: ConfigDict, checkpointer: checkpoint.TrainCheckpointer) -> int:
    """Raise (mode "stop") naming the first bad step and the last good checkpoint; return the count."""
    bad = int(state.nonfinite_steps)
    if bad and config.train.nonfinite == "stop":
        good = checkpointer.steps()
        raise NonFiniteError(
            f"Loss or gradients were not finite at step {int(state.first_nonfinite_step) + 1}; that update was not "
            f"applied and nothing after it was saved. Last good checkpoint: "
            f"{f'step {good[-1]} in {checkpointer.directory}' if good else 'none'}. Lower optimizer.lr, check the "
            "data, or set train.nonfinite=skip to skip such steps.")
    return bad


def run_metadata(config: ConfigDict, model_cfg: GPT1Config, tokenizer_identity: str, kind: str) -> dict:
    return {"model_config": model_cfg.to_dict(), "tokenizer": tokenizer_identity, "kind": kind,
            "config": json.loads(config.to_json_best_effort())}


def pretrain(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Pre-train with objective L1 until `train.num_steps`; resumes from the workdir's latest checkpoint."""
    from gpt1_jax.data.lm_pipeline import LMData

    workdir_path = pathlib.Path(workdir)
    model_cfg = config_check.model_config(config)
    config_check.check_pretrain(config, model_cfg)
    config_check.claim_workdir(workdir_path, config)
    data = LMData.build(config)
    probes = ZeroShotTracker(config, data.tokenizer)
    total_steps = config.train.num_steps
    schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
    abstract_params = jax.eval_shape(lambda: initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(config.optimizer, total_steps, abstract_params)
    compiled = compile_run(config, model_cfg, optimizer, schedule, make_lm_train_step)
    eval_step = jax.jit(make_lm_eval_step(compiled.graphdef, config))
    checkpointer = checkpoint.TrainCheckpointer(workdir_path / "checkpoints", keep=config.checkpoint.keep,
                                                async_save=config.checkpoint.async_save)
    state, resumed = restore_or_init(checkpointer, compiled, lambda: initial_params(model_cfg, config.seed), optimizer)
    start = int(state.step)
    metadata = run_metadata(config, model_cfg, data.tokenizer.fingerprint, kind="pretrain")
    run_log = RunLog(workdir_path, total_steps=total_steps, initial_step=start, description="pre-train")
    if resumed:
        run_log.message(f"Resumed from step {start} in {checkpointer.directory}.")
    run_log.message(f"Unigram baseline perplexity on validation: {data.unigram_perplexity:.1f}")
    flops = train_flops_per_token(model_cfg, model_cfg.n_ctx) * config.train.batch_size * model_cfg.n_ctx
    final: dict[str, float] = {}
    try:
        with StopRequest() as stop, data.batches(start, total_steps) as batches:
            last_time, last_step = time.perf_counter(), start
            for step, local_tokens in batches:
                state, metrics = compiled.train_step(state, sharding.global_batch(local_tokens, compiled.mesh))
                done = step + 1
                run_log.advance()
                if done % config.train.log_every == 0 or done == total_steps:
                    check_finite(state, config, checkpointer)
                    now = time.perf_counter()
                    seconds_per_step = (now - last_time) / (done - last_step)
                    last_time, last_step = now, done
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    scalars["perplexity"] = math.exp(min(scalars["loss"], 50.0))
                    scalars["tokens_per_s"] = config.train.batch_size * model_cfg.n_ctx / seconds_per_step
                    scalars["mfu"] = flops / seconds_per_step / peak_flops(config)
                    scalars["nonfinite_steps"] = float(state.nonfinite_steps)
                    run_log.write(done, scalars)
                    final.update(scalars)
                if config.train.eval_every and (done % config.train.eval_every == 0 or done == total_steps):
                    val = evaluate_lm(eval_step, state.params, data, compiled.mesh)
                    run_log.write(done, val)
                    final.update(val)
                if probes.due(done):
                    scores = probes.evaluate(compiled.graphdef, state.params)
                    run_log.write(done, scores)
                    final.update(scores)
                pause = done == config.train.stop_at
                if jax.process_count() > 1 and checkpointer.reached_preemption(done):
                    stop.request("preemption notice")
                if done % config.checkpoint.every == 0 or done == total_steps or stop.requested or pause:
                    check_finite(state, config, checkpointer)
                    checkpointer.save(done, state.params, state.rest(), metadata)
                if pause:
                    run_log.message(f"Paused at train.stop_at={done}; rerun the command without it to go on.")
                    break
                if stop.requested:
                    checkpointer.wait()
                    run_log.message(f"{stop.signal_name}: saved step {done} to {checkpointer.directory}; "
                                    "rerun the same command to resume.")
                    final["stopped_at"] = float(done)
                    break
    finally:
        checkpointer.close()
        run_log.close()
    return final


def evaluate_lm(eval_step, params, data, mesh) -> dict[str, float]:
    """Validation loss and perplexity over the fixed held-out windows."""
    total, count = 0.0, 0.0
    for batch in data.validation:
        nll, n = eval_step(params, *sharding.global_batch((batch.tokens, batch.weights), mesh))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

"""The training loop both recipes share: one sharded jit step, the guarded update, and `run`.

Pre-training (`gpt1_jax.pretraining.pretrain`, objective L1) and fine-tuning (`gpt1_jax.finetuning.finetune`,
L3) differ only in their loss, their batches and their evaluation. Each plugs those into a `Recipe`; compiling with
shardings and donation, gradient accumulation, the non-finite guard, logging, checkpoints, SIGTERM and
multi-host preemption notices, pauses (`train.stop_at`) and profiling (`train.profile_steps`) live here once.

The train step is one `jax.jit` over global arrays placed on a (data, fsdp) mesh: no pmap, no
per-step device-to-host transfer (metrics are fetched at logging steps only), buffers donated.
Dropout keys and batches are pure functions of (seed, step), so a run killed at any point and
restarted from its latest checkpoint reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, ContextManager, Iterator

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt1_jax.errors import UserError
from gpt1_jax.training import checkpoint, sharding
from gpt1_jax.training.preemption import Interrupted, StopRequest
from gpt1_jax.training.run_log import RunLog

# loss_fn(params, batch, dropout_key) -> (scalar loss, {name: scalar}), averaged over the batch's rows.
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]

# Metadata key of a step saved by a stop that interrupted its evaluation: the next start evaluates it first.
EVALUATION_PENDING = "evaluation_pending"


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradients stopped being finite."""


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How `run` carries out a recipe's updates; the recipes build it from their config (`train.*`,
    `checkpoint.every`, `mesh.fsdp`, `seed`), whose names the remedies in this module's messages use."""

    seed: int  # dropout keys are (seed, step)
    grad_accum_steps: int  # micro-batches a global batch is split into
    fsdp: int  # devices per parameter-sharding group of the (data, fsdp) mesh
    log_every: int
    checkpoint_every: int
    stop_at: int = 0  # save and return after this update (0: never)
    nonfinite: str = "stop"  # a non-finite update: "stop" (raise) or "skip" (counted)
    max_nonfinite_fraction: float = 0.1  # with "skip": fail at the end past this fraction of skipped updates
    profile_steps: tuple[int, int] | None = None  # (first, last) update to trace


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


def guarded_update(state: TrainState, grads, loss, optimizer) -> tuple[TrainState, jax.Array]:
    """Apply the optimizer unless the loss or the gradients are not finite.

    A non-finite step never changes the parameters, so the bad state can never be checkpointed; the
    host decides at its next check whether to stop (`train.nonfinite="stop"`) or carry on ("skip").
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


def micro_batches(rows, accum: int):
    """rows [batch, ...] -> [accum, batch // accum, ...], the micro-batches the loop accumulates over.

    Row r goes to micro-batch r % accum, so a device's rows of a data-parallel batch stay on it (no data
    moves). The one place this layout is written: a recipe that must know which rows share a micro-batch
    (fine-tuning sizes L1's gather by it) calls this too.
    """
    return rows.reshape(rows.shape[0] // accum, accum, *rows.shape[1:]).swapaxes(0, 1)


def accumulate_gradients(loss_fn: LossFn, params, batch, accum: int, key):
    """Mean loss, aux and gradients over the `accum` micro-batches of the batch (`micro_batches`)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(params, batch, key)
        return loss, aux, grads
    micro = jax.tree.map(lambda x: micro_batches(x, accum), batch)

    def body(carry, xs):
        index, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, key)))
    (loss, aux), grads = zeros
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (jnp.arange(accum), micro))
    return loss / accum, jax.tree.map(lambda a: a / accum, aux), jax.tree.map(lambda g: g / accum, grads)


def make_train_step(loss_fn: LossFn, optimizer, schedule, loop: LoopOptions, mesh: jax.sharding.Mesh | None = None):
    """(state, batch) -> (state, metrics): one guarded update on `loss_fn`, dropout keyed by (seed, step).

    Traced under `mesh` (its abstract form), so code that must know it can: the fused attention kernels run
    on each device's rows of the batch, and choose how to compile by the mesh's platform.
    """
    base_key = jax.random.key(loop.seed)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.fold_in(base_key, 0), state.step)  # stream 0: dropout
        with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, loop.grad_accum_steps, key)
        new_state, grad_norm = guarded_update(state, grads, loss, optimizer)
        return new_state, {"loss": loss, **aux, "grad_norm": grad_norm, "lr": schedule(state.step)}

    return train_step


@dataclasses.dataclass
class Compiled:
    """The model graph, mesh, shardings and jitted train step of one run.

    `abstract_state` and `abstract_batch` are the step's arguments without values, placed on the mesh:
    `lower()` traces the step for them, which is how it is compiled ahead of time (`gpt1_jax.aot`).
    """

    graphdef: Any
    mesh: jax.sharding.Mesh
    state_shardings: Any
    train_step: Callable
    abstract_state: TrainState
    abstract_batch: Any

    def lower(self) -> jax.stages.Lowered:
        return self.train_step.trace(self.abstract_state, self.abstract_batch).lower()


def compile_run(loop: LoopOptions, abstract_model: nnx.Module, optimizer, schedule,
                make_loss: Callable[[Any], LossFn], batch, devices=None) -> Compiled:
    """Shapes, shardings and the jitted, donating train step for a model given without values.

    make_loss(graphdef) builds the recipe's loss; `batch` is the global batch as a pytree of
    `jax.ShapeDtypeStruct`, each array split over the data axes on its leading dimension. `devices`:
    the mesh's, when not this process's (a TPU slice compiled for ahead of time).
    """
    mesh = sharding.make_mesh(loop.fsdp, devices)
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), nnx.to_pure_dict(abstract_params))
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, len(x.shape)), batch)
    train_step = jax.jit(make_train_step(make_loss(graphdef), optimizer, schedule, loop, mesh),
                         in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    placed = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    return Compiled(graphdef, mesh, state_shardings, train_step, placed(abstract_state, state_shardings),
                    placed(batch, batch_shardings))


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


def check_finite(state: TrainState, loop: LoopOptions, checkpointer: checkpoint.TrainCheckpointer) -> int:
    """Raise (mode "stop") naming the first bad step and what the newest checkpoint is; return the count.

    A non-finite update right after a restore points at the checkpoint rather than the learning rate,
    so the message then says how to fall back to the step before it. Otherwise it calls the newest step
    good only when this run wrote it (its updates were finite up to then) and says what is known of it
    when the run merely found it there.
    """
    bad = int(state.nonfinite_steps)
    if not bad or loop.nonfinite != "stop":
        return bad
    first = int(state.first_nonfinite_step) + 1
    directory, resumed = checkpointer.directory, checkpointer.resumed_step
    checked = "its checksums matched" if checkpointer.resumed_verified else "it has no checksums to verify"
    if resumed is not None and first == resumed + 1:
        raise NonFiniteError(
            f"Loss or gradients were not finite at step {first}, the first update after resuming from checkpoint "
            f"step {resumed} in {directory} ({checked}): that checkpoint may be bad. Move {directory / str(resumed)} "
            "aside and rerun to resume from the step before it, or pass --config.start_over=True to start afresh; if "
            "the next run fails the same way, lower optimizer.lr or check the data.")
    steps = checkpointer.steps()
    if not steps:
        newest = "No checkpoint saved yet"
    elif steps[-1] in checkpointer.saved_steps:
        newest = f"Last good checkpoint: step {steps[-1]} in {directory}, saved by this run before that update"
    elif steps[-1] == resumed:
        newest = f"Newest checkpoint: step {resumed} in {directory}, the one this run resumed from ({checked})"
    else:
        newest = f"Newest checkpoint: step {steps[-1]} in {directory}, neither restored nor written by this run"
    raise NonFiniteError(
        f"Loss or gradients were not finite at step {first}; that update was not applied and nothing after it was "
        f"saved. {newest}. Lower optimizer.lr, check the data, or set train.nonfinite=skip to skip such steps.")


def report_skipped(state: TrainState, loop: LoopOptions, run_log: RunLog) -> None:
    """Say how many updates `train.nonfinite=skip` skipped; fail past `train.max_nonfinite_fraction` of them.

    A run that skipped most of its updates exits 0 otherwise, with parameters that barely trained.
    """
    bad, steps = int(state.nonfinite_steps), int(state.step)
    if not bad:
        return
    run_log.message(f"Warning: {bad} of {steps} updates had a non-finite loss or gradient and were skipped "
                    "(train.nonfinite=skip).")
    if bad > loop.max_nonfinite_fraction * steps:
        raise NonFiniteError(
            f"{bad} of {steps} updates ({bad / steps:.0%}) were skipped as non-finite, more than "
            f"train.max_nonfinite_fraction={loop.max_nonfinite_fraction}: the model hardly trained. Lower "
            "optimizer.lr, check the data, or raise train.max_nonfinite_fraction.")


def run_metadata(run_config: dict, model_config: dict, tokenizer_identity: str, kind: str) -> dict:
    """What every checkpoint of a run records beside its arrays (read by fine-tuning and the report):
    `run_config` is the run's whole config as JSON values."""
    return {"model_config": model_config, "tokenizer": tokenizer_identity, "kind": kind, "config": run_config}


@dataclasses.dataclass
class Recipe:
    """What a recipe plugs into `run`.

    batches(start): a context manager over the global batches of updates start + 1 .. total_steps.
    evaluate(done, state, check_stop): scalars to log after update `done`, {} when no evaluation is due. It
        calls check_stop() between its batches, which raises `preemption.Interrupted` at a stop request: the
        loop then saves the step without its evaluation and the next start evaluates it first.
    derived(scalars, seconds_per_step): scalars computed from a logged step's metrics and the time per
        update (perplexity, tokens/s, MFU), logged beside them.
    save_due(done): checkpoints besides every `checkpoint.every` steps, the last step, stops and pauses.
    """

    total_steps: int
    batches: Callable[[int], ContextManager[Iterator[Any]]]
    evaluate: Callable[[int, TrainState, Callable[[], None]], dict[str, float]]
    metadata: dict
    derived: Callable[[dict, float], dict[str, float]] = lambda scalars, seconds_per_step: {}
    save_due: Callable[[int], bool] = lambda done: False


class StepProfiler:
    """A `jax.profiler` trace of updates first..last (`train.profile_steps`), for TensorBoard's Profile tab.

    The trace goes under the run's TensorBoard folder, beside the scalars, so `tensorboard --logdir
    WORKDIR/tensorboard` shows both. Compilation happens at the first step of a (re)start, so profile
    later steps to see the steady state.
    """

    def __init__(self, steps: tuple[int, int] | None, log_dir: str):
        self.steps, self.log_dir, self.active = steps, log_dir, False

    def before(self, done: int) -> None:
        if self.steps and done == self.steps[0]:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, done: int, result) -> None:
        if self.active and done == self.steps[1]:
            self.stop(result)

    def stop(self, result=None) -> None:
        if self.active:
            jax.block_until_ready(result)
            jax.profiler.stop_trace()
            self.active = False


def log_evaluation(recipe: Recipe, done: int, state: TrainState, stop: StopRequest, run_log: RunLog,
                   final: dict[str, float]) -> bool:
    """Log the recipe's evaluation after update `done`; False when a stop request interrupted it (nothing logged)."""
    try:
        scores = recipe.evaluate(done, state, stop.check)
    except Interrupted:
        return False
    if scores:
        run_log.write(done, scores)
        final.update(scores)
    return True


def finish_pending_evaluation(recipe: Recipe, start: int, state: TrainState, stop: StopRequest,
                              checkpointer: checkpoint.TrainCheckpointer, run_log: RunLog,
                              final: dict[str, float]) -> bool:
    """Evaluate the step this run resumed from when a stop interrupted its evaluation (`EVALUATION_PENDING`);
    False when a stop interrupts it again."""
    if checkpointer.resumed_step != start or not checkpointer.metadata(start).get(EVALUATION_PENDING):
        return True
    run_log.message(f"Evaluating step {start} first: a stop interrupted its evaluation.")
    if log_evaluation(recipe, start, state, stop, run_log, final):
        return True
    run_log.message(f"{stop.signal_name} during the evaluation of step {start}, which stays saved in "
                    f"{checkpointer.directory}; rerun the same command to resume.")
    return False


def run(loop: LoopOptions, compiled: Compiled, state: TrainState, checkpointer: checkpoint.TrainCheckpointer,
        run_log: RunLog, recipe: Recipe) -> tuple[TrainState, dict[str, float]]:
    """Train from `state` to `recipe.total_steps`; returns the final state and the last scalars logged.

    A SIGTERM/SIGINT, a preemption notice reaching any process of a multi-host run, or `train.stop_at`
    finishes the update in flight, saves it and returns with `"stopped_at"` set; rerunning the same
    command resumes from there. A stop during an evaluation ends it at the next batch (single process,
    `StopRequest.check`); the step is saved marked `EVALUATION_PENDING`, and the rerun evaluates it before
    its first update, so it logs and keeps (fine-tuning's best) what an uninterrupted run would.
    """
    start = int(state.step)
    final: dict[str, float] = {}
    profiler = StepProfiler(loop.profile_steps, run_log.tensorboard_dir)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopRequest())
        if not finish_pending_evaluation(recipe, start, state, stop, checkpointer, run_log, final):
            final["stopped_at"] = float(start)
            return state, final
        batches = stack.enter_context(recipe.batches(start))
        stack.callback(profiler.stop)
        last_time, last_step = time.perf_counter(), start
        in_flight = None
        for done, batch in zip(range(start + 1, recipe.total_steps + 1), batches):
            profiler.before(done)
            state, metrics = compiled.train_step(state, batch)
            profiler.after(done, metrics)
            # Dispatch is asynchronous: unbounded, the loop would run up to `log_every` updates ahead of the
            # device, and a stop request would wait for all of them before its save. Waiting for the previous
            # update keeps one in flight (the device never idles) and a stop at most one update away.
            jax.block_until_ready(in_flight)
            in_flight = metrics
            run_log.advance()
            if done % loop.log_every == 0 or done == recipe.total_steps:
                check_finite(state, loop, checkpointer)
                now = time.perf_counter()
                seconds_per_step = (now - last_time) / (done - last_step)
                last_time, last_step = now, done
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                scalars.update(recipe.derived(scalars, seconds_per_step))
                scalars["nonfinite_steps"] = float(state.nonfinite_steps)
                run_log.write(done, scalars)
                final.update(scalars)
            evaluated = log_evaluation(recipe, done, state, stop, run_log, final)
            pause = done == loop.stop_at
            if jax.process_count() > 1 and checkpointer.reached_preemption(done):
                stop.request("preemption notice")
            if (done % loop.checkpoint_every == 0 or done == recipe.total_steps or recipe.save_due(done)
                    or stop.requested or pause):
                check_finite(state, loop, checkpointer)
                metadata = recipe.metadata if evaluated else {**recipe.metadata, EVALUATION_PENDING: True}
                checkpointer.save(done, state.params, state.rest(), metadata)
                run_log.sync()  # a bucket workdir's metrics reach at least this checkpoint
            if pause or stop.requested:
                checkpointer.wait()
                reason = f"Paused at train.stop_at={done}" if pause else f"{stop.signal_name} at step {done}"
                pending = "" if evaluated else ", without its evaluation, which the rerun does first"
                run_log.message(f"{reason}: saved step {done} to {checkpointer.directory}{pending}; rerun the same "
                                "command (without train.stop_at) to resume.")
                final["stopped_at"] = float(done)
                break
    if "stopped_at" not in final:
        report_skipped(state, loop, run_log)
    return state, final

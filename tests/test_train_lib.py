"""The shared loop (`train_lib.run`) driven by a recipe of its own: hooks, checkpoints, pauses, profiling."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from gpt1_jax import run_options
from gpt1_jax.config_check import ConfigError, check_common
from gpt1_jax.configs import tiny_pretrain
from gpt1_jax.pretraining import pretrain
from gpt1_jax.training import checkpoint, optim, train_lib
from gpt1_jax.training.run_log import RunLog, read_metrics

STEPS = 4


def small_config(**train):
    config = tiny_pretrain.get_config()
    config.model.update(n_ctx=16, width=32, n_head=2, n_layer=1, mlp_width=64)
    config.train.update(batch_size=4, log_every=1, **train)
    config.checkpoint.update(every=100, async_save=False)
    return config


def fixed_batches(config, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, config.model.vocab_size, (config.train.batch_size, config.model.n_ctx + 1), np.int32)
            for _ in range(n)]


def compile_recipe(config):
    """(model config, optimizer, compiled step) of the tiny LM for STEPS updates."""
    model_cfg = pretrain.model_config(config)
    schedule = optim.learning_rate_schedule(run_options.optimizer_options(config), STEPS)
    abstract_params = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(run_options.optimizer_options(config), STEPS, abstract_params)
    return model_cfg, optimizer, pretrain.compile_pretraining(config, model_cfg, optimizer, schedule)


def run_recipe(config, workdir, *, evaluate=None, save_due=None):
    """STEPS updates of the tiny LM on fixed random batches; returns (final scalars, batches consumed)."""
    model_cfg, optimizer, compiled = compile_recipe(config)
    data = fixed_batches(config, STEPS)
    consumed = []

    def batches(start):
        def stream():
            for step in range(start, STEPS):
                consumed.append(step)
                yield data[step]
        return contextlib.nullcontext(stream())

    recipe = train_lib.Recipe(total_steps=STEPS, batches=batches,
                              evaluate=evaluate or (lambda done, state, check_stop: {}),
                              metadata={"kind": "test"}, save_due=save_due or (lambda done: False))
    with contextlib.closing(checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=5, async_save=False)) as ckpt:
        state, _ = train_lib.restore_or_init(ckpt, compiled, lambda: pretrain.initial_params(model_cfg, 0), optimizer)
        with contextlib.closing(RunLog(workdir, total_steps=STEPS, initial_step=int(state.step),
                                       description="test")) as run_log:
            _, final = train_lib.run(run_options.loop_options(config), compiled, state, ckpt, run_log, recipe)
        return final, consumed, ckpt.steps()


def test_hooks_are_called_and_logged_and_extra_saves_honoured(tmp_path):
    calls = []

    def evaluate(done, state, check_stop):
        calls.append((done, int(state.step)))
        return {"probe": float(done)} if done % 2 == 0 else {}

    final, consumed, saved = run_recipe(small_config(), tmp_path, evaluate=evaluate, save_due=lambda done: done == 3)
    assert calls == [(1, 1), (2, 2), (3, 3), (4, 4)]  # after each update, on the updated state
    assert consumed == [0, 1, 2, 3] and saved == [3, 4]  # save_due, then the last step
    logged = read_metrics(tmp_path)
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3, 4]
    assert [(m["step"], m["probe"]) for m in logged if "probe" in m] == [(2, 2.0), (4, 4.0)]
    assert final["probe"] == 4.0 and "stopped_at" not in final and np.isfinite(final["loss"])


def test_the_loop_stays_within_one_update_of_the_device(tmp_path):
    """Dispatch is asynchronous. Unbounded, the loop ran up to `log_every` updates ahead of the device, and a
    save on SIGTERM waited for all of them: with a 30 s grace period and slow updates, too long."""
    config = small_config()
    config.train.log_every = 1000  # no logging step to block on
    model_cfg, optimizer, compiled = compile_recipe(config)
    train_step, dispatched, unfinished = compiled.train_step, [], []

    def recorded_step(state, batch):
        unfinished.append(sum(not metrics["loss"].is_ready() for metrics in dispatched))
        state, metrics = train_step(state, batch)
        dispatched.append(metrics)
        return state, metrics

    batch = fixed_batches(config, 1)[0]
    compiled = dataclasses.replace(compiled, train_step=recorded_step)
    recipe = train_lib.Recipe(total_steps=12, batches=lambda start: contextlib.nullcontext(iter([batch] * 12)),
                              evaluate=lambda done, state, check_stop: {}, metadata={})
    with contextlib.closing(checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=1, async_save=False)) as ckpt:
        state = train_lib.place_state(pretrain.initial_params(model_cfg, 0), optimizer, compiled)
        with contextlib.closing(RunLog(tmp_path, total_steps=12, initial_step=0, description="test")) as run_log:
            train_lib.run(run_options.loop_options(config), compiled, state, ckpt, run_log, recipe)
    assert len(unfinished) == 12 and max(unfinished) <= 1, unfinished


def test_stop_at_saves_pauses_and_the_rerun_takes_the_next_batch(tmp_path):
    final, consumed, saved = run_recipe(small_config(stop_at=2), tmp_path)
    assert final["stopped_at"] == 2 and consumed == [0, 1] and saved == [2]
    final, consumed, saved = run_recipe(small_config(), tmp_path)
    assert consumed == [2, 3] and saved == [2, 4] and "stopped_at" not in final


def test_a_stop_during_an_evaluation_saves_the_step_and_the_rerun_evaluates_it_first(tmp_path):
    """A SIGTERM in the middle of an evaluation ends it at its next batch (`check_stop`), not at its end: the
    step is saved without it, and the rerun does it before its first update, so the log is the same."""
    calls, signalled = [], []

    def evaluate(done, state, check_stop):
        batches = 3 if done % 2 == 0 else 0
        for batch in range(batches):
            if done == 2 and batch == 1 and not signalled:
                signalled.append(done)
                os.kill(os.getpid(), signal.SIGTERM)  # handled at once: the loop's StopRequest sets its flag
            check_stop()
        calls.append(done)
        return {"probe": float(done)} if batches else {}

    final, consumed, saved = run_recipe(small_config(), tmp_path, evaluate=evaluate)
    assert final["stopped_at"] == 2 and consumed == [0, 1] and saved == [2] and calls == [1]
    assert "probe" not in final and not [m for m in read_metrics(tmp_path) if "probe" in m]
    final, consumed, saved = run_recipe(small_config(), tmp_path, evaluate=evaluate)
    assert calls == [1, 2, 3, 4] and consumed == [2, 3] and saved == [2, 4] and "stopped_at" not in final
    assert [(m["step"], m["probe"]) for m in read_metrics(tmp_path) if "probe" in m] == [(2, 2.0), (4, 4.0)]


def test_a_non_finite_first_update_after_a_resume_names_the_checkpoint_as_suspect(tmp_path):
    """A checkpoint that restores cleanly but holds bad values used to be called "the last good checkpoint",
    with advice to lower optimizer.lr; the message now says how to fall back to the step before it."""
    run_recipe(small_config(stop_at=2), tmp_path)
    _, _, compiled = compile_recipe(small_config())
    saver = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", keep=5, async_save=False)
    _, params, rest = saver.restore_latest(compiled.abstract_state.params, compiled.abstract_state.rest())
    # Step 3: infinite parameters, saved (so with matching checksums) as a step written by a run would be.
    saver.save(3, jax.tree.map(lambda p: p + np.inf, params), {**rest, "step": np.int32(3)}, {"kind": "test"})
    saver.close()
    with pytest.raises(train_lib.NonFiniteError,
                       match=r"not finite at step 4, the first update after resuming from checkpoint step 3 in "
                             r"\S+ \(its checksums matched\): that checkpoint may be bad. Move \S+/3 aside"):
        run_recipe(small_config(), tmp_path)


def test_profile_steps_write_a_trace_tensorboard_can_show(tmp_path):
    run_recipe(small_config(profile_steps="2-3"), tmp_path)
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


@pytest.mark.parametrize("value", ["3-2", "0", "x", "-3", "5-"])
def test_bad_profile_steps_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="train.profile_steps"):
        check_common(small_config(profile_steps=value))

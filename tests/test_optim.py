"""The optimiser: the paper's schedules, the released code's warmup_linear and Adam, the decay mask."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt1_jax import config_check, run_options
from gpt1_jax.configs import tiny_pretrain
from gpt1_jax.pretraining import pretrain
from gpt1_jax.training import optim


def options(**changes) -> optim.OptimizerOptions:
    """The recipes' optimizer (the released code's Adam), as the recipe hands it down, with `changes`."""
    return dataclasses.replace(run_options.optimizer_options(tiny_pretrain.get_config()), **changes)


def test_learning_rate_schedule_follows_the_papers_formula():
    opt = options(lr=2.5e-4, schedule="warmup_cosine", warmup_steps=2000)
    total = 100_000
    schedule = optim.learning_rate_schedule(opt, total)

    def formula(step):
        if step < 2000:
            return 2.5e-4 * step / 2000
        progress = (step - 2000) / (total - 2000)
        return 2.5e-4 * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (0, 1000, 2000, 51_000, total):
        assert float(schedule(step)) == pytest.approx(formula(step), rel=1e-5, abs=1e-12)
    assert float(schedule(total)) == 0.0


def test_finetuning_schedule_is_the_released_warmup_linear():
    """opt.py: (s * x / warmup + (1 - s)) * (1 - x) with s = (x <= warmup); the (1 - x) applies in warm-up too."""
    opt = options(lr=6.25e-5, schedule="warmup_linear", warmup_fraction=0.002)
    schedule = optim.learning_rate_schedule(opt, 10_000)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(6.25e-5 * 0.5 * (1 - 0.001), rel=1e-6)
    assert float(schedule(20)) == pytest.approx(6.25e-5 * (1 - 0.002), rel=1e-6)  # x == warmup: still s = 1
    assert float(schedule(138)) == pytest.approx(6.25e-5 * (1 - 0.0138), rel=1e-6)
    assert float(schedule(5000)) == pytest.approx(6.25e-5 * 0.5, rel=1e-6)
    assert float(schedule(10_000)) == 0.0


@pytest.mark.parametrize("kind", optim.KINDS)
def test_weight_decay_skips_biases_and_gains_but_not_matrices(kind):
    """The release decays rank > 1 tensors by lr_t * l2 * p, lr_t carrying Adam's bias correction;
    optax.adamw decays by lr * wd * p."""
    opt = options(kind=kind, grad_clip_norm=0.0, schedule="constant")
    params = pretrain.initial_params(pretrain.model_config(tiny_pretrain.get_config()), 0)
    optimizer = optim.make_optimizer(opt, 10, params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    blocks = new["blocks"]
    np.testing.assert_array_equal(blocks["ln_1"]["scale"], params["blocks"]["ln_1"]["scale"])
    np.testing.assert_array_equal(blocks["attn"]["qkv"]["bias"], params["blocks"]["attn"]["qkv"]["bias"])
    correction = math.sqrt(1 - opt.b2) / (1 - opt.b1) if kind == "released" else 1.0
    shrink = 1 - opt.lr * correction * opt.weight_decay
    fc = params["blocks"]["mlp"]["fc"]["kernel"]
    np.testing.assert_allclose(blocks["mlp"]["fc"]["kernel"], fc * shrink, rtol=1e-6)
    np.testing.assert_allclose(new["tokens_embed"], params["tokens_embed"] * shrink, rtol=1e-6)


def test_released_adam_adds_epsilon_before_the_bias_correction():
    """A gradient of 1e-8 after one update: the release moves lr * c * (0.1e-8 / (1e-9 * sqrt(0.001)... + 1e-8)),
    optax.adamw nearly a full lr (eps is added to the corrected sqrt(v))."""
    opt = options(kind="released", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0,
                  schedule="constant")
    params = {"b": jnp.zeros(3)}
    grads = {"b": jnp.full(3, 1e-8)}
    released_adam = optim.make_optimizer(opt, 10, params)
    released, _ = released_adam.update(grads, released_adam.init(params), params)
    m, v = 0.1 * 1e-8, math.sqrt(0.001) * 1e-8
    expected = -1e-3 * math.sqrt(1 - 0.999) / (1 - 0.9) * m / (v + 1e-8)
    np.testing.assert_allclose(released["b"], expected, rtol=1e-5)
    adamw = optim.make_optimizer(dataclasses.replace(opt, kind="adamw"), 10, params)
    moved, _ = adamw.update(grads, adamw.init(params), params)
    assert float(jnp.abs(moved["b"][0])) > 10 * abs(expected)


def test_unknown_optimizer_kind_is_a_config_error():
    config = tiny_pretrain.get_config()
    config.optimizer.kind = "sgd"
    with pytest.raises(config_check.ConfigError, match="optimizer.kind='sgd'.*released.*adamw"):
        config_check.check_common(config)

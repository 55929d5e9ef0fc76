"""The memory-lean cross-entropy changes no loss or gradient beyond float tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax.model.losses import lm_loss_sum
from gpt1_jax.model.transformer import GPT1, GPT1Config

CFG = GPT1Config(vocab_size=1000, n_ctx=16, width=32, n_head=2, n_layer=1, mlp_width=64)


@pytest.mark.parametrize("chunk", [7, 32, 64])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    model = GPT1(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 1000, (3, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 1000, (3, 16)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 16)) > 0.3, jnp.float32)

    def loss(m, chunk_size):
        total, count = lm_loss_sum(m, m(tokens), targets, weights, chunk=chunk_size)
        return total / count

    plain, plain_grads = nnx.value_and_grad(loss)(model, 0)
    chunked, chunked_grads = nnx.value_and_grad(loss)(model, chunk)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(chunked_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_padding_rows_of_the_vocabulary_never_take_probability():
    model = GPT1(CFG, rngs=nnx.Rngs(0))
    logits = model.logits(model(jnp.zeros((1, 4), jnp.int32)))
    assert logits.shape[-1] == 1024
    np.testing.assert_allclose(jax.nn.logsumexp(logits, -1), jax.nn.logsumexp(logits[..., :1000], -1), rtol=1e-6)

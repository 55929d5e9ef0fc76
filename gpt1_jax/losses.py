"""The language-modelling objective L1 (Sec. 3.1) with a memory-lean cross-entropy.

The LM head maps every position onto 40k logits; for a GPT-1 batch (64 x 512) the float32
logits alone would take 5.3 GB, more than the rest of the activations. `chunked_lm_loss` computes
the logits of `chunk` positions at a time inside a rematerialised scan, so the backward pass
recomputes each chunk instead of storing all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt1_jax.model import GPT1


def token_nll(logits, targets):
    """-log P(target) per position; logits [..., vocab] float32, targets [...] int."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - target_logit


def lm_loss_sum(model: GPT1, hidden, targets, weights, *, chunk: int = 0):
    """(sum of weighted token NLL, sum of weights).

    hidden [batch, seq, width], targets [batch, seq], weights [batch, seq] (0 on padding).
    `chunk` > 0 bounds the positions whose logits exist at once; 0 computes them all.
    """
    weights = weights.astype(jnp.float32)
    if chunk <= 0 or chunk >= hidden.shape[0] * hidden.shape[1]:
        nll = token_nll(model.logits(hidden), targets)
        return jnp.sum(nll * weights), jnp.sum(weights)
    width = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, width)  # [tokens, width]
    flat_targets, flat_weights = targets.reshape(-1), weights.reshape(-1)
    pad = -flat_hidden.shape[0] % chunk
    if pad:
        flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, pad))
        flat_weights = jnp.pad(flat_weights, (0, pad))
    n_chunks = flat_hidden.shape[0] // chunk

    @jax.checkpoint
    def chunk_loss(h, t, w):
        return jnp.sum(token_nll(model.logits(h), t) * w)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (
        flat_hidden.reshape(n_chunks, chunk, width),  # [chunks, chunk, width]
        flat_targets.reshape(n_chunks, chunk),
        flat_weights.reshape(n_chunks, chunk),
    ))
    return total, jnp.sum(weights)

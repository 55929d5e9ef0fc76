"""The language-modelling objective L1 (Sec. 3.1) with a memory-lean cross-entropy.

The LM head maps every position onto 40k logits; for a GPT-1 batch (64 x 512) the float32
logits alone would take 5.3 GB, more than the rest of the activations. With `chunk` > 0,
`token_nll_of` computes the logits of `chunk` positions at a time inside a rematerialised scan, so
the backward pass recomputes each chunk instead of storing all of them.
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


def token_nll_of(model: GPT1, hidden, targets, *, table=None, chunk: int = 0):
    """-log P(target) of every position, float32 [batch, seq].

    hidden [batch, seq, width], targets [batch, seq]; `table`: the LM head's rows (`GPT1.head_table`,
    None for the clean token table). `chunk` > 0 bounds the positions whose logits exist at once.
    """
    batch, seq, width = hidden.shape
    if chunk <= 0 or chunk >= batch * seq:
        return token_nll(model.logits(hidden, table), targets)
    flat_hidden = hidden.reshape(-1, width)  # [tokens, width]
    flat_targets = targets.reshape(-1)
    pad = -flat_hidden.shape[0] % chunk
    if pad:
        flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, pad))
    n_chunks = flat_hidden.shape[0] // chunk

    @jax.checkpoint
    def chunk_nll(h, t):
        return token_nll(model.logits(h, table), t)

    _, nll = jax.lax.scan(lambda carry, xs: (carry, chunk_nll(*xs)), None, (
        flat_hidden.reshape(n_chunks, chunk, width),  # [chunks, chunk, width]
        flat_targets.reshape(n_chunks, chunk),
    ))
    return nll.reshape(-1)[: batch * seq].reshape(batch, seq)


def lm_loss_sum(model: GPT1, hidden, targets, weights, *, table=None, chunk: int = 0):
    """(sum of weighted token NLL, sum of weights): L1 over the tokens of a batch.

    weights [batch, seq] (0 on padding); the other arguments as `token_nll_of`.
    """
    weights = weights.astype(jnp.float32)
    nll = token_nll_of(model, hidden, targets, table=table, chunk=chunk)
    return jnp.sum(nll * weights), jnp.sum(weights)

"""The language-modelling objective L1 (Sec. 3.1) with a memory-lean cross-entropy.

The LM head maps every position onto 40k logits; for a GPT-1 batch (64 x 512) the float32
logits alone would take 5.3 GB, more than the rest of the activations. With `chunk` > 0,
`token_nll_of` computes the logits of `chunk` positions at a time inside a rematerialised scan, so
the backward pass recomputes each chunk instead of storing all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt1_jax.model.transformer import GPT1


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

    # Chunk k holds positions k, k + n_chunks, k + 2 n_chunks, ...: a slice of every row of the batch, so on a
    # data-parallel mesh each device scores its own rows in every chunk. Chunks of consecutive positions would
    # each lie on one device, and XLA would gather every chunk to every device, which would then score the
    # whole batch (seen in the compiled TPU step: bf16[4,8192,768] all-gathers, the LM head run 4 times over).
    _, nll = jax.lax.scan(lambda carry, xs: (carry, chunk_nll(*xs)), None, (
        flat_hidden.reshape(chunk, n_chunks, width).swapaxes(0, 1),  # [chunks, chunk, width]
        flat_targets.reshape(chunk, n_chunks).swapaxes(0, 1),  # [chunks, chunk]
    ))
    return nll.swapaxes(0, 1).reshape(-1)[: batch * seq].reshape(batch, seq)


def lm_loss_sum(model: GPT1, hidden, targets, weights, *, table=None, chunk: int = 0):
    """(sum of weighted token NLL, sum of weights): L1 over the tokens of a batch.

    weights [batch, seq] (0 on padding); the other arguments as `token_nll_of`.
    """
    weights = weights.astype(jnp.float32)
    nll = token_nll_of(model, hidden, targets, table=table, chunk=chunk)
    return jnp.sum(nll * weights), jnp.sum(weights)


def window_nll(model: GPT1, tokens, weights, chunk: int = 0):
    """(sum NLL, number of tokens) of windows tokens [batch, n_ctx + 1], rows weighted by weights [batch]."""
    hidden = model(tokens[:, :-1])  # [batch, n_ctx, width]
    token_weights = jnp.broadcast_to(weights[:, None], tokens[:, 1:].shape)
    return lm_loss_sum(model, hidden, tokens[:, 1:], token_weights, chunk=chunk)


def real_target_nll_sums(model: GPT1, hidden, targets, real, *, slots: int, shards: int = 1, table=None,
                         chunk: int = 0):
    """Per row, the summed NLL of its real targets, float32 [rows], from the logits of `slots` positions
    per shard instead of every position.

    Fine-tuning rows are padded to the longest example, so most positions of a batch are padding (79% on
    SST-2) and the 40k-way LM head on them is wasted work. Each shard (the rows split into `shards` equal
    consecutive groups, as the batch is split over devices, so the gather stays on each device) picks the
    positions where `real` > 0 and scores those alone. hidden [rows, seq, width], targets and real
    [rows, seq]; no shard may hold more than `slots` real targets (`finetune.needed_lm_target_slots` sizes it from
    the run's batches). The sums equal the masked sums over all positions up to float32 rounding.
    """
    rows, seq, width = hidden.shape
    per_shard = rows // shards

    def shard_sums(h, t, r):  # [per_shard * seq, width], [per_shard * seq] x 2
        picked = jnp.nonzero(r > 0, size=slots, fill_value=0)[0]  # [slots], in order; filled slots point at 0
        weight = jnp.where(jnp.arange(slots) < jnp.sum(r > 0), r[picked], 0.0)  # [slots]
        nll = token_nll_of(model, h[picked][None], t[picked][None], table=table, chunk=chunk)[0]  # [slots]
        return jax.ops.segment_sum(nll * weight, picked // seq, num_segments=per_shard)  # [per_shard]

    sums = jax.vmap(shard_sums)(hidden.reshape(shards, per_shard * seq, width), targets.reshape(shards, -1),
                                real.astype(jnp.float32).reshape(shards, -1))  # [shards, per_shard]
    return sums.reshape(rows)

"""Log-likelihood scoring with the GPT-1 language model, in evaluation mode.

`score_continuations` gives the log-probability of candidate continuations of a context, the quantity the
zero-shot probes of Sec. 5 compare (`gpt1_jax.pretraining.zeroshot_probes`); `score_pairs` scores many
(context, continuation) pairs in fixed-size batches.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt1_jax.model.transformer import GPT1

# Rows per forward pass when scoring; a fixed batch keeps the number of compilations small.
SCORE_BATCH = 16
MIN_SCORE_LENGTH = 16


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token_logprobs(graphdef, state, tokens):
    """tokens [batch, seq] -> log p(tokens[:, t+1] | tokens[:, :t+1]), float32 [batch, seq - 1]."""
    model = nnx.merge(graphdef, state)
    logits = model.logits(model(tokens))[:, :-1]  # [batch, seq - 1, vocab]
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def score_pairs(model: GPT1, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                batch_size: int = SCORE_BATCH, check_stop: Callable[[], None] = lambda: None
                ) -> list[tuple[float, float]]:
    """(sum, mean) of log p(continuation | context) for each (context, continuation) pair.

    Contexts longer than n_ctx allows are cut from the left, so the tokens nearest the continuation
    are kept. Rows are right-padded to a power-of-two length (causal attention never looks right),
    and batches are padded to `batch_size` rows, which bounds the number of compilations.
    `check_stop()` runs before each batch and may raise to abandon the scoring (a stop request during
    pre-training's zero-shot probes).
    """
    n_ctx = model.config.n_ctx
    rows, spans = [], []
    for context, continuation in pairs:
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("score_pairs needs a non-empty context (the first token has no prediction) and a "
                             "non-empty continuation.")
        if len(continuation) >= n_ctx:
            raise ValueError(f"A continuation of {len(continuation)} tokens leaves no context within n_ctx={n_ctx}.")
        context = context[-(n_ctx - len(continuation)):]
        rows.append(context + continuation)
        spans.append((len(context) - 1, len(context) + len(continuation) - 1))  # predicting positions
    graphdef, state = nnx.split(model)
    results = []
    for begin in range(0, len(rows), batch_size):
        check_stop()
        chunk = rows[begin:begin + batch_size]
        length = min(n_ctx, max(MIN_SCORE_LENGTH, 1 << (max(map(len, chunk)) - 1).bit_length()))
        tokens = np.zeros((batch_size, length), np.int32)  # [batch, seq]
        for i, row in enumerate(chunk):
            tokens[i, :len(row)] = row
        logprobs = np.asarray(_next_token_logprobs(graphdef, state, jnp.asarray(tokens)))
        for i, (lo, hi) in enumerate(spans[begin:begin + batch_size]):
            picked = logprobs[i, lo:hi]
            results.append((float(picked.sum()), float(picked.mean())))
    return results


def score_continuations(model: GPT1, context_ids: Sequence[int], continuation_ids_list: Sequence[Sequence[int]],
                        *, average: bool = False) -> list[float]:
    """Log-probability of each continuation given the context, scored in one batch.

    The sum is the log-likelihood of the whole continuation; `average=True` gives the average token
    log-probability, the score the paper's zero-shot Story Cloze and RACE heuristics compare (Sec. 5).
    """
    scores = score_pairs(model, [(context_ids, c) for c in continuation_ids_list])
    return [mean if average else total for total, mean in scores]

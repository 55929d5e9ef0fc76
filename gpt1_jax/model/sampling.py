"""Sampling from the GPT-1 language model with a key/value cache.

Generation runs one jit-compiled prefill over the prompt and then one jit-compiled decode step per
new token. Each step feeds only the newest token: the keys and values of earlier positions are read
from the model's fixed-size cache [layers, batch, n_ctx, heads, head_dim] (`GPT1.init_cache`), so a
step costs O(n_ctx) instead of recomputing the whole prefix. The forward is `GPT1.__call__` itself,
given the cache, so decoding computes the same function as training and scoring in evaluation mode.

Each token is predicted from the last n_ctx tokens at most. Once the sequence outgrows the context, the
window slides one token per step and is re-encoded whole: GPT-1 learns an embedding per absolute
position 0..n_ctx-1 (Sec. 3.1), so after a slide every token sits at a new position and no cached key or
value holds any more. Those steps cost a full forward of n_ctx tokens each, as without a cache.

The command line is `gpt1_jax.generate`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt1_jax.model.transformer import GPT1

log = logging.getLogger(__name__)


def sample_logits(logits, key, *, greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
    """logits [batch, vocab] float32 -> next token ids [batch] int32.

    Temperature divides the logits; top-k keeps the k most likely tokens; top-p (nucleus sampling,
    Holtzman et al., 2020) keeps the smallest set of most likely tokens whose probability reaches p.
    """
    if greedy or temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    neg = jnp.finfo(logits.dtype).min
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the most likely token is always kept
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, neg)
        logits = jnp.full_like(logits, neg).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def _next_token(model: GPT1, tokens, cache, start, key, sampling: dict):
    """tokens [batch, seq] at positions start.. through the cached forward -> (next token [batch], cache)."""
    hidden, cache = model(tokens, cache=cache, start=start)  # [batch, seq, width]
    return sample_logits(model.logits(hidden[:, -1]), key, **sampling), cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy", "temperature", "top_k", "top_p"))
def _prefill(graphdef, state, tokens, key, **sampling):
    """Whole prompt at once: fills a fresh cache and samples the first new token."""
    model = nnx.merge(graphdef, state)
    return _next_token(model, tokens, model.init_cache(tokens.shape[0]), 0, key, sampling)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy", "temperature", "top_k", "top_p"),
                   donate_argnums=(2,))
def _decode_step(graphdef, state, cache, token, position, key, **sampling):
    """One new token: token [batch] at `position` -> (the next token [batch], updated cache)."""
    return _next_token(nnx.merge(graphdef, state), token[:, None], cache, position, key, sampling)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy", "temperature", "top_k", "top_p"),
                   donate_argnums=(2,))
def _window_step(graphdef, state, window, key, **sampling):
    """Past the context, without a cache: window [batch, n_ctx] at positions 0..n_ctx-1 -> (next token
    [batch], the window slid by one to end with that token [batch, n_ctx])."""
    model = nnx.merge(graphdef, state)
    token = sample_logits(model.logits(model(window)[:, -1]), key, **sampling)
    return token, jnp.concatenate([window[:, 1:], token[:, None]], axis=1)


def generate(model: GPT1, prompt_ids, *, max_new_tokens: int, key: jax.Array | None = None, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Continue prompts with `max_new_tokens` tokens, each predicted from the last n_ctx tokens at most.

    prompt_ids: [seq] or [batch, seq] ints (prompts of one length); a prompt longer than n_ctx keeps its
    last n_ctx tokens, with a warning. Returns the new tokens only, [new] or [batch, new]. `key` is
    required unless decoding greedily (or with temperature 0). Tokens that fit in the context come from
    the cache; later ones slide the window (see the module docstring).
    """
    cfg = model.config
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    prompt = np.asarray(prompt_ids, np.int32)
    single = prompt.ndim == 1
    prompt = _fit_prompt(prompt[None] if single else prompt, cfg.n_ctx)  # [batch, seq <= n_ctx]
    _check_sampling(temperature, top_k, top_p, cfg.n_vocab)
    sampling = dict(greedy=greedy or temperature == 0.0, temperature=float(temperature), top_k=top_k,
                    top_p=None if top_p is None or top_p >= 1.0 else float(top_p))
    if key is None:
        if not sampling["greedy"]:
            raise ValueError("Sampling needs a PRNG key (key=jax.random.key(seed)); or pass greedy=True.")
        key = jax.random.key(0)
    if max_new_tokens == 0:
        out = np.zeros((prompt.shape[0], 0), np.int32)
        return out[0] if single else out
    graphdef, state = nnx.split(model)
    keys = jax.random.split(key, max_new_tokens)
    # The prefill predicts position seq; decode steps feed positions seq..n_ctx-1, one new token each.
    n_cached = min(max_new_tokens, cfg.n_ctx - prompt.shape[1] + 1)
    token, cache = _prefill(graphdef, state, jnp.asarray(prompt), keys[0], **sampling)
    tokens = [token]
    for i in range(1, n_cached):  # the token sampled last sits at position prompt_len + i - 1
        token, cache = _decode_step(graphdef, state, cache, token, prompt.shape[1] + i - 1, keys[i], **sampling)
        tokens.append(token)
    if n_cached < max_new_tokens:
        window = jnp.concatenate([prompt, jnp.stack(tokens, axis=1)], axis=1)[:, -cfg.n_ctx:]  # [batch, n_ctx]
        for i in range(n_cached, max_new_tokens):
            token, window = _window_step(graphdef, state, window, keys[i], **sampling)
            tokens.append(token)
    out = np.asarray(jnp.stack(tokens, axis=1))  # [batch, new]
    return out[0] if single else out


def _fit_prompt(prompt: np.ndarray, n_ctx: int) -> np.ndarray:
    """prompt [batch, seq] -> its last n_ctx tokens [batch, min(seq, n_ctx)], warning when that cuts it."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [seq] or [batch, seq] array, got shape {prompt.shape}.")
    if prompt.shape[1] > n_ctx:
        log.warning("The prompt has %d tokens but model.n_ctx is %d: generating from its last %d tokens.",
                    prompt.shape[1], n_ctx, n_ctx)
    return prompt[:, -n_ctx:]

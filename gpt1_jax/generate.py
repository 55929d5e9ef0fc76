"""Sampling from the GPT-1 language model with a key/value cache, and log-likelihood scoring.

Generation runs one jit-compiled prefill over the prompt and then one jit-compiled decode step per
new token. Each step feeds only the newest token: the keys and values of earlier positions are read
from the model's fixed-size cache [layers, batch, n_ctx, heads, head_dim] (`GPT1.init_cache`), so a
step costs O(n_ctx) instead of recomputing the whole prefix. The forward is `GPT1.__call__` itself,
given the cache, so decoding computes the same function as training and scoring in evaluation mode.

Each token is predicted from the last n_ctx tokens at most. Once the sequence outgrows the context, the
window slides one token per step and is re-encoded whole: GPT-1 learns an embedding per absolute
position 0..n_ctx-1 (Sec. 3.1), so after a slide every token sits at a new position and no cached key or
value holds any more. Those steps cost a full forward of n_ctx tokens each, as without a cache.

`score_continuations` gives the log-probability of candidate continuations of a context, the
quantity the zero-shot probes of Sec. 5 compare (`gpt1_jax.zeroshot`).

Command line (installed as `gpt1-generate`):
    python -m gpt1_jax.generate --checkpoint DIR --prompt "..." [--max_new_tokens N --temperature T
        --top_k K --top_p P --seed S --greedy]
    python -m gpt1_jax.generate --hf DIR --prompt "..."      # a transformers OpenAIGPT folder
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from gpt1_jax import cli, weight_formats
from gpt1_jax.model import GPT1

# Rows per forward pass when scoring; a fixed batch keeps the number of compilations small.
SCORE_BATCH = 16
MIN_SCORE_LENGTH = 16

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sampling


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


# ---------------------------------------------------------------- log-likelihood scoring


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token_logprobs(graphdef, state, tokens):
    """tokens [batch, seq] -> log p(tokens[:, t+1] | tokens[:, :t+1]), float32 [batch, seq - 1]."""
    model = nnx.merge(graphdef, state)
    logits = model.logits(model(tokens))[:, :-1]  # [batch, seq - 1, vocab]
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def score_pairs(model: GPT1, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                batch_size: int = SCORE_BATCH) -> list[tuple[float, float]]:
    """(sum, mean) of log p(continuation | context) for each (context, continuation) pair.

    Contexts longer than n_ctx allows are cut from the left, so the tokens nearest the continuation
    are kept. Rows are right-padded to a power-of-two length (causal attention never looks right),
    and batches are padded to `batch_size` rows, which bounds the number of compilations.
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


# ---------------------------------------------------------------- command line


def load_model(checkpoint_dir: str | None = None, hf_dir: str | None = None) -> GPT1:
    """A GPT1 from one of our Orbax checkpoints or from a transformers OpenAIGPT folder, text tokens only.

    A fine-tuned backbone's special tokens (start, delimiter, extract) are not text the tokenizer can
    write, so their rows are dropped: sampling and scoring range over the BPE vocabulary.
    """
    from gpt1_jax import checkpoint

    if (checkpoint_dir is None) == (hf_dir is None):
        raise ValueError("Give exactly one of a checkpoint directory and a Hugging Face directory.")
    if checkpoint_dir is not None:
        config, params, _ = checkpoint.load_pretrained(checkpoint_dir)
    else:
        config, params = weight_formats.load_hf(hf_dir)
    model = weight_formats.model_from_params(config, params)
    return model.with_special_tokens(0, rngs=nnx.Rngs(0)) if config.n_special else model


SYNOPSIS = "(--checkpoint DIR | --hf DIR) --prompt TEXT [--max_new_tokens N --top_p P --seed S ...]"


def _define_flags(flag_values: flags.FlagValues) -> None:
    cli.define_model_flags(flag_values)
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("prompt", None, "The text to continue.", required=True, **define)
    flags.DEFINE_integer("max_new_tokens", 50, "How many tokens to sample.", lower_bound=1, **define)
    flags.DEFINE_float("temperature", 1.0, "Divides the logits before sampling (0: greedy).", lower_bound=0.0,
                       **define)
    flags.register_validator("temperature", math.isfinite, "--temperature must be a finite number", **define)
    flags.DEFINE_integer("top_k", None, "Sample among the K most likely tokens only.", lower_bound=1, **define)
    flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of tokens with probability >= P.",
                       lower_bound=0.0, upper_bound=1.0, **define)
    flags.DEFINE_integer("seed", 0, "The sampling key, jax.random.key(seed).", **define)
    flags.DEFINE_boolean("greedy", False, "Take the most likely token at every step.", **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.generate` (`gpt1-generate`); `argv` excludes the program name."""
    command = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.generate", synopsis=SYNOPSIS,
                        doc=__doc__)
    args = command.flags

    from gpt1_jax.tokenizer import GPT1Tokenizer

    model = load_model(args.checkpoint, args.hf)
    tokenizer = GPT1Tokenizer.from_files(args.vocab_dir)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        command.fail("the prompt encodes to no tokens; give some text")
    try:
        new_ids = generate(model, prompt_ids, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                           greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as err:
        command.fail(str(err))
    print(tokenizer.decode(list(prompt_ids) + new_ids.tolist()))


if __name__ == "__main__":
    main()

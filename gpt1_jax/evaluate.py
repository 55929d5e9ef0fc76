"""Perplexity of a trained GPT-1 on your own text, per document and overall, beside the unigram baseline.

    python -m gpt1_jax.evaluate --checkpoint RUN/checkpoints --data 'files:books/*.txt'
    gpt1-evaluate --hf path/to/openai-gpt --data 'tfds:tiny_shakespeare:test'

`--data` takes the syntax of `data.source` (`files:GLOB`, `local:GLOB` under $GPT1_JAX_DATA,
`tfds:NAME[:SPLIT][?feature=F]`). Each document is cleaned and tokenized as pre-training does, then
cut into consecutive windows of n_ctx + 1 tokens that predict every token after the first exactly once,
as validation does (`lm_batches.validation_batches`). The unigram baseline (add-one-smoothed token
frequencies of the checkpoint's own training data) is shown when that data's token cache is on this
machine: the floor a language model must beat to have learnt more than word frequencies.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from absl import flags
from flax import nnx

from gpt1_jax import cli, storage
from gpt1_jax.model import losses
from gpt1_jax.model.transformer import GPT1
from gpt1_jax.pretraining import lm_batches, lm_pipeline, text_sources, token_cache
from gpt1_jax.text.tokenizer import GPT1Tokenizer

SYNOPSIS = "(--checkpoint DIR | --hf DIR) --data SOURCE [--batch_size N]"


def document_nll(model: GPT1, tokens: np.ndarray, batch_size: int) -> tuple[float, int, list]:
    """(summed NLL, tokens predicted, the windows) of one token stream; (0, 0, []) if it is too short."""
    n_ctx = model.config.n_ctx
    if tokens.size < n_ctx + 1:
        return 0.0, 0, []
    windows = lm_batches.validation_batches(tokens, n_ctx=n_ctx, batch_size=batch_size)
    graphdef, state = nnx.split(model)
    total = sum(float(_window_nll(graphdef, state, batch.tokens, batch.weights)) for batch in windows)
    return total, int(sum(batch.weights.sum() for batch in windows)) * n_ctx, windows


@functools.partial(jax.jit, static_argnums=(0,))
def _window_nll(graphdef, state, tokens, weights):
    """Summed next-token NLL of windows [batch, n_ctx + 1], rows weighted by weights [batch] (0: padding)."""
    total, _ = losses.window_nll(nnx.merge(graphdef, state), tokens, weights)
    return total


def training_tokens(metadata: dict, tokenizer: GPT1Tokenizer) -> np.ndarray | None:
    """The training part of the checkpoint's own pre-training tokens, if their cache is on this machine."""
    data = metadata.get("config", {}).get("data", {})
    if not data.get("source") or metadata.get("tokenizer") != tokenizer.fingerprint:
        return None
    try:
        source = text_sources.make_source(data["source"], data_dir=data.get("tfds_data_dir") or None,
                                          process_index=0, process_count=1)
        cache_dir = data.get("cache_dir") or lm_pipeline.default_cache_dir()
        if storage.is_url(cache_dir):  # a bucket cache is read through each host's local copy
            cache_dir = lm_pipeline.default_cache_dir()
        path = os.path.join(cache_dir, token_cache.cache_key(source.identity, tokenizer.fingerprint))
        train, _ = token_cache.TokenCache.load(path).split(data.get("val_fraction", 0.01))
    except (ValueError, OSError, token_cache.InvalidCacheError):
        return None  # the training data is elsewhere (another machine, TFDS not prepared here)
    return train


def evaluate(model: GPT1, tokenizer: GPT1Tokenizer, source, batch_size: int, train_tokens: np.ndarray | None):
    """[(document name, tokens, perplexity, unigram perplexity or nan)], the last row the overall one."""
    names = getattr(source, "files", None)
    rows, total_nll, total_tokens, all_windows = [], 0.0, 0, []
    for index, text in enumerate(source):
        name = names[index] if names else f"document {index}"
        tokens = np.asarray(tokenizer.encode(text), np.int32)
        nll, count, windows = document_nll(model, tokens, batch_size)
        unigram = _unigram(train_tokens, windows, model.config.vocab_size)
        rows.append((name, count, math.exp(nll / count) if count else math.nan, unigram))
        total_nll, total_tokens, all_windows = total_nll + nll, total_tokens + count, all_windows + windows
    overall = math.exp(total_nll / total_tokens) if total_tokens else math.nan
    rows.append(("overall", total_tokens, overall, _unigram(train_tokens, all_windows, model.config.vocab_size)))
    return rows


def _unigram(train_tokens, windows, vocab: int) -> float:
    if train_tokens is None or not windows:
        return math.nan
    return lm_pipeline.unigram_perplexity(train_tokens, windows, vocab)


def _define_flags(flag_values: flags.FlagValues) -> None:
    cli.define_model_flags(flag_values)
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("data", None, "The text: files:GLOB, local:GLOB (under $GPT1_JAX_DATA) or "
                        "tfds:NAME[:SPLIT][?feature=F], as data.source.", required=True, **define)
    flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.", lower_bound=1, **define)
    flags.DEFINE_boolean("allow_replacement", False, "Evaluate documents that are mostly not UTF-8, with U+FFFD in "
                         "place of their bad bytes (as data.allow_replacement).", **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.evaluate` (`gpt1-evaluate`); `argv` excludes the program name."""
    command = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.evaluate", synopsis=SYNOPSIS, doc=__doc__)
    args = command.flags
    from gpt1_jax.training import checkpoint
    from gpt1_jax.weights.loading import load_model

    model = load_model(args.checkpoint, args.hf)
    tokenizer = GPT1Tokenizer.from_files(args.vocab_dir)
    try:
        source = text_sources.make_source(args.data, process_index=0, process_count=1,
                                          allow_replacement=args.allow_replacement)
    except ValueError as err:
        command.fail(str(err).replace("data.source", "--data"))
    metadata = checkpoint.read_metadata(args.checkpoint) if args.checkpoint else {}
    train = training_tokens(metadata, tokenizer)
    try:
        rows = evaluate(model, tokenizer, source, args.batch_size, train)
    except text_sources.CorpusError as err:
        raise text_sources.CorpusError(str(err).replace("data.allow_replacement=True", "--allow_replacement")) from None
    width = max(len(name) for name, *_ in rows)
    print(f"{'document':<{width}}  {'tokens':>10}  {'perplexity':>10}  {'unigram':>10}")
    for name, count, perplexity, unigram in rows:
        print(f"{name:<{width}}  {count:>10,}  {perplexity:>10.2f}  {unigram:>10.2f}")
    if train is None:
        print("(unigram: the checkpoint's training data is not cached on this machine)")


if __name__ == "__main__":
    main()

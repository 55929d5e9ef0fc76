"""Perplexity of a trained GPT-1 on your own text, per document and overall, beside the unigram baseline.

    python -m gpt1_jax.evaluate --checkpoint RUN/checkpoints --data 'files:books/*.txt'
    gpt1-evaluate --hf path/to/openai-gpt --data 'tfds:tiny_shakespeare:test'

`--data` takes the syntax of `data.source` (`files:GLOB`, `local:GLOB` under $GPT1_JAX_DATA,
`tfds:NAME[:SPLIT][?feature=F]`). Each document is cleaned and tokenized as pre-training does, then
cut into consecutive windows of n_ctx + 1 tokens that predict every token after the first exactly once,
as validation does (`lm_batches.validation_batches`). The unigram baseline (add-one-smoothed token
frequencies of the checkpoint's own training data) is shown when that data's token cache is on this
machine (`-` otherwise): the floor a language model must beat to have learnt more than word frequencies.
A document without one whole window (empty, whitespace, too short) is named in a warning and left out.
Tokenizing and scoring show progress bars on stderr, as training does: 11 books take minutes on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Callable

import jax
import numpy as np
from absl import flags
from flax import nnx
from tqdm import tqdm

from gpt1_jax import cli, storage
from gpt1_jax.errors import UserError
from gpt1_jax.model import losses
from gpt1_jax.model.transformer import GPT1
from gpt1_jax.pretraining import lm_batches, lm_pipeline, text_sources, token_cache
from gpt1_jax.text.tokenizer import GPT1Tokenizer

SYNOPSIS = "(--checkpoint DIR | --hf DIR) --data SOURCE [--batch_size N]"

log = logging.getLogger(__name__)


class NothingToScoreError(UserError, ValueError):
    """No document of `--data` holds a whole window of text."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a document, or "overall"."""

    name: str
    tokens: int  # tokens predicted
    perplexity: float
    unigram: float | None  # the unigram baseline's; None when the checkpoint's training data is not cached here


def document_windows(tokens: np.ndarray, n_ctx: int, batch_size: int) -> list[lm_batches.ValidationBatch]:
    """The consecutive windows of one token stream tokens [doc_tokens], in batches; [] if it is shorter than one."""
    if tokens.size < n_ctx + 1:
        return []
    return lm_batches.validation_batches(tokens, n_ctx=n_ctx, batch_size=batch_size)


def document_nll(model: GPT1, tokens: np.ndarray, batch_size: int) -> tuple[float, int, list]:
    """(summed NLL, tokens predicted, the windows) of one token stream; (0, 0, []) if it is too short."""
    windows = document_windows(tokens, model.config.n_ctx, batch_size)
    return _summed_nll(_batch_scorer(model), windows), _predicted(windows, model.config.n_ctx), windows


def _batch_scorer(model: GPT1) -> Callable[[lm_batches.ValidationBatch], float]:
    graphdef, state = nnx.split(model)
    return lambda batch: float(_window_nll(graphdef, state, batch.tokens, batch.weights))


def _summed_nll(batch_nll, windows: list[lm_batches.ValidationBatch], bar: tqdm | None = None) -> float:
    total = 0.0
    for batch in windows:
        total += batch_nll(batch)
        if bar is not None:
            bar.update()
    return total


def _predicted(windows: list[lm_batches.ValidationBatch], n_ctx: int) -> int:
    return int(sum(batch.weights.sum() for batch in windows)) * n_ctx


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


def tokenized_documents(tokenizer: GPT1Tokenizer, source, n_ctx: int, batch_size: int, *,
                        progress: bool = False) -> list[tuple[str, list[lm_batches.ValidationBatch]]]:
    """(name, windows) of each document with at least one whole window; each other one is named in a warning.

    An empty or whitespace-only file, or one shorter than a window, used to print a row of 0 tokens and
    perplexity nan. Raises NothingToScoreError when no document is left.
    """
    names = getattr(source, "files", None)
    documents, left_out = [], []
    texts = tqdm(source, total=source.num_documents, desc="Tokenizing", unit="doc", disable=not progress,
                 dynamic_ncols=True)
    with texts:
        for index, text in enumerate(texts):
            name = names[index] if names else f"document {index}"
            tokens = np.asarray(tokenizer.encode(text), np.int32)  # [doc_tokens]
            windows = document_windows(tokens, n_ctx, batch_size)
            if windows:
                documents.append((name, windows))
            else:
                left_out.append((name, tokens.size))
    for name, count in left_out:  # after the bar, which a warning would cut in two
        why = "holds no text" if not count else f"has {count} tokens, fewer than one window (n_ctx + 1 = {n_ctx + 1})"
        log.warning("%s %s: left out of the table.", name, why)
    if not documents:
        raise NothingToScoreError(f"none of the {len(left_out)} documents holds text to score: each is empty, "
                                  f"whitespace, or shorter than one window of n_ctx + 1 = {n_ctx + 1} tokens.")
    return documents


def evaluate(model: GPT1, tokenizer: GPT1Tokenizer, source, batch_size: int, train_tokens: np.ndarray | None, *,
             progress: bool = False) -> list[Row]:
    """A Row per document with text to score, then the overall one; `progress` shows bars on stderr."""
    n_ctx, vocab = model.config.n_ctx, model.config.vocab_size
    documents = tokenized_documents(tokenizer, source, n_ctx, batch_size, progress=progress)
    batch_nll, rows = _batch_scorer(model), []
    total_nll, all_windows = 0.0, []
    scoring = tqdm(total=sum(len(windows) for _, windows in documents), desc="Scoring", unit="batch",
                   disable=not progress, dynamic_ncols=True)
    with scoring:
        for name, windows in documents:
            nll, count = _summed_nll(batch_nll, windows, scoring), _predicted(windows, n_ctx)
            rows.append(Row(name, count, math.exp(nll / count), _unigram(train_tokens, windows, vocab)))
            total_nll, all_windows = total_nll + nll, all_windows + windows
    total_tokens = sum(row.tokens for row in rows)
    return rows + [Row("overall", total_tokens, math.exp(total_nll / total_tokens),
                       _unigram(train_tokens, all_windows, vocab))]


def _unigram(train_tokens, windows, vocab: int) -> float | None:
    return None if train_tokens is None else lm_pipeline.unigram_perplexity(train_tokens, windows, vocab)


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
    from gpt1_jax.weights import sources
    from gpt1_jax.weights.loading import load_model

    with checkpoint.named_by("--checkpoint"):
        weights = sources.resolve(cli.model_weights(args))
        model = load_model(weights)
        # Our checkpoints record their training data, for the unigram column.
        metadata = checkpoint.read_metadata(weights.folder) if weights.kind == sources.ORBAX else {}
    tokenizer = GPT1Tokenizer.from_files(args.vocab_dir)
    try:
        source = text_sources.make_source(args.data, process_index=0, process_count=1,
                                          allow_replacement=args.allow_replacement)
    except ValueError as err:
        command.fail(str(err).replace("data.source", "--data"))
    train = training_tokens(metadata, tokenizer)
    try:
        rows = evaluate(model, tokenizer, source, args.batch_size, train, progress=True)
    except text_sources.CorpusError as err:
        raise text_sources.CorpusError(str(err).replace("data.allow_replacement=True", "--allow_replacement")) from None
    except NothingToScoreError as err:
        raise NothingToScoreError(f"--data {args.data}: {err}") from None
    width = max(len(row.name) for row in rows)
    print(f"{'document':<{width}}  {'tokens':>10}  {'perplexity':>10}  {'unigram':>10}")
    for row in rows:
        unigram = "-" if row.unigram is None else f"{row.unigram:.2f}"
        print(f"{row.name:<{width}}  {row.tokens:>10,}  {row.perplexity:>10.2f}  {unigram:>10}")
    if train is None:
        print("(unigram: the checkpoint's training data is not cached on this machine)")


if __name__ == "__main__":
    main()

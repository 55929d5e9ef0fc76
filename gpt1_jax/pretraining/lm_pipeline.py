"""The pre-training input pipeline of a run: source -> token cache -> train windows + validation.

With `data.shard_by_process` (the default) each process reads and caches only its share of the
source and draws its rows of every batch from it. With it off, every process reads the whole
source and takes its slice of one global batch, so a run gives the same batches whatever the
number of processes (what the multi-process tests compare against one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from gpt1_jax import storage
from gpt1_jax.errors import UserError
from gpt1_jax.pretraining import lm_batches, text_sources, token_cache
from gpt1_jax.text.tokenizer import GPT1Tokenizer


def default_cache_dir() -> str:
    return storage.user_cache_dir("token_cache")


@dataclasses.dataclass(frozen=True)
class LMDataOptions:
    """What the pipeline reads and how it batches it; the pre-training recipe builds it from its config."""

    source: str  # a `text_sources.make_source` spec: tfds:NAME, files:GLOB, local:PATH
    n_ctx: int  # tokens a window predicts
    vocab_size: int  # the model's BPE ids; the tokenizer's must fit
    batch_size: int  # windows of a global batch, over all processes
    eval_batch_size: int
    eval_batches: int  # validation batches (0: all of the held-out tail)
    seed: int  # which windows each step draws
    val_fraction: float  # the held-out tail of the token stream
    tfds_data_dir: str = ""  # "" for TFDS's default
    vocab_dir: str = ""  # "" to find the BPE files as `vocab_files` does
    cache_dir: str = ""  # "" for `default_cache_dir()`
    shard_by_process: bool = True
    allow_replacement: bool = False  # read a corpus that is mostly not UTF-8


class VocabularyTooSmallError(UserError, ValueError):
    """The model's vocabulary has fewer ids than the tokenizer: larger ids would index past its token table."""

    def __init__(self, vocab_size: int, tokenizer_ids: int):
        self.vocab_size, self.tokenizer_ids = vocab_size, tokenizer_ids
        super().__init__(f"a model vocabulary of {vocab_size} ids is smaller than the tokenizer's {tokenizer_ids:,} "
                         "ids: larger ids would index past the token table")


@dataclasses.dataclass
class LMData:
    sampler: lm_batches.WindowSampler
    validation: list[lm_batches.ValidationBatch]
    tokenizer: GPT1Tokenizer
    unigram_perplexity: float
    rows: slice  # this process's rows of the sampler's batch

    @classmethod
    def build(cls, options: LMDataOptions) -> "LMData":
        n_ctx = options.n_ctx
        processes, index = jax.process_count(), jax.process_index()
        shard = options.shard_by_process
        source = text_sources.make_source(
            options.source, data_dir=options.tfds_data_dir or None,
            process_index=index if shard else 0, process_count=processes if shard else 1,
            allow_replacement=options.allow_replacement)
        tokenizer = GPT1Tokenizer.from_files(options.vocab_dir or None)
        if len(tokenizer.encoder) > options.vocab_size:
            raise VocabularyTooSmallError(options.vocab_size, len(tokenizer.encoder))
        cache_dir = options.cache_dir or default_cache_dir()
        if storage.is_url(cache_dir):
            # A sharded source gives each process its own key, which it writes; otherwise process 0 writes
            # the one key and the others wait for it.
            together = processes > 1 and not shard
            cache = token_cache.TokenCache.load_or_build_shared(
                source, tokenizer, cache_dir, default_cache_dir(), writes=shard or index == 0,
                wait_for_writer=(lambda: multihost_utils.sync_global_devices("token cache uploaded")) if together
                else None)
        else:
            cache = token_cache.TokenCache.load_or_build(source, tokenizer, cache_dir)
        train_tokens, val_tokens = cache.split(options.val_fraction)
        local_batch = options.batch_size // processes
        eval_local = options.eval_batch_size // processes
        eval_batches = options.eval_batches or None
        if shard:
            sampler = lm_batches.WindowSampler(train_tokens, n_ctx, local_batch, options.seed, process_index=index)
            rows = slice(0, local_batch)
            validation = lm_batches.validation_batches(val_tokens, n_ctx=n_ctx, batch_size=eval_local,
                                                       num_batches=eval_batches)
        else:
            sampler = lm_batches.WindowSampler(train_tokens, n_ctx, options.batch_size, options.seed)
            rows = slice(index * local_batch, (index + 1) * local_batch)
            full = lm_batches.validation_batches(val_tokens, n_ctx=n_ctx, batch_size=options.eval_batch_size,
                                                 num_batches=eval_batches)
            eval_rows = slice(index * eval_local, (index + 1) * eval_local)
            validation = [lm_batches.ValidationBatch(b.tokens[eval_rows], b.weights[eval_rows]) for b in full]
        return cls(sampler=sampler, validation=validation, tokenizer=tokenizer,
                   unigram_perplexity=unigram_perplexity(train_tokens, validation, options.vocab_size), rows=rows)

    @contextlib.contextmanager
    def batches(self, start: int, end: int):
        """(step, this process's int32 [rows, n_ctx + 1]) for steps in [start, end), prefetched."""
        rows = self.rows
        with lm_batches.Prefetcher(lambda step: self.sampler.batch(step)[rows], start, end) as prefetched:
            yield prefetched


def unigram_perplexity(train_tokens: np.ndarray, validation: list[lm_batches.ValidationBatch], vocab: int) -> float:
    """Perplexity of add-one-smoothed training unigram frequencies on the validation targets.

    The floor a language model must beat to have learnt anything beyond word frequencies.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    total, n = 0.0, 0.0
    for batch in validation:
        targets = batch.tokens[:, 1:]  # [batch, n_ctx]
        total -= float((log_probs[targets] * batch.weights[:, None]).sum())
        n += float(batch.weights.sum()) * targets.shape[1]
    return math.exp(total / n) if n else math.nan

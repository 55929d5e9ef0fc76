"""gpt1_jax/pretraining/lm_batches.py: random training windows, prefetching, fixed validation windows."""

import numpy as np
import pytest

from gpt1_jax.pretraining import lm_batches, token_cache


def counting_stream(n):
    return np.arange(n, dtype=np.uint16)  # distinct ids, so windows reveal where they came from


def test_batch_is_a_pure_function_of_seed_step_and_process():
    tokens = counting_stream(50_000)
    sampler = lm_batches.WindowSampler(tokens, n_ctx=32, batch_size=8, seed=3, process_index=0)
    again = lm_batches.WindowSampler(tokens, n_ctx=32, batch_size=8, seed=3, process_index=0)
    other_process = lm_batches.WindowSampler(tokens, n_ctx=32, batch_size=8, seed=3, process_index=1)
    batch = sampler.batch(7)
    assert batch.shape == (8, 33) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, again.batch(7))
    assert not np.array_equal(batch, sampler.batch(8))
    assert not np.array_equal(batch, other_process.batch(7))


def test_windows_are_contiguous_spans_of_the_stream():
    batch = lm_batches.WindowSampler(counting_stream(1000), n_ctx=16, batch_size=64, seed=0).batch(0)
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)


def test_prefetcher_yields_the_same_batches_as_direct_calls():
    sampler = lm_batches.WindowSampler(counting_stream(5000), n_ctx=16, batch_size=4, seed=1)
    with sampler.prefetch(10, 20, depth=2) as batches:
        got = list(batches)
    assert [step for step, _ in got] == list(range(10, 20))
    for step, batch in got:
        np.testing.assert_array_equal(batch, sampler.batch(step))


def test_prefetcher_reraises_errors_and_stops_early():
    def make_batch(step):
        if step == 3:
            raise RuntimeError("boom")
        return step

    with pytest.raises(RuntimeError, match="boom"):
        with lm_batches.Prefetcher(make_batch, 0, 10) as batches:
            list(batches)
    with lm_batches.Prefetcher(lambda step: step, 0, 10**9, depth=1) as batches:
        assert next(iter(batches)) == (0, 0)  # close() must not hang with a full queue


def test_validation_windows_are_fixed_cover_the_held_out_tail_and_avoid_training_tokens(
    tmp_path, char_tokenizer, write_corpus
):
    source = write_corpus(tmp_path / "corpus", ["".join(chr(0x100 + i) for i in range(3000))])
    cache = token_cache.TokenCache.load_or_build(source, char_tokenizer(), str(tmp_path / "cache"))
    train, val = cache.split(0.1)
    assert train.size + val.size == 3000 and val.size == 300
    first = lm_batches.validation_batches(val, n_ctx=16, batch_size=4)
    second = lm_batches.validation_batches(val, n_ctx=16, batch_size=4)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    real = np.concatenate([b.tokens[b.weights > 0] for b in first])  # [num_windows, n_ctx + 1]
    np.testing.assert_array_equal(real[:, 1:].ravel(), val[1 : 1 + real.shape[0] * 16])
    assert sum(b.weights.sum() for b in first) == (300 - 1) // 16
    sampler = lm_batches.WindowSampler(train, n_ctx=16, batch_size=64, seed=0)
    seen = np.concatenate([sampler.batch(step).ravel() for step in range(200)])
    assert not np.isin(seen, val).any()


def test_validation_num_batches_pads_with_empty_batches():
    batches = lm_batches.validation_batches(counting_stream(100), n_ctx=16, batch_size=4, num_batches=3)
    assert [float(b.weights.sum()) for b in batches] == [4.0, 2.0, 0.0]


def test_short_corpus_error_names_counts_and_config_keys():
    with pytest.raises(ValueError, match=r"has 100 tokens.*513.*model\.n_ctx.*data\.source"):
        lm_batches.WindowSampler(counting_stream(100), n_ctx=512, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"empty.*data\.source"):
        lm_batches.WindowSampler(counting_stream(0), n_ctx=512, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        lm_batches.validation_batches(counting_stream(10), n_ctx=16, batch_size=1)

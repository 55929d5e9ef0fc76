"""gpt1_jax/pretraining/lm_pipeline.py: a run's source, cache, training windows and validation, from its config (through
the pre-training recipe's `lm_data`, which builds the pipeline's options)."""

import math

import jax
import numpy as np
import pytest

from gpt1_jax import storage
from gpt1_jax.config_check import ConfigError
from gpt1_jax.pretraining import lm_batches, lm_pipeline, pretrain
from gpt1_jax.pretraining.lm_pipeline import LMData
from gpt1_jax.pretraining.text_sources import CorpusError
from pretrain_helpers import tiny_config

TWO_BOOKS = "local:corpus/gutenberg/3[56]-0.txt"  # The Time Machine, The War of the Worlds


def build_as_process(config, monkeypatch, index: int, count: int) -> LMData:
    """LMData.build as process `index` of `count` sees it: one host's view of a multi-host run."""
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_index", lambda: index)
        patch.setattr(jax, "process_count", lambda: count)
        return pretrain.lm_data(config)


def test_build_on_a_real_book_gives_windows_of_its_text_and_fixed_validation(token_cache_dir):
    config = tiny_config(token_cache_dir)  # Alice in Wonderland, n_ctx 32, batches of 8, 2 validation batches
    data = pretrain.lm_data(config)
    assert data.rows == slice(0, 8)
    assert data.tokenizer.decode(data.sampler.tokens[:5]) == "alice 's adventures in wonderland"
    assert data.sampler.batch(0).shape == (8, 33)
    assert [(b.tokens.shape, float(b.weights.sum())) for b in data.validation] == [((8, 33), 8.0)] * 2
    with data.batches(3, 5) as batches:
        got = list(batches)
    assert [step for step, _ in got] == [3, 4]
    for step, batch in got:
        np.testing.assert_array_equal(batch, data.sampler.batch(step))


def test_unigram_baseline_of_a_real_book_lies_between_uniform_and_certain(token_cache_dir):
    data = pretrain.lm_data(tiny_config(token_cache_dir))
    # Word frequencies of English text: far better than uniform over 40,478 ids, far from perfect.
    assert 100 < data.unigram_perplexity < 2_000


def test_a_vocabulary_smaller_than_the_tokenizers_ids_is_refused_before_compiling(token_cache_dir):
    """Ids past the table gave a non-finite loss that blamed the learning rate."""
    with pytest.raises(ConfigError, match=r"model\.vocab_size=100 is smaller than the tokenizer's 40,478 ids"):
        pretrain.lm_data(tiny_config(token_cache_dir, **{"model.vocab_size": 100}))


def test_a_corpus_that_is_not_utf8_is_refused_unless_data_allow_replacement(tmp_path, token_cache_dir):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    config = tiny_config(tmp_path / "cache", **{"data.source": f"files:{noise}", "data.val_fraction": 0.1,
                                                "train.eval_batches": 1})
    with pytest.raises(CorpusError, match=r"noise\.txt: .* invalid UTF-8 .*data\.allow_replacement=True"):
        pretrain.lm_data(config)
    config.data.allow_replacement = True
    assert pretrain.lm_data(config).sampler.tokens.size > 0


def test_unigram_perplexity_matches_a_hand_computation():
    train = np.array([0, 0, 1, 2], np.uint16)  # add-one counts over a vocabulary of 4: [3, 2, 2, 1] / 8
    validation = [lm_batches.ValidationBatch(tokens=np.array([[0, 1, 3], [2, 2, 0]], np.int32),
                                             weights=np.array([1.0, 0.0], np.float32))]  # row 2 is padding
    # Targets of the real row: 1 (p = 2/8) and 3 (p = 1/8); exp(-(log 1/4 + log 1/8) / 2) = sqrt(32).
    assert lm_pipeline.unigram_perplexity(train, validation, vocab=4) == pytest.approx(math.sqrt(32), rel=1e-12)


def test_unigram_perplexity_of_padding_only_validation_is_nan():
    padding = lm_batches.validation_batches(np.arange(40, dtype=np.uint16), n_ctx=8, batch_size=2, num_batches=4)[-1]
    assert float(padding.weights.sum()) == 0.0
    assert math.isnan(lm_pipeline.unigram_perplexity(np.arange(10), [padding], vocab=40))


def test_sharded_processes_each_read_their_own_book_and_draw_their_own_rows(token_cache_dir, monkeypatch):
    config = tiny_config(token_cache_dir, **{"data.source": TWO_BOOKS})
    assert config.data.shard_by_process
    first, second = (build_as_process(config, monkeypatch, index, 2) for index in range(2))
    assert first.rows == second.rows == slice(0, 4)  # each process's whole local batch of 8 / 2
    assert first.tokenizer.decode(first.sampler.tokens[:3]) == "the time machine"
    assert "war of the worlds" in second.tokenizer.decode(second.sampler.tokens[:8])
    assert (first.sampler.process_index, second.sampler.process_index) == (0, 1)
    assert [b.tokens.shape for b in first.validation + second.validation] == [(4, 33)] * 4


def test_unsharded_processes_take_slices_that_tile_the_one_process_batch(token_cache_dir, monkeypatch):
    config = tiny_config(token_cache_dir, **{"data.shard_by_process": False})
    whole = pretrain.lm_data(config)
    parts = [build_as_process(config, monkeypatch, index, 2) for index in range(2)]
    assert [p.rows for p in parts] == [slice(0, 4), slice(4, 8)]
    for step in range(3):
        tiled = np.concatenate([p.sampler.batch(step)[p.rows] for p in parts])  # [8, n_ctx + 1]
        np.testing.assert_array_equal(tiled, whole.sampler.batch(step))
    for k, batch in enumerate(whole.validation):
        np.testing.assert_array_equal(np.concatenate([p.validation[k].tokens for p in parts]), batch.tokens)
        np.testing.assert_array_equal(np.concatenate([p.validation[k].weights for p in parts]), batch.weights)


@pytest.mark.parametrize("bucket", [False, True])
def test_a_home_that_cannot_be_written_is_one_error_naming_the_cache_folder_and_data_cache_dir(tmp_path, monkeypatch,
                                                                                             bucket):
    """HOME=/proc (a sandbox, a batch job) gave a bare FileNotFoundError traceback from the default token cache.

    With a bucket cache the local copy still goes under HOME, so that error names XDG_CACHE_HOME instead.
    """
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "a_file" / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    folder = tmp_path / "a_file" / "home" / ".cache" / "gpt1_jax" / "token_cache"
    assert lm_pipeline.default_cache_dir() == str(folder)
    config = tiny_config("gs://some-bucket/token_cache" if bucket else "")
    with pytest.raises(storage.StorageError) as error:
        pretrain.lm_data(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"Cannot create the {'local ' * bucket}token cache folder {folder} "
                              f"(Not a directory: {tmp_path / 'a_file' / 'home'}); ")
    assert ("set XDG_CACHE_HOME to a folder you can write" if bucket else "set data.cache_dir to a folder") in message

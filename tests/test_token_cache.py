"""gpt1_jax/pretraining/token_cache.py: the atomic uint16 token cache, its reuse, invalidation and repair."""

import hashlib
import os
import pathlib

import numpy as np
import pytest

from gpt1_jax.pretraining import lm_batches, text_sources, token_cache


def file_digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_empty_corpus_error_names_data_source(tmp_path, char_tokenizer, write_corpus):
    source = write_corpus(tmp_path / "corpus", ["", "\ufeff"])
    with pytest.raises(ValueError, match=r"data\.source produced no tokens"):
        token_cache.TokenCache.load_or_build(source, char_tokenizer(), str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_token_ids_that_do_not_fit_uint16_are_rejected(tmp_path, char_tokenizer, write_corpus):
    source = write_corpus(tmp_path / "corpus", ["abc"])
    with pytest.raises(ValueError, match="uint16"):
        token_cache.TokenCache.load_or_build(source, char_tokenizer(offset=70_000), str(tmp_path / "cache"))


def test_cache_is_reused_and_invalidated_by_fingerprint_or_source(tmp_path, char_tokenizer, write_corpus):
    source = write_corpus(tmp_path / "corpus", ["hello world", "second document"])
    cache_dir = str(tmp_path / "cache")
    first = token_cache.TokenCache.load_or_build(source, char_tokenizer(), cache_dir)
    assert first.num_tokens == len("hello world") + len("second document")
    np.testing.assert_array_equal(first.doc_starts, [0, 11, 26])
    reuse = char_tokenizer()
    again = token_cache.TokenCache.load_or_build(source, reuse, cache_dir)
    assert reuse.calls == 0 and again.path == first.path
    assert isinstance(again.tokens, np.memmap)

    new_vocab = char_tokenizer(fingerprint="char-v2")
    assert token_cache.TokenCache.load_or_build(source, new_vocab, cache_dir).path != first.path
    assert new_vocab.calls > 0

    (tmp_path / "corpus" / "doc001.txt").write_text("an edited second document")
    edited = text_sources.FileCorpus(str(tmp_path / "corpus" / "*.txt"), process_index=0, process_count=1)
    rebuilt = token_cache.TokenCache.load_or_build(edited, char_tokenizer(), cache_dir)
    assert rebuilt.path != first.path and rebuilt.num_tokens == 11 + 25


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_meta"])
def test_corrupt_cache_is_rebuilt_without_touching_other_caches(tmp_path, damage, char_tokenizer, write_corpus):
    cache_dir = str(tmp_path / "cache")
    victim = token_cache.TokenCache.load_or_build(
        write_corpus(tmp_path / "a", ["victim text " * 20]), char_tokenizer(), cache_dir
    )
    bystander = token_cache.TokenCache.load_or_build(
        write_corpus(tmp_path / "b", ["bystander text"]), char_tokenizer(), cache_dir
    )
    before = file_digests(pathlib.Path(bystander.path))
    tokens_file = pathlib.Path(victim.path) / "tokens.u16"
    data = bytearray(tokens_file.read_bytes())
    if damage == "truncate":
        tokens_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data[5] ^= 0xFF
        tokens_file.write_bytes(data)
    else:
        (pathlib.Path(victim.path) / "meta.json").unlink()
    with pytest.raises(token_cache.InvalidCacheError):
        token_cache.TokenCache.load(victim.path)

    tokenizer = char_tokenizer()
    source = text_sources.FileCorpus(str(tmp_path / "a" / "*.txt"), process_index=0, process_count=1)
    rebuilt = token_cache.TokenCache.load_or_build(source, tokenizer, cache_dir)
    assert tokenizer.calls > 0 and rebuilt.path == victim.path
    assert bytes(rebuilt.tokens.tobytes()) == np.array([ord(c) for c in "victim text " * 20], "<u2").tobytes()
    assert file_digests(pathlib.Path(bystander.path)) == before
    assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(c.path) for c in (victim, bystander))


def test_failed_build_leaves_no_cache_and_keeps_existing_ones(tmp_path, char_tokenizer, write_corpus):
    class FailingTokenizer(char_tokenizer):
        def encode_batch(self, texts, **kwargs):
            raise KeyboardInterrupt  # e.g. the job is pre-empted mid-build

    cache_dir = str(tmp_path / "cache")
    kept_source = write_corpus(tmp_path / "a", ["kept"])
    kept = token_cache.TokenCache.load_or_build(kept_source, char_tokenizer(), cache_dir)
    before = file_digests(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        token_cache.TokenCache.load_or_build(
            write_corpus(tmp_path / "b", ["never cached"]), FailingTokenizer(), cache_dir
        )
    assert os.listdir(cache_dir) == [os.path.basename(kept.path)]
    assert file_digests(tmp_path / "cache") == before


def test_real_tokenizer_cache_on_gutenberg_books(tmp_path, data_root, books):
    try:
        from gpt1_jax.text.tokenizer import GPT1Tokenizer
    except ImportError as e:
        pytest.skip(f"gpt1_jax.text.tokenizer is not importable yet: {e}")
    tokenizer = GPT1Tokenizer.from_files(data_root / "gpt1_vocab")
    source = text_sources.FileCorpus(str(books / "3[56]-0.txt"), process_index=0, process_count=1)
    cache = token_cache.TokenCache.load_or_build(source, tokenizer, str(tmp_path))
    assert cache.num_documents == 2 and cache.num_tokens > 50_000
    assert int(cache.tokens.max()) < 40_478 + 3
    (time_machine, _) = list(source)
    expected = tokenizer.encode(time_machine)
    np.testing.assert_array_equal(cache.tokens[: cache.doc_starts[1]], expected)
    train, val = cache.split(0.05)
    batch = lm_batches.WindowSampler(train, n_ctx=512, batch_size=4, seed=0).batch(0)
    assert batch.shape == (4, 513)
    assert lm_batches.validation_batches(val, n_ctx=512, batch_size=4)

"""Pre-training data: gpt1_jax/data/{text_sources,token_cache,lm_batches}.py."""

import glob
import hashlib
import logging
import os
import pathlib

import numpy as np
import pytest

from gpt1_jax import vocab_files
from gpt1_jax.data import lm_batches, text_sources, token_cache


@pytest.fixture
def books(data_root):
    return data_root / "corpus" / "gutenberg"


class CharTokenizer:
    """Stands in for GPT1Tokenizer in cache-logic tests: one id per character, calls counted."""

    def __init__(self, fingerprint="char-v1", offset=0):
        self.fingerprint = fingerprint
        self.offset = offset
        self.calls = 0

    def encode_batch(self, texts, *, num_workers=None, progress=False):
        self.calls += 1
        return [[ord(c) + self.offset for c in text] for text in texts]


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return text_sources.FileCorpus(str(folder / "*.txt"), process_index=0, process_count=1)


def file_digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def counting_stream(n):
    return np.arange(n, dtype=np.uint16)  # distinct ids, so windows reveal where they came from


# --- windows ---------------------------------------------------------------------------------


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


def test_validation_windows_are_fixed_cover_the_held_out_tail_and_avoid_training_tokens(tmp_path):
    source = write_corpus(tmp_path / "corpus", ["".join(chr(0x100 + i) for i in range(3000))])
    cache = token_cache.TokenCache.load_or_build(source, CharTokenizer(), str(tmp_path / "cache"))
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


# --- errors name the config key ------------------------------------------------------------------


def test_short_corpus_error_names_counts_and_config_keys():
    with pytest.raises(ValueError, match=r"has 100 tokens.*513.*model\.n_ctx.*data\.source"):
        lm_batches.WindowSampler(counting_stream(100), n_ctx=512, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"empty.*data\.source"):
        lm_batches.WindowSampler(counting_stream(0), n_ctx=512, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        lm_batches.validation_batches(counting_stream(10), n_ctx=16, batch_size=1)


def test_empty_corpus_error_names_data_source(tmp_path):
    source = write_corpus(tmp_path / "corpus", ["", "\ufeff"])
    with pytest.raises(ValueError, match=r"data\.source produced no tokens"):
        token_cache.TokenCache.load_or_build(source, CharTokenizer(), str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_missing_files_and_unset_data_root_name_the_config(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.source: no files match"):
        text_sources.make_source(f"files:{tmp_path}/*.txt", process_index=0, process_count=1)
    monkeypatch.delenv(vocab_files.DATA_ENV, raising=False)
    with pytest.raises(ValueError, match=r"data\.source.*GPT1_JAX_DATA is not set"):
        text_sources.make_source("local:corpus/gutenberg/*.txt")


def test_token_ids_that_do_not_fit_uint16_are_rejected(tmp_path):
    source = write_corpus(tmp_path / "corpus", ["abc"])
    with pytest.raises(ValueError, match="uint16"):
        token_cache.TokenCache.load_or_build(source, CharTokenizer(offset=70_000), str(tmp_path / "cache"))


# --- token cache -------------------------------------------------------------------------------


def test_cache_is_reused_and_invalidated_by_fingerprint_or_source(tmp_path):
    source = write_corpus(tmp_path / "corpus", ["hello world", "second document"])
    cache_dir = str(tmp_path / "cache")
    first = token_cache.TokenCache.load_or_build(source, CharTokenizer(), cache_dir)
    assert first.num_tokens == len("hello world") + len("second document")
    np.testing.assert_array_equal(first.doc_starts, [0, 11, 26])
    reuse = CharTokenizer()
    again = token_cache.TokenCache.load_or_build(source, reuse, cache_dir)
    assert reuse.calls == 0 and again.path == first.path
    assert isinstance(again.tokens, np.memmap)

    new_vocab = CharTokenizer(fingerprint="char-v2")
    assert token_cache.TokenCache.load_or_build(source, new_vocab, cache_dir).path != first.path
    assert new_vocab.calls > 0

    (tmp_path / "corpus" / "doc001.txt").write_text("an edited second document")
    edited = text_sources.FileCorpus(str(tmp_path / "corpus" / "*.txt"), process_index=0, process_count=1)
    rebuilt = token_cache.TokenCache.load_or_build(edited, CharTokenizer(), cache_dir)
    assert rebuilt.path != first.path and rebuilt.num_tokens == 11 + 25


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_meta"])
def test_corrupt_cache_is_rebuilt_without_touching_other_caches(tmp_path, damage):
    cache_dir = str(tmp_path / "cache")
    victim = token_cache.TokenCache.load_or_build(
        write_corpus(tmp_path / "a", ["victim text " * 20]), CharTokenizer(), cache_dir
    )
    bystander = token_cache.TokenCache.load_or_build(
        write_corpus(tmp_path / "b", ["bystander text"]), CharTokenizer(), cache_dir
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

    tokenizer = CharTokenizer()
    source = text_sources.FileCorpus(str(tmp_path / "a" / "*.txt"), process_index=0, process_count=1)
    rebuilt = token_cache.TokenCache.load_or_build(source, tokenizer, cache_dir)
    assert tokenizer.calls > 0 and rebuilt.path == victim.path
    assert bytes(rebuilt.tokens.tobytes()) == np.array([ord(c) for c in "victim text " * 20], "<u2").tobytes()
    assert file_digests(pathlib.Path(bystander.path)) == before
    assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(c.path) for c in (victim, bystander))


def test_failed_build_leaves_no_cache_and_keeps_existing_ones(tmp_path):
    class FailingTokenizer(CharTokenizer):
        def encode_batch(self, texts, **kwargs):
            raise KeyboardInterrupt  # e.g. the job is pre-empted mid-build

    cache_dir = str(tmp_path / "cache")
    kept_source = write_corpus(tmp_path / "a", ["kept"])
    kept = token_cache.TokenCache.load_or_build(kept_source, CharTokenizer(), cache_dir)
    before = file_digests(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        token_cache.TokenCache.load_or_build(
            write_corpus(tmp_path / "b", ["never cached"]), FailingTokenizer(), cache_dir
        )
    assert os.listdir(cache_dir) == [os.path.basename(kept.path)]
    assert file_digests(tmp_path / "cache") == before


# --- sources -------------------------------------------------------------------------------------


def test_clean_text_removes_bom_crlf_and_counts_invalid_bytes(caplog):
    with caplog.at_level(logging.WARNING):
        text = text_sources.clean_text(b"\xef\xbb\xbfline one\r\nline \xff\xfe two\r\n", name="x.txt")
    assert text == "line one\nline \ufffd\ufffd two\n"
    assert "x.txt: replaced 2 invalid UTF-8" in caplog.text


@pytest.mark.parametrize("book", ["11-0.txt", "pg1342.txt", "28054-0.txt"])
def test_gutenberg_header_and_footer_are_stripped_from_real_books(books, book):
    (text,) = text_sources.FileCorpus(str(books / book), process_index=0, process_count=1)
    first_line = text.lstrip().splitlines()[0]
    assert "gutenberg" not in first_line.lower()
    assert "\r" not in text and not text.startswith("\ufeff")
    assert "*** START OF" not in text.upper() and "END OF THE PROJECT GUTENBERG" not in text.upper()
    assert "END OF THIS PROJECT GUTENBERG" not in text.upper()
    assert len(text) > 0.5 * os.path.getsize(books / book)  # only the boilerplate went


def test_file_sharding_covers_every_file_exactly_once(books):
    pattern = str(books / "*.txt")
    for count in (1, 2, 3, 5):
        shards = [
            text_sources.FileCorpus(pattern, process_index=i, process_count=count).files for i in range(count)
        ]
        everything = [f for shard in shards for f in shard]
        assert sorted(everything) == sorted(glob.glob(pattern))
        assert len(set(everything)) == len(everything)


def test_local_spec_resolves_against_the_data_root(monkeypatch, data_root, books):
    monkeypatch.setenv(vocab_files.DATA_ENV, str(data_root))
    source = text_sources.make_source("local:corpus/gutenberg/11-0.txt", process_index=0, process_count=1)
    assert source.files == [str(books / "11-0.txt")]
    assert "11-0.txt" in source.identity


def test_tfds_source_reads_its_process_share_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        source = text_sources.make_source(
            "tfds:tiny_shakespeare:1.0.0:train?feature=text", process_index=1, process_count=2
        )
        documents = list(source)
        assert source.feature == "text" and len(documents) == 4
        assert all(isinstance(d, str) and d for d in documents)
        assert "tiny_shakespeare/1.0.0:train" in source.identity and "process=1/2" in source.identity
        auto = text_sources.make_source("tfds:tiny_shakespeare", process_index=0, process_count=1)
        cache = token_cache.TokenCache.load_or_build(auto, CharTokenizer(), str(tmp_path))
        assert cache.num_documents == 4
    with pytest.raises(ValueError, match=r"data\.source: TFDS has no dataset 'no_such_corpus'"):
        text_sources.make_source("tfds:no_such_corpus", process_index=0, process_count=1)


# --- the real tokenizer on real books ------------------------------------------------------------


def test_real_tokenizer_cache_on_gutenberg_books(tmp_path, data_root, books):
    try:
        from gpt1_jax.tokenizer import GPT1Tokenizer
    except ImportError as e:
        pytest.skip(f"gpt1_jax.tokenizer is not importable yet: {e}")
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

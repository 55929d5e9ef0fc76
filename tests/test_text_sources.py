"""gpt1_jax/pretraining/text_sources.py: local files and TFDS as documents, cleaned and shared over processes."""

import glob
import logging
import os
import re

import numpy as np
import pytest

from gpt1_jax.pretraining import text_sources, token_cache
from gpt1_jax.text import vocab_files


def test_missing_files_and_unset_data_root_name_the_config(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.source: no files match"):
        text_sources.make_source(f"files:{tmp_path}/*.txt", process_index=0, process_count=1)
    monkeypatch.delenv(vocab_files.DATA_ENV, raising=False)
    with pytest.raises(ValueError, match=r"data\.source.*GPT1_JAX_DATA is not set"):
        text_sources.make_source("local:corpus/gutenberg/*.txt")


def test_a_bucket_glob_must_name_its_bucket_without_wildcards():
    """Refused before any request: a wildcard in the bucket would have to list every bucket of the project."""
    with pytest.raises(text_sources.CorpusError, match=r"name the bucket without wildcards \(gs://BUCKET/"):
        text_sources.make_source("files:gs://books-*/novels/*.txt", process_index=0, process_count=1)


def test_clean_text_removes_bom_crlf_and_counts_invalid_bytes(caplog):
    raw = b"\xef\xbb\xbfline one\r\nline \xff\xfe two\r\n" + b"plain text\n" * 20  # 2 of 245 characters bad
    with caplog.at_level(logging.WARNING):
        text = text_sources.clean_text(raw, name="x.txt")
    assert text.startswith("line one\nline \ufffd\ufffd two\nplain text\n")
    assert "x.txt: replaced 2 invalid UTF-8 byte sequence(s) with U+FFFD (0.82% of its characters)" in caplog.text


def test_a_corpus_of_random_bytes_is_refused_unless_replacement_is_allowed(tmp_path, char_tokenizer, caplog):
    """Refused while the cache is built, so no cache is left to skip the check; one accepted with
    data.allow_replacement is cached, and a later run without the flag reuses it."""
    # Random bytes below 0xf0: no 4-byte UTF-8 sequences, so every character fits the char tokenizer's uint16 ids.
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).integers(0, 0xF0, 20_000, np.uint8).tobytes())
    pattern, cache_dir = str(tmp_path / "noise.bin"), tmp_path / "cache"
    refused = text_sources.make_source(f"files:{pattern}", process_index=0, process_count=1)
    with pytest.raises(text_sources.CorpusError,
                       match=r"noise\.bin: 7,556 invalid UTF-8 byte sequence\(s\), 39\.9% of its 18,948 characters "
                             r"\(more than 1%\).*data\.allow_replacement=True"):
        token_cache.TokenCache.load_or_build(refused, char_tokenizer(), str(cache_dir))
    assert os.listdir(cache_dir) == []
    allowed = text_sources.make_source(f"files:{pattern}", process_index=0, process_count=1,
                                       allow_replacement=True)
    with caplog.at_level(logging.WARNING):
        built = token_cache.TokenCache.load_or_build(allowed, char_tokenizer(), str(cache_dir))
    assert "noise.bin: replaced" in caplog.text and (np.asarray(built.tokens) == 0xFFFD).sum() == 7556
    tokenizer = char_tokenizer()
    reused = token_cache.TokenCache.load_or_build(refused, tokenizer, str(cache_dir))
    assert reused.path == built.path and tokenizer.calls == 0


def test_every_book_of_concatenated_gutenberg_books_is_kept(books, tmp_path, caplog):
    names = ["11-0.txt", "35-0.txt", "pg174.txt"]  # two with a BOM, one without
    (tmp_path / "three.txt").write_bytes(b"".join((books / name).read_bytes() for name in names))
    with caplog.at_level(logging.WARNING):
        (text,) = text_sources.FileCorpus(str(tmp_path / "three.txt"), process_index=0, process_count=1)
    singles = [next(iter(text_sources.FileCorpus(str(books / name), process_index=0, process_count=1)))
               for name in names]
    assert text == "\n\n".join(singles) and caplog.text == ""


def test_stripping_that_drops_most_of_a_file_is_logged_naming_it(books, tmp_path, caplog):
    """Alice, then Moby Dick whose marker lines are not in the '*** START OF' form: Moby Dick is dropped."""
    moby = (books / "2701-0.txt").read_bytes().replace(b"*** START OF", b"START OF").replace(b"*** END OF", b"END OF")
    (tmp_path / "two.txt").write_bytes((books / "11-0.txt").read_bytes() + moby)
    with caplog.at_level(logging.WARNING):
        (text,) = text_sources.FileCorpus(str(tmp_path / "two.txt"), process_index=0, process_count=1)
    assert "MOBY" not in text.upper()
    assert re.search(r"two\.txt: stripping Project Gutenberg headers and licences kept \d+ of its \d+ characters",
                     caplog.text)


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


def test_tfds_source_reads_its_process_share_with_mock_data(tmp_path, char_tokenizer):
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
        cache = token_cache.TokenCache.load_or_build(auto, char_tokenizer(), str(tmp_path))
        assert cache.num_documents == 4
    with pytest.raises(ValueError, match=r"data\.source: TFDS has no dataset 'no_such_corpus'"):
        text_sources.make_source("tfds:no_such_corpus", process_index=0, process_count=1)

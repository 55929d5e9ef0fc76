"""gpt1_jax/pretraining/token_cache.py: the atomic uint16 token cache, its reuse, invalidation and repair."""

import errno
import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from gpt1_jax.errors import UserError
from gpt1_jax.pretraining import lm_batches, text_sources, token_cache
from gpt1_jax.training.preemption import Interrupted, StopRequest
from pretrain_helpers import REPO, tiny_config, train_py_command


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


def test_a_full_disk_is_one_error_naming_the_folder_the_room_needed_and_data_cache_dir(
        tmp_path, monkeypatch, char_tokenizer, write_corpus):
    """It was a raw `OSError: No space left on device` traceback; the room the whole cache needs is extrapolated
    from the documents written before the disk filled up (here 2 of 4, of 500 kB each)."""
    real_open, writes = open, []

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if str(path).endswith("tokens.u16") else file

    monkeypatch.setattr(token_cache, "open", open_on_a_full_disk, raising=False)
    cache_dir = tmp_path / "cache"
    source = write_corpus(tmp_path / "corpus", ["x" * 250_000] * 4)
    with pytest.raises(token_cache.CacheSpaceError) as raised:
        token_cache.TokenCache.load_or_build(source, char_tokenizer(), str(cache_dir))
    assert isinstance(raised.value, UserError) and "\n" not in str(raised.value)
    assert f"No room for the token cache in {cache_dir}: " in str(raised.value)
    assert "the cache needs about 2.0 MB" in str(raised.value) and "set data.cache_dir to a folder" in str(raised.value)
    assert os.listdir(cache_dir) == []


def test_a_stop_while_tokenizing_removes_the_temporary_folder(tmp_path, char_tokenizer, write_corpus):
    """A SIGTERM during the build (train.py enters `StopRequest(at_once=True)` around it) used to exit 143 at
    once, leaving `.<key>.tmp-*` behind; now `Interrupted` ends the build and its folder is deleted."""
    cache_dir = tmp_path / "cache"
    building = []

    class SignalledTokenizer(char_tokenizer):
        def encode_batch(self, texts, **kwargs):
            building.extend(os.listdir(cache_dir))
            os.kill(os.getpid(), signal.SIGTERM)
            return super().encode_batch(texts, **kwargs)

    with pytest.raises(Interrupted, match="SIGTERM while tokenizing: stopped"):
        with StopRequest("tokenizing", at_once=True):
            token_cache.TokenCache.load_or_build(write_corpus(tmp_path / "a", ["text"]), SignalledTokenizer(),
                                                 str(cache_dir))
    assert len(building) == 1 and ".tmp-" in building[0] and os.listdir(cache_dir) == []


def test_a_sigterm_while_train_py_tokenizes_exits_0_with_one_line_and_no_temporary_folder(tmp_path, data_root):
    """It exited 143 at once, silently, leaving `.<key>.tmp-*` behind. One 1.9 MB book is tokenized in-process for
    tens of seconds, long enough to be signalled mid-build."""
    cache_dir = tmp_path / "cache"
    config = tiny_config(cache_dir, **{"data.source": "local:corpus/gutenberg/145-0.txt"})
    proc = subprocess.Popen(train_py_command(config, tmp_path / "run"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "GPT1_JAX_DATA": str(data_root)})
    deadline = time.monotonic() + 120
    while not (cache_dir.is_dir() and any(".tmp-" in name for name in os.listdir(cache_dir))):
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and time.monotonic() - sent < 10, output[-3000:]
    assert f"SIGTERM while reading data.source into the token cache in {cache_dir}: stopped" in output
    assert os.listdir(cache_dir) == [] and not (tmp_path / "run" / "checkpoints").exists()


def test_folders_of_killed_builds_are_deleted_and_those_of_live_ones_kept(tmp_path, char_tokenizer, write_corpus):
    """kill -9 cannot be caught: the next run deletes what such a build left, by the pid in the folder's name on
    this host, by its age for another host's (a shared folder) or a name without a pid."""
    host, key = socket.gethostname(), "0123456789abcdef01234567"
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # a process of this host that is gone
    folders = {f".{key}.tmp-{host}-{dead}-a1b2c3d4": False, f".{key}.stale-{host}-{dead}-e5f6g7h8": False,
               f".{key}.tmp-{host}-{os.getpid()}-i9j0k1l2": True, f".{key}.tmp-other-host-{dead}-m3n4o5p6": True,
               f".{key}.tmp-other-host-{dead}-q7r8s9t0": False, f".{key}.tmp-u1v2w3x4": False,
               "unrelated-folder": True}
    cache_dir = tmp_path / "cache"
    for name in folders:
        (cache_dir / name).mkdir(parents=True)
        (cache_dir / name / "tokens.u16").write_bytes(b"partial")
    a_day_ago = time.time() - token_cache.ABANDONED_AFTER_S - 60
    for name in (f".{key}.tmp-other-host-{dead}-q7r8s9t0", f".{key}.tmp-u1v2w3x4"):
        for path in (cache_dir / name / "tokens.u16", cache_dir / name):
            os.utime(path, (a_day_ago, a_day_ago))
    cache = token_cache.TokenCache.load_or_build(write_corpus(tmp_path / "a", ["text"]), char_tokenizer(),
                                                 str(cache_dir))
    left = set(os.listdir(cache_dir)) - {os.path.basename(cache.path)}
    assert left == {name for name, kept in folders.items() if kept}


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

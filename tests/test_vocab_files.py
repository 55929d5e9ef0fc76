"""gpt1_jax/vocab_files.py: where the vocabulary is looked for, the fix-it error, and the fetch into the cache.

No test here reaches the network: downloads go to an HTTP server on 127.0.0.1 standing in for GitHub.
"""

import functools
import http.server
import threading

import pytest

from gpt1_jax import vocab_files


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """No environment folders, a fresh user cache, and a download URL on a closed local port."""
    monkeypatch.delenv(vocab_files.VOCAB_ENV, raising=False)
    monkeypatch.delenv(vocab_files.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.setenv("no_proxy", "*")  # urllib must not route 127.0.0.1 through a proxy
    monkeypatch.setattr(vocab_files, "SOURCE_URL", "http://127.0.0.1:9/")


@pytest.fixture
def real_vocab(data_root):
    return data_root / "gpt1_vocab"


def vocab_copy(folder, real_vocab, names=vocab_files.VOCAB_FILES):
    """`folder` holding links to (some of) the real vocabulary files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(real_vocab / name)
    return folder


@pytest.fixture
def local_server(monkeypatch):
    """serve(folder): an HTTP server on 127.0.0.1 for `folder`, made the download URL; returns its request log."""
    servers = []

    def serve(folder):
        requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
        servers.append(server)
        monkeypatch.setattr(vocab_files, "SOURCE_URL", f"http://127.0.0.1:{server.server_port}/")
        return requests

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_lookup_order_is_explicit_folder_then_vocab_env_then_data_root_then_cache(
        tmp_path, monkeypatch, data_root, real_vocab):
    explicit = vocab_copy(tmp_path / "explicit", real_vocab)
    from_env = vocab_copy(tmp_path / "from_env", real_vocab)
    cached = vocab_copy(vocab_files.cache_dir(), real_vocab)
    monkeypatch.setenv(vocab_files.VOCAB_ENV, str(from_env))
    monkeypatch.setenv(vocab_files.DATA_ENV, str(data_root))
    found = [vocab_files.find_vocab_dir(explicit, allow_download=False)]
    found.append(vocab_files.find_vocab_dir(allow_download=False))
    monkeypatch.delenv(vocab_files.VOCAB_ENV)
    found.append(vocab_files.find_vocab_dir(allow_download=False))
    monkeypatch.delenv(vocab_files.DATA_ENV)
    found.append(vocab_files.find_vocab_dir(allow_download=False))
    assert found == [explicit, from_env, real_vocab, cached]
    assert cached == tmp_path / "xdg_cache" / "gpt1_jax" / "vocab"


def test_a_folder_with_only_one_of_the_two_files_is_passed_over(tmp_path, monkeypatch, data_root, real_vocab):
    half = vocab_copy(tmp_path / "half", real_vocab, names=[vocab_files.ENCODER_FILE])
    monkeypatch.setenv(vocab_files.VOCAB_ENV, str(half))
    monkeypatch.setenv(vocab_files.DATA_ENV, str(data_root))
    assert vocab_files.find_vocab_dir(allow_download=False) == real_vocab


def test_missing_files_error_lists_every_folder_searched_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv(vocab_files.VOCAB_ENV, str(tmp_path / "from_env"))
    monkeypatch.setenv(vocab_files.DATA_ENV, str(tmp_path / "data"))
    with pytest.raises(vocab_files.VocabFilesNotFoundError) as error:
        vocab_files.find_vocab_dir(allow_download=False)
    message = str(error.value)
    for folder in (tmp_path / "from_env", tmp_path / "data" / "gpt1_vocab", vocab_files.cache_dir()):
        assert f"  - {folder}\n" in message
    assert "download disabled" in message
    assert "Fix: put both files in one folder and pass it as vocab_dir, or set $GPT1_JAX_VOCAB" in message


def test_missing_files_are_downloaded_into_the_user_cache_once(local_server, real_vocab):
    requests = local_server(real_vocab)
    folder = vocab_files.find_vocab_dir()
    assert folder == vocab_files.cache_dir()
    for name in vocab_files.VOCAB_FILES:
        assert (folder / name).read_bytes() == (real_vocab / name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(vocab_files.VOCAB_FILES)  # no .part files left
    assert vocab_files.find_vocab_dir() == folder
    assert sorted(requests) == sorted(f"/{name}" for name in vocab_files.VOCAB_FILES)  # the second call: none


def test_an_interrupted_download_fetches_only_the_file_still_missing(tmp_path, local_server, real_vocab):
    vocab_copy(vocab_files.cache_dir(), real_vocab, names=[vocab_files.ENCODER_FILE])
    requests = local_server(vocab_copy(tmp_path / "server", real_vocab, names=[vocab_files.MERGES_FILE]))
    assert vocab_files.find_vocab_dir() == vocab_files.cache_dir()
    assert requests == [f"/{vocab_files.MERGES_FILE}"]


def test_a_failed_download_says_why_and_leaves_the_cache_empty(tmp_path, local_server):
    (tmp_path / "nothing_served").mkdir()
    local_server(tmp_path / "nothing_served")  # every request answers 404
    with pytest.raises(vocab_files.VocabFilesNotFoundError, match=r"download failed: HTTP Error 404.*\n.*Needed:"):
        vocab_files.find_vocab_dir()
    assert list(vocab_files.cache_dir().iterdir()) == []

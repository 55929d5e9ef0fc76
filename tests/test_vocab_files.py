"""gpt1_jax/text/vocab_files.py: where the vocabulary is looked for, the fix-it error, and the fetch into the cache.

No test here reaches the network: downloads go to an HTTP server on 127.0.0.1 standing in for GitHub,
or to a stand-in for `urllib.request.urlopen`.
"""

import functools
import http.client
import http.server
import io
import re
import threading

import pytest

from gpt1_jax.text import vocab_files


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
    with pytest.raises(vocab_files.VocabFilesNotFoundError,
                       match=r"download failed: http://127\.0\.0\.1:\d+/encoder_bpe_40000\.json: HTTP Error 404"
                             r".*\n.*Needed:"):
        vocab_files.find_vocab_dir()
    assert list(vocab_files.cache_dir().iterdir()) == []


class FakeResponse(io.BytesIO):
    """What `urlopen` returns for one URL: `read()` gives the body, or raises `error` as a cut-off transfer does."""

    def __init__(self, body: bytes, error: Exception | None = None):
        super().__init__(body)
        self.error = error

    def read(self, *args):
        if self.error is not None:
            raise self.error
        return super().read(*args)


def serve_bodies(monkeypatch, real_vocab, replaced=None):
    """urlopen answering each vocabulary URL with the real file, or with `replaced` (name, FakeResponse)."""
    def urlopen(url, timeout):
        name = url.rsplit("/", 1)[-1]
        if replaced and name == replaced[0]:
            return replaced[1]
        return FakeResponse((real_vocab / name).read_bytes())

    monkeypatch.setattr(vocab_files.urllib.request, "urlopen", urlopen)


HTML = b"<!DOCTYPE html><html><body>Sign in to the hotel Wi-Fi</body></html>"
ENCODER, MERGES = vocab_files.ENCODER_FILE, vocab_files.MERGES_FILE


@pytest.mark.parametrize("name, response, found", [
    pytest.param(ENCODER, FakeResponse(b"", http.client.IncompleteRead(b'{"a": 1', 900)),
                 r"IncompleteRead\(7 bytes read, 900 more expected\)", id="cut-short"),
    pytest.param(ENCODER, FakeResponse(HTML), r"served an HTML page \('<!DOCTYPE html>", id="html-encoder"),
    pytest.param(MERGES, FakeResponse(HTML), r"served an HTML page", id="html-merges"),
    pytest.param(ENCODER, FakeResponse(b'{"a": 1, "b": 2'), r"served 15 bytes that are not JSON",
                 id="truncated-json"),
    pytest.param(ENCODER, FakeResponse(b'{"a": "1"}'), r"served JSON that is not an object of token -> integer id",
                 id="json-not-an-encoder"),
    pytest.param(MERGES, FakeResponse(b"t h\ni n\n"), r"served text whose first line is 't h', not the '#version'",
                 id="no-header"),
    pytest.param(MERGES, FakeResponse(b"#version: 0.2\nt h\nnot a merge\n"),
                 r"served lines that are not merges 'a b': \['not a merge'\]", id="bad-merge"),
])
def test_a_cut_short_or_wrong_download_names_the_url_and_the_cache_file_and_caches_nothing(
        monkeypatch, real_vocab, name, response, found):
    serve_bodies(monkeypatch, real_vocab, (name, response))
    with pytest.raises(vocab_files.VocabFilesNotFoundError) as error:
        vocab_files.find_vocab_dir()
    message = str(error.value)
    assert re.search(rf"download failed: {re.escape(vocab_files.SOURCE_URL + name)}:? {found}", message), message
    assert f"nothing written to {vocab_files.cache_dir() / name})" in message
    assert not (vocab_files.cache_dir() / name).exists()
    assert not [p for p in vocab_files.cache_dir().iterdir() if p.name.endswith(".part")]
    serve_bodies(monkeypatch, real_vocab)  # the network recovers: the next lookup fetches the real files
    assert (vocab_files.find_vocab_dir() / name).read_bytes() == (real_vocab / name).read_bytes()

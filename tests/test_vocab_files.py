"""gpt1_jax/text/vocab_files.py: where the vocabulary is looked for, the fix-it error, and the fetch into the cache.

No test here reaches the network: the hub is tests/fake_hub.py on 127.0.0.1, and where a test serves nothing the
hub's address is a closed port there.
"""

import re

import pytest
from fake_hub import FakeHub, Repo, use_hub

from gpt1_jax import storage
from gpt1_jax.text import vocab_files
from gpt1_jax.weights import hub

COMMIT, FIXED_COMMIT = "3" * 40, "4" * 40
HUB_NAMES = dict(zip(vocab_files.VOCAB_FILES, hub.TOKENIZER_FILES))  # encoder_bpe_40000.json -> vocab.json, ...


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """No environment folders, fresh user and hub caches, and the hub on a closed local port."""
    monkeypatch.delenv(vocab_files.VOCAB_ENV, raising=False)
    monkeypatch.delenv(vocab_files.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_cache")


@pytest.fixture
def real_vocab(data_root):
    return data_root / "gpt1_vocab"


def vocab_copy(folder, real_vocab, names=vocab_files.VOCAB_FILES):
    """`folder` holding links to (some of) the real vocabulary files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(real_vocab / name)
    return folder


def released_repo(real_vocab, commit=COMMIT, replaced=None) -> Repo:
    """The released model's repository: the real files as vocab.json and merges.txt, or `replaced` {name: body}."""
    files = {hub_name: (real_vocab / name).read_bytes() for name, hub_name in HUB_NAMES.items()}
    return Repo(commits={commit: {**files, **(replaced or {})}}, refs={"main": commit})


@pytest.fixture
def released_hub(real_vocab, tmp_path, monkeypatch):
    """A fake hub holding the released repository, made this process's hub; its `requests` say what was fetched."""
    with FakeHub() as fake:
        fake.repos[hub.RELEASED_REPO] = released_repo(real_vocab)
        use_hub(monkeypatch, fake.url, tmp_path / "hf_cache")
        yield fake


def fetched_files(fake: FakeHub) -> list[str]:
    """The files `fake` sent, in order (GETs of /ORG/NAME/resolve/REVISION/FILE; not the hub's other calls)."""
    return [path.rsplit("/", 1)[-1] for method, path, _ in fake.requests if method == "GET" and "/resolve/" in path]


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


def test_missing_files_are_fetched_from_the_hub_into_the_user_cache_once(released_hub, real_vocab):
    folder = vocab_files.find_vocab_dir()
    assert folder == vocab_files.cache_dir()
    for name in vocab_files.VOCAB_FILES:
        assert (folder / name).read_bytes() == (real_vocab / name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(vocab_files.VOCAB_FILES)  # no .part files left
    assert vocab_files.find_vocab_dir() == folder
    assert sorted(fetched_files(released_hub)) == sorted(hub.TOKENIZER_FILES)  # the second lookup: none


def test_an_interrupted_fetch_from_the_hub_gets_only_the_file_still_missing(released_hub, real_vocab):
    vocab_copy(vocab_files.cache_dir(), real_vocab, names=[vocab_files.ENCODER_FILE])
    assert vocab_files.find_vocab_dir() == vocab_files.cache_dir()
    assert fetched_files(released_hub) == [HUB_NAMES[vocab_files.MERGES_FILE]]


OFFLINE_REASON = r"offline \(HF_HUB_OFFLINE is set, or the hub cannot be reached\) and not in the hub cache"


@pytest.mark.parametrize("hub_state, reason", [
    pytest.param("no-repository", r"no folder of that name here and no such model repository on the hub",
                 id="no-repository"),
    # huggingface_hub retries a refused connection 5 times, 1 + 2 + 4 + 8 + 8 s apart, before it gives up: past
    # CI's budget for a message the offline case already shows (and tests/test_hub.py a server gone mid-download).
    pytest.param("server-down", OFFLINE_REASON, id="server-down", marks=pytest.mark.long),
    pytest.param("offline", OFFLINE_REASON, id="offline"),
])
def test_a_failed_fetch_from_the_hub_says_why_and_leaves_the_cache_without_vocabulary_files(
        tmp_path, monkeypatch, real_vocab, hub_state, reason):
    with FakeHub() as fake:
        if hub_state != "no-repository":
            fake.repos[hub.RELEASED_REPO] = released_repo(real_vocab)
        use_hub(monkeypatch, fake.url, tmp_path / "hf_cache", offline=hub_state == "offline")
        if hub_state == "server-down":
            fake.stop()
        with pytest.raises(vocab_files.VocabFilesNotFoundError) as error:
            vocab_files.find_vocab_dir()
    message = str(error.value)
    failed = rf"download failed: hf:{hub.RELEASED_REPO} \(vocab\.json\): {reason}.* \(nothing written to .*\)\)\.\n"
    assert re.search(failed, message), message
    assert f"or, offline (HF_HUB_OFFLINE), first run `hf download {hub.RELEASED_REPO} vocab.json merges.txt`" in message
    assert list(vocab_files.cache_dir().iterdir()) == []


def test_a_home_that_cannot_be_written_is_one_line_naming_the_download_folder_and_what_to_set(tmp_path, monkeypatch):
    """The user cache derives from HOME; HOME=/proc (a sandbox, a batch job) cannot hold it. Nothing is fetched."""
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "a_file" / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(hub, "fetch", lambda *args, **kwargs: pytest.fail("fetched"))
    with pytest.raises(storage.StorageError) as error:
        vocab_files.find_vocab_dir()
    folder = tmp_path / "a_file" / "home" / ".cache" / "gpt1_jax" / "vocab"
    assert str(error.value) == (
        f"Cannot create the folder to download the GPT-1 vocabulary into {folder} (Not a directory: "
        f"{tmp_path / 'a_file' / 'home'}); set $GPT1_JAX_VOCAB (or pass vocab_dir) to a folder holding "
        "encoder_bpe_40000.json and vocab_40000.bpe, or set $XDG_CACHE_HOME to a folder you can write (the default "
        "lies under $HOME/.cache).")


HTML = b"<!DOCTYPE html><html><body>Sign in to the hotel Wi-Fi</body></html>"


@pytest.mark.parametrize("hub_name, body, found", [
    pytest.param("vocab.json", HTML, r"an HTML page \('<!DOCTYPE html>", id="html-vocab"),
    pytest.param("merges.txt", HTML, r"an HTML page", id="html-merges"),
    pytest.param("vocab.json", b'{"a": 1, "b": 2', r"15 bytes that are not JSON", id="truncated-json"),
    pytest.param("vocab.json", b'{"a": "1"}', r"JSON that is not an object of token -> integer id",
                 id="json-not-an-encoder"),
    pytest.param("vocab.json", b'{"a": 0, "b": 1}', r"a token -> id object of 2 entries, not 40478",
                 id="vocab-of-another-size"),
    pytest.param("merges.txt", b"t h\ni n\n", r"text whose first line is 't h', not the '#version' header",
                 id="merges-without-header"),
    pytest.param("merges.txt", b"#version: 0.2\nt h\nnot a merge\n",
                 r"lines that are not merges 'a b': \['not a merge'\]", id="bad-merge"),
    pytest.param("merges.txt", b"#version: 0.2\nt h\ni n\n", r"2 merges after the '#version' header, not 40000",
                 id="merges-of-another-size"),
])
def test_a_wrong_file_from_the_hub_is_named_and_nothing_is_cached_until_the_hub_serves_the_right_one(
        tmp_path, monkeypatch, real_vocab, hub_name, body, found):
    with FakeHub() as fake:
        fake.repos[hub.RELEASED_REPO] = released_repo(real_vocab, replaced={hub_name: body})
        use_hub(monkeypatch, fake.url, tmp_path / "hf_cache")
        with pytest.raises(vocab_files.VocabFilesNotFoundError) as error:
            vocab_files.find_vocab_dir()
        message = str(error.value)
        named = rf"download failed: hf:{hub.RELEASED_REPO} \({re.escape(hub_name)}\): the hub served {found}"
        assert re.search(named, message), message
        assert f"nothing written to {vocab_files.cache_dir()})" in message
        assert list(vocab_files.cache_dir().iterdir()) == []  # not even the other, good file
        fake.repos[hub.RELEASED_REPO] = released_repo(real_vocab, commit=FIXED_COMMIT)
        folder = vocab_files.find_vocab_dir()
    for name in vocab_files.VOCAB_FILES:
        assert (folder / name).read_bytes() == (real_vocab / name).read_bytes()

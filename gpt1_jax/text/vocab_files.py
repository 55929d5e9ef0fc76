"""Finding (and, if allowed, fetching) the two GPT-1 vocabulary files.

The released model (openai/finetune-transformer-lm) ships its BPE vocabulary as two files next to the
weights. They are data, not code, so they are never committed here; this module looks for them in a fixed
order so that tests, training jobs and notebooks all agree on which copy they use:

1. an explicit folder passed by the caller,
2. ``$GPT1_JAX_VOCAB`` (a folder holding the two files),
3. ``$GPT1_JAX_DATA/gpt1_vocab`` (the project's local data root, laid out like ``shared/data``),
4. the user cache, ``$XDG_CACHE_HOME/gpt1_jax/vocab`` or ``~/.cache/gpt1_jax/vocab``.

Only when none of these holds both files, and the caller allows it, are they fetched into the cache, from the
released model's repository on the Hugging Face Hub (`gpt1_jax.weights.hub.RELEASED_REPO`). It holds them as
``vocab.json`` (the same token -> id object as ``encoder_bpe_40000.json``) and ``merges.txt`` (the same
"#version" header and merges as ``vocab_40000.bpe``), which transformers' OpenAIGPTTokenizer reads exactly as
the released code reads the originals. They come through `huggingface_hub`, as the weights do, so its cache,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and tokens apply; they are then copied into the cache under the original
names, so the lookup and everything downstream see one layout whichever way the files arrived.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gpt1_jax import storage
from gpt1_jax.constants import DATA_ENV, VOCAB_SIZE
from gpt1_jax.errors import UserError

ENCODER_FILE = "encoder_bpe_40000.json"
MERGES_FILE = "vocab_40000.bpe"
VOCAB_FILES = (ENCODER_FILE, MERGES_FILE)
N_MERGES = 40000  # the 40000 in the file names: "a bytepair encoding (BPE) vocabulary with 40,000 merges", Sec. 4.1

VOCAB_ENV = "GPT1_JAX_VOCAB"

START_ID, DELIMITER_ID, CLASSIFY_ID = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2


class VocabFilesNotFoundError(UserError, FileNotFoundError):
    """Raised when the vocabulary is neither on disk nor downloadable; the message says how to fix it."""


class VocabDownloadError(VocabFilesNotFoundError):
    """A fetch from the hub that failed, or that brought something other than the vocabulary file."""


def cache_dir() -> Path:
    """The per-user folder where downloaded vocabulary files are kept."""
    return Path(storage.user_cache_dir("vocab"))


def candidate_dirs(vocab_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the vocabulary, in priority order (see the module docstring)."""
    dirs = []
    if vocab_dir is not None:
        dirs.append(Path(vocab_dir))
    if os.environ.get(VOCAB_ENV):
        dirs.append(Path(os.environ[VOCAB_ENV]))
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]) / "gpt1_vocab")
    dirs.append(cache_dir())
    return dirs


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in VOCAB_FILES)


def _missing_message(searched: list[Path], reason: str) -> str:
    from gpt1_jax.weights import hub

    where = "\n".join(f"  - {d}" for d in searched)
    hub_files = " ".join(hub.TOKENIZER_FILES)
    return (
        f"GPT-1 vocabulary files not found ({reason}).\n"
        f"Needed: {ENCODER_FILE} and {MERGES_FILE} (on the Hugging Face Hub as {' and '.join(hub.TOKENIZER_FILES)} "
        f"of {hub.RELEASED_REPO}).\n"
        f"Searched:\n{where}\n"
        f"Fix: put both files in one folder and pass it as vocab_dir, or set ${VOCAB_ENV} to that folder, "
        f"or set ${DATA_ENV} to a data root containing gpt1_vocab/, or copy them into {cache_dir()}; "
        f"or, offline (HF_HUB_OFFLINE), first run `hf download {hub.RELEASED_REPO} {hub_files}` where there is a "
        "network, with the same HF_HOME."
    )


def download(dest: str | os.PathLike | None = None) -> Path:
    """Fetches the files ``dest`` (default: the cache) lacks from the hub and returns that folder.

    Both are checked (`_vocab_file_problem`) before either is written, and each is written to a temporary name
    in the destination folder and then renamed, so a page served in its stead (a captive portal, an error page
    sent with status 200), another vocabulary, a crash or a concurrent download never leaves a file that a later
    lookup would take for the vocabulary. A transfer cut short never gets this far: the hub resumes it or fails.
    Raises `VocabDownloadError` naming the hub file and the destination folder.
    """
    folder = Path(dest) if dest is not None else cache_dir()
    storage.make_local_dir(folder, "folder to download the GPT-1 vocabulary into", f"set ${VOCAB_ENV} (or pass "
                           f"vocab_dir) to a folder holding {ENCODER_FILE} and {MERGES_FILE}, or set "
                           "$XDG_CACHE_HOME to a folder you can write (the default lies under $HOME/.cache)")
    missing = [name for name in VOCAB_FILES if not (folder / name).is_file()]
    for name, payload in _fetch_checked(missing, folder).items():
        _write_atomically(folder / name, payload)
    return folder


def _fetch_checked(names: list[str], folder: Path) -> dict[str, bytes]:
    """The released files for `names` (ours), fetched from the hub and checked; `folder` only names the target."""
    from gpt1_jax.weights import hub

    model = hub.HubModel(hub.RELEASED_REPO)
    hub_names = dict(zip(VOCAB_FILES, hub.TOKENIZER_FILES))  # (vocab.json, merges.txt): the same files renamed
    try:
        snapshot = hub.fetch(model, filenames=tuple(hub_names[name] for name in names)).folder
    except hub.HubError as err:
        raise VocabDownloadError(f"{err} (nothing written to {folder})") from err
    payloads = {}
    for name in names:
        source = snapshot / hub_names[name]
        payloads[name] = source.read_bytes()
        problem = _vocab_file_problem(name, payloads[name])
        if problem:
            raise VocabDownloadError(f"{model} ({hub_names[name]}): the hub served {problem}, not the GPT-1 "
                                     f"vocabulary file (kept in the hub cache as {source}; nothing written to "
                                     f"{folder})")
    return payloads


def _write_atomically(target: Path, payload: bytes) -> None:
    """Writes `payload` beside `target` under a temporary name, then renames it, so `target` is whole or absent."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _vocab_file_problem(name: str, payload: bytes) -> str | None:
    """What downloaded bytes for `name` are, when they are not the released vocabulary's file; else None.

    The encoder is a JSON object of BPE token -> id; the merges file opens with a "#version" line and
    then holds one "a b" pair per line, as the tokenizer reads them. The sizes are checked too: another BPE
    vocabulary in the same format (GPT-2's 50,257 tokens) would load and tokenize silently wrong.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes that are not UTF-8 text"
    if text.lstrip().startswith("<"):
        return f"an HTML page ({text.lstrip()[:40]!r}...)"
    return _encoder_problem(payload, text) if name == ENCODER_FILE else _merges_problem(text)


def _encoder_problem(payload: bytes, text: str) -> str | None:
    try:
        encoder = json.loads(text)
    except json.JSONDecodeError as err:
        return f"{len(payload)} bytes that are not JSON ({err}; cut short?)"
    if not (isinstance(encoder, dict) and encoder
            and all(isinstance(k, str) and type(v) is int for k, v in encoder.items())):
        return "JSON that is not an object of token -> integer id"
    return None if len(encoder) == VOCAB_SIZE else f"a token -> id object of {len(encoder)} entries, not {VOCAB_SIZE}"


def _merges_problem(text: str) -> str | None:
    header, *lines = text.split("\n")
    if not header.startswith("#version"):
        return f"text whose first line is {header[:40]!r}, not the '#version' header"
    merges = [line for line in lines if line]
    malformed = [line for line in merges if len(line.split()) != 2]
    if malformed:
        return f"lines that are not merges 'a b': {malformed[:3]}"
    return None if len(merges) == N_MERGES else f"{len(merges)} merges after the '#version' header, not {N_MERGES}"


def find_vocab_dir(vocab_dir: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """Returns the first folder holding both vocabulary files, downloading them to the cache if needed.

    An explicit ``vocab_dir`` that lacks the files is an error rather than a silent fall-through, since the
    caller asked for that copy.
    """
    if vocab_dir is not None and not _has_files(Path(vocab_dir)):
        raise VocabFilesNotFoundError(_missing_message([Path(vocab_dir)], "explicit vocab_dir lacks them"))
    searched = candidate_dirs(vocab_dir)
    for folder in searched:
        if _has_files(folder):
            return folder
    if not allow_download:
        raise VocabFilesNotFoundError(_missing_message(searched, "download disabled"))
    try:
        return download()
    except storage.StorageError:  # the cache folder cannot be made: its own line says what to set instead
        raise
    except OSError as err:  # a VocabDownloadError
        raise VocabFilesNotFoundError(_missing_message(searched, f"download failed: {err}")) from err

"""Finding (and, if allowed, fetching) the two GPT-1 vocabulary files.

The released model (openai/finetune-transformer-lm) ships its BPE vocabulary as two files next to the
weights. They are data, not code, so they are never committed here; this module looks for them in a fixed
order so that tests, training jobs and notebooks all agree on which copy they use:

1. an explicit folder passed by the caller,
2. ``$GPT1_JAX_VOCAB`` (a folder holding the two files),
3. ``$GPT1_JAX_DATA/gpt1_vocab`` (the project's local data root, laid out like ``shared/data``),
4. the user cache, ``$XDG_CACHE_HOME/gpt1_jax/vocab`` or ``~/.cache/gpt1_jax/vocab``.

Only when none of these holds both files, and the caller allows it, are they downloaded into the cache.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import urllib.request
from pathlib import Path

from gpt1_jax.constants import DATA_ENV, VOCAB_SIZE
from gpt1_jax.errors import UserError

ENCODER_FILE = "encoder_bpe_40000.json"
MERGES_FILE = "vocab_40000.bpe"
VOCAB_FILES = (ENCODER_FILE, MERGES_FILE)

# The files as released with the paper's code (MIT licence); master has not changed them since 2018.
SOURCE_URL = "https://raw.githubusercontent.com/openai/finetune-transformer-lm/master/model/"

VOCAB_ENV = "GPT1_JAX_VOCAB"

START_ID, DELIMITER_ID, CLASSIFY_ID = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2


class VocabFilesNotFoundError(UserError, FileNotFoundError):
    """Raised when the vocabulary is neither on disk nor downloadable; the message says how to fix it."""


class VocabDownloadError(VocabFilesNotFoundError):
    """A download that failed, was cut short, or fetched something other than the vocabulary file."""


def cache_dir() -> Path:
    """The per-user folder where downloaded vocabulary files are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt1_jax" / "vocab"


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
    where = "\n".join(f"  - {d}" for d in searched)
    return (
        f"GPT-1 vocabulary files not found ({reason}).\n"
        f"Needed: {ENCODER_FILE} and {MERGES_FILE} (from {SOURCE_URL}).\n"
        f"Searched:\n{where}\n"
        f"Fix: put both files in one folder and pass it as vocab_dir, or set ${VOCAB_ENV} to that folder, "
        f"or set ${DATA_ENV} to a data root containing gpt1_vocab/, or copy them into {cache_dir()}."
    )


def download(dest: str | os.PathLike | None = None, *, timeout: float = 30.0) -> Path:
    """Fetches both files into ``dest`` (default: the cache) and returns that folder.

    Each file is checked (`_vocab_file_problem`) and only then renamed into place from a temporary name
    in the destination folder, so a cut-off transfer, a page served in its stead (a captive portal, an
    error page sent with status 200), a crash or a concurrent download never leaves a file that a later
    lookup would take for the vocabulary. Raises `VocabDownloadError` naming the URL and the target file.
    """
    folder = Path(dest) if dest is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in VOCAB_FILES:
        target, url = folder / name, SOURCE_URL + name
        if target.is_file():
            continue
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts; IncompleteRead, bad status lines
            raise VocabDownloadError(f"{url}: {str(err) or type(err).__name__} (nothing written to {target})") \
                from err
        problem = _vocab_file_problem(name, payload)
        if problem:
            raise VocabDownloadError(f"{url} served {problem}, not the GPT-1 vocabulary file (nothing written to "
                                     f"{target})")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    return folder


def _vocab_file_problem(name: str, payload: bytes) -> str | None:
    """What downloaded bytes for `name` are, when they are not in the vocabulary's format; else None.

    The encoder is a JSON object of BPE token -> id; the merges file opens with a "#version" line and
    then holds one "a b" pair per line, as the tokenizer reads them.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes that are not UTF-8 text"
    if text.lstrip().startswith("<"):
        return f"an HTML page ({text.lstrip()[:40]!r}...)"
    if name == ENCODER_FILE:
        try:
            encoder = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{len(payload)} bytes that are not JSON ({err}; cut short?)"
        if not (isinstance(encoder, dict) and encoder
                and all(isinstance(k, str) and type(v) is int for k, v in encoder.items())):
            return "JSON that is not an object of token -> integer id"
        return None
    header, *merges = text.split("\n")
    if not header.startswith("#version"):
        return f"text whose first line is {header[:40]!r}, not the '#version' header"
    malformed = [line for line in merges if line and len(line.split()) != 2]
    if malformed:
        return f"lines that are not merges 'a b': {malformed[:3]}"
    return None if any(merges) else "no merges after the '#version' header"


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
    except OSError as err:  # a VocabDownloadError, or the cache folder not writable
        raise VocabFilesNotFoundError(_missing_message(searched, f"download failed: {err}")) from err

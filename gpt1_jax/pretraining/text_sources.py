"""Text sources for LM pre-training: one spec string, one iterable of documents.

GPT-1 was pre-trained on BooksCorpus (Sec. 4.1), which is not distributable; this module lets a
config point ``data.source`` at any comparable corpus instead:

``tfds:<name>[:<version>][:<split>][?feature=<feature>]``
    Any TFDS dataset with a text feature, e.g. ``tfds:pg19``, ``tfds:wikipedia/20230601.en``,
    ``tfds:c4/en:3.0.1:train``, ``tfds:tiny_shakespeare:train``, ``tfds:pg19?feature=book_text``.
    The split defaults to ``train`` and may use TFDS slicing (``train[:10%]``). The feature
    defaults to the dataset's only ``Text`` feature, or to the one named ``text`` when there are
    several (wikipedia, c4). ``data_dir`` (e.g. a ``gs://`` bucket of prepared datasets) is passed
    to ``tfds.builder``.
``files:<glob>`` or a plain path/glob
    UTF-8 text files, one document per file: local, or in a bucket (``files:gs://bucket/books/*.txt``;
    on a bucket ``**`` is refused, since it would list every object below).
``local:<relative glob>``
    A glob relative to ``$GPT1_JAX_DATA`` (a folder laid out like ``shared/data``), e.g.
    ``local:corpus/gutenberg/*.txt``.

Every document goes through :func:`clean_text`: BOM removal, CRLF -> LF, Project Gutenberg
header/footer stripping (of every book, when one file holds several) and invalid UTF-8 replaced
(counted and logged), so that the licence boilerplate of every book does not become the most
frequent "text" the model learns. A document with more than 1% of its characters replaced is not
UTF-8 text (binary data, another encoding) and is refused with a :class:`CorpusError` unless
``data.allow_replacement`` is set. The refusal comes while the token cache is being built, and a
cache is published only once complete, so a refused corpus leaves no cache behind. The flag is not
part of a source's identity (the cache key): it accepts a corpus without changing its text, so the
cache one run built with it holds the same tokens, and later runs reuse it without the flag.

Each process reads only its own share (files ``[process_index::process_count]`` of the sorted
list, or ``tfds.split_for_jax_process``), so a multi-host run tokenizes every document once.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import urllib.parse
from collections.abc import Iterator
from typing import Protocol

import jax

from gpt1_jax import storage
from gpt1_jax.constants import DATA_ENV
from gpt1_jax.errors import UserError

# Bump when clean_text changes what it produces, so token caches built from the old text are rebuilt.
CLEANING_VERSION = 3
# Above this fraction of replaced characters a document is refused unless data.allow_replacement.
MAX_REPLACED_FRACTION = 0.01

_BOM = "\ufeff"
_REPLACEMENT_UTF8 = "\ufffd".encode()
# "*** START OF THIS PROJECT GUTENBERG EBOOK ... ***", "***START OF THE PROJECT ...***",
# indented "   *** END OF ...". "*** START: FULL LICENSE ***" (after the END marker) does not match.
_START_MARKER = re.compile(r"^[ \t]*\*{3}[ \t]*START OF\b.*$", re.MULTILINE | re.IGNORECASE)
_END_MARKER = re.compile(r"^[ \t]*\*{3}[ \t]*END OF\b.*$", re.MULTILINE | re.IGNORECASE)
_TFDS_SPEC = re.compile(
    r"^(?P<name>[^:?]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>[^?]+))?(?:\?(?P<query>.*))?$"
)

log = logging.getLogger(__name__)


class CorpusError(UserError, ValueError):
    """A ``data.source`` that cannot be read as a corpus; the message names the file or spec and the fix."""


class TextSource(Protocol):
    """What the token cache needs from a corpus."""

    @property
    def identity(self) -> str:
        """Stable string naming exactly the text this process reads (cache-invalidation key)."""

    @property
    def num_documents(self) -> int | None:
        """Document count for progress bars, when known without reading the data."""

    def __iter__(self) -> Iterator[str]: ...


def resolve_data_path(relative: str) -> str:
    """Maps ``corpus/gutenberg/*.txt`` to ``$GPT1_JAX_DATA/corpus/gutenberg/*.txt``.

    One environment variable names the local data root, so configs stay machine-independent.
    """
    root = os.environ.get(DATA_ENV)
    if not root:
        raise CorpusError(
            f"data.source {'local:' + relative!r} is relative to the data root, but the environment "
            f"variable {DATA_ENV} is not set; export {DATA_ENV}=/path/to/data (a folder with "
            "corpus/, gpt1_vocab/, ...) or use files:<absolute glob>."
        )
    return os.path.join(root, relative)


def strip_gutenberg(text: str) -> str:
    """Keeps the books between each ``*** START OF`` marker line and the ``*** END OF`` line after it.

    A file may hold several books one after another, each with its own header, licence and markers;
    every book is kept, joined by a paragraph break. A book without an END marker runs to the next
    START marker (or the end of the text). Text without a START marker is returned unchanged.
    """
    starts = list(_START_MARKER.finditer(text))
    books = []
    for start, following in zip(starts, starts[1:] + [None]):
        limit = following.start() if following else len(text)
        end = _END_MARKER.search(text, start.end(), limit)
        books.append(unwrap_lines(text[start.end() : end.start() if end else limit].strip("\n")))
    return "\n\n".join(book for book in books if book) if starts else text


def unwrap_lines(text: str) -> str:
    """Joins the hard-wrapped lines of each paragraph, keeping blank-line paragraph breaks.

    Gutenberg texts break lines at ~70 characters; the GPT-1 tokenizer keeps every newline as a
    token, so unwrapped text puts newlines only where BooksCorpus-style prose has them.
    """
    paragraphs = re.split(r"\n[ \t]*\n+", text)
    unwrapped = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs if p.strip())
    return "\n\n".join(unwrapped)


def _decode(raw: bytes, name: str, allow_replacement: bool) -> str:
    """UTF-8 with invalid bytes replaced by U+FFFD: a few in a book are noise, logged and kept; more than
    MAX_REPLACED_FRACTION of the characters means the file is not UTF-8 text, and training on it would
    teach the model U+FFFD, so it is a CorpusError unless ``allow_replacement``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
    fraction = replaced / len(text)
    if fraction > MAX_REPLACED_FRACTION and not allow_replacement:
        raise CorpusError(
            f"{name}: {replaced:,} invalid UTF-8 byte sequence(s), {fraction:.1%} of its {len(text):,} "
            f"characters (more than {MAX_REPLACED_FRACTION:.0%}): it is not UTF-8 text. Convert it (e.g. "
            "iconv -f latin1 -t utf-8), leave it out of data.source, or set data.allow_replacement=True "
            "to train on it with U+FFFD in place of those bytes."
        )
    log.warning("%s: replaced %d invalid UTF-8 byte sequence(s) with U+FFFD (%.2f%% of its characters)",
                name, replaced, 100 * fraction)
    return text


def clean_text(raw: bytes | str, *, name: str = "<document>", allow_replacement: bool = False) -> str:
    """Decodes UTF-8 (see `_decode`), drops a BOM, normalises CRLF, strips Gutenberg boilerplate.

    Stripping that drops more than half of a document is logged: a book's licence is a small part of
    it, so losing more means marker lines that do not enclose the text (a file of many books whose
    markers are not all of the ``*** START OF`` / ``*** END OF`` form, say).
    """
    text = _decode(raw, name, allow_replacement) if isinstance(raw, bytes) else raw
    text = text.removeprefix(_BOM).replace("\r\n", "\n").replace("\r", "\n")
    stripped = strip_gutenberg(text)
    if len(stripped) < len(text) / 2:
        log.warning("%s: stripping Project Gutenberg headers and licences kept %d of its %d characters; check "
                    "that its '*** START OF' and '*** END OF' lines enclose every book", name, len(stripped),
                    len(text))
    return stripped


def _process_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    return index, count


class FileCorpus:
    """Text files matching a glob (local or a bucket URL), one document per file, this process's share only."""

    def __init__(
        self,
        pattern: str,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        allow_replacement: bool = False,
    ):
        self.allow_replacement = allow_replacement
        self.remote = storage.is_url(pattern)
        # One cache key however a local pattern is spelt.
        self.pattern = pattern if self.remote else os.path.realpath(os.path.expanduser(pattern))
        self.process_index, self.process_count = _process_share(process_index, process_count)
        all_files = _glob_url(self.pattern) if self.remote else sorted(glob.glob(self.pattern, recursive=True))
        all_files = [f for f in all_files if (storage.path(f).is_file() if self.remote else os.path.isfile(f))]
        if not all_files:
            raise CorpusError(f"data.source: no files match {self.pattern!r}.")
        if len(all_files) < self.process_count:
            raise CorpusError(
                f"data.source {self.pattern!r} matches {len(all_files)} file(s) but there are "
                f"{self.process_count} processes; each process reads whole files, so split the "
                "corpus into at least as many files as processes."
            )
        # Strided rather than contiguous: neighbouring (similar-sized) files spread over processes.
        self.files = all_files[self.process_index :: self.process_count]

    @property
    def identity(self) -> str:
        if self.remote:
            stats = [(f, st.length, st.mtime) for f, st in ((f, storage.path(f).stat()) for f in self.files)]
        else:
            stats = [(f, st.st_size, st.st_mtime_ns) for f, st in ((f, os.stat(f)) for f in self.files)]
        return (
            f"files:{self.pattern}|clean=v{CLEANING_VERSION}"
            f"|process={self.process_index}/{self.process_count}|{stats}"
        )

    @property
    def num_documents(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            with storage.path(path).open("rb") as f:
                yield clean_text(f.read(), name=path, allow_replacement=self.allow_replacement)


def _glob_url(pattern: str) -> list[str]:
    """The objects matching a bucket glob (`gs://b/books/*.txt`), sorted; a CorpusError names what failed."""
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    if first < 3:
        raise CorpusError(f"data.source {pattern!r}: name the bucket without wildcards (gs://BUCKET/books/*.txt).")
    base, rest = "/".join(parts[:first]), "/".join(parts[first:])
    try:
        if not rest:
            return [base] if storage.path(base).exists() else []
        return sorted(os.fspath(p) for p in storage.path(base).glob(rest))
    except NotImplementedError as err:  # epath refuses `**` on object stores
        raise CorpusError(f"data.source {pattern!r}: {err}") from None
    except OSError as err:
        raise CorpusError(str(storage.explain(err, base, "list"))) from None


class TfdsCorpus:
    """One text feature of a TFDS split, this process's share via ``tfds.split_for_jax_process``."""

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        feature: str | None = None,
        data_dir: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        allow_replacement: bool = False,
    ):
        import tensorflow_datasets as tfds  # TensorFlow is heavy; only TFDS sources pay for it.

        self.split, self.data_dir, self.allow_replacement = split, data_dir, allow_replacement
        self.process_index, self.process_count = _process_share(process_index, process_count)
        try:
            # Reads only code and dataset_info.json; nothing is downloaded or prepared here.
            self._builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise CorpusError(
                f"data.source: TFDS has no dataset {name!r} (spec 'tfds:{name}'); check the name at "
                "https://www.tensorflow.org/datasets/catalog/overview."
            ) from e
        self.feature = feature or self._default_feature()
        if self.feature not in self._builder.info.features:
            raise CorpusError(
                f"data.source: {self._builder.info.full_name} has no feature {self.feature!r}; "
                f"features are {sorted(self._builder.info.features)}."
            )

    def _default_feature(self) -> str:
        import tensorflow_datasets as tfds

        features = self._builder.info.features
        texts = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
        if len(texts) == 1:
            return texts[0]
        if "text" in texts:
            return "text"
        raise CorpusError(
            f"data.source: cannot pick the text feature of {self._builder.info.full_name} "
            f"(Text features: {texts or 'none'}); name one, e.g. 'tfds:<name>?feature=<feature>'."
        )

    @property
    def identity(self) -> str:
        return (
            f"tfds:{self._builder.info.full_name}:{self.split}?feature={self.feature}"
            f"|data_dir={self.data_dir}|clean=v{CLEANING_VERSION}"
            f"|process={self.process_index}/{self.process_count}"
        )

    def _dataset(self):
        import tensorflow_datasets as tfds

        self._builder.download_and_prepare()
        split = tfds.split_for_jax_process(
            self.split, process_index=self.process_index, process_count=self.process_count
        )
        dataset = self._builder.as_dataset(split=split, shuffle_files=False)
        return dataset.map(lambda example: example[self.feature])

    @property
    def num_documents(self) -> int | None:
        cardinality = int(self._dataset().cardinality())
        return cardinality if cardinality >= 0 else None

    def __iter__(self) -> Iterator[str]:
        for i, raw in enumerate(self._dataset().as_numpy_iterator()):
            yield clean_text(raw, name=f"{self._builder.info.full_name}[{i}]",
                             allow_replacement=self.allow_replacement)


def make_source(
    spec: str,
    *,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    allow_replacement: bool = False,
) -> FileCorpus | TfdsCorpus:
    """Builds the source named by ``data.source`` (syntax in the module docstring).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``;
    ``allow_replacement`` is ``data.allow_replacement``.
    """
    share = dict(process_index=process_index, process_count=process_count, allow_replacement=allow_replacement)
    if not spec:
        raise CorpusError("data.source is empty; set it to e.g. 'local:corpus/gutenberg/*.txt'.")
    if spec.startswith("tfds:"):
        match = _TFDS_SPEC.match(spec.removeprefix("tfds:"))
        if match is None:
            raise CorpusError(f"data.source {spec!r}: expected tfds:<name>[:<split>][?feature=<f>].")
        query = urllib.parse.parse_qs(match["query"] or "", strict_parsing=bool(match["query"]))
        if set(query) - {"feature"}:
            raise CorpusError(f"data.source {spec!r}: the only option is ?feature=<name>.")
        feature = query["feature"][0] if "feature" in query else None
        split = match["split"] or "train"
        return TfdsCorpus(match["name"], split=split, feature=feature, data_dir=data_dir, **share)
    if spec.startswith("local:"):
        return FileCorpus(resolve_data_path(spec.removeprefix("local:")), **share)
    return FileCorpus(spec.removeprefix("files:"), **share)


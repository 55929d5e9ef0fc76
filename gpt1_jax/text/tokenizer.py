"""The GPT-1 tokenizer exactly as the released code builds it (PAPER.md, "Tokenizer").

Pipeline per text, following openai/finetune-transformer-lm's ``text_utils.py``:
``ftfy.fix_text`` -> :func:`standardize` -> spaCy's rule-based English tokenizer -> lower-case each token ->
BPE with the ``</w>`` end-of-word marker -> ids, unknown pieces -> 0. The model was trained on exactly these
ids, so every step (including the original's quirks) is kept; speed comes only from changes that provably
give the same ids:

* ftfy is skipped for printable ASCII without ``&`` (nothing in it for ftfy to fix; tested),
* ids are memoised per space-separated chunk of standardised text (spaCy works chunk by chunk) and per
  word, so spaCy and BPE only run on unseen chunks,
* cache misses run the Rust ``tokenizers`` BPE on the same vocab and merges (tested against the
  pure-Python BPE below, which stays for words the Rust model cannot express exactly),
* large batches spread the ftfy/spaCy stage over a process pool.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import ftfy
import spacy
from tokenizers import models as tk_models

from gpt1_jax.constants import N_SPECIAL, VOCAB_SIZE  # noqa: F401 (re-exported)
from gpt1_jax.text import vocab_files
from gpt1_jax.text.vocab_files import CLASSIFY_ID, DELIMITER_ID, START_ID  # noqa: F401 (re-exported)

SPECIAL_TOKENS = {START_ID: "_start_", DELIMITER_ID: "_delimiter_", CLASSIFY_ID: "_classify_"}
UNK_ID = 0
END_OF_WORD = "</w>"

# Bump when the pipeline's output may change, so that token caches keyed on `fingerprint` are rebuilt.
# ftfy's and spaCy's versions are part of it because their rules decide the word boundaries.
PIPELINE_VERSION = f"gpt1-bpe/2 ftfy={ftfy.__version__} spacy={spacy.__version__}"

# Batches below this many characters are encoded in-process: starting workers (each imports spaCy and
# loads the vocabulary, ~1 s) costs more than it saves on a 2-core machine.
MIN_PARALLEL_CHARS = 2_000_000

# Tokenizer workers are spawned, so each imports the main script again: one without an `if __name__ ==
# "__main__":` guard starts its whole job over in every worker, and Python stops that child at once.
WORKERS_DIED = ("The tokenizer's worker processes stopped (the lines above say why). Workers are started with "
                "'spawn' and import your main script again: if it runs its work at the top level, put that under "
                "`if __name__ == \"__main__\":`. A crash of a worker with no such cause is a bug: please report it.")

# Entries per memo (chunks, words), ~200 bytes each; caches only pay off for repeats, so they start over
# rather than grow without bound on huge corpora.
MAX_CACHE_ENTRIES = 1_000_000
# Unseen chunks tokenized per spaCy call.
SPACY_GROUP = 2048

# The original's alternation `(-+|~+|!+|...)` (a run of one listed character), written as a class plus a
# back-reference: the same matches, ~8x faster (equivalence is tested). The backslash is deliberately not
# in the class: text_utils.py writes the pattern as a plain, not raw, string, so its `\\+` reaches `re` as
# `\+` (one literal '+', which the earlier `\++` always matches first) and backslashes are never spaced.
# transformers' copy is a raw string and does space them; we follow the release, whose ids the model was
# trained on.
_PUNCTUATION_RUNS = re.compile(r"""(([-~!";?+,)(/*\[\]}{|_])\2*)""")
_NEWLINE_SPACE = re.compile(r"\s*\n\s*")
_OTHER_SPACE = re.compile(r"[^\S\n]+")
# Printable ASCII plus tab/newline, minus '&': ftfy has nothing to do on such text (no mojibake, curly
# quotes, ligatures, wide forms, control characters, terminal escapes or HTML entities are possible).
_FTFY_NOOP = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def fix_text(text: str) -> str:
    """``ftfy.fix_text``, skipped when it provably returns its input (its cost dominates on plain text)."""
    if text.isascii() and _FTFY_NOOP.fullmatch(text):
        return text
    return ftfy.fix_text(text)


def standardize(text: str) -> str:
    """The released ``text_standardize``: fixes spaCy's trouble with BooksCorpus punctuation and spacing.

    Long dashes become '-', the ellipsis character '...', the acute accent an apostrophe; runs of the
    listed punctuation (``- ~ ! " ; ? + , ) ( / * [ ] } { | _``, not the backslash: see
    ``_PUNCTUATION_RUNS``) get spaces around them so spaCy splits them off; any whitespace touching a
    newline becomes " \\n " and other whitespace runs a single space.
    """
    text = text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2015", "-")
    text = text.replace("\u2026", "...").replace("\u00b4", "'")
    text = _PUNCTUATION_RUNS.sub(r" \1 ", text)
    text = _NEWLINE_SPACE.sub(" \n ", text)
    text = _OTHER_SPACE.sub(" ", text)
    return text.strip()


def spacy_tokenizer():
    """spaCy's English rules without a model download.

    ``spacy.blank("en")`` carries the same tokenizer exceptions and prefix/suffix/infix rules as the
    ``spacy.load('en')`` model the original used (only its tokenizer mattered there).
    Lexical attributes (shape, like_num, ...) that spaCy computes for every new word never influence
    where it splits, so they are switched off: that was a third of the time on unseen text.
    """
    tokenizer = spacy.blank("en").tokenizer
    tokenizer.vocab.lex_attr_getters = {}
    return tokenizer


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merges of one word, as in the released code, returning its pieces.

    The last character carries ``</w>`` so word-final pieces have their own ids. At each step the
    lowest-ranked adjacent pair is merged everywhere, left to right. The original joins pieces with spaces
    and splits the result on spaces, so a word containing spaces yields extra (empty) pieces, and the
    whitespace word "\\n " collapses to "\\n</w>"; both quirks are kept because they decide the ids.
    """
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    joined = " ".join(symbols)
    if joined == "\n  " + END_OF_WORD:
        joined = "\n" + END_OF_WORD
    return joined.split(" ")


class GPT1Tokenizer:
    """Text <-> GPT-1 ids (40,478 BPE ids plus the three task tokens of Sec. 3.3)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], fingerprint: str,
                 vocab_dir: Path | None = None):
        self.encoder = encoder
        self.decoder = {i: piece for piece, i in encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._fingerprint = fingerprint
        self._vocab_dir = vocab_dir
        self._spacy = spacy_tokenizer()
        self._rust = tk_models.BPE(vocab=encoder, merges=merges, unk_token=self.decoder[UNK_ID],
                                   end_of_word_suffix=END_OF_WORD, fuse_unk=False)
        self._word_cache: dict[str, list[int]] = {}
        self._chunk_cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, vocab_dir: str | os.PathLike | None = None) -> "GPT1Tokenizer":
        """Loads ``encoder_bpe_40000.json`` and ``vocab_40000.bpe`` (located by :mod:`vocab_files`)."""
        folder = vocab_files.find_vocab_dir(vocab_dir)
        encoder_bytes = (folder / vocab_files.ENCODER_FILE).read_bytes()
        merges_bytes = (folder / vocab_files.MERGES_FILE).read_bytes()
        encoder = json.loads(encoder_bytes.decode("utf-8"))
        # First line is the "#version" header; every other non-empty line is one merge, in priority order.
        merges = [tuple(line.split()) for line in merges_bytes.decode("utf-8").split("\n")[1:] if line]
        malformed = [m for m in merges if len(m) != 2]
        if malformed:
            raise ValueError(f"{folder / vocab_files.MERGES_FILE}: expected 'a b' per line, got {malformed[:3]}; "
                             "re-download the file (see gpt1_jax.text.vocab_files).")
        digest = hashlib.sha256(PIPELINE_VERSION.encode())
        digest.update(hashlib.sha256(encoder_bytes).digest())
        digest.update(hashlib.sha256(merges_bytes).digest())
        return cls(encoder, merges, digest.hexdigest(), folder)

    @property
    def fingerprint(self) -> str:
        """Hash of both vocabulary files and PIPELINE_VERSION: the key for any cache of token ids."""
        return self._fingerprint

    def word_ids(self, word: str) -> list[int]:
        """Ids of one lower-cased spaCy word, memoised (words repeat; BPE is the costly part)."""
        ids = self._word_cache.get(word)
        if ids is None:
            if any(c.isspace() for c in word):
                # The Rust model knows nothing of the space-splitting quirks in `bpe`.
                ids = self.python_word_ids(word)
            else:
                ids = [token.id for token in self._rust.tokenize(word)]
            self._word_cache[word] = ids
        return ids

    def python_word_ids(self, word: str) -> list[int]:
        """Ids of one word from the pure-Python BPE only: the reference the fast path is tested against."""
        return [self.encoder.get(piece, UNK_ID) for piece in bpe(word, self.ranks)]

    def words(self, text: str) -> list[str]:
        """The lower-cased words BPE sees (after ftfy, standardisation and spaCy on the whole text)."""
        return [token.text.lower() for token in self._spacy(standardize(fix_text(text)))]

    def encode(self, text: str) -> list[int]:
        """Ids of one text, as the released ``TextEncoder.encode`` gives them."""
        return self.encode_batch([text], num_workers=1)[0]

    def _chunk_ids(self, chunked: list[list[str]]) -> list[list[int]]:
        """Ids of texts already standardised and cut at spaces.

        spaCy splits text at spaces before applying its rules, and after :func:`standardize` the only
        whitespace left is single spaces and " \\n ", so each chunk's ids can be memoised. Unseen chunks
        go through spaCy together, joined by spaces, because building a spaCy Doc per call is the main
        cost. The one context effect, spaCy keeping the space after a newline in the token ("\\n "), does
        not change ids: BPE maps both "\\n" and "\\n " to "\\n</w>".
        """
        if len(self._chunk_cache) > MAX_CACHE_ENTRIES:
            self._chunk_cache.clear()
        if len(self._word_cache) > MAX_CACHE_ENTRIES:
            self._word_cache.clear()
        cache = self._chunk_cache
        unseen = [c for c in dict.fromkeys(itertools.chain.from_iterable(chunked)) if c not in cache]
        for start in range(0, len(unseen), SPACY_GROUP):
            group = unseen[start:start + SPACY_GROUP]
            offsets = list(itertools.accumulate((len(c) + 1 for c in group[:-1]), initial=0))
            group_ids = [[] for _ in group]
            for token in self._spacy(" ".join(group)):
                owner = bisect.bisect_right(offsets, token.idx) - 1
                group_ids[owner] += self.word_ids(token.text.lower())
            cache.update(zip(group, group_ids))
        lookup = cache.__getitem__
        return [list(itertools.chain.from_iterable(map(lookup, chunks))) for chunks in chunked]

    def encode_batch(self, texts: Sequence[str], *, num_workers: int | None = None,
                     progress: bool = False) -> list[list[int]]:
        """Encodes many texts; identical to ``[encode(t) for t in texts]``, only faster.

        ``num_workers`` defaults to the CPU count, but workers are only started when the batch holds at
        least MIN_PARALLEL_CHARS characters; ``num_workers=1`` forces a single process.
        """
        texts = list(texts)
        workers = num_workers or os.cpu_count() or 1
        if workers > 1 and len(texts) > 1 and sum(map(len, texts)) >= MIN_PARALLEL_CHARS:
            results = self._encode_parallel(texts, workers)
        else:
            results = self._chunk_ids([_chunks(t) for t in texts])
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(texts), desc="tokenize", unit="text")
        return list(results)

    def _encode_parallel(self, texts: list[str], workers: int) -> Iterator[list[int]]:
        # "spawn" because callers typically have JAX (and its threads) loaded, where fork can deadlock. An
        # executor rather than multiprocessing.Pool: when workers die at start-up, a Pool starts new ones
        # forever and the caller waits forever; the executor raises.
        chunk = max(1, min(256, len(texts) // (workers * 8)))
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(str(self._vocab_dir) if self._vocab_dir else None,))
        try:
            yield from pool.map(_worker_encode, texts, chunksize=chunk)
        except concurrent.futures.process.BrokenProcessPool as err:
            pool.shutdown()
            raise RuntimeError(WORKERS_DIED) from err
        except BaseException:
            # Abandoned (a stop request while a corpus is tokenized, Ctrl-C): the caller cleans up and says so at
            # once, not after the workers finish the text each holds (a whole book: up to a minute on two cores);
            # the interpreter waits for them as it exits. Terminating them races with the executor's cancelling
            # of the queued texts on Python 3.11 and can hang that exit.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def encode_file(self, path: str | os.PathLike) -> list[int]:
        """Encodes a whole text file as one text.

        Bytes are decoded as UTF-8 with ``errors="replace"``: a stray invalid byte becomes U+FFFD (which
        maps to the unknown id) instead of aborting a long corpus job.
        """
        return self.encode(Path(path).read_bytes().decode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text: pieces joined, ``</w>`` turned into spaces, task tokens shown by name.

        Word boundaries are all the BPE keeps, so this is the lower-cased, space-separated word sequence,
        not the original string.
        """
        pieces = []
        for i in ids:
            i = int(i)
            if i in SPECIAL_TOKENS:
                pieces.append(SPECIAL_TOKENS[i] + END_OF_WORD)
            elif i in self.decoder:
                pieces.append(self.decoder[i])
            else:
                raise ValueError(f"id {i} is outside the GPT-1 vocabulary [0, {CLASSIFY_ID}].")
        return " ".join("".join(pieces).replace(END_OF_WORD, " ").split())


def _chunks(text: str) -> list[str]:
    standard = standardize(fix_text(text))
    return standard.split(" ") if standard else []


_worker_tokenizer: GPT1Tokenizer | None = None


def _init_worker(vocab_dir: str | None) -> None:
    # Each worker process needs its own spaCy tokenizer and word cache; they cannot be pickled cheaply.
    global _worker_tokenizer
    _worker_tokenizer = GPT1Tokenizer.from_files(vocab_dir)


def _worker_encode(text: str) -> list[int]:
    return _worker_tokenizer.encode(text)

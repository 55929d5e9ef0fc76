"""Tokenize a corpus once into an on-disk uint16 cache that later runs memory-map.

The GPT-1 tokenizer (ftfy + spaCy + BPE) runs at tens of thousands of tokens per second per core, far
slower than a train step consumes text, so pre-training reads token ids, never text. One cache is
one directory ``<cache_dir>/<key>/`` where ``key`` hashes the source identity and the tokenizer
fingerprint, so a changed corpus or vocabulary gets a new cache instead of silently reusing ids:

    tokens.u16      [num_tokens] little-endian uint16 (GPT-1 ids < 40,481 < 65,536), raw bytes
    doc_starts.npy  [num_documents + 1] int64; document i is tokens[doc_starts[i]:doc_starts[i+1]]
    meta.json       counts, identity, fingerprint and a blake2b digest of tokens.u16

Documents are concatenated without a separator token: the paper (Sec. 4.1) trains on contiguous
spans of books and GPT-1's vocabulary has no end-of-text token (its three specials are for
fine-tuning). ``doc_starts`` keeps the boundaries for anyone who wants them.

A cache is built in a temporary directory and renamed into place, so a crash never leaves a
half-written cache under its key, and a cache that fails verification is rebuilt while caches
with other keys are left alone. The temporary directory is deleted when the build fails or is
stopped; one left by a build that was killed outright (SIGKILL, a power cut) is deleted by the next
run that opens the cache folder (`remove_abandoned`). A disk that fills up during the build is one
`CacheSpaceError` saying how much room the cache needs.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import tqdm

from gpt1_jax import storage
from gpt1_jax.errors import UserError
from gpt1_jax.pretraining.text_sources import TextSource

FORMAT_VERSION = 1
_TOKENS, _DOC_STARTS, _META = "tokens.u16", "doc_starts.npy", "meta.json"
_DTYPE = np.dtype("<u2")
_HASH_CHUNK = 1 << 24  # tokens per hashing chunk (32 MiB)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# `.<key>.tmp-<host>-<pid>-<random>` (a build) or `.stale-` (an invalid cache being deleted): `_temporary_dir`.
_TEMPORARY = re.compile(r"\.[0-9a-f]+\.(?:tmp|stale)-(?:(?P<host>.+)-(?P<pid>\d+)-)?[^-]+")
ABANDONED_AFTER_S = 24 * 3600  # a temporary folder of another host untouched this long belongs to no live build

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """The part of ``gpt1_jax.text.tokenizer.GPT1Tokenizer`` the cache uses."""

    @property
    def fingerprint(self) -> str: ...

    def encode_batch(
        self, texts: Sequence[str], *, num_workers: int | None = None, progress: bool = False
    ) -> list[list[int]]: ...


class InvalidCacheError(Exception):
    """A cache directory that is missing, partial or corrupt; it will be rebuilt."""


class CacheSpaceError(UserError):
    """The disk of the cache folder filled up while a cache was written there; the message says how much it needs."""

    def __init__(self, folder: str, free: int, needed: int | None, elsewhere: str):
        need = f"about {needed / 1e6:,.1f} MB" if needed else "more than that"
        super().__init__(f"No room for the token cache in {folder}: the disk filled up while it was written "
                         f"({free / 1e6:,.1f} MB were free; the cache needs {need}). No partial cache is left. Free "
                         f"space there, or {elsewhere}.")


def _room_needed(doc_starts: array.array, num_documents: int | None) -> int | None:
    """Bytes of a whole cache, extrapolated from the documents written before the disk filled up (None when
    none was, or the source's document count is unknown)."""
    done = len(doc_starts) - 1
    if not done or not num_documents:
        return None
    return int(doc_starts[-1] * num_documents / done) * _DTYPE.itemsize + 8 * (num_documents + 1)


def _temporary_dir(parent: str, key: str, kind: str = "tmp") -> str:
    """A new folder `.<key>.<kind>-<host>-<pid>-<random>` in `parent`: its name says which process uses it."""
    return tempfile.mkdtemp(prefix=f".{key}.{kind}-{socket.gethostname()}-{os.getpid()}-", dir=parent)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_change(folder: str) -> float:
    return max([os.stat(folder).st_mtime, *(entry.stat().st_mtime for entry in os.scandir(folder))])


def remove_abandoned(cache_dir: str) -> None:
    """Delete the temporary folders that killed builds left in `cache_dir`; each may hold most of a cache.

    A stopped or failed build deletes its own, but SIGKILL cannot be caught. A folder made on this host is
    abandoned once its process is gone (`os.kill(pid, 0)`; a reused pid only keeps it longer). One made on
    another host sharing the folder (NFS), whose processes this one cannot see, is abandoned when nothing
    in it changed for `ABANDONED_AFTER_S`: a live build writes its token file every batch.
    """
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        match = _TEMPORARY.fullmatch(name)
        folder = os.path.join(cache_dir, name)
        if not match or not os.path.isdir(folder):
            continue
        try:
            if match["host"] == host:
                abandoned = not _process_is_alive(int(match["pid"]))
            else:
                abandoned = time.time() - _last_change(folder) > ABANDONED_AFTER_S
        except OSError:  # deleted meanwhile by its build
            continue
        if abandoned:
            log.warning("Deleting %s, left by a token cache build that was killed.", folder)
            shutil.rmtree(folder, ignore_errors=True)


def cache_key(source_identity: str, tokenizer_fingerprint: str) -> str:
    text = f"format=v{FORMAT_VERSION}\n{source_identity}\n{tokenizer_fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _digest(tokens: np.ndarray) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for begin in range(0, tokens.size, _HASH_CHUNK):
        hasher.update(np.ascontiguousarray(tokens[begin : begin + _HASH_CHUNK]).data)
    return hasher.hexdigest()


def _batched(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Groups documents into batches of about ``max_chars`` characters.

    Batches by size rather than count: ``encode_batch`` starts its worker pool per call, so a
    call must carry enough text to pay for it, yet the ids of one batch are held as Python lists.
    """
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """A verified, memory-mapped token cache."""

    path: str
    tokens: np.ndarray  # [num_tokens] uint16, read-only memmap
    doc_starts: np.ndarray  # [num_documents + 1] int64
    meta: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.size - 1)

    @classmethod
    def load(cls, path: str) -> TokenCache:
        """Opens and verifies a cache directory; raises InvalidCacheError if it cannot be trusted.

        Verification hashes the whole token file (about 1 s per GB): a flipped or truncated byte
        would otherwise train silently on garbage ids.
        """
        try:
            with open(os.path.join(path, _META)) as f:
                meta = json.load(f)
            num_tokens = int(meta["num_tokens"])
            tokens_path = os.path.join(path, _TOKENS)
            size = os.path.getsize(tokens_path)
            if size != num_tokens * _DTYPE.itemsize or num_tokens == 0:
                raise InvalidCacheError(f"{tokens_path} has {size} bytes, meta says {num_tokens} tokens")
            tokens = np.memmap(tokens_path, dtype=_DTYPE, mode="r", shape=(num_tokens,))
            doc_starts = np.load(os.path.join(path, _DOC_STARTS))
            if doc_starts.shape != (meta["num_documents"] + 1,) or doc_starts[-1] != num_tokens:
                raise InvalidCacheError(f"{path}: document offsets do not match the token count")
            if _digest(tokens) != meta["tokens_blake2b"]:
                raise InvalidCacheError(f"{path}: token digest mismatch (corrupt file)")
        # json.JSONDecodeError is a ValueError; the others come from missing or mistyped fields.
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise InvalidCacheError(f"{path}: {e}") from e
        return cls(path=path, tokens=tokens, doc_starts=doc_starts, meta=meta)

    @classmethod
    def load_or_build(
        cls,
        source: TextSource,
        tokenizer: Tokenizer,
        cache_dir: str,
        *,
        chars_per_batch: int = 8_000_000,
        num_workers: int | None = None,
        elsewhere: str = "set data.cache_dir to a folder on a disk with room",
    ) -> TokenCache:
        """Returns the cache for (source, tokenizer), tokenizing the source only if needed.

        ``cache_dir`` is ``data.cache_dir``; one directory may hold caches of many corpora.
        ``chars_per_batch`` and ``num_workers`` tune tokenization only; they do not change the ids.
        ``elsewhere`` says how to put the cache on another disk, in the message of a `CacheSpaceError`.
        """
        key = cache_key(source.identity, tokenizer.fingerprint)
        path = os.path.join(cache_dir, key)
        if os.path.isdir(cache_dir):
            remove_abandoned(cache_dir)
        if os.path.exists(path):
            try:
                cache = cls.load(path)
                log.info("Token cache %s: %d tokens, %d docs", path, cache.num_tokens, cache.num_documents)
                return cache
            except InvalidCacheError as e:
                log.warning("Rebuilding invalid token cache: %s", e)
        storage.make_local_dir(cache_dir, "token cache folder", "set data.cache_dir to a folder you can write (by "
                               "default it lies under $XDG_CACHE_HOME, else under $HOME/.cache)")
        free = shutil.disk_usage(cache_dir).free
        doc_starts = array.array("q", [0])  # filled by _write; how far it got if the disk fills up
        tmp = _temporary_dir(cache_dir, key)
        try:
            cls._write(tmp, source, tokenizer, doc_starts, chars_per_batch=chars_per_batch, num_workers=num_workers)
            return cls._publish(tmp, path)
        except OSError as err:
            if err.errno not in _NO_SPACE:
                raise
            raise CacheSpaceError(cache_dir, free, _room_needed(doc_starts, source.num_documents), elsewhere) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load_or_build_shared(cls, source: TextSource, tokenizer: Tokenizer, bucket_dir: str, local_dir: str, *,
                             writes: bool, wait_for_writer=None) -> TokenCache:
        """The cache for (source, tokenizer) kept in a bucket (`data.cache_dir=gs://...`), read from a local copy.

        A memory map needs a local file, so the bucket is a store the hosts share: the process that
        `writes` (process 0, or every process for its own share of a sharded source) builds the cache
        locally and uploads it once, meta.json last, so a key without meta.json is never taken for a
        cache. Every process then calls `wait_for_writer` (a barrier, when several share one key),
        and one without a local copy that verifies downloads the cache, verified as any cache is.
        """
        key = cache_key(source.identity, tokenizer.fingerprint)
        local, remote = os.path.join(local_dir, key), storage.path(bucket_dir) / key
        storage.make_local_dir(local_dir, "local token cache folder", "a bucket cache is read through a local copy "
                               "under $XDG_CACHE_HOME, else under $HOME/.cache: set XDG_CACHE_HOME to a folder you "
                               "can write")
        elsewhere = "set XDG_CACHE_HOME to a folder on a disk with room (a bucket cache is read through a local copy)"
        remove_abandoned(local_dir)
        cache = None
        if os.path.exists(local):
            with contextlib.suppress(InvalidCacheError):
                cache = cls.load(local)
        try:
            if writes and not (remote / _META).exists():
                cache = cache or cls.load_or_build(source, tokenizer, local_dir, elsewhere=elsewhere)
                for name in (_TOKENS, _DOC_STARTS, _META):
                    storage.write_whole(remote / name, pathlib.Path(local, name).read_bytes())
                log.info("Token cache uploaded to %s", remote)
            if wait_for_writer:
                wait_for_writer()
            if cache is not None:
                return cache
            return cls._download(remote, local, elsewhere)
        except OSError as err:
            raise storage.explain(err, remote, "use the token cache") from err

    @classmethod
    def _download(cls, remote: storage.Path, local: str, elsewhere: str) -> TokenCache:
        """Copy the cache `remote` to `local` through a temporary folder beside it; verified as any cache is."""
        local_dir = os.path.dirname(local)
        free = shutil.disk_usage(local_dir).free
        tmp = _temporary_dir(local_dir, os.path.basename(local))
        try:
            for name in (_TOKENS, _DOC_STARTS, _META):
                pathlib.Path(tmp, name).write_bytes((remote / name).read_bytes())
            log.info("Token cache %s copied to %s", remote, local)
            return cls._publish(tmp, local)
        except OSError as err:
            if err.errno not in _NO_SPACE:
                raise
            raise CacheSpaceError(local_dir, free, None, elsewhere) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _write(
        tmp: str, source: TextSource, tokenizer: Tokenizer, doc_starts: array.array, *, chars_per_batch: int,
        num_workers: int | None
    ) -> None:
        """Tokenize `source` into the files of a cache in `tmp`, appending each document's end to `doc_starts`."""
        hasher = hashlib.blake2b(digest_size=16)
        with (
            open(os.path.join(tmp, _TOKENS), "wb") as f,
            tqdm.tqdm(total=source.num_documents, unit="doc", desc="Tokenizing corpus") as bar,
        ):
            for documents in _batched(source, chars_per_batch):
                for ids in tokenizer.encode_batch(documents, num_workers=num_workers):
                    ids = np.asarray(ids, dtype=np.int64)  # [doc_tokens]
                    out_of_range = ids[(ids < 0) | (ids >= 1 << 16)]
                    if out_of_range.size:
                        raise ValueError(
                            f"Token id {out_of_range[0]} does not fit the uint16 token cache (ids must "
                            "be in [0, 65536)); the tokenizer's vocabulary is too large for this format."
                        )
                    data = ids.astype(_DTYPE).tobytes()
                    f.write(data)
                    hasher.update(data)
                    doc_starts.append(doc_starts[-1] + ids.size)
                bar.update(len(documents))
            f.flush()
            os.fsync(f.fileno())
        num_tokens = doc_starts[-1]
        if num_tokens == 0:
            raise ValueError(
                f"data.source produced no tokens ({len(doc_starts) - 1} documents, all empty after "
                f"cleaning); source: {source.identity[:300]}"
            )
        np.save(os.path.join(tmp, _DOC_STARTS), np.frombuffer(doc_starts, dtype=np.int64))
        meta = {
            "format": FORMAT_VERSION,
            "num_tokens": num_tokens,
            "num_documents": len(doc_starts) - 1,
            "tokens_blake2b": hasher.hexdigest(),
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "source_identity": source.identity,
        }
        # meta.json is written last: a directory without it is never mistaken for a cache.
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
        log.info("Tokenized %d documents into %d tokens", meta["num_documents"], num_tokens)

    @classmethod
    def _publish(cls, tmp: str, path: str) -> TokenCache:
        """Renames the finished build to ``path``, replacing an invalid cache there."""
        if os.path.exists(path):
            stale = _temporary_dir(os.path.dirname(path), os.path.basename(path), "stale")
            os.replace(path, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another run published the same key meanwhile; keep theirs if it is sound.
            log.info("Token cache %s was published concurrently; using it", path)
        return cls.load(path)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Holds out the last ``val_fraction`` of tokens for validation (``data.val_fraction``).

        A fixed tail is deterministic and never overlaps the training windows.
        Returns (train [num_train] uint16, validation [num_val] uint16) views of the memmap.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        cut = self.num_tokens - int(round(self.num_tokens * val_fraction))
        return self.tokens[:cut], self.tokens[cut:]

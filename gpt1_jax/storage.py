"""Paths that may be URLs: a run's files on a bucket (`gs://bucket/run`, any etils.epath scheme) or a local disk.

On a TPU pod slice or a GPU cluster every host has its own disk, so the one place all hosts share is a
bucket. Everything the project reads or writes by path goes through `etils.epath` (which Orbax uses
too) and, for URLs, through fsspec (gcsfs for gs://). epath would pick TensorFlow's file system for
gs:// once TensorFlow is importable; gpt1_jax/__init__.py turns that off (`EPATH_USE_TF=false`, unless
the user set it) because TensorFlow's GCS client has a fixed endpoint and its own credential lookup, so
it could not be pointed at a test server and would not read what gcsfs and TensorStore read.

Object stores have no rename and no append: an object appears whole when its upload completes, or
not at all. So a file that must never be read half-written (config.json, results.json) is written
in one write on a bucket, and through a temporary file and an atomic rename on a local disk.
"""

from __future__ import annotations

import os

from etils import epath

from gpt1_jax.errors import UserError

Path = epath.Path


class StorageError(UserError, OSError):
    """A bucket or folder that is missing, refuses access or cannot be reached."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` names an object store (`gs://...`, `s3://...`) rather than a local path."""
    return "://" in os.fspath(location)


def path(location: str | os.PathLike) -> epath.Path:
    """An epath.Path for `location`; a local one made absolute, since Orbax resolves relative paths per call."""
    if is_url(location):
        return epath.Path(os.fspath(location))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(location))))


def user_cache_dir(name: str) -> str:
    """`$XDG_CACHE_HOME/gpt1_jax/<name>`, else `$HOME/.cache/gpt1_jax/<name>`: where a cache goes by default
    (`name`: "vocab" for downloaded vocabulary files, "token_cache" for tokenized corpora)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt1_jax", name)


def make_local_dir(folder: str | os.PathLike, what: str, instead: str) -> None:
    """Create the local `folder` (and its parents) for `what`, or a StorageError: one line naming it, why, and
    what to set `instead`.

    The default caches lie under $HOME (`user_cache_dir`), which a batch job, a container or a sandbox may
    set to a path nobody can write (`/proc`, `/nonexistent`); os.makedirs then raised a bare
    FileNotFoundError from deep inside the data pipeline.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        why = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else f"{type(err).__name__}: {err}"
        raise StorageError(f"Cannot create the {what} {folder} ({why}); {instead}.") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"Cannot write the {what} {folder} (permission denied); {instead}.")


def write_whole(target: epath.Path, data: str | bytes) -> None:
    """Write `target` so no reader ever sees part of `data`: one upload on a bucket, a renamed temporary file locally.

    A kill during the write leaves the previous contents (or no file), never a truncated one.
    """
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_url(target):
        with target.open(mode) as out:
            out.write(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, mode) as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, target)


def is_dir(location: epath.Path) -> bool:
    """Whether `location` is a folder; an OSError, not False, when a bucket refuses access or cannot be reached.

    gcsfs answers an `isdir` it was refused with False, which would read as "does not exist"; listing
    the folder raises what really happened.
    """
    if location.is_dir():
        return True
    if is_url(location):
        try:
            next(iter(location.iterdir()), None)
        except FileNotFoundError:
            return False
    return False


def explain(err: Exception, location: str | os.PathLike, doing: str) -> StorageError:
    """One line naming `location` for an error of an object store or a disk, with what to do."""
    text = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the server's message holds
    return StorageError(f"Cannot {doing} {location}: {remedy(err)} ({text[:300]}).")


def remedy(err: Exception) -> str:
    """What to do about `err`, judged from its type and text.

    gcsfs raises FileNotFoundError for a missing bucket or object, OSError("Forbidden") or a
    PermissionError for a refused one; a network failure arrives as an aiohttp or OSError; TensorStore's
    (Orbax's arrays) errors carry the HTTP status in their text.
    """
    lowered = f"{type(err).__name__}: {err}".lower()
    if isinstance(err, PermissionError) or "forbidden" in lowered or "permission" in lowered or " 403" in lowered:
        return ("access was refused: give this machine's credentials (its service account, or "
                "`gcloud auth application-default login`) read and write access to the bucket")
    if isinstance(err, FileNotFoundError) or "not found" in lowered or "nosuchbucket" in lowered:
        return "it does not exist: check the bucket name, or create it (gcloud storage buckets create)"
    return "the store could not be reached or failed: check the network"

"""The workdir belongs to one run: one process at a time, one configuration, one learning-rate schedule.

A workdir's checkpoints, metrics and results only make sense for one run, so `claim`:
- locks it: a second launch on the same workdir while the first runs is refused at once, naming the
  pid and host of the first. Two runs would otherwise race on the checkpoints (one fails, the other
  hangs) and both append to metrics.jsonl. The lock is an OS lock (`flock`) on `run.lock`, so a
  killed run's lock goes with its process; the file also names the holder for the message.
- records the config in `config.json` on the first start; a later start with different identity keys
  (the model, data, seed, optimizer, batch, task or starting point) is refused naming them. Other
  keys (logging, evaluation, checkpoint cadence) may change between restarts.
- refuses a resume whose number of updates changed (`train.num_steps`; fine-tuning's `finetune.epochs`
  and `finetune.max_train_examples`): the schedule would be recomputed for the new length and the
  learning rate would jump at the resumed step. `extend=True` accepts it and says what the
  learning rate does.

A workdir on a bucket (gs://...) cannot be locked: object stores have no locks. There run.lock still
names the run that holds it, and a start that finds it naming someone warns instead of refusing.

`start_over=True` moves whatever the workdir holds into `previous-<time>/` (nothing is deleted) and
starts from step 0, also when the config is unchanged: the user asked for a fresh run. So it must not
stay in a command that is rerun to resume (a preemptible job's restart, a `train.stop_at` slice):
each such start would move the run so far aside and train from step 0 again.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import itertools
import json
import logging
import os
import socket
import time
from typing import Iterator

import jax
from ml_collections import ConfigDict

from gpt1_jax import run_options, storage
from gpt1_jax.config_check import ConfigError
from gpt1_jax.errors import UserError
from gpt1_jax.training import checkpoint, optim

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
ASIDE_PREFIX = "previous-"
# Keys that define what a workdir's checkpoints are; changing them mid-run would mix two runs.
IDENTITY_KEYS = ("mode", "model", "data.source", "seed", "optimizer", "train.batch_size", "task", "custom", "init",
                 # fine-tuning's objective and which examples it trains on
                 "finetune.lm_coef", "finetune.train_from_eval", "finetune.heldout_examples", "finetune.heldout_seed")
# Model keys that say how a step is computed, not what it computes: they may change between restarts (a run
# moved from a GPU to a TPU slice, or given remat to fit). `scan_layers` is `layers` in runs of before 2026-12.
HOW_KEYS = ("layers", "scan_layers", "remat", "attention", "head_backward")
# Keys that set a run's number of updates, which its learning-rate schedule spans (finetune.py: updates
# = epochs x (training examples // batch)).
LENGTH_KEYS = {"pretrain": ("train.num_steps",), "finetune": ("finetune.epochs", "finetune.max_train_examples")}


class WorkdirError(UserError, RuntimeError):
    """A workdir another run holds, one that cannot be written, or one whose config.json is unreadable."""


@contextlib.contextmanager
def claim(workdir: str | os.PathLike, config: ConfigDict) -> Iterator[None]:
    """Lock `workdir` for this run until the context exits, check that its previous run (if any) is one this
    config may resume (same identity; same length unless `extend`) or move it aside (`start_over`), and
    record the config.

    Only process 0 locks and writes; the other processes of a multi-host run share the workdir and
    make the same checks, so they refuse the same launches.
    """
    main = jax.process_index() == 0
    workdir = storage.path(workdir)
    lock = _named_only if storage.is_url(workdir) else _locked
    with lock(workdir) if main else contextlib.nullcontext():
        previous = _previous_config(workdir, config.start_over)
        current = json.loads(config.to_json_best_effort())
        if config.start_over:
            if main:
                _move_aside(workdir)
        elif previous is not None:
            _check_identity(workdir, previous, current)
            _check_length(workdir, previous, current, config)
        if main:
            _write_config(workdir, config)
        yield


# ---------------------------------------------------------------- the lock


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


@contextlib.contextmanager
def _named_only(workdir: storage.Path) -> Iterator[None]:
    """A bucket's run.lock: names this run while it runs and is emptied at the end, but locks nothing.

    Object stores offer no lock a killed run would release, so a run.lock that names someone is either
    a run still going or one that was killed (a preempted VM); it is taken over with a warning.
    """
    path = workdir / LOCK_FILE
    try:
        text = path.read_bytes().decode(errors="replace").strip() if path.exists() else ""
        if text:
            log.warning("%s names %s: a run that is still going or was killed. Object stores have no locks, so this "
                        "run takes over; make sure only one run uses %s.", path, _describe(_parse_holder(text)),
                        workdir)
        storage.write_whole(path, json.dumps(_me()) + "\n")
    except OSError as err:
        raise _unwritable(workdir, err) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            storage.write_whole(path, "")


@contextlib.contextmanager
def _locked(workdir: storage.Path) -> Iterator[None]:
    """An exclusive `flock` on workdir/run.lock, which names this process while it holds it.

    The file is emptied on release and kept: deleting it would let a run that opened it just before
    lock a file no later run sees. A lock file that still names someone when the lock is free was
    left by a run that died without releasing it (kill -9, a lost host): the lock is taken over with
    a warning naming that run.
    """
    path = workdir / LOCK_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unwritable(workdir, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(workdir, fd) from None
        except OSError as err:
            log.warning("Cannot lock %s (%s): this filesystem has no file locks, so a second run on %s is not "
                        "refused. Make sure only one run uses it.", path, err.strerror, workdir)
        left = _holder(fd)
        if left:
            log.warning("Took over %s from %s, a run that ended without releasing it (killed?).", path,
                        _describe(left))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        except OSError as err:
            raise _unwritable(workdir, err) from None
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def refuse_if_held(workdir: str | os.PathLike) -> None:
    """Refuse at once a workdir whose lock another run holds, before the entry point loads the training code.

    Importing the training stack (TensorFlow through clu, the model) takes seconds to a minute on a busy
    host; a second launch should not wait that long to hear the workdir is taken. Only a probe: `claim`
    still takes the lock. A bucket has no lock to probe.
    """
    if storage.is_url(workdir):
        return
    try:
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return  # no lock file yet, or unreadable: `claim` decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(workdir, fd) from None
    except OSError:
        pass  # no file locks on this filesystem: `claim` warns
    finally:
        os.close(fd)


def _in_use(workdir: str | os.PathLike, fd: int) -> WorkdirError:
    return WorkdirError(f"{workdir} is in use by {_describe(_holder(fd))}; wait for it or stop it (SIGTERM saves and "
                        "exits), or use another --workdir.")


def _holder(fd: int) -> dict | None:
    """Who the lock file names ({} for text that names no one), or None when it is empty."""
    return _parse_holder(os.pread(fd, 4096, 0).decode(errors="replace").strip())


def _parse_holder(text: str) -> dict | None:
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict | None) -> str:
    if not holder or "pid" not in holder:
        return "another run (its lock file names none yet)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def _unwritable(path: storage.Path, err: OSError) -> WorkdirError:
    if storage.is_url(path):
        return WorkdirError(str(storage.explain(err, path, "write the workdir")))
    return WorkdirError(f"Cannot write the workdir {path} ({err.strerror}: {err.filename or path}). Use a "
                        "--workdir on a writable disk, or make this one writable (permissions, read-only mount).")


# ---------------------------------------------------------------- the recorded config


def _previous_config(workdir: storage.Path, start_over: bool) -> dict | None:
    """The config.json of the run in `workdir`; None for none, or for an unreadable one that start_over moves aside."""
    record = workdir / RUN_CONFIG_FILE
    try:
        text = record.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        if storage.is_url(record):
            raise WorkdirError(str(storage.explain(err, record, "read"))) from None
        raise WorkdirError(f"Cannot read {record} ({err.strerror}); fix its permissions or use another --workdir."
                           ) from None
    try:
        previous = json.loads(text)
        problem = None if isinstance(previous, dict) else f"a JSON {type(previous).__name__}, not an object"
    except ValueError as err:  # not JSON, or not UTF-8
        problem = str(err)
    if problem is None:
        return previous
    if start_over:
        return None
    raise WorkdirError(
        f"{record} is not a run's config ({problem}); it should hold the JSON config of the run in {workdir}. Restore "
        "it (each checkpoint's metadata holds a copy), use another --workdir, or pass --config.start_over=True to "
        "move the old run (this file included) aside and start afresh.")


def _value(values: dict, key: str):
    """values["a"]["b"] for key "a.b"; None where a level is missing."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _check_identity(workdir: storage.Path, previous: dict, current: dict) -> None:
    previous, current = _without_how_keys(previous), _without_how_keys(current)
    changed = [key for key in IDENTITY_KEYS if _value(previous, key) != _value(current, key)]
    if changed:
        raise ConfigError(
            f"{workdir} holds a run with a different {', '.join(changed)}. Use another --workdir, restore those "
            "values, or pass --config.start_over=True to move the old run aside and start afresh.")


def _without_how_keys(values: dict) -> dict:
    model = {key: value for key, value in (values.get("model") or {}).items() if key not in HOW_KEYS}
    return {**values, "model": model}


def _check_length(workdir: storage.Path, previous: dict, current: dict, config: ConfigDict) -> None:
    """Refuse (unless `extend=True`) to resume a run whose number of updates, hence its schedule, changed.

    A constant learning rate does not depend on the length, so it may change freely.
    """
    keys = [key for key in LENGTH_KEYS.get(config.mode, ()) if _value(previous, key) != _value(current, key)]
    if not keys or config.optimizer.schedule == "constant":
        return
    step = checkpoint.latest_step(workdir / "checkpoints")
    if step is None:  # nothing to resume
        return
    changes = ", ".join(f"{key} {_value(previous, key)} -> {_value(current, key)}" for key in keys)
    if not config.extend:
        raise ConfigError(
            f"{workdir} holds a run at step {step} with {changes}: resuming would recompute the "
            f"{config.optimizer.schedule} learning-rate schedule for the new length, so the learning rate would jump "
            "at the resumed step. Pass --config.extend=True to resume so, restore the old value, or pass "
            "--config.start_over=True to move the old run aside and start afresh.")
    log.warning("%s (extend=True): %s", changes, _schedule_change(config, previous, step))


def _schedule_change(config: ConfigDict, previous: dict, step: int) -> str:
    """What the recomputed schedule does from the resumed `step`, in words."""
    name = config.optimizer.schedule
    if config.mode != "pretrain":
        # Fine-tuning's length is epochs x updates per epoch, known once the task data is read.
        return (f"the {name} schedule is recomputed for the new number of updates; from the latest checkpoint "
                f"(step {step}) on, the learning rate follows it.")
    old_total, new_total = _value(previous, "train.num_steps"), config.train.num_steps
    lr_old = float(optim.learning_rate_schedule(run_options.optimizer_options(config), old_total)(step))
    lr_new = float(optim.learning_rate_schedule(run_options.optimizer_options(config), new_total)(step))
    said = (f"the {name} schedule is recomputed for {new_total} steps; at the resumed step {step} the learning rate "
            f"goes from {lr_old:.3g} to {lr_new:.3g}")
    return said + (f"; step {step} is already past {new_total}, so the run ends at once." if step >= new_total else ".")


def _write_config(workdir: storage.Path, config: ConfigDict) -> None:
    """config.json, in one write (storage.write_whole) so a kill never leaves half of it."""
    try:
        storage.write_whole(workdir / RUN_CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
    except OSError as err:
        raise _unwritable(workdir, err) from None


def _move_aside(workdir: storage.Path) -> None:
    """Move every entry but the lock and earlier set-aside runs into a new `previous-<time>[-n]/`.

    On a bucket a move is a copy and a delete of each object, so it takes as long as the run's size.
    """
    if not workdir.exists():
        return
    items = [p for p in workdir.iterdir() if p.name != LOCK_FILE and not p.name.startswith(ASIDE_PREFIX)]
    if not items:
        return
    try:
        aside = _new_aside_folder(workdir)
        for item in items:
            item.rename(aside / item.name)
    except OSError as err:
        raise _unwritable(workdir, err) from None
    log.warning("start_over=True: moved the previous run in %s to %s. Take --config.start_over=True out of the "
                "command before rerunning it to resume: every start with it sets the run so far aside.", workdir,
                aside)


def _new_aside_folder(workdir: storage.Path) -> storage.Path:
    """A new `previous-<time>/`, with `-2`, `-3`, ... after the time when start_over ran twice in that second.

    The workdir is claimed, so no other run picks a name meanwhile.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        aside = workdir / f"{ASIDE_PREFIX}{stamp}{f'-{n}' if n > 1 else ''}"
        if not aside.exists():
            aside.mkdir(parents=True, exist_ok=True)
            return aside

"""Metrics to TensorBoard event files and a JSON-lines file, and a progress bar with ETA.

Only process 0 writes files (the other processes of a multi-host run compute the same global
values); every process may show a bar, but only process 0 does by default.

metrics.jsonl holds one history: a run (re)started at step s moves the records of steps after s,
written by an earlier attempt whose checkpoints are gone (a kill before the next save, deleted or
unusable checkpoints), to metrics.superseded.jsonl, so no step has two values from two attempts.

A workdir on a bucket (gs://...) has no append: the files are written in a local folder as on a disk
and copied up whole (each object appears complete or not at all) every `UPLOAD_EVERY_S` seconds,
at each checkpoint save (`sync`) and at the end, so the bucket's metrics reach at least as far as its
latest checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time

import jax
from clu import metric_writers
from tqdm import tqdm

from gpt1_jax import storage
from gpt1_jax.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
UPLOAD_EVERY_S = 60.0


class MetricsError(UserError, ValueError):
    """A line of metrics.jsonl that is not a metrics record (other than a last line cut short by a kill)."""


class RunLog:
    """Writes scalar metrics for a step to `workdir/metrics.jsonl` and `workdir/tensorboard/`.

    Opened at `initial_step` (the step the run resumes from), it first moves the records of later
    steps out of metrics.jsonl, so the steps about to be trained again are logged once.
    `tensorboard_dir` is where event files and profiles go: the workdir's, or on a bucket the local
    folder that is copied up.
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int, description: str):
        self.is_main = jax.process_index() == 0
        self.workdir = storage.path(workdir)
        self._mirror = _BucketMirror(self.workdir) if self.is_main and storage.is_url(self.workdir) else None
        files = self._mirror.local if self._mirror else pathlib.Path(self.workdir)
        self.tensorboard_dir = str(files / "tensorboard")
        if self.is_main:
            files.mkdir(parents=True, exist_ok=True)
            _start_history_at(files / METRICS_FILE, initial_step)
        self._writer = metric_writers.create_default_writer(
            self.tensorboard_dir, just_logging=not self.is_main, asynchronous=True)
        self._jsonl = open(files / METRICS_FILE, "a") if self.is_main else None
        self.sync()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, unit="step",
                        disable=not self.is_main, dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self._writer.write_scalars(step, {k: v for k, v in clean.items() if math.isfinite(v)})
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        shown = {k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "val_perplexity", "val_metric", "lr")}
        self.bar.set_postfix(shown, refresh=False)
        if self._mirror and self._mirror.due():
            self.sync()

    def sync(self) -> None:
        """On a bucket workdir, copy the metrics and event files written so far up to it; elsewhere nothing."""
        if self._mirror:
            self._writer.flush()
            self._mirror.upload()

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.is_main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self._writer.flush()
        self._writer.close()
        if self._jsonl:
            self._jsonl.close()
        if self._mirror:
            self._mirror.upload()
            self._mirror.discard()


class _BucketMirror:
    """A local folder standing in for a bucket workdir's metrics and event files, copied up whole on `upload`.

    Opening it copies down metrics.jsonl and metrics.superseded.jsonl, whose history a resumed run
    continues. `upload` writes the superseded file before metrics.jsonl, as on a disk, so a kill
    between the two loses no record, and then each event or profile file that changed.
    """

    def __init__(self, workdir: storage.Path):
        self.workdir = workdir
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="gpt1_jax-metrics-"))
        self._sent: dict[pathlib.Path, tuple[int, int]] = {}
        self._last = 0.0
        try:
            for name in (SUPERSEDED_FILE, METRICS_FILE):
                if (workdir / name).exists():
                    (self.local / name).write_bytes((workdir / name).read_bytes())
                    self._sent[self.local / name] = self._stamp(self.local / name)
        except OSError as err:
            raise storage.explain(err, workdir / METRICS_FILE, "read") from err

    @staticmethod
    def _stamp(file: pathlib.Path) -> tuple[int, int]:
        stat = file.stat()
        return stat.st_size, stat.st_mtime_ns

    def due(self) -> bool:
        return time.monotonic() - self._last >= UPLOAD_EVERY_S

    def upload(self) -> None:
        ordered = [self.local / SUPERSEDED_FILE, self.local / METRICS_FILE,
                   *sorted(p for p in (self.local / "tensorboard").rglob("*") if p.is_file())]
        for file in ordered:
            if not file.is_file() or self._sent.get(file) == self._stamp(file):
                continue
            stamp = self._stamp(file)
            target = self.workdir / file.relative_to(self.local).as_posix()
            try:
                storage.write_whole(target, file.read_bytes())
            except OSError as err:
                raise storage.explain(err, target, "write") from err
            self._sent[file] = stamp
        self._last = time.monotonic()

    def discard(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl` in order; a last line cut short by a kill is skipped with a warning."""
    path = storage.path(workdir) / METRICS_FILE
    lines = _records(path, path.read_bytes().decode(errors="replace"))
    if lines and lines[-1][2] is None:
        log.warning("%s:%d: skipped the last line, which is not a complete record (cut short by a kill?): %.80r",
                    path, lines[-1][0], lines[-1][1])
    return [record for _, _, record in lines if record is not None]


def _records(path: storage.Path | pathlib.Path, text: str) -> list[tuple[int, str, dict | None]]:
    """(line number, line, record) of each non-blank line of `text`, the contents of `path`.

    A line that is not a JSON object with an integer "step" raises MetricsError naming file:line,
    unless it is the last one (its record is then None): a kill during a write leaves at most that
    one incomplete.
    """
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    parsed = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            if number != lines[-1][0]:
                raise MetricsError(f"{path}:{number}: not a metrics record ({line[:80]!r}); every line should be a "
                                   "JSON object with a \"step\". Repair or delete that line.")
            record = None
        parsed.append((number, line, record))
    return parsed


def _start_history_at(path: pathlib.Path, step: int) -> None:
    """Move the records of steps after `step` (and a cut-short last line) from `path` to SUPERSEDED_FILE.

    They come from an earlier attempt that got further than the checkpoint this run resumes from;
    the new values of those steps follow. The moved lines are appended verbatim under a header line
    saying when and why, before `path` is replaced in one rename, so a kill at any point loses no line.
    """
    if not path.is_file():
        return
    text = path.read_bytes().decode(errors="replace")
    lines = _records(path, text)
    moved = [(number, line, record) for number, line, record in lines if record is None or record["step"] > step]
    if not moved and text.endswith("\n"):
        return
    superseded = path.with_name(SUPERSEDED_FILE)
    if moved:
        header = {"superseded_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "restart_step": step, "lines": len(moved)}
        with open(superseded, "a") as side:
            side.write("\n".join([json.dumps(header), *(line for _, line, _ in moved)]) + "\n")
            side.flush()
            os.fsync(side.fileno())
    partial = path.with_name(METRICS_FILE + ".partial")
    kept = [line for _, line, record in lines if record is not None and record["step"] <= step]
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)
    stale = sorted(record["step"] for _, _, record in moved if record is not None)
    if stale:
        log.warning("%s records steps %d-%d, past the step %d this run %s: their checkpoints are gone (the run was "
                    "stopped before saving them, or they were deleted or unusable). Those %d records are moved to %s "
                    "and training repeats the steps.", path, stale[0], stale[-1], step,
                    "resumes from" if step else "starts from (no checkpoint is left)", len(stale), superseded)
    if moved and moved[-1][2] is None:
        log.warning("%s:%d: the last line was cut short (a kill during a write?); moved to %s.", path, moved[-1][0],
                    superseded)

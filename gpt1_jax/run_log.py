"""Metrics to TensorBoard event files and a JSON-lines file, and a progress bar with ETA.

Only process 0 writes files (the other processes of a multi-host run compute the same global
values); every process may show a bar, but only process 0 does by default.

metrics.jsonl holds one history: a run (re)started at step s moves the records of steps after s,
written by an earlier attempt whose checkpoints are gone (a kill before the next save, deleted or
unusable checkpoints), to metrics.superseded.jsonl, so no step has two values from two attempts.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib

import jax
from clu import metric_writers
from tqdm import tqdm

from gpt1_jax.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"


class MetricsError(UserError, ValueError):
    """A line of metrics.jsonl that is not a metrics record (other than a last line cut short by a kill)."""


class RunLog:
    """Writes scalar metrics for a step to `workdir/metrics.jsonl` and `workdir/tensorboard/`.

    Opened at `initial_step` (the step the run resumes from), it first moves the records of later
    steps out of metrics.jsonl, so the steps about to be trained again are logged once.
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int, description: str):
        self.is_main = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        if self.is_main:
            _start_history_at(self.workdir / METRICS_FILE, initial_step)
        self._writer = metric_writers.create_default_writer(
            str(self.workdir / "tensorboard"), just_logging=not self.is_main, asynchronous=True)
        self._jsonl = open(self.workdir / METRICS_FILE, "a") if self.is_main else None
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


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl` in order; a last line cut short by a kill is skipped with a warning."""
    path = pathlib.Path(workdir) / METRICS_FILE
    lines = _records(path, path.read_text(errors="replace"))
    if lines and lines[-1][2] is None:
        log.warning("%s:%d: skipped the last line, which is not a complete record (cut short by a kill?): %.80r",
                    path, lines[-1][0], lines[-1][1])
    return [record for _, _, record in lines if record is not None]


def _records(path: pathlib.Path, text: str) -> list[tuple[int, str, dict | None]]:
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
    text = path.read_text(errors="replace")
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

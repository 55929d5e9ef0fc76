"""Metrics to TensorBoard event files and a JSON-lines file, and a progress bar with ETA.

Only process 0 writes files (the other processes of a multi-host run compute the same global
values); every process may show a bar, but only process 0 does by default.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
from clu import metric_writers
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Writes scalar metrics for a step to `workdir/metrics.jsonl` and `workdir/tensorboard/`."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int, description: str):
        self.is_main = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
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
    path = pathlib.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""What would make a run fit on a slice, each candidate checked by compiling it.

Three levers, in the order a user should reach for them (cheapest in speed first):
1. `mesh.fsdp`: shard parameters and Adam's moments over more chips (all-gathers and reduce-scatters
   in exchange); the smallest divisor of the chip count that fits.
2. `model.remat`: recompute activations in the backward pass instead of keeping them: "dots" keeps
   every matmul's output, "dots_no_batch" only the weight matmuls', "full" nothing.
3. `train.grad_accum_steps`: fewer sequences per chip at a time, the global batch (and so the
   run's numbers) unchanged; the smallest count that fits.
`suggestions` tries each lever alone; `search` tries them in that order, each on top of the previous
lever at its strongest setting, and returns the first config that fits. Only the steps that did not fit
are compiled again, and each candidate once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Iterator

from ml_collections import ConfigDict

from gpt1_jax.aot import slices, steps

log = logging.getLogger(__name__)

LEVERS = ("mesh.fsdp", "model.remat", "train.grad_accum_steps")
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # from the most activations kept to none


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A change to the run's config and what it needs per chip (the most of the steps compiled)."""

    changes: tuple[tuple[str, object], ...]  # (config key, value)
    total_bytes: int
    fits: bool

    def flags(self) -> str:
        return " ".join(f"--config.{key}={value}" for key, value in self.changes)


class FitSearch:
    """Candidates for one run on one slice, compiled on demand and remembered."""

    def __init__(self, report: steps.CompileReport, config: ConfigDict):
        self.config, self.tpu = config, report.slice
        self.failing = tuple(step.name for step in report.steps if not step.fits)
        self.baseline_bytes = max(step.memory.total for step in report.steps if not step.fits)
        self._seen: dict[tuple, Candidate] = {}

    def values(self, lever: str) -> list:
        """The settings of `lever` beyond the run's own, from the weakest to the strongest."""
        batch, accum = self.config.train.batch_size, self.config.train.grad_accum_steps
        if lever == "mesh.fsdp":
            return [n for n in range(self.config.mesh.fsdp + 1, self.tpu.chips + 1) if self.tpu.chips % n == 0]
        if lever == "model.remat":
            return list(REMAT_ORDER[REMAT_ORDER.index(self.config.model.remat) + 1:])
        per_chip = batch // self.tpu.chips
        return [n for n in range(accum + 1, per_chip + 1) if per_chip % n == 0]

    def try_changes(self, changes: tuple[tuple[str, object], ...]) -> Candidate:
        if changes not in self._seen:
            config = copy.deepcopy(self.config)
            for key, value in changes:
                section, name = key.split(".")
                config[section][name] = value
            with _only_our_progress():
                report = steps.compile_for_topology(config, self.tpu, only=self.failing)
            total = max(step.memory.total for step in report.steps)
            self._seen[changes] = Candidate(changes, total, report.fits)
            log.info("%s: %.2f GiB per chip, %s", " ".join(f"{k}={v}" for k, v in changes), total / slices.GiB,
                     "fits" if report.fits else "does not fit")
        return self._seen[changes]

    def smallest(self, lever: str, base: tuple[tuple[str, object], ...] = ()) -> Candidate | None:
        """The weakest setting of `lever` (on top of `base`) that fits, None when none does."""
        for value in self.values(lever):
            candidate = self.try_changes((*base, (lever, value)))
            if candidate.fits:
                return candidate
        return None

    def suggestions(self) -> dict[str, Candidate | None]:
        """Each lever alone: {lever: the weakest setting that fits, or None}."""
        return {lever: self.smallest(lever) for lever in LEVERS}

    def search(self) -> Candidate | None:
        """The first config that fits: each lever alone in order, then together, each at its strongest setting
        that helped under the next one (fsdp, then remat on top, then accumulation on both)."""
        for lever in LEVERS:
            found = self.smallest(lever)
            if found is not None:
                return found
        base: tuple[tuple[str, object], ...] = ()
        for lever in LEVERS:
            found = self.smallest(lever, base) if base else None
            if found is not None:
                return found
            strongest = self.values(lever)[-1:]
            if strongest and self.try_changes((*base, (lever, strongest[0]))).total_bytes < self._total(base):
                base = (*base, (lever, strongest[0]))
        return None

    def _total(self, changes: tuple[tuple[str, object], ...]) -> int:
        return self.try_changes(changes).total_bytes if changes else self.baseline_bytes


@contextlib.contextmanager
def _only_our_progress() -> Iterator[None]:
    """Keeps each candidate to its one line: the config checks and checkpoint reads it repeats say nothing new."""
    quiet = [logging.getLogger(name) for name in ("absl", "gpt1_jax.finetuning.finetune", "gpt1_jax.aot.steps")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)

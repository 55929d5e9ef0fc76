"""The best parameters of a fine-tuning run by its dev metric: kept in `best/`, remembered in every checkpoint.

The paper reports a run's best dev score, and the test predictions come from those parameters. `best/` holds
them with their record (primary score, step, epoch, every dev score). The record also travels in the metadata
of each rolling checkpoint (`BEST_KEY`), so a run resumed after `best/` was deleted still knows its best: it
rebuilds `best/` from `checkpoints/` when that step is still there. When that step is gone too, the run says so,
keeps the best of its later evaluations in `best/` and records the lost one with it (`lost_best`, also in
results.json), so no later, worse step is ever reported as the best of the run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gpt1_jax import storage
from gpt1_jax.training import checkpoint

log = logging.getLogger(__name__)

BEST_KEY = "best"  # metadata key of the best record, in best/ and in every rolling checkpoint


class BestCheckpoint:
    """`best/` of a fine-tuning workdir and the record of the best evaluation so far.

    `metadata` is the dict the loop saves with every rolling checkpoint: the record is written into it, so
    each checkpoint carries the best known at its step.
    """

    def __init__(self, workdir: storage.Path, rolling: checkpoint.TrainCheckpointer, metadata: dict[str, Any],
                 abstract_state):
        self.directory = workdir / "best"
        self._checkpointer = checkpoint.TrainCheckpointer(self.directory, keep=1, async_save=False)
        self._metadata = metadata
        self._abstract = abstract_state  # the run's TrainState of shapes, dtypes and shardings
        self.record: dict | None = None
        self.lost: dict | None = None  # the record of a best whose parameters no folder holds any more
        if self._checkpointer.steps():
            self.record = self._checkpointer.metadata(self._checkpointer.steps()[-1]).get(BEST_KEY)
        elif rolling.resumed_step is not None:
            self._recover(rolling)
        if self.record is not None:
            self.lost = self.record.get("lost_best")
        metadata[BEST_KEY] = self.record

    def _recover(self, rolling: checkpoint.TrainCheckpointer) -> None:
        """`best/` is empty on resume: rebuild it from the step the last checkpoint names, or say it is lost."""
        record = rolling.metadata(rolling.resumed_step).get(BEST_KEY)
        if record is None:
            return
        step = record["step"]
        if step in rolling.steps():
            self._save(step, rolling.restore_params(step, self._abstract.params), record)
            log.warning("%s was missing: rebuilt it from %s (step %d, the best dev score so far).",
                        self.directory, rolling.directory / str(step), step)
            return
        self.lost = record
        log.warning("%s is missing and step %d, the best so far (dev %s %.4f), is no longer in %s: its parameters "
                    "are gone. The run goes on and keeps the best of its later evaluations for the predictions; "
                    "results.json records the lost one as `lost_best`. To get them back, rerun with "
                    "--config.start_over=True.", self.directory, step, record.get("metric", "score"), record["primary"],
                    rolling.directory)

    def offer(self, step: int, params, scores: dict[str, dict[str, float]], split: str, metric: str,
              epoch: float) -> bool:
        """Keep `params` when `scores[split][metric]` beats the best so far; True when it did."""
        primary = scores[split][metric]
        if self.record is not None and primary <= self.record["primary"]:
            return False
        lost = {"lost_best": self.lost} if self.lost else {}
        self._save(step, params, {"primary": primary, "metric": metric, "step": step, "epoch": epoch,
                                  "dev": scores, **lost})
        return True

    def _save(self, step: int, params, record: dict) -> None:
        self.record = record
        self._metadata[BEST_KEY] = record
        self._checkpointer.save(step, params, {"step": np.asarray(step, np.int32)}, self._metadata)

    def restore(self):
        """The best parameters, for the predictions; a CheckpointError saying why when there are none."""
        if self.record is None:
            lost = (f" The best (step {self.lost['step']}) was lost with it, and no evaluation since has been kept."
                    if self.lost else "")
            raise checkpoint.CheckpointError(
                f"{self.directory} holds no best checkpoint, so no test predictions can be written.{lost} Rerun "
                "with --config.start_over=True to fine-tune again.")
        step, params, _ = self._checkpointer.restore_latest(self._abstract.params, {"step": self._abstract.step})
        if step is None:
            raise checkpoint.CheckpointError(
                f"The best checkpoint in {self.directory} is unusable (set aside, see the warning above), so the "
                f"predictions of its step cannot be written; rerun with --config.start_over=True to fine-tune again.")
        return params

    def close(self) -> None:
        self._checkpointer.close()

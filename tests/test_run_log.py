"""gpt1_jax/run_log.py: metrics.jsonl and TensorBoard event files of a run, read back as written."""

import json
import math

import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from gpt1_jax.run_log import METRICS_FILE, RunLog, read_metrics


def log_steps(workdir, steps: dict[int, dict], *, initial_step: int = 0) -> None:
    """One RunLog from open to close, as a (possibly resumed) run uses it."""
    run_log = RunLog(workdir, total_steps=10, initial_step=initial_step, description="test")
    for step, metrics in steps.items():
        run_log.write(step, metrics)
        run_log.advance()
    run_log.close()


def tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    """Every scalar in the event files under workdir/tensorboard, as TensorBoard itself reads them."""
    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
            for tag in events.Tags()["tensors"]}


def test_metrics_jsonl_has_one_line_per_step_and_read_metrics_returns_them(tmp_path):
    # Values arrive as device scalars and numpy floats from the step; they are written as plain floats.
    log_steps(tmp_path, {1: {"loss": jnp.asarray(2.5), "lr": np.float32(0.25)}, 2: {"loss": 1.5, "lr": 0.5}})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.5, "lr": 0.25},
                                                    {"step": 2, "loss": 1.5, "lr": 0.5}]
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "lr": 0.25}, {"step": 2, "loss": 1.5, "lr": 0.5}]


def test_scalars_reach_tensorboard_event_files_under_the_workdir(tmp_path):
    log_steps(tmp_path, {1: {"loss": 2.5}, 2: {"loss": 1.5, "val_perplexity": 40.0}})
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert tensorboard_scalars(tmp_path) == {"loss": {1: 2.5, 2: 1.5}, "val_perplexity": {2: 40.0}}


def test_non_finite_values_are_kept_in_the_jsonl_but_not_sent_to_tensorboard(tmp_path):
    log_steps(tmp_path, {1: {"loss": 2.5}, 2: {"loss": math.nan, "grad_norm": math.inf}, 3: {"loss": 1.5}})
    logged = read_metrics(tmp_path)
    assert math.isnan(logged[1]["loss"]) and logged[1]["grad_norm"] == math.inf
    assert tensorboard_scalars(tmp_path) == {"loss": {1: 2.5, 3: 1.5}}


def test_a_resumed_run_appends_to_the_metrics_of_the_first(tmp_path):
    log_steps(tmp_path, {1: {"loss": 3.0}, 2: {"loss": 2.5}})
    log_steps(tmp_path, {3: {"loss": 2.0}}, initial_step=2)
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert tensorboard_scalars(tmp_path) == {"loss": {1: 3.0, 2: 2.5, 3: 2.0}}

"""gpt1_jax/training/run_log.py: metrics.jsonl and TensorBoard event files of a run, read back as written, one history
across restarts."""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from gpt1_jax.training.run_log import METRICS_FILE, SUPERSEDED_FILE, MetricsError, RunLog, read_metrics


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


def test_a_restart_before_the_last_logged_step_moves_the_later_records_aside_and_logs_each_step_once(tmp_path,
                                                                                                       caplog):
    """A kill after step 6 was logged but step 3 was the last checkpoint, or checkpoints deleted under a run."""
    log_steps(tmp_path, {step: {"loss": 10.0 - step} for step in range(1, 7)})
    first_attempt = (tmp_path / METRICS_FILE).read_text().splitlines()
    with caplog.at_level("WARNING"):
        log_steps(tmp_path, {step: {"loss": 20.0 - step} for step in range(4, 8)}, initial_step=3)
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0),
                                                                        (5, 15.0), (6, 14.0), (7, 13.0)]
    header, *moved = (tmp_path / SUPERSEDED_FILE).read_text().splitlines()
    assert moved == first_attempt[3:]  # nothing lost: the superseded lines, verbatim
    assert json.loads(header)["restart_step"] == 3
    assert "records steps 4-6, past the step 3 this run resumes from" in caplog.text
    with caplog.at_level("WARNING"):
        log_steps(tmp_path, {1: {"loss": 1.0}})  # every checkpoint gone: a new history from step 0
    assert "records steps 1-7, past the step 0 this run starts from (no checkpoint is left)" in caplog.text
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_a_last_line_cut_short_by_a_kill_is_skipped_with_a_warning_and_moved_aside_on_resume(tmp_path, caplog):
    log_steps(tmp_path, {1: {"loss": 3.0}, 2: {"loss": 2.5}})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "lo')  # killed in the middle of a write
    with caplog.at_level("WARNING"):
        assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    assert f"{tmp_path / METRICS_FILE}:3: skipped the last line" in caplog.text
    log_steps(tmp_path, {3: {"loss": 2.0}}, initial_step=2)  # appends after a clean line end, not onto the stub
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert (tmp_path / SUPERSEDED_FILE).read_text().splitlines()[1:] == ['{"step": 3, "lo']


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    log_steps(tmp_path, {1: {"loss": 3.0}, 2: {"loss": 2.5}})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    (tmp_path / METRICS_FILE).write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(MetricsError, match=rf"{re.escape(str(tmp_path / METRICS_FILE))}:2: not a metrics record"):
        read_metrics(tmp_path)

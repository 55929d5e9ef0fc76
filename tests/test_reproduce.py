"""gpt1-reproduce: one command per task, a queue that survives a stop and a failed task, the report at the end.

The end-to-end tests run the real queue (`python -m gpt1_jax.reproduce`) over tiny fine-tuning runs of WNLI (the
smallest task) and RTE: each task is a train.py process, which is most of their time (its imports alone take
~10-25 s on a 2-core machine).
"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from gpt1_jax import reproduce
from pretrain_helpers import REPO

TINY = ["--init=", "--preset", "tiny", "--config.data.task_source=local", "--config.finetune.max_train_examples=48",
        "--config.train.log_every=1", "--config.checkpoint.async_save=False"]


def queue_command(workdir: pathlib.Path, tasks: str) -> list[str]:
    return [sys.executable, "-m", "gpt1_jax.reproduce", "--workdir", str(workdir), "--tasks", tasks, *TINY]


def start(command: list[str], out: pathlib.Path, env: dict | None = None) -> subprocess.Popen:
    """The queue in its own session, so that a test can end it and its task together whatever happens."""
    with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr,
                                start_new_session=True)


def finish(queue: subprocess.Popen, out: pathlib.Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a queue started with `start`; killed with its task if it hangs."""
    try:
        status = queue.wait(timeout=600)
    finally:
        if queue.poll() is None:
            os.killpg(queue.pid, signal.SIGKILL)
    return status, out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def wait_for_a_logged_step(workdir: pathlib.Path, queue: subprocess.Popen) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert queue.poll() is None, f"the queue ended before {workdir.name} logged a step"
        assert time.monotonic() < deadline, f"{workdir.name} logged no step in 600 s"
        time.sleep(0.05)


def test_dry_run_prints_one_runnable_command_per_task_and_runs_nothing(tmp_path, capsys):
    workdir = tmp_path / "tables"
    reproduce.main(["--workdir", str(workdir), "--tasks", "wnli,race/all", "--dry_run", *TINY])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not workdir.exists()
    commands = [shlex.split(line) for line in lines]
    assert all(command[:3] == [sys.executable, "-m", "gpt1_jax.train_cli"] for command in commands)
    assert commands[1][commands[1].index("--workdir") + 1] == str(workdir / "race-all")
    assert "--config.task=race/all" in commands[1] and "--config.finetune.max_train_examples=48" in commands[1]


@pytest.mark.parametrize("argv, named", [
    (["--tasks", "sst2,sst3"], "unknown --tasks sst3: use all, snli"),
    (["--config.finetune.max_train_exampls=3"], "nearest valid key: finetune.max_train_examples"),
    (["--config.task=rte"], "use --tasks"),
    (["--config.finetune.epochs"], "write --config.KEY=VALUE"),
])
def test_a_bad_command_line_is_one_line_before_any_task_starts(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--init=", "--workdir", str(tmp_path / "tables"), *argv])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err and not (tmp_path / "tables").exists()


@pytest.mark.slow
def test_a_stopped_queue_reruns_skipping_the_finished_task_and_resuming_the_stopped_one(tmp_path, capsys):
    workdir = tmp_path / "tables"
    reproduce.main(["--workdir", str(workdir), "--tasks", "wnli,rte", "--dry_run", *TINY])
    printed = capsys.readouterr().out.splitlines()
    queue = start(queue_command(workdir, "wnli,rte"), tmp_path / "first")
    try:
        wait_for_a_logged_step(workdir / "rte", queue)
        queue.send_signal(signal.SIGTERM)  # to the queue alone: it passes the stop on to rte's train.py
    finally:
        status, _, err = finish(queue, tmp_path / "first")
    assert status == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM during rte. Rerun the same command" in err
    assert not (workdir / "rte" / "results.json").exists()
    wnli_results = workdir / "wnli" / "results.json"
    finished_at = wnli_results.stat().st_mtime_ns

    status, out, err = finish(start(queue_command(workdir, "wnli,rte"), tmp_path / "second"), tmp_path / "second")
    assert status == 0, err[-3000:]
    assert "[1/2] wnli: finished before" in err and "[2/2] rte: resuming" in err
    assert wnli_results.stat().st_mtime_ns == finished_at
    log = (workdir / "rte" / "reproduce.log").read_text()
    assert "Resumed from step" in log
    assert [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("--- ")] == [printed[1]] * 2
    rows = {row.split(" | ")[1] for row in table_rows(out)}
    assert rows == {"wnli", "rte"} and (workdir / "report.md").read_text() == out
    assert {path.name for path in (workdir / "plots").iterdir()} == {"wnli.png", "rte.png"}


def data_root_with_a_bad_rte_training_file(data_root: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
    """A data root of links to the real folders, but for RTE's train.tsv, whose third row has an unknown label."""
    (copy / "glue").mkdir(parents=True)
    for folder in data_root.iterdir():
        if folder.name != "glue":
            (copy / folder.name).symlink_to(folder)
    for folder in (data_root / "glue").iterdir():
        if folder.name != "RTE":
            (copy / "glue" / folder.name).symlink_to(folder)
    rte = copy / "glue" / "RTE"
    rte.mkdir()
    for name in ("dev.tsv", "test.tsv"):
        (rte / name).symlink_to(data_root / "glue" / "RTE" / name)
    lines = (data_root / "glue" / "RTE" / "train.tsv").read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:3] + ["maybe"])
    (rte / "train.tsv").write_text("\n".join(lines) + "\n")
    return copy


@pytest.mark.slow
def test_a_task_that_fails_on_bad_data_is_reported_while_the_next_one_finishes(tmp_path, data_root):
    broken = data_root_with_a_bad_rte_training_file(data_root, tmp_path / "data")
    workdir = tmp_path / "tables"
    status, out, err = finish(start(queue_command(workdir, "rte,wnli"), tmp_path / "queue",
                                    env={"GPT1_JAX_DATA": str(broken)}), tmp_path / "queue")
    assert status == reproduce.FAILED_STATUS, err[-3000:]
    failure = [line for line in err.splitlines() if line.startswith("rte failed")]
    assert failure and "(exit status 2): error: " in failure[0] and "train.tsv:4: label 'maybe'" in failure[0]
    assert f"its output: {workdir / 'rte' / 'reproduce.log'}" in err
    assert json.loads((workdir / "wnli" / "results.json").read_text())["task"] == "wnli"
    assert [row.split(" | ")[1] for row in table_rows(out)] == ["wnli"]


def table_rows(report: str) -> list[str]:
    """The rows of the report's table: after its header and rule, before the starting points under it."""
    return [line for line in report.splitlines()[2:] if line.startswith("|")]
